"""Beat timing: when each beat fires, which template it uses, and atrial fibrillation's f-waves.

- Sinus: RR = 60/HR modulated by respiratory sinus arrhythmia (a few % at the breathing
  rate, 0.15–0.4 Hz) plus ~1–3 % beat-to-beat jitter (short-term HRV of resting adults).
- Atrial fibrillation: irregularly irregular RR, log-normal with a coefficient of variation
  around 0.2 (typical of AF's RR histograms), no P waves; f-waves are a slowly
  frequency- and amplitude-modulated 4–8 Hz oscillation of an atrial dipole.
- Premature ventricular beats: a sinus beat is replaced by an ectopic beat at 55–75 % of
  the RR interval; the next sinus beat keeps its own time, which gives the full
  compensatory pause (the sinus impulse that fell in the refractory period is not conducted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NORMAL, ECTOPIC = 0, 1


@dataclass(frozen=True)
class Schedule:
    times: np.ndarray  # (n_beats,) s, each beat's QRS fiducial
    kinds: np.ndarray  # (n_beats,) NORMAL or ECTOPIC
    qt_scale: np.ndarray  # (n_beats,) Bazett's sqrt(RR / 1 s) from the preceding interval


def beat_schedule(params, duration_s: float, rng: np.random.Generator) -> Schedule:
    """Beats covering [−0.5 s, duration + 0.5 s] so edge beats still show their P and T."""
    rr0 = 60.0 / params.heart_rate_bpm
    n = int(np.ceil((duration_s + 1.0) / (rr0 * 0.6))) + 2  # enough beats even when RR shrinks
    if params.rhythm == "af":
        rr = rr0 * np.exp(rng.normal(0.0, params.rr_sd, n) - params.rr_sd**2 / 2)
        rr = np.maximum(rr, 0.28)  # the AV node's refractory period bounds the shortest RR
    else:
        phase = rng.uniform(0, 2 * np.pi)
        t_approx = np.arange(n) * rr0
        rsa = params.rsa * np.sin(2 * np.pi * params.resp_hz * t_approx + phase)
        rr = rr0 * (1.0 + rsa + rng.normal(0.0, params.rr_sd, n))
    times = -0.5 - rng.uniform(0, rr0) + np.concatenate([[0.0], np.cumsum(rr[:-1])])
    keep = times < duration_s + 0.5
    times, rr_prev = times[keep], np.concatenate([[rr0], rr])[: keep.sum()]
    kinds = np.full(times.shape, NORMAL)
    if params.rhythm == "pvc":
        kinds, times = _place_ectopics(times, rr_prev, duration_s, params, rng)
    rr_prev = np.diff(times, prepend=times[0] - rr0)
    return Schedule(times, kinds, np.sqrt(np.clip(rr_prev, 0.3, 2.0)))


def _place_ectopics(times, rr_prev, duration_s, params, rng):
    kinds = np.full(times.shape, NORMAL)
    inside = np.flatnonzero((times > 0.8) & (times < duration_s - 0.8))
    chosen = [k for k in inside if rng.random() < params.pvc_prob]
    if not chosen and inside.size:  # the rhythm was asked for: show at least one
        chosen = [int(rng.choice(inside))]
    times = times.copy()
    last = -10
    for k in chosen:
        if k - last < 2:  # no couplets: the pause needs a sinus beat on each side
            continue
        times[k] = times[k - 1] + params.pvc_coupling * rr_prev[k]
        kinds[k], last = ECTOPIC, k
    return kinds, times


def f_waves(t: np.ndarray, f_hz: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-amplitude AF f-wave time course at times ``t`` (s).

    The rate wanders ±0.5 Hz around ``f_hz`` and the amplitude by ±30 % over seconds, and a
    second harmonic makes the wave saw-toothed, as in recorded AF.
    """
    a1, a2, ph = rng.uniform(0, 2 * np.pi, 3)
    f = f_hz + 0.5 * np.sin(2 * np.pi * 0.13 * t + a1)
    dt = np.diff(t, prepend=t[0])
    phase = 2 * np.pi * np.cumsum(f * dt) + ph
    env = 1.0 + 0.3 * np.sin(2 * np.pi * 0.21 * t + a2)
    return env * (np.sin(phase) + 0.35 * np.sin(2 * phase + a1)) / 1.1
