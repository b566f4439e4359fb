"""Per-patient parameters: anatomy, sources and rhythm, drawn from population distributions.

Where the spreads come from (and what was tuned): heart position varies by a few cm and its
orientation by ±15–25° between adults (CT/MRI studies of the heart's axis); the torso's
chest ellipse by ±10 % (anthropometry); wave amplitudes are log-normal with the spread of
recorded 12-lead amplitudes; the distributions were then tuned until simulated patients
scored like the real records in ``shared/data/ecg`` on the data README's benchmark
(zero / dipole projection / population least squares, I, II, V3 → V2, V6).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from panorama.geometry import unit_vector

from . import sources
from .sources import BeatTemplate
from .torso import CONDUCTIVITY, SOFTENING_CM, TORSO_SEMI_AXES

# Probabilities when no rhythm is forced: mostly sinus, as in a diagnostic ECG population.
RHYTHMS: dict[str, float] = {
    "sinus": 0.50,
    "af": 0.12,
    "pvc": 0.12,
    "wide_qrs": 0.10,
    "st_elevation": 0.08,
    "st_depression": 0.08,
}


@dataclass
class PatientParams:
    """Everything that defines one simulated patient; ``render`` is deterministic given it."""

    rhythm: str
    heart_rate_bpm: float
    heart_offset_cm: np.ndarray  # (3,) from the nominal heart centre
    rotation_deg: np.ndarray  # (3,) extrinsic x, y, z rotations of the heart about its centre
    torso_semi_axes_cm: np.ndarray  # (3,) anteroposterior, left-right, vertical
    limb_jitter_cm: np.ndarray  # (3, 3) RA, LA, LL offsets from the Einthoven triangle
    conductivity: np.ndarray  # (3,) relative conductivity along x, y, z (torso.lead_field)
    beat: BeatTemplate  # the conducted (supraventricular) beat
    ectopic: BeatTemplate | None = None  # premature ventricular beat, if any
    rr_sd: float = 0.02  # beat-to-beat RR jitter (fraction); AF: log-normal sigma
    rsa: float = 0.03  # respiratory sinus arrhythmia (fraction of RR)
    resp_hz: float = 0.25
    pvc_prob: float = 0.0
    pvc_coupling: float = 0.65
    af_f_hz: float = 6.0
    af_moment: np.ndarray = field(default_factory=lambda: np.zeros(3))  # mV·cm², heart frame
    af_pos: np.ndarray = field(default_factory=lambda: np.array([-2.0, -1.0, 3.0]))
    schedule_seed: int = 0  # draws RR intervals and f-waves inside render()
    softening_cm: float = SOFTENING_CM  # wavefront size in the lead field (sources.SOFTENING_BY_ANATOMY)
    details: dict = field(default_factory=dict)  # labels for meta: BBB kind, injury region, ...


def sample_patient(rng: np.random.Generator, rhythm: str | None = None, anatomy: str = "v1") -> PatientParams:
    """Draw one patient; ``rhythm`` forces one of ``RHYTHMS`` (else drawn with its probability).
    ``anatomy`` chooses the ventricular sources (``sources.ANATOMIES``); it draws nothing, so a
    seed gives the same patient under either, with its sources placed differently."""
    if rhythm is None:
        rhythm = str(rng.choice(list(RHYTHMS), p=list(RHYTHMS.values())))
    elif rhythm not in RHYTHMS:
        raise ValueError(f"unknown rhythm {rhythm!r}; choose from {', '.join(RHYTHMS)}")
    details: dict = {}

    hr = float(np.clip(rng.normal(72, 12), 48, 110))
    if rhythm == "af":
        hr = float(np.clip(rng.normal(95, 20), 60, 150))  # AF is often poorly rate-controlled

    beat = sources.normal_beat(p_wave=rhythm != "af", anatomy=anatomy)
    if rhythm == "wide_qrs":
        details["bundle_branch_block"] = kind = str(rng.choice(["lbbb", "rbbb"]))
        beat = sources.bundle_branch_beat(kind, p_wave=True, anatomy=anatomy)
    beat = sources.perturb(beat, rng, amp_sd=0.25, time_sd=0.004, width_sd=0.12, dir_deg=12.0, pos_cm=0.8)
    # Whole-wave scale factors: patients differ mostly in overall QRS, T and P size.
    beat = beat.scaled(beat.select("Q"), float(np.exp(rng.normal(0, 0.25))))
    beat = beat.scaled(beat.select("T"), float(np.exp(rng.normal(0, 0.35))))
    beat = beat.scaled(beat.select("P"), float(np.exp(rng.normal(0, 0.30))))
    if rhythm in ("st_elevation", "st_depression"):
        region = str(rng.choice(sources.INJURY_REGIONS))
        elevation = rhythm == "st_elevation"
        amp = rng.uniform(12, 30) if elevation else rng.uniform(5, 14)  # ~0.1–0.4 mV ST shift
        details["injury_region"] = region
        beat = beat + sources.perturb(sources.injury_current(region, elevation, amp), rng,
                                      amp_sd=0.1, time_sd=0.003, width_sd=0.1, dir_deg=10.0, pos_cm=0.5)

    params = PatientParams(
        rhythm=rhythm,
        heart_rate_bpm=hr,
        heart_offset_cm=rng.normal(0.0, 1.2, 3),
        rotation_deg=rng.normal(0.0, 12.0, 3),
        torso_semi_axes_cm=TORSO_SEMI_AXES * np.exp(rng.normal(0.0, [0.09, 0.07, 0.05])),
        limb_jitter_cm=rng.normal(0.0, 2.0, (3, 3)),
        conductivity=CONDUCTIVITY * np.exp(rng.normal(0.0, 0.1, 3)),
        beat=beat,
        rr_sd=float(rng.uniform(0.01, 0.03)),
        rsa=float(rng.uniform(0.0, 0.05)),
        resp_hz=float(rng.uniform(0.15, 0.4)),
        schedule_seed=int(rng.integers(2**31)),
        softening_cm=sources.SOFTENING_BY_ANATOMY[anatomy],
        details=details,
    )
    if rhythm == "af":
        params.rr_sd = float(rng.uniform(0.12, 0.28))
        params.af_f_hz = float(rng.uniform(4.0, 8.0))
        # f-waves are largest in V1: an atrial dipole pointing anterior-right-inferior.
        direction = unit_vector(rng.uniform(100, 150), rng.uniform(-60, 20))
        params.af_moment = direction * rng.uniform(2.0, 6.0)  # ~0.03–0.1 mV in V1
    if rhythm == "pvc":
        params.pvc_prob = float(rng.uniform(0.05, 0.25))
        params.pvc_coupling = float(rng.uniform(0.55, 0.75))
        origin = sources.PVC_ORIGINS[rng.integers(len(sources.PVC_ORIGINS))] + rng.normal(0, 0.7, 3)
        params.ectopic = sources.perturb(sources.ectopic_beat(origin, amp=rng.uniform(80, 140)), rng,
                                         amp_sd=0.1, time_sd=0.003, width_sd=0.08, dir_deg=8.0, pos_cm=0.3)
        details["pvc_origin_cm"] = np.round(origin, 1).tolist()
    return params
