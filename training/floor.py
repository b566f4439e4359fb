"""The lead-vector floor: how well any fit could place a chest electrode from what it
records, in this simulator (``panorama bench calibration --identifiability [--figure PNG]``).

``bench_lead_vectors`` measures it; ``plot_floor`` draws it. In the picture, one panel per
chest lead: each dot is one simulated patient's lead vector with the electrode exactly at
its table angle (each patient's best common rotation of the six chest leads taken out),
drawn as its angle from the patients' mean direction (degrees along φ and θ). The dashed
circle is how far the median electrode displacement (σ = 10.6° per axis, 12.5° as an
angle) turns a lead vector; the dotted one the 3° the offset target asks for (a median per
axis, 5.2° as an angle). Where the dots spread as far as the dashed circle, what a lead
records says about as little of where its electrode is as the table already does (README,
On-the-fly calibration).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from panorama.calibrate import PRIOR_SD_DEG
from panorama.geometry import NAMED, STANDARD_12
from panorama.records import MODEL_FS

from .bench_calibration import _displaced_patient

# An isotropic 2-D Gaussian with σ per axis: the median |x| is MEDIAN_ABS·σ, the median
# angle from the centre RADIUS·σ, so a median angle is PER_AXIS of itself per axis.
MEDIAN_ABS = 0.6745
RADIUS = np.sqrt(np.log(4.0))
PER_AXIS = MEDIAN_ABS / RADIUS
TARGET_DEG = 3.0  # issue 4: median offset error per axis


def _ideal_fit(floor_deg: float, prior_sd_deg: float = PRIOR_SD_DEG) -> float:
    """Median error per axis of the Gaussian posterior: the prior against a reading whose
    median angle from the truth is ``floor_deg`` (per-axis σ = floor / RADIUS)."""
    reading_sd = floor_deg / RADIUS
    if reading_sd <= 0:  # a perfect reading (one patient: nothing to differ from)
        return 0.0
    return float(MEDIAN_ABS / np.sqrt(prior_sd_deg ** -2 + reading_sd ** -2))


def bench_lead_vectors(patients: int, anatomy: str = "v1", step_deg: float = 5.0, figure: Path | None = None) -> dict:
    """How well any fit could place a chest electrode from what it records, model aside.

    A chest lead records roughly the heart's dipole moment projected on its lead vector
    (least squares against the simulated moment; the rest, ``nondipolar_share``, is near
    field). With every electrode at its table angle, the simulated patients' lead vectors
    for the same lead still point apart, by ``spread`` about their mean (heart position and
    sources, torso shape; ``spread_after_rotation`` once each patient's best common rotation
    of all chest leads is taken out, which also covers a rotated heart), while moving an
    electrode by 1° turns its lead vector by ``turn_per_deg``. So from its recording alone an
    electrode's angle is known to no better than about spread / turn degrees, whatever the
    model: the electrode offsets are not identifiable below that floor. ``floor_per_axis``
    puts it in the units of the offset errors (median |dθ| and |dφ|): for an isotropic
    spread the median per axis is 0.674 / sqrt(ln 4) ≈ 0.573 of the median angle.
    ``ideal_fit_per_axis``: the median error per axis of an ideal fit that weighs the
    table's prior (σ = 10.6° per axis) against a perfect reading of each lead's direction
    (uncertain by the floor), both taken as Gaussian.
    ``figure``: also draw each lead's patients about their mean (``plot_floor``)."""
    from scipy.spatial.transform import Rotation

    from training.simulator import render
    from training.simulator.torso import FRANK_AXES

    chest_names = [n for n in STANDARD_12 if n.startswith("V")]
    table = np.array([[NAMED[n].theta, NAMED[n].phi] for n in chest_names], dtype=float)
    frank = np.stack([FRANK_AXES[k] for k in ("VX", "VY", "VZ")])  # Frank leads = frank @ moment
    names = [*(f"c{i}" for i in range(len(table))), "VX", "VY", "VZ"]

    def lead_vectors(params, angles):  # (leads, 3) unit lead vectors and each lead's non-dipolar share
        clean = render(params, np.concatenate([angles, np.zeros((3, 2))]), names, 3.0, MODEL_FS)
        moment = np.linalg.solve(frank, clean[-3:])
        g = np.linalg.lstsq(moment.T, clean[:-3].T, rcond=None)[0].T
        share = np.abs(clean[:-3] - g @ moment).mean(1) / np.abs(clean[:-3]).mean(1)
        return g / np.linalg.norm(g, axis=1, keepdims=True), share

    def degrees(a, b):
        return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1.0, 1.0)))

    at_table, turn, share = [], [], []
    for seed in tqdm(range(patients), desc="lead vectors", unit="pt", leave=False):
        params = _displaced_patient(seed, anatomy)[1]  # the same patients as bench_calibration
        g, s = lead_vectors(params, table)
        at_table.append(g)
        share.append(s)
        for move in ([step_deg, 0.0], [0.0, step_deg]):
            turn.append(degrees(g, lead_vectors(params, table + move)[0]) / step_deg)
    at_table = np.array(at_table)  # (patients, leads, 3)
    mean = at_table.mean(0)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    spread = degrees(at_table, mean[None])
    rotated = np.array([Rotation.align_vectors(mean, g)[0].apply(g) for g in at_table])
    after_rotation = float(np.median(degrees(rotated, mean[None])))
    per_turn = float(np.median(turn))
    floor = after_rotation / per_turn
    if figure is not None:
        plot_floor(figure, rotated, mean, chest_names, per_turn, PRIOR_SD_DEG)
    return {"leadvector_spread_deg_median": round(float(np.median(spread)), 2),
            "leadvector_spread_after_rotation_deg_median": round(after_rotation, 2),
            "leadvector_turn_per_deg_median": round(per_turn, 2),
            "leadvector_floor_deg": round(floor, 1),
            "leadvector_floor_per_axis_deg": round(float(PER_AXIS * floor), 1),
            "leadvector_ideal_fit_per_axis_deg": round(_ideal_fit(floor), 1),
            "leadvector_nondipolar_share_median": round(float(np.median(share)), 3),
            **{f"leadvector_spread_{n}_deg": round(float(v), 1) for n, v in zip(chest_names, np.median(spread, 0))}}


def _tangent(v: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(n, 2) degrees of each unit vector in ``v`` from ``m``, along φ and θ at ``m``."""
    theta, phi = np.arccos(np.clip(m[2], -1, 1)), np.arctan2(m[1], m[0])
    e_phi = np.array([-np.sin(phi), np.cos(phi), 0.0])
    e_theta = np.array([np.cos(theta) * np.cos(phi), np.cos(theta) * np.sin(phi), -np.sin(theta)])
    ang = np.degrees(np.arccos(np.clip(v @ m, -1, 1)))  # (n,)
    side = v - np.outer(v @ m, m)
    side /= np.maximum(np.linalg.norm(side, axis=1, keepdims=True), 1e-12)
    return ang[:, None] * np.stack([side @ e_phi, side @ e_theta], axis=1)


def plot_floor(path: Path, rotated: np.ndarray, mean: np.ndarray, names: list[str], turn_per_deg: float,
               displacement_sd_deg: float) -> Path:
    """``rotated`` (patients, leads, 3) unit lead vectors, ``mean`` (leads, 3) their mean directions."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = 3
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.3 * rows + 0.6), squeeze=False)
    pts = [_tangent(rotated[:, k], mean[k]) for k in range(len(names))]
    lim = max(45.0, 1.1 * max(float(np.abs(p).max()) for p in pts))
    circle = np.linspace(0, 2 * np.pi, 200)
    moved = displacement_sd_deg * RADIUS  # the median displacement as an angle
    for k, (ax, name, p) in enumerate(zip(axes.flat, names, pts)):
        spread = float(np.median(np.hypot(*p.T)))
        ax.scatter(p[:, 0], p[:, 1], s=12, color="tab:blue", alpha=0.8, label="a patient")
        for r, style, label in ((moved * turn_per_deg, "--", f"median displacement ({moved:.1f}°)"),
                                (TARGET_DEG / PER_AXIS * turn_per_deg, ":", f"{TARGET_DEG:g}° per axis target")):
            ax.plot(r * np.cos(circle), r * np.sin(circle), style, color="black", lw=1, label=label)
        ax.set_title(f"{name}: median {spread:.0f}° from the mean", fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if k % cols == 0:
            ax.set_ylabel("along θ (°)", fontsize=8)
        if k >= len(names) - cols:
            ax.set_xlabel("along φ (°)", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"Chest lead vectors of {rotated.shape[0]} simulated patients, electrodes exactly at their table "
                 "angles (each patient's common rotation removed):\npatients differ about as much as a displaced "
                 "electrode moves its lead, and far more than the target", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
