"""``simulate``: one patient, any views, ground truth before and after a recording device.

Random streams are split by purpose (patient, device, and one per view for electrode
displacement, keyed by the view's name), so the same seed gives the same heart whatever
views or device are asked for, and a view's misplacement does not depend on its neighbours.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from panorama.geometry import STANDARD_12, View, resolve_view

from .device import DeviceProfile, apply_device, resolve_device
from .patient import RHYTHMS, PatientParams, sample_patient
from .render import lead_kind, render

# CT-measured spread of real precordial electrode angles about the table (the paper).
DEFAULT_DISPLACEMENT_DEG = 10.6


@dataclass
class SimRecord:
    signals: np.ndarray  # (n_views, n_samples) float32 mV, after the device
    clean: np.ndarray  # (n_views, n_samples) float32 mV, before the device
    names: list[str]
    fs: int
    nominal_angles: np.ndarray  # (n_views, 2) degrees (θ, φ), the table's
    true_angles: np.ndarray  # (n_views, 2) degrees, after electrode displacement
    meta: dict = field(default_factory=dict)
    params: PatientParams | None = None

    def lead(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise ValueError(f"no view {name!r} in this record; it has {', '.join(self.names)}")
        return self.signals[self.names.index(name)]


def simulate(seed: int, views: list[str] | list[View] | str | None = None, duration_s: float = 10.0,
             fs: int = 500, rhythm: str | None = None, displacement_deg: float = DEFAULT_DISPLACEMENT_DEG,
             device: str | DeviceProfile | None = "ideal", anatomy: str = "v1",
             exact: tuple[str, ...] | list[str] = ()) -> SimRecord:
    """Simulate one patient's ECG at ``views`` (None → the 12 standard leads).

    Views are table names (``V7``), ``THETA:PHI`` strings, or ``View`` objects. Chest and
    arbitrary electrodes are displaced from their nominal angle by N(0, ``displacement_deg``)
    in θ and φ; limb and Frank leads are not (far-field, so placement hardly matters).
    ``device``: a name in ``DEVICE_PROFILES``, ``"random"``, a ``DeviceProfile``, or None.
    ``anatomy``: the ventricular sources, ``sources.ANATOMIES``. ``exact``: names of views
    whose electrodes sit exactly at their nominal angle (a view scored as asked for rather
    than as a misplaced electrode would record it); the others are drawn as without it.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not np.isfinite(duration_s) or duration_s <= 0:
        raise ValueError(f"duration_s must be a positive number of seconds, got {duration_s!r}")
    if isinstance(fs, bool) or not isinstance(fs, (int, np.integer)) or fs <= 0:
        raise ValueError(f"fs must be a positive integer rate in Hz (e.g. 250, 500, 1000), got {fs!r}")
    if rhythm is not None and rhythm not in RHYTHMS:
        raise ValueError(f"unknown rhythm {rhythm!r}; choose from {', '.join(RHYTHMS)} (or None for random)")
    if not np.isfinite(displacement_deg) or displacement_deg < 0:
        raise ValueError(f"displacement_deg must be ≥ 0 degrees, got {displacement_deg!r}")
    view_list = _resolve(views)
    unknown = sorted(set(exact) - {v.name for v in view_list})
    if unknown:
        raise ValueError(f"exact names views not simulated: {', '.join(unknown)}")

    patient_ss, device_ss = np.random.SeedSequence(seed).spawn(2)
    params = sample_patient(np.random.default_rng(patient_ss), rhythm, anatomy)
    device_rng = np.random.default_rng(device_ss)
    profile = resolve_device(device, device_rng)

    names = [v.name for v in view_list]
    nominal = np.array([[v.theta, v.phi] for v in view_list], dtype=float)
    true = nominal.copy()
    for i, v in enumerate(view_list):
        if lead_kind(v.name) == "chest" and displacement_deg > 0 and v.name not in exact:
            view_rng = np.random.default_rng([seed, zlib.crc32(v.name.encode())])
            true[i] = _wrap(nominal[i] + view_rng.normal(0.0, displacement_deg, 2))

    clean = render(params, true, names, duration_s, int(fs))
    signals = apply_device(clean, int(fs), profile, device_rng)
    meta = {
        "seed": int(seed),
        "rhythm": params.rhythm,
        "heart_rate_bpm": round(params.heart_rate_bpm, 1),
        "device": profile.name,
        "displacement_deg": float(displacement_deg),
        **params.details,
    }
    return SimRecord(signals.astype(np.float32), clean.astype(np.float32), names, int(fs),
                     nominal, true, meta, params)


def _resolve(views) -> list[View]:
    if views is None:
        views = list(STANDARD_12)
    if isinstance(views, str):
        views = views.split(",")
    if isinstance(views, View):
        views = [views]
    try:
        out = [v if isinstance(v, View) else resolve_view(str(v)) for v in views]
    except TypeError as exc:
        raise ValueError(f"views must be a list of names, THETA:PHI strings or View objects, got {views!r}") from exc
    if not out:
        raise ValueError("no views given; pass None for the 12 standard leads")
    names = [v.name for v in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"views named more than once: {', '.join(dupes)}")
    return out


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Keep θ in [0, 180] (crossing a pole flips φ by 180°) and φ in (−180, 180]."""
    theta, phi = float(angle[0]), float(angle[1])
    if theta < 0:
        theta, phi = -theta, phi + 180.0
    elif theta > 180:
        theta, phi = 360.0 - theta, phi + 180.0
    phi = (phi + 180.0) % 360.0 - 180.0
    return np.array([theta, phi])
