"""Cardiac sources: a beat is a handful of current dipoles at different places in the heart.

Each component is one dipole at a fixed position (heart frame, cm from the heart centre),
with a fixed moment direction and a time course on the beat's clock: a Gaussian bump
(μ, σ) as in McSharry et al.'s ECGSYN (IEEE TBME 2003) and Sameni et al.'s 3-D dipole
model (EURASIP JASP 2007), or — for injury currents — a plateau between two logistic edges.
Splitting ventricular activation over separate regional dipoles (septum, apex, free walls,
base) that fire in sequence is what makes the near-field chest leads more than a linear
view of one heart vector: each electrode weighs the regions by its distance to them.

Times are seconds from the beat's fiducial (the middle of the QRS). Repolarisation
components (``repol``) stretch with the QT interval, which follows heart rate (Bazett).

Where the numbers come from: the activation sequence and directions follow the textbook
vectorcardiogram (Durrer et al. 1970: septum left→right first, then apex and free walls,
posterobasal regions last; QRS loop inferior-left-posterior, T loop concordant with it);
the moments (mV·cm²) were tuned so that amplitudes match the real records in
``shared/data/ecg`` (lead II R ≈ 1 mV, V2–V4 1.5–3 mV, T 0.1–0.5 mV, P ≈ 0.15 mV).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.spatial.transform import Rotation

from panorama.geometry import unit_vector

from .torso import SOFTENING_CM


@dataclass(frozen=True)
class BeatTemplate:
    """One beat's dipole components, heart frame. All arrays have one row per component."""

    names: tuple[str, ...]
    pos: np.ndarray  # (n, 3) cm from the heart centre
    moment: np.ndarray  # (n, 3) peak moment, mV·cm²
    mu: np.ndarray  # (n,) s, bump centre (plateau: start)
    sigma: np.ndarray  # (n,) s, bump width (plateau: edge time constant)
    plateau: np.ndarray  # (n,) s, plateau length; 0 for a Gaussian bump
    repol: np.ndarray  # (n,) bool, scales with QT

    def __add__(self, other: BeatTemplate) -> BeatTemplate:
        return BeatTemplate(*(a + b if isinstance(a, tuple) else np.concatenate([a, b])
                              for a, b in zip(self._fields(), other._fields())))

    def _fields(self):
        return (self.names, self.pos, self.moment, self.mu, self.sigma, self.plateau, self.repol)

    def scaled(self, mask: np.ndarray, factor: float) -> BeatTemplate:
        m = self.moment.copy()
        m[mask] *= factor
        return replace(self, moment=m)

    def select(self, prefix: str) -> np.ndarray:
        return np.array([n.startswith(prefix) for n in self.names])


def _template(rows: list[tuple]) -> BeatTemplate:
    """rows: (name, pos, θ, φ, amplitude, μ, σ[, plateau[, repol]])."""
    names, pos, mom, mu, sig, plat, rep = [], [], [], [], [], [], []
    for row in rows:
        name, p, th, ph, amp, m, s = row[:7]
        plateau = row[7] if len(row) > 7 else 0.0
        names.append(name)
        pos.append(p)
        mom.append(amp * unit_vector(th, ph))
        mu.append(m)
        sig.append(s)
        plat.append(plateau)
        rep.append(name.startswith(("T", "ST")))
    f = lambda v: np.array(v, dtype=float)  # noqa: E731
    return BeatTemplate(tuple(names), f(pos), f(mom), f(mu), f(sig), f(plat), np.array(rep))


# Ventricular regions (heart frame, before the patient's rotation): a point on the wall of
# a spherical LV (centre below and left of the heart centre, radius 3 cm) or of the RV's
# anterior-right free wall, and the wall's outward normal there as (θ, φ). Activation runs
# endocardium → epicardium, so a region's depolarisation dipole points along its outward
# normal; an electrode facing the region sees an R wave, one across the heart an S wave.
_LV_CENTRE, _LV_RADIUS = np.array([0.0, 1.0, 1.0]), 3.5
_RV_CENTRE, _RV_RADIUS = np.array([1.5, -2.0, -0.5]), 2.0
REGIONS: dict[str, tuple[np.ndarray, float, float]] = {}
for _name, (_c, _r, _th, _ph) in {
    "septum": (_LV_CENTRE, 2.0, 95, -70),
    "apex": (_LV_CENTRE, _LV_RADIUS, 135, 40),
    "anterior": (_LV_CENTRE, _LV_RADIUS, 85, 35),
    "inferior": (_LV_CENTRE, _LV_RADIUS, 160, 100),
    "lateral": (_LV_CENTRE, _LV_RADIUS, 95, 100),
    "posterior": (_LV_CENTRE, _LV_RADIUS, 90, 160),
    "base": (_LV_CENTRE, _LV_RADIUS, 40, 150),
    "rv_free": (_RV_CENTRE, _RV_RADIUS, 95, -40),
    "rv_outflow": (_RV_CENTRE, _RV_RADIUS, 45, -60),
}.items():
    REGIONS[_name] = (_c + _r * unit_vector(_th, _ph), _th, _ph)


def _r(name: str, region: str, amp: float, mu: float, sigma: float, plateau: float = 0.0,
       direction: tuple[float, float] | None = None, flip: bool = False) -> tuple:
    """A template row for a dipole on ``region``: along its outward normal unless told."""
    pos, th, ph = REGIONS[region]
    if direction is not None:
        th, ph = direction
    if flip:
        th, ph = 180 - th, ph + 180
    return (name, tuple(pos), th, ph, amp, mu, sigma, plateau)


_ATRIA = [
    ("P_right", (-1.5, -2.5, 3.0), 130, 10, 8.0, -0.175, 0.020),  # RA: anterior, inferior
    ("P_left", (-3.0, 0.5, 3.0), 115, 125, 7.0, -0.145, 0.020),  # LA: posterior, left
]
# Normal activation (Durrer 1970): septum left→right first, then apex, anterior and inferior
# walls, RV free wall, lateral wall, and the posterobasal LV and RV outflow tract last.
_QRS = [
    _r("Q_septum", "septum", 22.0, -0.032, 0.009, direction=(95, -50)),
    _r("Q_apex", "apex", 40.0, -0.016, 0.009),
    _r("Q_anterior", "anterior", 35.0, -0.010, 0.009),
    _r("Q_rv_free", "rv_free", 18.0, -0.012, 0.009),
    _r("Q_inferior", "inferior", 40.0, -0.004, 0.009),
    _r("Q_lateral", "lateral", 55.0, 0.002, 0.009),
    _r("Q_posterior", "posterior", 35.0, 0.014, 0.009),
    _r("Q_base", "base", 25.0, 0.028, 0.009),
    _r("Q_rv_outflow", "rv_outflow", 12.0, 0.022, 0.009),
]
# Anatomy "v2" (session 10): the right ventricle and the septum lie against the front of the
# chest, so their dipoles sit 2 cm further anterior, and the anterior and apical LV moments
# turn left (azimuth 60°), so that V1 sees the septum and RV near by and the LV mostly
# leaving it while V3 faces the LV; its wavefronts are 1 cm across instead of 2. V1 and V3
# then correlate 0.61 against the validation records' 0.28 (v1: 0.77; `panorama bench
# realism --patients 60 --anatomy v2`; the spread between patients is wide).


def _anterior_rv(rows: list[tuple]) -> list[tuple]:
    out = []
    for name, pos, th, ph, *rest in rows:
        if name.startswith(("Q_rv", "Q_septum")):
            pos = tuple(np.add(pos, (2.0, 0.0, 0.0)))
        if name in ("Q_anterior", "Q_apex"):
            ph = 60.0
        out.append((name, pos, th, ph, *rest))
    return out


_QRS_BY_ANATOMY = {"v1": _QRS, "v2": _anterior_rv(_QRS)}
SOFTENING_BY_ANATOMY = {"v1": SOFTENING_CM, "v2": 1.0}  # cm, wavefront size in torso.lead_field
ANATOMIES = tuple(_QRS_BY_ANATOMY)

# Repolarisation runs epicardium → endocardium with the opposite sign of charge, so its
# regional dipoles also point outward: a T wave concordant with the QRS (left, inferior,
# anterior). A late, narrower lateral component makes the T wave rise slowly, fall fast.
_T = [
    _r("T_apex", "apex", 9.0, 0.28, 0.055),
    _r("T_anterior", "anterior", 8.0, 0.28, 0.055),
    _r("T_inferior", "inferior", 8.0, 0.29, 0.055),
    _r("T_lateral", "lateral", 11.0, 0.29, 0.050),
    _r("T_lateral_late", "lateral", 6.0, 0.33, 0.030),
]

# ST injury: current toward the injured epicardium (elevation over it) or, for
# subendocardial ischaemia, toward the cavity (depression).
INJURY_REGIONS = ("anterior", "inferior", "lateral")
# PVC origins (heart frame, cm): outflow tracts, free walls, apex, inferior septum.
PVC_ORIGINS = np.array([
    (2.0, -1.5, 2.0), (-0.5, 3.5, -1.0), (2.5, 1.5, -3.0),
    (2.0, -2.5, -1.0), (0.0, 0.5, -2.5), (-1.5, 2.0, 2.0),
])


def _qrs(anatomy: str) -> list[tuple]:
    if anatomy not in _QRS_BY_ANATOMY:
        raise ValueError(f"unknown anatomy {anatomy!r}; choose from {', '.join(ANATOMIES)}")
    return _QRS_BY_ANATOMY[anatomy]


def normal_beat(p_wave: bool = True, anatomy: str = "v1") -> BeatTemplate:
    """The normal sinus beat; ``p_wave=False`` for atrial fibrillation (no organised P)."""
    return _template((_ATRIA if p_wave else []) + _qrs(anatomy) + _T)


def bundle_branch_beat(kind: str, p_wave: bool = True, anatomy: str = "v1") -> BeatTemplate:
    """Wide QRS (120–170 ms): left or right bundle branch block, with secondary T changes.

    LBBB: the septum is activated right→left from the RV, then the LV spreads slowly cell to
    cell (broad notched R in I/V6, QS in V1); T discordant. RBBB: a normal LV part plus a
    late, slow RV free wall and outflow tract (R' in V1, slurred S in I and V6), T inverted
    over the right precordium.
    """
    atria = _ATRIA if p_wave else []
    if kind == "lbbb":
        qrs = [
            _r("Q_septum", "septum", 25.0, -0.050, 0.014, direction=(95, 130)),
            _r("Q_rv_free", "rv_free", 15.0, -0.045, 0.012),
            _r("Q_apex", "apex", 35.0, -0.015, 0.016),
            _r("Q_anterior", "anterior", 35.0, 0.000, 0.018),
            _r("Q_inferior", "inferior", 35.0, 0.010, 0.018),
            _r("Q_lateral", "lateral", 70.0, 0.030, 0.020),
            _r("Q_posterior", "posterior", 45.0, 0.050, 0.018),
            _r("Q_base", "base", 35.0, 0.065, 0.014),
        ]
        t = [_r("T_lateral", "lateral", 22.0, 0.30, 0.060, flip=True),
             _r("T_posterior", "posterior", 10.0, 0.30, 0.060, flip=True)]
        return _template(atria + qrs + t)
    if kind == "rbbb":
        late = [_r("Q_rv_late", "rv_free", 35.0, 0.050, 0.018),
                _r("Q_rvot_late", "rv_outflow", 20.0, 0.070, 0.015)]
        qrs = [row for row in _qrs(anatomy) if not row[0].startswith("Q_rv")]
        t = _T + [_r("T_rv", "rv_free", 8.0, 0.27, 0.060, flip=True)]
        return _template(atria + qrs + late + t)
    raise ValueError(f"unknown bundle branch block {kind!r}; choose 'lbbb' or 'rbbb'")


def ectopic_beat(origin: np.ndarray, amp: float = 110.0) -> BeatTemplate:
    """A premature ventricular beat: activation spreads from ``origin`` through the muscle.

    Three dipoles along the path from the origin to the opposite wall, all pointing along
    it (the wavefront travels away from the focus), staggered and slow because conduction
    runs cell to cell instead of through the Purkinje network: QRS 140–180 ms. No P wave;
    the T wave is discordant (repolarisation follows the same abnormal order).
    """
    origin = np.asarray(origin, dtype=float)
    far = -origin / max(np.linalg.norm(origin), 1e-6) * 2.5
    d = far - origin
    th, ph = _angles(d)
    rows = [(f"Q_pvc{k}", tuple(origin + (k + 0.5) / 3 * d), th, ph, amp * w, -0.04 + 0.04 * k, 0.022)
            for k, w in enumerate((0.6, 1.0, 0.7))]
    mid = tuple(origin + 0.5 * d)
    rows.append(("T_pvc", mid, 180 - th, ph + 180, 0.3 * amp, 0.32, 0.07))
    return _template(rows)


def injury_current(region: str, elevation: bool, amp: float) -> BeatTemplate:
    """ST-segment injury dipole on ``region``: a plateau from the end of the QRS to the T wave."""
    if region not in INJURY_REGIONS:
        raise ValueError(f"unknown injury region {region!r}; choose from {', '.join(INJURY_REGIONS)}")
    return _template([_r("ST_injury", region, amp, 0.045, 0.015, plateau=0.20, flip=not elevation)])


def perturb(t: BeatTemplate, rng: np.random.Generator, amp_sd: float, time_sd: float,
            width_sd: float, dir_deg: float, pos_cm: float) -> BeatTemplate:
    """Per-patient variation of every component: log-normal amplitude and width, shifted
    timing, a small rotation of each moment, and a moved position."""
    n = len(t.names)
    rot = Rotation.from_rotvec(rng.normal(0.0, np.deg2rad(dir_deg), (n, 3)))
    moment = rot.apply(t.moment) * np.exp(rng.normal(0.0, amp_sd, n))[:, None]
    return replace(
        t,
        pos=t.pos + rng.normal(0.0, pos_cm, (n, 3)),
        moment=moment,
        mu=t.mu + rng.normal(0.0, time_sd, n) * np.where(t.repol, 3.0, 1.0),
        sigma=t.sigma * np.exp(rng.normal(0.0, width_sd, n)),
    )


def _angles(v: np.ndarray) -> tuple[float, float]:
    v = v / np.linalg.norm(v)
    return float(np.degrees(np.arccos(np.clip(v[2], -1, 1)))), float(np.degrees(np.arctan2(v[1], v[0])))
