"""Render a patient's clean ECG at given (true) electrode angles.

The whole forward model is linear in the dipole moments, so per beat template it is one
coefficient matrix C (electrodes × components) — lead field times moment — and the
potentials are C @ G, where G holds the components' time courses (Gaussian bumps or
plateaus on each beat's clock). Only G changes from beat to beat, and it is evaluated
analytically at the output rate: the bumps are far narrower in frequency than any
Nyquist rate used here (a σ = 8 ms Gaussian is down by e⁻²⁰ at 125 Hz), so there is no
aliasing to avoid and nothing to resample.

Leads are then formed from electrode potentials exactly as an electrocardiograph does:
I = LA − RA, II = LL − RA, III = LL − LA, augmented leads against the other two limbs'
mean, chest and arbitrary leads against Wilson's central terminal (RA + LA + LL)/3, and
Frank VX/VY/VZ as the total dipole moment on +y, −z, −x.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation
from scipy.special import expit

from panorama.geometry import FRANK, unit_vector

from .patient import PatientParams
from .rhythm import ECTOPIC, NORMAL, beat_schedule, f_waves
from .sources import BeatTemplate
from .torso import FRANK_AXES, FRANK_GAIN, HEART_CENTRE, LIMB_GAIN, lead_field, limb_positions, ray_to_surface

LIMB_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF")


def lead_kind(name: str) -> str:
    """'limb' (from RA/LA/LL), 'frank' (dipole projection) or 'chest' (an electrode on the torso)."""
    return "limb" if name in LIMB_LEADS else "frank" if name in FRANK else "chest"


def render(params: PatientParams, angles_deg: np.ndarray, names: list[str],
           duration_s: float = 10.0, fs: int = 500) -> np.ndarray:
    """Clean ECG (n_views, round(duration_s·fs)) in mV, float64.

    ``angles_deg`` (n_views, 2) are the TRUE (θ, φ) of each chest/arbitrary electrode, seen
    from the heart centre; they are ignored for limb and Frank leads, which ``names``
    identifies (their geometry is the limb triangle and the dipole axes).
    """
    angles = np.asarray(angles_deg, dtype=float).reshape(-1, 2)
    if len(angles) != len(names):
        raise ValueError(f"got {len(angles)} angle pairs for {len(names)} names; give one (θ, φ) per view")
    if not duration_s > 0 or not fs > 0:
        raise ValueError(f"duration_s and fs must be positive, got {duration_s} s and {fs} Hz")
    n_samples = int(round(duration_s * fs))
    kinds = [lead_kind(n) for n in names]
    chest = [i for i, k in enumerate(kinds) if k == "chest"]

    rot = Rotation.from_euler("xyz", params.rotation_deg, degrees=True).as_matrix()
    centre = HEART_CENTRE + params.heart_offset_cm
    limbs = limb_positions(HEART_CENTRE, params.limb_jitter_cm)  # (3, 3) RA, LA, LL
    on_chest = ray_to_surface(centre, unit_vector(angles[chest, 0], angles[chest, 1]),
                              params.torso_semi_axes_cm)
    electrodes = np.concatenate([limbs, on_chest])  # (3 + n_chest, 3)
    # Rows: electrodes, then the three Frank axes (total moment, no position).
    gain = np.concatenate([np.full(3, LIMB_GAIN), np.ones(len(chest))])

    def coefficients(t: BeatTemplate) -> np.ndarray:  # (n_rows, n_comp)
        pos = centre + t.pos @ rot.T
        mom = t.moment @ rot.T
        per_moment = lead_field(electrodes, pos, params.conductivity, params.softening_cm)
        c = np.einsum("edk,dk->ed", per_moment, mom) * gain[:, None]
        frank = np.stack([FRANK_AXES[k] for k in FRANK]) @ mom.T * FRANK_GAIN
        return np.concatenate([c, frank])

    rng = np.random.default_rng(params.schedule_seed)
    sched = beat_schedule(params, duration_s, rng)
    templates = {NORMAL: params.beat, ECTOPIC: params.ectopic}
    coef = {k: coefficients(t) for k, t in templates.items() if t is not None}
    pot = np.zeros((len(electrodes) + 3, n_samples))
    for t0, kind, q in zip(sched.times, sched.kinds, sched.qt_scale):
        _add_beat(pot, templates[kind], coef[kind], t0, q, fs)
    if params.rhythm == "af":
        t = np.arange(n_samples) / fs
        af = BeatTemplate(("F",), params.af_pos[None], params.af_moment[None], *np.zeros((3, 1)),
                          np.zeros(1, bool))
        pot += coefficients(af) @ f_waves(t, params.af_f_hz, rng)[None]
    return _leads(pot, names, kinds)


def _add_beat(pot: np.ndarray, t: BeatTemplate, coef: np.ndarray, t0: float, q: float, fs: int) -> None:
    """Add one beat's potentials in place over the window its components reach."""
    stretch = np.where(t.repol, q, 1.0)  # repolarisation follows the QT interval
    mu, sig, plat = t.mu * stretch, t.sigma * stretch, t.plateau * stretch
    lo = int(np.floor((t0 + np.min(mu - 4 * sig)) * fs))
    hi = int(np.ceil((t0 + np.max(mu + plat + 4 * sig)) * fs)) + 1
    lo, hi = max(lo, 0), min(hi, pot.shape[1])
    if hi <= lo:
        return
    tau = np.arange(lo, hi) / fs - t0  # (W,) s on the beat's clock
    z = (tau[None, :] - mu[:, None]) / sig[:, None]  # (n_comp, W)
    g = np.exp(-0.5 * z * z)
    bump = plat > 0
    if bump.any():  # plateau between two logistic edges
        g[bump] = expit(z[bump]) - expit(z[bump] - (plat[bump] / sig[bump])[:, None])
    pot[:, lo:hi] += coef @ g


def _leads(pot: np.ndarray, names: list[str], kinds: list[str]) -> np.ndarray:
    """Form the leads from electrode potentials (rows RA, LA, LL, chest…, VX, VY, VZ)."""
    ra, la, ll = pot[0], pot[1], pot[2]
    limb = {
        "I": lambda: la - ra, "II": lambda: ll - ra, "III": lambda: ll - la,
        "aVR": lambda: ra - (la + ll) / 2, "aVL": lambda: la - (ra + ll) / 2, "aVF": lambda: ll - (ra + la) / 2,
    }
    wct = (ra + la + ll) / 3.0
    n_chest = kinds.count("chest")
    out = np.empty((len(names), pot.shape[1]))
    row = 3
    for i, (name, kind) in enumerate(zip(names, kinds)):
        if kind == "limb":
            out[i] = limb[name]()
        elif kind == "frank":
            out[i] = pot[3 + n_chest + FRANK.index(name)]
        else:
            out[i] = pot[row] - wct
            row += 1
    return out
