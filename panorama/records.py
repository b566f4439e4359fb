"""Reading and writing ECG records (WFDB, through the ``wfdb`` package).

Every record is turned into one canonical form: float32 millivolts, shape (leads, samples),
canonical lead names (see ``geometry.canonical_lead_name``), resampled to the model rate.

wfdb and scipy are imported by the functions that read, write or resample: calibration and
the lead-quality checks (all an edge device needs from here) work without them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import RecordError
from .geometry import NOT_QUITE, canonical_lead_name, inverted_lead_name

log = logging.getLogger(__name__)

MODEL_FS = 500  # Hz: the rate every model and metric works at
FLAT_STD_MV = 0.01  # the evaluation protocol's lead-off threshold (data README)
MIN_FS = 50.0  # Hz: below this a recording cannot hold a QRS complex (the wire protocol's min_fs too)
MIN_RECORD_S = 1.0  # a beat at least: shorter records hold nothing to synthesise from
RAIL_SAMPLES = 25  # a lead pinned at its extreme this often is at least at a rail (the daemon's window test too)

UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nu": None,
              "millivolt": 1.0, "millivolts": 1.0, "microvolt": 1e-3, "microvolts": 1e-3, "volt": 1e3, "volts": 1e3}


@dataclass
class Record:
    """One ECG record in canonical form."""

    name: str
    signals: np.ndarray  # (leads, samples) float32 mV
    leads: list[str]
    fs: float
    source: str = ""
    comments: list[str] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)  # header labels no lead name matched: not read

    @property
    def seconds(self) -> float:
        return self.signals.shape[1] / self.fs

    def lead(self, name: str) -> np.ndarray:
        try:
            return self.signals[self.leads.index(name)]
        except ValueError:
            raise RecordError(f"{self.name}: no lead {name!r} (has {', '.join(self.leads)})") from None

    def has(self, names) -> bool:
        return all(n in self.leads for n in names)


def record_base(path: str | Path) -> Path:
    """The WFDB base path (no extension) for ``rec``, ``rec.hea`` or ``rec.dat``."""
    p = Path(path)
    if p.suffix in (".hea", ".dat", ".mat"):
        p = p.with_suffix("")
    if not p.with_suffix(".hea").is_file():
        raise RecordError(f"no WFDB record at {path} (looked for {p.with_suffix('.hea')})")
    return p


def find_records(*paths: str | Path) -> list[Path]:
    """WFDB base paths for the given records and folders (folders searched recursively)."""
    found: list[Path] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            found.extend(sorted(h.with_suffix("") for h in p.rglob("*.hea")))
        else:
            found.append(record_base(p))
    if not found:
        raise RecordError(f"no WFDB records (*.hea) found in {', '.join(map(str, paths))}")
    return found


def _not_quite(labels: list[str]) -> str:
    """What to know of labels that look like a lead but are not one (MLII), as "; ..." or ""."""
    said = [NOT_QUITE[k] for k in dict.fromkeys(lab.strip().lower() for lab in labels) if k in NOT_QUITE]
    return "".join(f"; {s}" for s in said)


def _source_of(comments: list[str]) -> str:
    for c in comments:
        if c.lower().startswith("source:"):
            return c.split(":", 1)[1].strip()
    return ""


_BYTES_PER_SAMPLE = {"8": 1, "16": 2, "24": 3, "32": 4, "61": 2, "80": 1, "160": 2, "212": 1.5, "310": 4 / 3,
                     "311": 4 / 3}


def _short_file(base: Path, header) -> str:
    """Why a signal file could not be read when it is shorter than its header says (a
    truncated copy or download), else ""."""
    files, fmts = set(header.file_name or []), set(header.fmt or [])
    if len(files) != 1 or len(fmts) != 1 or not header.sig_len or fmts.pop() not in _BYTES_PER_SAMPLE:
        return ""
    path = base.parent / files.pop()
    width = _BYTES_PER_SAMPLE[header.fmt[0]] * header.n_sig
    try:
        offset = max((b or 0 for b in header.byte_offset or []), default=0)
        have = int((path.stat().st_size - offset) / width)
    except (OSError, TypeError):
        return ""
    if have >= header.sig_len:
        return ""
    return (f"{path.name} holds {have} of the {header.sig_len} samples per lead its header says "
            f"({have / header.fs:.1f} of {header.sig_len / header.fs:.1f} s): truncated?")


def read_record(path: str | Path, leads: list[str] | None = None, fs: float | None = MODEL_FS) -> Record:
    """Read a WFDB record into canonical form.

    ``leads``: read only these canonical leads (all known ones when None); a named lead that
    the record lacks is an error. ``fs``: resample to this rate (None keeps the record's).
    """
    import wfdb

    base = record_base(path)
    try:
        header = wfdb.rdheader(str(base))
    except Exception as exc:  # wfdb raises bare ValueError/OSError for bad headers
        raise RecordError(f"{base}: unreadable WFDB header: {exc}") from exc
    labels = list(header.sig_name or [])
    names = [canonical_lead_name(n) or inverted_lead_name(n) for n in labels]
    sign = {i: -1.0 for i, lab in enumerate(labels) if canonical_lead_name(lab) is None and names[i] is not None}
    known = {n: i for i, n in enumerate(names) if n is not None and n not in names[:i]}
    if not known:
        raise RecordError(f"{base}: no known lead names in the header (found {', '.join(labels) or 'none'})"
                          + _not_quite(labels))
    twice = [n for n in known if names.count(n) > 1]
    if twice:
        said = "; ".join(f"{n} as " + ", ".join(repr(labels[i]) for i, m in enumerate(names) if m == n) for n in twice)
        raise RecordError(f"{base}: the header names a lead more than once ({said}); which signal is which "
                          "cannot be told, so fix the header")
    if not (header.fs and MIN_FS <= header.fs):
        raise RecordError(f"{base}: sampled at {header.fs} Hz; an ECG needs at least {MIN_FS:g} Hz")
    wanted = list(known) if leads is None else list(leads)
    missing = [n for n in wanted if n not in known]
    if missing:
        unknown = [lab for lab, n in zip(labels, names) if n is None]
        raise RecordError(f"{base}: lacks lead(s) {', '.join(missing)} (has {', '.join(known)}"
                          + (f"; labels not recognised: {', '.join(unknown)})" if unknown else ")")
                          + _not_quite(unknown))
    channels = [known[n] for n in wanted]
    try:
        rec = wfdb.rdrecord(str(base), channels=channels, physical=True)
    except Exception as exc:
        raise RecordError(f"{base}: unreadable WFDB signal file: {_short_file(base, header) or exc}") from exc
    if rec.p_signal is None or rec.p_signal.shape[0] == 0:
        raise RecordError(f"{base}: record holds no samples")
    if rec.p_signal.shape[0] < MIN_RECORD_S * rec.fs:
        n = rec.p_signal.shape[0]
        raise RecordError(f"{base}: record holds {n} samples ({n / rec.fs:.3g} s); at least {MIN_RECORD_S:g} s "
                          "(a beat) is needed")
    sig = rec.p_signal.T.astype(np.float64)
    for row, unit in enumerate(rec.units):
        factor = UNIT_TO_MV.get((unit or "mV").strip().lower())
        if factor is None:
            raise RecordError(f"{base}: lead {wanted[row]} has unknown units {unit!r} (expected mV, uV or V)")
        sig[row] *= factor * sign.get(channels[row], 1.0)  # -aVR is stored upside down: aVR as recorded
    record = Record(base.name, sig.astype(np.float32), wanted, float(rec.fs),
                    _source_of(rec.comments or []), list(rec.comments or []),
                    [lab for lab, n in zip(labels, names) if n is None])
    return resample(record, fs) if fs is not None else record


def resample(record: Record, fs: float) -> Record:
    """Polyphase resampling to ``fs``; NaN (missing samples) are kept as NaN regions."""
    from scipy.signal import resample_poly

    if fs <= 0:
        raise ValueError(f"sampling rate must be positive, got {fs}")
    if abs(record.fs - fs) < 1e-9:
        return record
    ratio = Fraction(fs / record.fs).limit_denominator(1000)
    sig = record.signals.astype(np.float64)
    nan = np.isnan(sig)
    # the filter pads with zeros: take each lead's median out first so the edges do not ring
    med = np.nanmedian(np.where(nan.all(axis=1, keepdims=True), 0.0, sig), axis=1, keepdims=True)
    out = resample_poly(np.where(nan, 0.0, sig - med), ratio.numerator, ratio.denominator, axis=1) + med
    if nan.any():  # carry missing regions across the rate change
        idx = np.minimum((np.arange(out.shape[1]) * record.fs / fs).astype(int), sig.shape[1] - 1)
        out[nan[:, idx]] = np.nan
    return Record(record.name, out.astype(np.float32), record.leads, float(fs), record.source, record.comments,
                  record.unrecognised)


def lead_quality(signals: np.ndarray, flat_std_mv: float = FLAT_STD_MV) -> list[str]:
    """One flag per lead: ``ok``, ``missing`` (mostly NaN), ``flat`` (std under the
    lead-off threshold) or ``saturated`` (pinned at its extreme for ≥ 2 % of samples and at
    least ``RAIL_SAMPLES``, as an amplifier at the rail is: a real trough quantised to 1 µV
    sits at its minimum for up to 11 samples in a row, ludb001's V6)."""
    flags = []
    for x in np.atleast_2d(signals):
        finite = x[np.isfinite(x)]
        if finite.size < 0.5 * x.size:
            flags.append("missing")
        elif finite.std(dtype=np.float64) < flat_std_mv:  # float64: huge samples must not overflow
            flags.append("flat")
        else:
            lo, hi = finite.min(), finite.max()
            pinned = max(np.sum(finite == lo), np.sum(finite == hi))
            flags.append("saturated" if pinned >= max(0.02 * finite.size, RAIL_SAMPLES) else "ok")
    return flags


NOISE_CORR = 0.3  # zero-lag |r| with every other lead below this: no shared waveform
NOISE_ENVELOPE_CORR = 0.4  # QRS-band energy envelopes correlating below this: no shared beats
MAX_SPAN_MV = 50.0  # a lead spanning more (0.1-99.9 percentiles) is not in mV: check the units
DC_WARN_MV = 10.0  # a lead whose median lies further from 0 was not high-passed (a DC-coupled amplifier)


def dc_offsets(x: np.ndarray, names: list[str]) -> dict[str, float]:
    """The leads of ``x`` whose median lies more than ``DC_WARN_MV`` from zero, with it (mV).
    The model expects high-passed leads, as a monitor's are: a lead's DC offset moves the
    views by 0.1-0.4 times it, and past about 30 mV bends their shape too (tens of µV)."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    with np.errstate(all="ignore"):  # np.median where every sample is finite: nanmedian is 10x slower on a window
        med = np.median(x, axis=1) if np.isfinite(x).all() else np.nanmedian(x, axis=1)
    return {n: float(m) for n, m in zip(names, med) if np.isfinite(m) and abs(m) > DC_WARN_MV}


def dc_warning(lead: str, mv: float) -> str:
    return (f"lead {lead} sits {mv:+.0f} mV from zero: inputs are expected high-passed (a monitor's 0.05 Hz "
            "filter, not a DC-coupled amplifier's raw samples); its views shift by 0.1-0.4 times that, and "
            "past about 30 mV their shape is off too")


def qrs_envelope(x: np.ndarray, fs: float) -> np.ndarray:
    """(leads, samples): each lead's 5-25 Hz energy smoothed over 100 ms, which peaks at every
    QRS whatever the lead's direction (numpy only: an FFT band-pass)."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    f = np.fft.rfftfreq(x.shape[1], 1 / fs)
    spec = np.fft.rfft(x - x.mean(axis=1, keepdims=True), axis=1)
    spec[:, (f < 5) | (f > 25)] = 0
    e = np.fft.irfft(spec, n=x.shape[1], axis=1) ** 2
    k = max(1, int(0.1 * fs))
    c = np.concatenate([np.zeros((len(x), 1)), np.cumsum(e, axis=1)], axis=1)
    return (c[:, k:] - c[:, :-k]) / k


def screen_leads(x: np.ndarray, fs: float) -> list[str]:
    """One flag per lead for a synthesis input or a per-patient fit: :func:`lead_quality`'s
    (``ok``, ``missing``, ``flat``, ``saturated``), ``missing samples`` where any sample is not
    finite, ``not in mV`` where a lead spans more than 50 mV (a record in µV labelled mV), and
    ``noise-only`` where a lead shares with no other usable lead either its waveform (zero-lag
    |r| under 0.3) or its beats (QRS-band energy envelopes correlating under 0.4). The
    envelope test is what keeps a real lead whose waveform is unlike the others' (V3 beside
    I and II): on 95 real records every lead's envelope correlated 0.59 or more with another's
    among I, II, V3, white noise's 0.35 at most."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    flags = [f if f != "ok" or np.isfinite(lead).all() else "missing samples" for f, lead in zip(lead_quality(x), x)]
    for i, lead in enumerate(x):
        if flags[i] == "ok" and np.subtract(*np.percentile(lead, [99.9, 0.1])) > MAX_SPAN_MV:
            flags[i] = "not in mV (check the units)"
    ok = [i for i, f in enumerate(flags) if f == "ok"]
    if len(ok) >= 2 and x.shape[1] >= fs:  # a second at least, for the envelopes to hold beats
        part = x[ok, :int(60 * fs)]  # a minute tells noise from ECG, in bounded memory whatever the length
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.nan_to_num(np.abs(np.corrcoef(part)))
            e = np.nan_to_num(np.corrcoef(qrs_envelope(part, fs)))
        np.fill_diagonal(c, 0)
        np.fill_diagonal(e, 0)
        for j, i in enumerate(ok):
            if c[j].max() < NOISE_CORR and e[j].max() < NOISE_ENVELOPE_CORR:
                flags[i] = "noise-only"
    return flags


def check_fit_window(x: np.ndarray, views: list, fs: float, purpose: str, inputs: list[str] | None = None) -> None:
    """The checks every per-patient fit (calibration, neighbour transfer, patient adaptation)
    makes of its recording: ``x`` (leads, samples) with one row per view, at the model rate;
    with ``inputs``, no lead named twice and every input among the views. ValueError if not."""
    if x.ndim != 2 or x.shape[0] != len(views):
        raise ValueError(f"expected ({len(views)}, samples) signals, got {x.shape}")
    if fs != MODEL_FS:
        raise ValueError(f"{purpose} runs at the model rate ({MODEL_FS} Hz); resample first (got {fs})")
    if inputs is None:
        return
    names = [v.name for v in views]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"lead(s) named more than once: {', '.join(twice)}")
    missing = [n for n in inputs if n not in names]
    if missing:
        raise ValueError(f"input lead(s) {', '.join(missing)} not among the recorded leads")


def write_record(out_dir: str | Path, name: str, signals: np.ndarray, leads: list[str], fs: float,
                 comments: list[str] | None = None, missing_ok: bool = False, start=None) -> Path:
    """Write float mV signals (leads, samples) as a WFDB format-16 record; returns its base path.

    Gains are chosen per lead so the full int16 range covers the signal (at least 1 µV resolution).
    With ``missing_ok``, NaN samples are written as WFDB's missing value (-32768, read back as NaN).
    ``start`` (a UTC ``datetime``): the record's base date and time.
    """
    import wfdb

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sig = np.ascontiguousarray(np.asarray(signals, dtype=np.float64).T)
    gone = np.isnan(sig) if missing_ok else np.zeros(sig.shape, dtype=bool)
    if not np.isfinite(sig[~gone]).all():
        raise ValueError(f"{name}: refusing to write non-finite samples")
    sig = np.where(gone, 0.0, sig)
    peak = np.maximum(np.abs(sig).max(axis=0), 1e-3)
    gain = np.minimum(np.floor(32000.0 / peak), 1000.0 * 32)  # ≥ 1 count per µV up to 1 V
    d_signal = np.where(gone, -32768, np.round(sig * gain)).astype(np.int16)
    # WFDB headers are ASCII text
    comments = [c.replace("°", " deg").replace("µ", "u").encode("ascii", "replace").decode()
                for c in comments or []]
    when = {} if start is None else {"base_time": start.time().replace(tzinfo=None), "base_date": start.date()}
    wfdb.wrsamp(name, fs=float(fs), units=["mV"] * len(leads), sig_name=list(leads),
                d_signal=d_signal, fmt=["16"] * len(leads), adc_gain=gain.tolist(),
                baseline=[0] * len(leads), comments=comments, write_dir=str(out), **when)
    return out / name


def folder_problem(folder: Path) -> str:
    """What keeps ``folder`` from being a folder of records ("is not a folder", "holds no WFDB
    records (*.hea)"), or "" when it is one."""
    if not folder.is_dir():
        return "is not a folder"
    return "" if any(folder.rglob("*.hea")) else "holds no WFDB records (*.hea)"


def default_data_dir() -> Path | None:
    """The real records: ``$PANORAMA_DATA`` (a RecordError where it holds none: never another
    folder in its place), else ``../shared/data/ecg`` beside the repo or beside the working
    folder (an installed package lives elsewhere); None where there are none."""
    import os

    env = os.environ.get("PANORAMA_DATA")
    if env:
        if problem := folder_problem(Path(env)):
            raise RecordError(f"$PANORAMA_DATA is {env}, which {problem}")
        return Path(env)
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data" / "ecg",
                  Path.cwd().parent / "shared" / "data" / "ecg"]
    return next((c for c in candidates if not folder_problem(c)), None)


def require_data_dir() -> Path:
    """``default_data_dir``, or a RecordError saying where records are looked for."""
    found = default_data_dir()
    if found is None:
        raise RecordError("no real records found: give their folder, set $PANORAMA_DATA, or put them at "
                          "../shared/data/ecg beside the repo")
    return found
