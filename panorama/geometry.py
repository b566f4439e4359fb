"""Lead geometry: every ECG view is a viewing direction (θ, φ) in degrees.

Convention (the paper's, see ``../shared/data/README.md``): x anterior, y the patient's
left, z the head; direction = (sinθ cosφ, sinθ sinφ, cosθ).

Where the named angles come from
--------------------------------
- The 12 standard leads: the NEF-NET v2 paper's table (as given in the data README).
- Frank VX, VY, VZ: the data README, checked there against the PTB records' own
  correlations (VX toward the left, VY toward the feet, VZ toward the back).
- Right-sided V3R–V6R: the mirror images of V3–V6 through the sagittal plane (φ → −φ),
  which is how they are placed (same landmarks on the right hemithorax).
- Posterior V7–V9: the horizontal plane of V6 (θ = 96°), continued round the back:
  V7 posterior axillary line (φ = 120°), V8 mid-scapular line (φ = 150°), V9 left
  paravertebral line (φ = 170°). These follow the electrode landmarks; they are not CT-measured.
- High V1/V2 (Brugada): V1/V2 moved one and two intercostal spaces up. One intercostal
  space is about 2 cm and the heart's centre lies about 10 cm behind the sternum, so each
  space raises the electrode by about 11° (θ 90° → 79° in the 3rd space, → 68° in the 2nd).
  Approximate, documented as such.

Anything else is written ``THETA:PHI`` in degrees, e.g. ``120:45``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

__all__ = [
    "STANDARD_12",
    "FRANK",
    "View",
    "resolve_view",
    "resolve_views",
    "view_names",
    "unit_vector",
    "canonical_lead_name",
    "descriptors",
    "LIMB_LEADS",
    "redundant_limb_leads",
]


@dataclass(frozen=True)
class View:
    """A named or arbitrary viewing direction."""

    name: str
    theta: float  # degrees from the head axis (+z)
    phi: float  # degrees in the horizontal plane, from anterior (+x) toward the left (+y)
    mdc_code: int | None = None  # IEEE 11073-10101 MDC_ECG_LEAD_* code, where one exists
    group: str = "arbitrary"

    @property
    def direction(self) -> np.ndarray:
        return unit_vector(self.theta, self.phi)

    @property
    def far_field(self) -> bool:
        """Limb and Frank leads are far-field (bipolar, or corrected orthogonal) projections;
        every other view is an electrode on the torso against Wilson's terminal, which also
        sees the near field. Lead I (90°, 90°) and V6 (96°, 90°) look the same way but are
        different signals: the model is told which kind a view is."""
        return self.group in ("limb", "frank")

    @property
    def descriptor(self) -> tuple[float, float, float]:
        """What the model is told about a view: (θ, φ, 1 if far-field else 0)."""
        return (float(self.theta), float(self.phi), float(self.far_field))


# IEEE 11073-10101 lead codes: partition 2 (MDC_PART_SCADA... ECG leads), 2 << 16 = 131072.
_MDC = 131072

_TABLE: list[View] = [
    # the paper's table for the 12 standard leads
    View("I", 90, 90, _MDC + 1, "limb"),
    View("II", 150, 90, _MDC + 2, "limb"),
    View("III", 150, -90, _MDC + 61, "limb"),
    View("aVR", 60, -90, _MDC + 62, "limb"),
    View("aVL", 60, 90, _MDC + 63, "limb"),
    View("aVF", 180, 90, _MDC + 64, "limb"),
    View("V1", 90, -10, _MDC + 3, "precordial"),
    View("V2", 90, 10, _MDC + 4, "precordial"),
    View("V3", 95, 15, _MDC + 5, "precordial"),
    View("V4", 99, 30, _MDC + 6, "precordial"),
    View("V5", 96, 60, _MDC + 7, "precordial"),
    View("V6", 96, 90, _MDC + 8, "precordial"),
    # right-sided: mirror of V3-V6
    View("V3R", 95, -15, _MDC + 11, "right"),
    View("V4R", 99, -30, _MDC + 12, "right"),
    View("V5R", 96, -60, _MDC + 13, "right"),
    View("V6R", 96, -90, _MDC + 14, "right"),
    # posterior, V6's horizontal plane continued round the back
    View("V7", 96, 120, _MDC + 9, "posterior"),
    View("V8", 96, 150, _MDC + 66, "posterior"),
    View("V9", 96, 170, _MDC + 67, "posterior"),
    # high precordial leads for Brugada (approximate, see module docstring)
    View("V1ICS3", 79, -10, None, "high"),
    View("V2ICS3", 79, 10, None, "high"),
    View("V1ICS2", 68, -10, None, "high"),
    View("V2ICS2", 68, 10, None, "high"),
    # Frank orthogonal leads (data README)
    View("VX", 90, 90, _MDC + 16, "frank"),
    View("VY", 180, 0, _MDC + 17, "frank"),
    View("VZ", 90, 180, _MDC + 18, "frank"),
]

NAMED: dict[str, View] = {v.name: v for v in _TABLE}
STANDARD_12: tuple[str, ...] = tuple(v.name for v in _TABLE[:12])
FRANK: tuple[str, ...] = ("VX", "VY", "VZ")
# The six limb leads span the frontal plane twice over: any two give the other four
# (Einthoven's and Goldberger's equations). In order of preference as the two kept.
LIMB_LEADS: tuple[str, ...] = ("I", "II", "III", "aVF", "aVL", "aVR")

# Spellings seen in WFDB headers of the sources we read (PTB, Challenge, LUDB, SPH).
_ALIASES = {
    "i": "I", "ii": "II", "iii": "III", "avr": "aVR", "avl": "aVL", "avf": "aVF",
    "v1": "V1", "v2": "V2", "v3": "V3", "v4": "V4", "v5": "V5", "v6": "V6",
    "vx": "VX", "vy": "VY", "vz": "VZ", "x": "VX", "y": "VY", "z": "VZ",
    "v7": "V7", "v8": "V8", "v9": "V9",
    "v3r": "V3R", "v4r": "V4R", "v5r": "V5R", "v6r": "V6R",
    "di": "I", "dii": "II", "diii": "III", "d1": "I", "d2": "II", "d3": "III",  # Einthoven's, as in Europe
}
# labels that look like a lead but are not one at its table angle: said when a record has them
NOT_QUITE = {"mlii": "MLII is a modified lead II from torso electrodes (a Holter's), not II; relabel it II "
                     "only if its electrodes sat on the limbs",
             "mli": "MLI is a modified lead I from torso electrodes, not I",
             "mliii": "MLIII is a modified lead III from torso electrodes, not III"}
_ARBITRARY = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*:\s*(-?\d+(?:\.\d+)?)\s*$")


def unit_vector(theta_deg, phi_deg) -> np.ndarray:
    """Direction(s) for angles in degrees; broadcasts, last axis is (x, y, z)."""
    t = np.deg2rad(np.asarray(theta_deg, dtype=float))
    p = np.deg2rad(np.asarray(phi_deg, dtype=float))
    return np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], axis=-1)


def rotating_heart(views: list["View"], seconds: float, fs: float = 500.0) -> np.ndarray:
    """(len(views), T) mV: a synthetic recording, a heart vector turning at 72 beats a minute
    with a sharp QRS-like spike each beat, seen along each view's direction. For warming up
    and checking exports, never for judging synthesis."""
    t = np.arange(int(round(seconds * fs))) / fs
    beat = 2 * np.pi * 1.2 * t
    spike = np.exp(-(((t * 1.2) % 1.0 - 0.3) / 0.012) ** 2)  # a 20 ms wide deflection each beat
    heart = np.stack([np.sin(beat) + 1.5 * spike, np.sin(2 * beat + 0.7) - spike, 0.5 * np.cos(3 * beat)])
    return (np.stack([unit_vector(v.theta, v.phi) for v in views]) @ heart).astype(np.float32)


def canonical_lead_name(name: str) -> str | None:
    """Canonical name for a header's lead label, or None when it is not a known lead."""
    raw = name.strip()
    if raw in NAMED:
        return raw
    key = raw.lower().replace(" ", "").replace("_", "").replace("-", "").removeprefix("ecg").removeprefix("lead")
    return None if raw.startswith(("-", "\u2212")) else _ALIASES.get(key)


def inverted_lead_name(name: str) -> str | None:
    """The lead a label names upside down (``-aVR``, ``−aVR``: the Cabrera display's), else None."""
    raw = name.strip()
    return canonical_lead_name(raw[1:]) if raw.startswith(("-", "\u2212")) and len(raw) > 1 else None


def view_names() -> list[str]:
    return list(NAMED)


def resolve_view(spec: str) -> View:
    """A view from a name (``V7``) or ``THETA:PHI`` in degrees; a clear error otherwise."""
    m = _ARBITRARY.match(spec)
    if m:
        theta, phi = float(m.group(1)), float(m.group(2))
        if not 0.0 <= theta <= 180.0:
            raise ValueError(f"view {spec!r}: theta must lie in [0, 180] degrees, got {theta:g}")
        if not -360.0 <= phi <= 360.0:
            raise ValueError(f"view {spec!r}: phi must lie in [-360, 360] degrees, got {phi:g}")
        return View(spec.strip(), theta, phi)
    canon = canonical_lead_name(spec)
    if canon is None:
        raise ValueError(
            f"unknown view {spec!r}; valid names are {', '.join(view_names())}, "
            "or an arbitrary direction written THETA:PHI in degrees (e.g. 120:45)"
        )
    return NAMED[canon]


def resolve_views(specs: str | list[str]) -> list[View]:
    """Comma-separated or listed view specs; duplicates are an error."""
    items = [s for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not items:
        raise ValueError("no views or leads given")
    views = [resolve_view(s) for s in items]
    names = [v.name for v in views]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"named more than once: {', '.join(dupes)}")
    return views


def descriptors(views: list[View], offsets: np.ndarray | None = None) -> np.ndarray:
    """(n, 3) float32 model descriptors (θ, φ, far-field); ``offsets`` (n, 2) add to θ, φ."""
    d = np.array([v.descriptor for v in views], dtype=np.float32).reshape(-1, 3)
    if offsets is not None:
        d[:, :2] += np.asarray(offsets, dtype=np.float32)
    return d


def angle_between(a: View, b: View) -> float:
    """Great-circle angle between two views in degrees."""
    c = float(np.clip(a.direction @ b.direction, -1.0, 1.0))
    return math.degrees(math.acos(c))


def redundant_limb_leads(names: list[str], usable=None) -> np.ndarray:
    """(n,) bool: the limb leads that add nothing to the others — every usable limb lead
    after the first two in ``LIMB_LEADS`` order (any two give the other four exactly), and
    any lead named twice. A monitor's III, aVR, aVL and aVF are sums of its I and II: the
    model is given I and II alone, which saves a third of the encoder in PyTorch and keeps the montage
    like the ones it was trained on (given all twelve leads, the pretrained model drew
    posterior views worse on the simulator: ``tests/test_shipped_model.py``)."""
    usable = np.ones(len(names), bool) if usable is None else np.asarray(usable, bool)
    out = np.zeros(len(names), bool)
    seen: set[str] = set()
    limbs = 0  # limb leads kept so far
    # limb leads in order of preference, every other lead in its own order
    rank = lambda i: (LIMB_LEADS.index(names[i]) if names[i] in LIMB_LEADS else -1, i)  # noqa: E731
    for i in sorted((i for i in range(len(names)) if usable[i]), key=rank):
        out[i] = names[i] in seen or (names[i] in LIMB_LEADS and limbs >= 2)
        limbs += names[i] in LIMB_LEADS and not out[i]
        seen.add(names[i])
    return out
