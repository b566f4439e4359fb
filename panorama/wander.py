"""Baseline wander: the model draws the heart's signal; chest views get the shared drift back.

Why: below about 0.67 Hz (breathing, electrode drift) a recorded chest lead is mostly the
drift of its own electrode, which nothing else records, plus the drift of the Wilson
central terminal, which every chest lead shares (a chest lead is its electrode minus the
mean of the three limb electrodes). Left in, that drift misleads every step: the model
draws it as if it were the heart's signal seen from an angle, and calibration, patient
adaptation and neighbour transfer fit it as if it were the patient's. On the validation
split, giving the pipeline's V2 and V6 their true slow part (below 0.67 Hz) would raise
PSNR from 30.5 to 32.9 dB and r from 0.91 to 0.96 (their true fast part instead: 36.6 dB,
0.97): a small part of the signal, and a large part of the error.

So, with ``Wander``: every recorded lead loses its slow part before anything is fitted or
drawn (``strip``: the fit window on its own, so nothing past it leaks in; the inputs over
the whole record), and afterwards each chest view keeps ``model_gain`` of whatever slow
part the model drew and gains ``common_gain`` of the chest inputs' mean slow part, their
shared terminal drift (``restore``). Limb and Frank views are drawn from the inputs as
recorded: their drift is the limb electrodes', which the inputs carry.

A chest view on the precordial line beside chest inputs (a monitor's V2 between its
recorded V1 and V3, V6 beyond V4 and V5) then moves ``line_share`` of the way to the
interpolation of those inputs' slow parts along the line (the weights of
:func:`~panorama.transfer.line_weights`): neighbouring electrodes breathe and drift alike,
and their drift is recorded. The share is neighbour transfer's own ``LINE_BLEND`` (0.2),
which interpolates the fast part the same way, so that with both the view takes that share
of the interpolation over the whole band. With I, II, V3 as inputs no view lies between
chest inputs and nothing changes; in a monitor's montage it lifts the whole pipeline from
31.16 to 31.37 dB on validation, 31.57 to 31.59 on the training split (README).

The gains are fitted with ``panorama bench wander`` by leave one lead out on the validation
split: V1, V4 and V5 are held out in turn and drawn by the whole pipeline from the stripped
I, II, V3 and the other leads' first 5 s; the gains are the least-squares ones for the
held-out leads' 5-10 s as recorded. V2 and V6 play no part. (On the training split the
model has learned those very leads, drift included, so its errors there are not what it
makes on an unseen view.) The cutoff, 0.5 Hz, did best in that bench, level with 0.67 Hz
(the AHA's corner for zero-phase baseline filters) and ahead of 1 Hz. The filter is
zero-phase (forward-backward), so it needs the whole signal: it suits records, not the
daemon's causal windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import butter, sosfiltfilt

from .geometry import View
from .records import MODEL_FS, lead_quality
from .transfer import LINE_BLEND, line_weights, view_kind

__all__ = ["Wander", "slow_part", "WANDER"]

CUTOFF_HZ = 0.5  # chosen by `panorama bench wander` among 0.5, 0.67 (the AHA's corner) and 1 Hz


def slow_part(x: np.ndarray, cutoff_hz: float = CUTOFF_HZ, fs: float = MODEL_FS) -> np.ndarray:
    """The part of each row below ``cutoff_hz``: the signal minus its zero-phase high-pass
    (second-order Butterworth, run forward and backward over the signal extended by its
    point reflection, up to one period of the cutoff at each end, so that the filter's
    start-up transient falls outside it). A row of one or two samples is returned whole."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-1] < 3:
        return x.copy()
    sos = butter(2, cutoff_hz, "highpass", fs=fs, output="sos")
    pad = min(x.shape[-1] - 1, int(round(fs / cutoff_hz)))
    return x - sosfiltfilt(sos, x, axis=-1, padtype="odd", padlen=pad)


@dataclass(frozen=True)
class Wander:
    model_gain: float
    common_gain: float
    cutoff_hz: float = CUTOFF_HZ
    line_share: float = 0.0  # how far a view between chest inputs moves to their interpolated slow part

    def __post_init__(self):
        if not 0.0 <= self.line_share <= 1.0:
            raise ValueError(f"line_share must lie in [0, 1], got {self.line_share}")

    def applies(self, view: View, inputs: list[View]) -> bool:
        """Whether ``view`` is a chest view with at least one chest lead among ``inputs``."""
        return view_kind(view) == "torso" and any(view_kind(v) == "torso" for v in inputs)

    def strip(self, x: np.ndarray, fs: float = MODEL_FS) -> np.ndarray:
        """(leads, T) float32: ``x`` without its slow part. A lead that ``lead_quality`` flags
        (missing, flat, saturated) or that holds a NaN is returned as recorded, so that the
        steps after still see why it cannot be used (a clipped lead, high-passed, is no longer
        pinned at its rail)."""
        x = np.asarray(x, np.float64)
        out = x.copy()
        ok = [i for i, (f, row) in enumerate(zip(lead_quality(x), x)) if f == "ok" and np.isfinite(row).all()]
        if ok:
            out[ok] = x[ok] - slow_part(x[ok], self.cutoff_hz, fs)
        return out.astype(np.float32)

    def restore(self, pred: np.ndarray, queries: list[View], x: np.ndarray, inputs: list[View],
                fs: float = MODEL_FS) -> np.ndarray:
        """(queries, T) float32: ``pred`` with each chest view's slow part scaled by
        ``model_gain`` and ``common_gain`` × the chest inputs' mean slow part added, then,
        for a view on the precordial line beside chest inputs, moved ``line_share`` of the
        way to their slow parts' interpolation; other views as they are. ``x``: (inputs, T)
        the inputs as recorded, mV, at ``fs``."""
        pred = np.asarray(pred)
        if pred.shape[0] != len(queries) or x.shape[0] != len(inputs) or pred.shape[1] != x.shape[1]:
            raise ValueError(f"prediction {pred.shape} for {len(queries)} views and inputs {x.shape} "
                             f"for {len(inputs)} leads do not match")
        rows = [i for i, q in enumerate(queries) if self.applies(q, inputs)]
        out = pred.astype(np.float64, copy=True)
        if rows:
            chest = [i for i, v in enumerate(inputs) if view_kind(v) == "torso"]
            slow = dict(zip((inputs[i].name for i in chest), slow_part(x[chest], self.cutoff_hz, fs)))
            common = np.mean(list(slow.values()), axis=0)
            out[rows] += (self.model_gain - 1.0) * slow_part(out[rows], self.cutoff_hz, fs) + self.common_gain * common
            for i in rows:
                w = self.line(queries[i], inputs)
                if w:
                    drift = sum(c * slow[n] for n, c in w.items())
                    out[i] += self.line_share * (drift - slow_part(out[i], self.cutoff_hz, fs))
        return out.astype(np.float32)

    def line(self, view: View, inputs: list[View]) -> dict[str, float]:
        """The weights over the chest inputs whose slow parts ``view`` moves toward
        (``line_share`` of the way); empty off the line, without such inputs, or when
        ``line_share`` is 0."""
        if self.line_share <= 0 or not self.applies(view, inputs):
            return {}
        return line_weights(view.name, [v.name for v in inputs if view_kind(v) == "torso"])

    def synthesize(self, draw, x: np.ndarray, inputs: list[View], queries: list[View],
                   fs: float = MODEL_FS) -> np.ndarray:
        """(queries, T) float32 through ``draw(x, views)`` → (views, T): the chest views
        from the stripped inputs, then restored; the others from ``x`` as recorded."""
        chest = [i for i, q in enumerate(queries) if self.applies(q, inputs)]
        rest = [i for i in range(len(queries)) if i not in chest]
        out = np.empty((len(queries), x.shape[1]), np.float32)
        if chest:
            qs = [queries[i] for i in chest]
            out[chest] = self.restore(draw(self.strip(x, fs), qs), qs, x, inputs, fs)
        if rest:
            out[rest] = draw(x, [queries[i] for i in rest])
        return out

    def summary(self) -> str:
        tail = (f"; views beside chest inputs on the precordial line move {self.line_share:g} of the way to "
                "their interpolation" if self.line_share > 0 else "")
        return (f"baseline below {self.cutoff_hz:g} Hz removed; chest views get {self.model_gain:.2f} x the "
                f"model's + {self.common_gain:.2f} x the chest inputs' mean" + tail)


# Fitted by `panorama bench wander` (validation split, leave one lead out, V2 and V6 unused; README).
WANDER = Wander(model_gain=0.94, common_gain=0.34, line_share=LINE_BLEND)
