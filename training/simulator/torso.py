"""Volume conductor: where the electrodes sit and what each dipole puts on them.

Coordinates are in cm, in the data README's frame: x anterior, y the patient's left, z the
head, origin at the torso's centre.

- Torso: an ellipsoid. Its horizontal cross-section at heart level is the usual adult chest
  ellipse (half-width 14–18 cm, antero-posterior half-depth 9–13 cm, CT anthropometry);
  the long vertical axis (about 32 cm) only closes the surface, so that views pointing at
  the head or feet still meet it.
- Heart centre: anterior and to the left of the torso's centre, about 8 cm behind the
  sternum (the heart lies on the diaphragm behind the sternum, apex to the left).
- A view (θ, φ) is the electrode where the ray from the heart centre in that direction meets
  the torso surface, so a view's angle is what the paper's CT measurements describe.
- Limb electrodes RA, LA, LL: far away (about 30 cm from the heart), RA up and right, LA
  up and left, LL down. Their directions are not the equilateral Einthoven triangle but a
  scalene one in the manner of Burger's triangle (the torso's boundary makes the real limb
  leads' lead vectors unequal): lead I tilts about 12° upward and lead II about 63°
  downward instead of the table's 0° and 60°. This systematic difference between the table
  and the body is what lets population least squares beat dipole projection on real records,
  and the simulator reproduces it. Each patient gets a few cm of jitter on the positions.
- Potential of a current dipole p at r0, measured at r, in an infinite medium:
  p·(r − r0)/|r − r0|³ (the 1/(4πσ) factor is folded into the dipole's units, mV·cm²),
  generalised in ``lead_field`` to a mildly anisotropic conductivity and softened at
  distances below a region's size.
  A bounded, insulated torso raises far-field potentials relative to near-field ones (the
  limb leads are not 1/r² weaker in life); ``LIMB_GAIN`` stands in for that, a single
  scale that brings limb-lead amplitudes to those of recorded ECGs.
"""

from __future__ import annotations

import numpy as np

from panorama.geometry import unit_vector

# Nominal geometry (cm); per-patient variation is drawn in patient.py.
TORSO_SEMI_AXES = np.array([11.0, 16.0, 32.0])  # (anteroposterior, left-right, vertical)
HEART_CENTRE = np.array([3.0, 3.0, 8.0])  # ~8 cm behind the sternum, left of the midline
CONDUCTIVITY = np.array([1.0, 0.8, 1.0])  # relative, x y z: the lungs lower it laterally
SOFTENING_CM = 2.0  # finite size of a regional wavefront (see lead_field)
LIMB_DISTANCE = 30.0  # heart centre to each limb electrode
# Far-field gain of the limb electrodes (see module docstring); tuned so that lead II's
# R wave is about 1 mV when V2-V4 reach 1.5-3 mV, as in recorded 12-lead ECGs.
LIMB_GAIN = 6.5
# Frank's corrected orthogonal leads read the total dipole moment; mV per (mV·cm²).
FRANK_GAIN = 1.0 / 90.0

LIMB_NAMES = ("RA", "LA", "LL")
# Directions from the heart to the limb electrodes (θ, φ): RA (70, −90), LA (45, 90),
# LL (165, −90) — a Burger-like scalene triangle, tuned against the real records' I/II/V6
# correlations (the table's equilateral triangle would be RA (60, −90), LA (60, 90), LL 180).
_LIMB_DIRS = unit_vector([70.0, 45.0, 165.0], [-90.0, 90.0, -90.0])
# Frank VX, VY, VZ: +y (left), −z (feet), −x (back), as in the data README.
FRANK_AXES = {"VX": np.array([0.0, 1.0, 0.0]), "VY": np.array([0.0, 0.0, -1.0]), "VZ": np.array([-1.0, 0.0, 0.0])}


def ray_to_surface(origin: np.ndarray, directions: np.ndarray, semi_axes: np.ndarray) -> np.ndarray:
    """Points where rays from ``origin`` (inside) along ``directions`` (n, 3) leave the ellipsoid.

    Solves |(o + t d) / a|² = 1 for the positive root t; returns (n, 3) points in cm.
    """
    o = np.asarray(origin, dtype=float) / semi_axes
    d = np.asarray(directions, dtype=float) / semi_axes
    a = np.einsum("ij,ij->i", d, d)
    b = d @ o
    c = o @ o - 1.0
    if c >= 0:
        raise ValueError(f"heart centre {origin} lies outside the torso {semi_axes}; shrink its offset")
    t = (-b + np.sqrt(b * b - a * c)) / a
    return origin + t[:, None] * directions


def limb_positions(heart_nominal: np.ndarray, jitter_cm: np.ndarray) -> np.ndarray:
    """(3, 3) positions of RA, LA, LL: the triangle around the *nominal* heart centre.

    The limbs are fixed to the body, so a patient's heart offset does not move them.
    """
    return heart_nominal + LIMB_DISTANCE * _LIMB_DIRS + jitter_cm


def lead_field(electrodes: np.ndarray, dipoles: np.ndarray, conductivity: np.ndarray,
               softening_cm: float = SOFTENING_CM) -> np.ndarray:
    """(n_e, n_d, 3): potential at electrode e per unit moment of dipole d.

    Unbounded medium with a diagonal conductivity tensor Σ (relative; 1 = isotropic):
    φ = p·Σ⁻¹r / (√det Σ · (rᵀΣ⁻¹r)^{3/2}), r = electrode − dipole, the exact solution of
    ∇·(Σ∇φ) = ∇·J for a point dipole. Low lateral conductivity stands in for the lungs on
    either side of the heart, which bend the chest leads' lead vectors toward the left
    (as Frank's torso-model and Dower's transfer coefficients show).
    ``softening_cm`` (ε, default ``SOFTENING_CM``) smooths r² → r² + ε²: a region's wavefront is
    a few cm across, and a point dipole overstates its potential at electrodes closer than that.
    """
    inv = 1.0 / np.asarray(conductivity, dtype=float)
    diff = electrodes[:, None, :] - dipoles[None, :, :]
    q = np.einsum("edk,k,edk->ed", diff, inv, diff)[..., None] + softening_cm**2
    return diff * inv / (np.sqrt(np.prod(1.0 / inv)) * q**1.5)
