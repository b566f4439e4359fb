"""Per-patient residual transfer: what the model gets wrong about this patient, learnt on
the first seconds of the leads that are recorded but not synthesis inputs, and passed on
to the unrecorded views near them.

Why: angle offsets alone barely move real records (README, calibration analysis), yet a
patient's own leads say a lot about that patient. During the first N s every lead of the
record is there; afterwards synthesis sees only its inputs (I, II, V3 in the evaluation
protocol). For each recorded lead k that is not an input, the model predicts k from the
inputs, and the patient's residual (truth − prediction) is fitted as a short linear filter
of the inputs (lags ±40 ms, ridge): F_k. A queried view q then gets

    correction_q(t) = Σ_k w_qk · F_k(inputs)(t),   w_qk = exp(−½ (angle(q, k) / τ)²)

with the inputs as zero-residual anchors in the same kernel, and the weights scaled down
whenever they sum past 1. A view far from every recorded lead (posterior, right-sided)
is left as the model draws it; one between two recorded leads takes their corrections.

τ = 20° and the lags were chosen by leave-one-lead-out on the validation split's non-scored
leads (V1, V4, V5 held out in turn, never V2 or V6): README, "Residual transfer".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry import View, angle_between
from .records import MODEL_FS, lead_quality

__all__ = ["Transfer", "fit_transfer", "TAU_DEG", "LAGS"]

TAU_DEG = 20.0
LAGS = tuple(range(-20, 21, 4))  # samples at 500 Hz: ±40 ms in 8 ms steps
RIDGE = 0.03  # relative to the mean eigenvalue of the inputs' lagged covariance


def _centre(x: np.ndarray) -> np.ndarray:
    return x - np.median(x, axis=-1, keepdims=True)


def _lagged(x: np.ndarray, lags=LAGS) -> np.ndarray:
    """(n, T) → (n·lags, T): row (i, l) is x[i] delayed by l samples, zero-filled."""
    n, t = x.shape
    out = np.zeros((len(lags), n, t), dtype=np.float64)
    for j, lag in enumerate(lags):
        if lag >= 0:
            out[j, :, lag:] = x[:, : t - lag]
        else:
            out[j, :, :lag] = x[:, -lag:]
    return out.reshape(len(lags) * n, t)


@dataclass
class Transfer:
    inputs: list[View]
    leads: list[View] = field(default_factory=list)  # recorded non-input leads with a fitted residual
    filters: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (leads, inputs·lags)
    reason: str = ""
    residual_before_uv: float = float("nan")  # mean |truth − model| of those leads over the fit window
    residual_after_uv: float = float("nan")  # the same after their own fitted correction
    tau_deg: float = TAU_DEG

    @property
    def fitted(self) -> bool:
        return len(self.leads) > 0

    def weights(self, queries: list[View]) -> np.ndarray:
        """(queries, leads) kernel weights; the inputs take part as zero-residual anchors."""
        if not self.fitted:
            return np.zeros((len(queries), 0))
        both = [*self.leads, *self.inputs]
        d = np.array([[angle_between(q, k) for k in both] for q in queries]).reshape(len(queries), len(both))
        w = np.exp(-0.5 * (d / self.tau_deg) ** 2)
        w /= np.maximum(w.sum(axis=1, keepdims=True), 1.0)
        return w[:, : len(self.leads)]

    def correction(self, x: np.ndarray, queries: list[View]) -> np.ndarray:
        """x (inputs, samples) mV at the model rate → (queries, samples) mV to add to the
        model's output for ``queries``."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != len(self.inputs):
            raise ValueError(f"expected ({len(self.inputs)}, samples) input, got {x.shape}")
        if not self.fitted:
            return np.zeros((len(queries), x.shape[1]), dtype=np.float32)
        return ((self.weights(queries) @ self.filters) @ _lagged(_centre(x))).astype(np.float32)

    def summary(self) -> str:
        if not self.fitted:
            return f"residual transfer not used: {self.reason}"
        return (f"residual transfer from {', '.join(v.name for v in self.leads)}: residual "
                f"{self.residual_before_uv:.0f} -> {self.residual_after_uv:.0f} µV on the fit window")


def fit_transfer(synth, x: np.ndarray, views: list[View], inputs: list[str], fs: float = MODEL_FS,
                 seconds: float = 5.0, offsets: np.ndarray | None = None, tau_deg: float = TAU_DEG,
                 ridge: float = RIDGE) -> Transfer:
    """Fit the residual filters of the recorded leads ``views`` (x: (leads, samples) mV at
    500 Hz, the first ``seconds`` are used) that are not among ``inputs``.

    ``synth`` is a :class:`~panorama.synth.Synthesizer`; ``offsets`` (inputs, 2) are the
    calibrated angle offsets synthesis will use. Returns an empty transfer with the reason
    when it cannot be fitted: fewer seconds than asked, an input absent or unusable, or no
    usable recorded lead beside the inputs. Never give it a lead you will score.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(views):
        raise ValueError(f"expected ({len(views)}, samples) signals, got {x.shape}")
    if fs != MODEL_FS:
        raise ValueError(f"residual transfer runs at the model rate ({MODEL_FS} Hz); resample first (got {fs})")
    names = [v.name for v in views]
    by_name = {v.name: v for v in views}
    missing = [n for n in inputs if n not in by_name]
    if missing:
        raise ValueError(f"input lead(s) {', '.join(missing)} not among the recorded leads")
    in_views = [by_name[n] for n in inputs]
    need = int(round(seconds * fs))
    if x.shape[1] < need:
        return Transfer(in_views, reason=f"only {x.shape[1] / fs:.1f} s recorded, {seconds:g} s asked")
    x = x[:, :need]
    flags = dict(zip(names, lead_quality(x.astype(np.float32))))
    flags.update({n: "missing" for i, n in enumerate(names) if not np.isfinite(x[i]).all()})
    bad = [f"{n} {flags[n]}" for n in inputs if flags[n] != "ok"]
    if bad:
        return Transfer(in_views, reason=f"input lead(s) unusable in the first {seconds:g} s: {', '.join(bad)}")
    others = [i for i, n in enumerate(names) if n not in inputs and flags[n] == "ok"]
    if not others:
        return Transfer(in_views, reason="no usable recorded lead beside the inputs")

    xin = np.stack([x[names.index(n)] for n in inputs])
    targets = [views[i] for i in others]
    pred = np.asarray(synth(xin.astype(np.float32), in_views, targets, offsets=offsets), dtype=np.float64)
    residual = _centre(x[others]) - _centre(pred)  # (leads, T)
    lag = _lagged(_centre(xin))  # (inputs·lags, T)
    a = lag @ lag.T
    a += ridge * np.trace(a) / len(a) * np.eye(len(a))
    filters = np.linalg.solve(a, lag @ residual.T).T  # (leads, inputs·lags)
    after = residual - filters @ lag
    return Transfer(in_views, targets, filters, "fitted",
                    float(np.mean(np.abs(residual)) * 1000), float(np.mean(np.abs(after)) * 1000), tau_deg)
