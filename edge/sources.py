"""What a monitor streams: a WFDB record or simulated patients as ``MonitorStream``s (500 Hz
mV, with the int16 resolution that replays a record losslessly). ``panorama monitor``
(``edge/monitor.py``) streams them; the demo and the benchmark build them too."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import wfdb

from panorama.geometry import STANDARD_12, canonical_lead_name, inverted_lead_name
from panorama.records import MODEL_FS, UNIT_TO_MV, read_record, record_base, screen_leads

log = logging.getLogger(__name__)

DEFAULT_SCALE_MV = 0.001  # 1 µV per count: int16 covers ±32.8 mV
SIM_SECONDS = 30.0  # a simulated patient's strip when --duration does not say (it loops with --loop)


@dataclass
class MonitorStream:
    """One patient's signals, ready to stream."""

    monitor_id: str
    patient_id: str
    leads: list[str]
    signals: np.ndarray  # (L, T) float32 mV at fs
    scale_mv: float = DEFAULT_SCALE_MV  # int16 resolution
    fs: float = MODEL_FS

    def __post_init__(self):
        self.signals = np.asarray(self.signals, dtype=np.float32)
        if self.signals.ndim != 2 or self.signals.shape[0] != len(self.leads) or self.signals.shape[1] == 0:
            raise ValueError(f"{self.monitor_id}/{self.patient_id}: signals must be (n_leads={len(self.leads)}, "
                             f"n_samples > 0), got {self.signals.shape}")
        if not self.scale_mv > 0:
            raise ValueError(f"{self.monitor_id}/{self.patient_id}: scale_mv must be positive, got {self.scale_mv}")



# what the daemon makes of a lead the whole-record screen flags (it judges each window)
_DAEMON_DOES = {
    "not in mV (check the units)": "the daemon finds each window implausible and leaves them out",
    "flat": "the daemon leaves them out (no_signal if none is left)",
    "missing": "the daemon leaves them out (no_signal if none is left)",
    "saturated": "the daemon leaves them out of the windows where they sit at the rail",
    "missing samples": "the daemon leaves them out of the windows whose output a hole reaches (a hole of up to "
                       "256 samples only in a window's context or lookahead is bridged)",
    "noise-only": "the daemon cannot tell noise from ECG by the window and draws from them: expect poor views",
}


def adc_resolution_mv(path: str | Path, leads: list[str]) -> float | None:
    """mV per ADC count shared by ``leads`` of a WFDB record, or None when they differ."""
    header = wfdb.rdheader(str(record_base(path)))
    res = {}
    for name, gain, unit in zip(header.sig_name or [], header.adc_gain or [], header.units or []):
        canon = canonical_lead_name(name) or inverted_lead_name(name)
        factor = UNIT_TO_MV.get((unit or "mV").strip().lower())
        if canon in leads and canon not in res and gain and factor:
            res[canon] = factor / float(gain)
    values = [res.get(n) for n in leads]
    if None in values or not np.allclose(values, values[0], rtol=1e-9, atol=0):
        return None
    return float(values[0])


def record_stream(path: str | Path, monitor_id: str = "bed", patient_id: str | None = None,
                  leads: list[str] | None = None) -> MonitorStream:
    """A WFDB record as a stream: resampled to 500 Hz, int16 scale = its ADC resolution when
    uniform across ``leads`` and the signal fits int16 at it, else 1 µV."""
    rec = read_record(path, leads=leads, fs=MODEL_FS)
    if rec.unrecognised and leads is None:
        log.warning("%s: header labels that name no known lead, not streamed: %s", rec.name,
                    ", ".join(rec.unrecognised))
    flags: dict[str, list[str]] = {}
    for n, f in zip(rec.leads, screen_leads(rec.signals, MODEL_FS)):
        if f != "ok":
            flags.setdefault(f, []).append(n)
    if flags:  # sent as recorded: the daemon judges each window, but the cause is best said here
        log.warning("%s: %s", rec.name, "; ".join(f"{','.join(names)} {f}: {_DAEMON_DOES.get(f, 'check them')}"
                                                  for f, names in flags.items()))
    scale = adc_resolution_mv(path, rec.leads)
    peak = float(np.nanmax(np.abs(rec.signals))) if np.isfinite(rec.signals).any() else 0.0
    if scale is None:
        log.info("%s: leads have different ADC resolutions; int16 at 1 µV", rec.name)
        scale = DEFAULT_SCALE_MV
    elif peak / scale > 32767:
        log.info("%s: peak %.1f mV exceeds int16 at its ADC resolution %g mV; int16 at 1 µV", rec.name, peak, scale)
        scale = DEFAULT_SCALE_MV
    return MonitorStream(monitor_id, patient_id or rec.name, rec.leads, rec.signals, scale)


def sim_streams(n: int, seed: int = 0, monitor_id: str = "bed", seconds: float = SIM_SECONDS,
                leads: list[str] | None = None, device: str = "diagnostic") -> list[MonitorStream]:
    """``n`` simulated patients (seeds seed, seed + 1, ...) named sim-000, sim-001, ...;
    the 12 standard leads unless ``leads`` names others (any view, e.g. V7 or 120:45)."""
    from training.simulator import simulate

    views = leads or list(STANDARD_12)
    out = []
    for i in range(n):
        sim = simulate(seed + i, views, duration_s=seconds, fs=MODEL_FS, device=device)
        out.append(MonitorStream(monitor_id, f"sim-{i:03d}", sim.names, sim.signals))
    return out
