"""Neighbour transfer: continue the patient's own recorded leads past the calibration
window, and give the model the nearest of them as one more input.

Why: angle offsets alone barely move real records (README, calibration analysis), yet in
the first seconds a patient's other leads say a lot about that patient, and the model
draws an unseen view far better when a recorded neighbour is among its inputs (V2 from
I, II, V1, V3: 29.5 dB on the validation split, against 28.4 from I, II, V3). After the
first N s synthesis sees only its inputs (I, II, V3 in the evaluation protocol), so the
neighbour is reconstructed: for each recorded lead k that is not an input (V1, V4, V5, …),
the model predicts k from the inputs, and the patient's residual (truth − prediction) over
the first N s is fitted as a short linear filter of the inputs (lags ±40 ms, ridge): k's
continuation is model + filter. A queried view then gets, as an extra input, the
reconstruction of the nearest such lead of its own kind (torso electrode, limb or Frank
lead) within 45°; a view with none that near (with I, II, V3 as inputs: V8, V9, V5R, Frank
leads, and V7 unless V6 is recorded) is drawn from the inputs alone, as before. Given the
recorded leads' own calibrated offsets (``view_offsets``: a leave-one-out fit of every
recorded lead), the neighbour enters synthesis at its fitted angle rather than the table's
(+0.05 dB for the whole pipeline on validation, +0.13 on the training split; README).

One neighbour rather than two or three was chosen by leave-one-lead-out on real records
without V2 or V6 (`panorama bench transfer`; README). A first version added the recorded
leads' residuals to nearby views through an angular kernel instead: it gained half as much.

A view on the standard precordial line (V1 … V6) with recorded leads of that line on both
sides, or two on one side with the nearest one place away, is also drawn by linear
interpolation of them in their order along the chest (V2 = (V1 + V3) / 2 and V6 = 2·V5 − V4
in the protocol's montage; the inputs as recorded, the other leads continued), and the
model's view takes ``LINE_BLEND`` (0.2) of it. The model draws every angle from what the
simulator taught it; the interpolation is this patient's own leads, and the two err
differently (+0.5 dB for the whole pipeline on validation; README). Views off that line
(V7–V9, right-sided, high and arbitrary leads) are not touched: no recording here holds
them to check an interpolation. The interpolation needs no continued lead: in a monitor's
montage, where every recorded lead is an input and there is nothing to continue, a transfer
still interpolates between the inputs that pass the fit window's checks (V2 = (V1 + V3) / 2
from the recorded V1 and V3; +0.3 dB for that pipeline on validation; README).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry import View, angle_between
from .metrics import centre
from .records import MODEL_FS, check_fit_window, screen_leads

__all__ = ["Transfer", "fit_transfer", "fit_neighbour_offsets", "line_weights", "LAGS", "LINE_BLEND",
           "MAX_NEIGHBOUR_DEG", "PRECORDIAL_LINE"]

MAX_NEIGHBOUR_DEG = 45.0
LAGS = tuple(range(-20, 21, 4))  # samples at 500 Hz: ±40 ms in 8 ms steps
RIDGE = 0.03  # relative to the mean eigenvalue of the inputs' lagged covariance
# The standard precordial electrodes in their order along the chest. A view on this line
# with recorded leads of it on both sides (or two on one side, the nearest one place away)
# is also drawn by linear interpolation of them in that order, and the model's view takes
# LINE_BLEND of it (README, "Neighbour transfer").
PRECORDIAL_LINE = {"V1": 1, "V2": 2, "V3": 3, "V4": 4, "V5": 5, "V6": 6}
LINE_BLEND = 0.2
LINE_MAX_GAP = 2  # places between a view and each lead it is interpolated from


def line_weights(view: str, recorded: list[str], max_gap: int = LINE_MAX_GAP) -> dict[str, float]:
    """Weights over ``recorded`` lead names that draw ``view`` by linear interpolation along the
    precordial line (V1 … V6 in order): between the nearest recorded lead on each side, each
    at most ``max_gap`` places away, or else one place past the two nearest on one side (the
    second at most ``max_gap`` places beyond the first). Empty when the view is not on the
    line, is itself in ``recorded``, or has no such leads."""
    if view not in PRECORDIAL_LINE or view in recorded:
        return {}
    p = PRECORDIAL_LINE[view]
    at = sorted((PRECORDIAL_LINE[n], n) for n in dict.fromkeys(recorded) if n in PRECORDIAL_LINE)
    below = [(q, n) for q, n in at if q < p][::-1]  # nearest first
    above = [(q, n) for q, n in at if q > p]
    if below and above and p - below[0][0] <= max_gap and above[0][0] - p <= max_gap:
        (lo, a), (hi, b) = below[0], above[0]
        return {a: (hi - p) / (hi - lo), b: (p - lo) / (hi - lo)}
    side = below if below and (not above or p - below[0][0] < above[0][0] - p) else above
    if len(side) < 2 or abs(side[0][0] - p) != 1 or abs(side[1][0] - side[0][0]) > max_gap:
        return {}
    (q1, a), (q2, b) = side[:2]
    t = (p - q1) / (q1 - q2)  # past a, in units of a's distance from b
    return {a: 1 + t, b: -t}


def fit_neighbour_offsets(model, x: np.ndarray, views: list[View], seconds: float = 5.0, device=None,
                          inputs: list[str] | None = None):
    """The recorded leads' own angle offsets, for ``fit_transfer``'s ``view_offsets``: every
    lead fitted leave-one-out, φ only under the subset montage's prior, limb leads at their
    table angles (``calibrate.SUBSET``). Not the monitor's settings, which a leave-one-out
    fit would choose by default: with its θ and φ under a lighter prior the whole pipeline
    fell from 31.09 to 31.00 dB on validation (README). Returns the ``CalibrationResult``,
    or None when ``inputs`` (lead names) are given and every lead of ``views`` is among
    them: then there is no neighbour to continue, and none needs an angle."""
    from .calibrate import SUBSET, calibrate

    if inputs is not None and {v.name for v in views} <= set(inputs):
        return None

    return calibrate(model, x, views, seconds=seconds, axes=SUBSET.axes, prior_weight=SUBSET.prior_weight,
                     move_far_field=SUBSET.move_limb_leads, device=device)


def view_kind(v: View) -> str:
    """'torso' (an electrode on the chest or back), 'limb' or 'frank'."""
    return v.group if v.group in ("limb", "frank") else "torso"


def _lagged(x: np.ndarray, lags=LAGS) -> np.ndarray:
    """(n, T) → (lags·n, T): row j·n + i is x[i] delayed by lags[j] samples; the ends are
    held at their edge values, so the first and last samples keep every tap."""
    n, t = x.shape
    pad = max(abs(lag) for lag in lags)
    xp = np.pad(x, ((0, 0), (pad, pad)), mode="edge")
    return np.concatenate([xp[:, pad - lag: pad - lag + t] for lag in lags]).astype(np.float64, copy=False)


@dataclass
class Transfer:
    inputs: list[View]
    leads: list[View] = field(default_factory=list)  # recorded non-input leads with a fitted residual
    filters: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (leads, lags·inputs)
    reason: str = ""
    residual_before_uv: float = float("nan")  # mean |truth − model| of those leads over the fit window
    residual_after_uv: float = float("nan")  # the same after their own fitted correction
    max_neighbour_deg: float = MAX_NEIGHBOUR_DEG
    per_view: int = 1  # neighbours given to each view
    lags: tuple[int, ...] = LAGS  # the filters' taps, samples
    lead_offsets: np.ndarray | None = None  # (leads, 2) dθ, dφ of each fitted lead as an input; None: table
    line_blend: float = LINE_BLEND  # the share of a precordial view drawn by interpolation along the line
    line_inputs: tuple[str, ...] = ()  # the inputs that passed the fit window's checks: the line may use them

    @property
    def fitted(self) -> bool:
        return len(self.leads) > 0

    def reconstruct(self, synth, x: np.ndarray, offsets: np.ndarray | None = None) -> np.ndarray:
        """x (inputs, samples) mV at the model rate → (leads, samples): each fitted lead as
        the model draws it from the inputs plus this patient's residual filter."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] != len(self.inputs):
            raise ValueError(f"expected ({len(self.inputs)}, samples) input, got {x.shape}")
        base = np.asarray(synth(x, self.inputs, self.leads, offsets=offsets), dtype=np.float64)
        if not self.fitted:
            return base.astype(np.float32)
        return (base + self.filters @ _lagged(centre(x), self.lags)).astype(np.float32)

    def neighbours(self, queries: list[View]) -> list[tuple[int, ...]]:
        """For each query, the indices in ``leads`` of its ``per_view`` nearest fitted leads of
        the same kind (torso electrode, limb lead or Frank lead) within ``max_neighbour_deg``,
        nearest first."""
        out = []
        for q in queries:
            near = sorted((angle_between(q, v), i) for i, v in enumerate(self.leads)
                          if view_kind(v) == view_kind(q) and v.name != q.name)  # never a view's own recording
            out.append(tuple(i for d, i in near[: self.per_view] if d <= self.max_neighbour_deg))
        return out

    def synthesize(self, synth, x: np.ndarray, queries: list[View], offsets: np.ndarray | None = None) -> np.ndarray:
        """x (inputs, samples) mV at the model rate → (queries, samples) mV: each query from
        the inputs plus its reconstructed neighbours; queries without one from the inputs. A
        query on the precordial line beside recorded leads (between two, or past two as V6
        past V4 and V5) then takes ``line_blend`` of their interpolation (:meth:`line`)."""
        x = np.asarray(x, dtype=np.float32)
        near, line = self.neighbours(queries), self.line(queries)
        recon = self.reconstruct(synth, x, offsets) if any(near) or (self.fitted and any(line)) else None
        out = np.empty((len(queries), x.shape[1]), np.float32)
        for ks in dict.fromkeys(near):  # one model call per distinct set of neighbours
            idx = [i for i, n in enumerate(near) if n == ks]
            qs = [queries[i] for i in idx]
            if not ks:
                out[idx] = synth(x, self.inputs, qs, offsets=offsets)
                continue
            own = np.zeros((len(self.inputs), 2)) if offsets is None else np.asarray(offsets)
            nb = np.zeros((len(ks), 2)) if self.lead_offsets is None else self.lead_offsets[list(ks)]
            off = np.concatenate([own, nb]).astype(np.float32)
            out[idx] = synth(np.concatenate([x, recon[list(ks)]]), [*self.inputs, *(self.leads[k] for k in ks)], qs,
                             offsets=off)
        if any(line):
            both = x if recon is None else np.concatenate([x, recon])  # the inputs, then the continued leads
            signals = dict(zip((v.name for v in [*self.inputs, *self.leads]), centre(both)))
            for i, w in enumerate(line):
                if w:
                    drawn = sum(c * signals[n] for n, c in w.items())
                    out[i] += (self.line_blend * (drawn - centre(out[i]))).astype(np.float32)
        return out

    def line(self, queries: list[View]) -> list[dict[str, float]]:
        """For each query, the weights over the chest inputs and fitted leads (continued) that
        draw it by interpolation along the precordial line (:func:`line_weights`); empty where
        none does or ``line_blend`` is 0. A transfer with no lead to continue still
        interpolates between its inputs, and one refused for an unusable input between the
        others; one refused for its window (fewer seconds than asked) does not."""
        if self.line_blend <= 0:
            return [{} for _ in queries]
        usable = [*(v for v in self.inputs if v.name in self.line_inputs), *self.leads]
        recorded = [v.name for v in usable if view_kind(v) == "torso"]
        return [line_weights(q.name, recorded) for q in queries]

    def line_summary(self, queries: list[View]) -> list[str]:
        """One line per query drawn partly by interpolation along the precordial line."""
        return [f"precordial line: {q.name} takes {self.line_blend:g} of "
                + " ".join(f"{c:+.2f} {n}" for n, c in w.items()).lstrip("+")
                for q, w in zip(queries, self.line(queries)) if w]

    def summary(self) -> str:
        if not self.fitted:
            return f"neighbour transfer not used: {self.reason}"
        return (f"neighbour transfer from {', '.join(v.name for v in self.leads)}: residual "
                f"{self.residual_before_uv:.0f} -> {self.residual_after_uv:.0f} µV on the fit window")


def fit_transfer(synth, x: np.ndarray, views: list[View], inputs: list[str], fs: float = MODEL_FS,
                 seconds: float = 5.0, offsets: np.ndarray | None = None,
                 view_offsets: np.ndarray | None = None, max_neighbour_deg: float = MAX_NEIGHBOUR_DEG,
                 ridge: float = RIDGE, lags: tuple[int, ...] = LAGS, line_blend: float | None = None) -> Transfer:
    """Fit the residual filters of the recorded leads ``views`` (x: (leads, samples) mV at
    500 Hz, the first ``seconds`` are used) that are not among ``inputs``.

    ``synth`` is a :class:`~panorama.synth.Synthesizer`; ``offsets`` (inputs, 2) are the
    calibrated angle offsets synthesis will use. ``view_offsets`` (views, 2), optional:
    offsets for every lead of ``views`` (those of the inputs are ignored); a fitted lead
    given as a neighbour input takes its own row, so it enters synthesis at its calibrated
    angle rather than the table's. Its continuation is still the model's view at the table
    angle plus the residual filter, which is fitted to the recording itself either way.
    Limb leads are not fitted when the inputs already hold two usable ones (the other four
    follow from those two). Returns an empty transfer with the reason when it cannot be
    fitted: fewer seconds than asked, an input unusable in them, or no usable recorded lead
    beside the inputs; in the last two it still draws precordial views by interpolation
    between its usable inputs (:meth:`Transfer.line`). An input that is not among ``views``, a lead named twice, or
    ``view_offsets`` of another shape is a ValueError. Never give it a lead you will score.
    ``line_blend``: the share of a precordial view drawn by interpolation of the recorded
    leads along the line (:meth:`Transfer.line`); None takes ``LINE_BLEND``, 0 turns it off.
    """
    line_blend = LINE_BLEND if line_blend is None else float(line_blend)
    if not 0.0 <= line_blend <= 1.0:
        raise ValueError(f"line_blend must lie in [0, 1], got {line_blend}")
    x = np.asarray(x, dtype=np.float64)
    check_fit_window(x, views, fs, "neighbour transfer", inputs)
    if view_offsets is not None:
        view_offsets = np.asarray(view_offsets, dtype=np.float32)
        if view_offsets.shape != (len(views), 2):
            raise ValueError(f"view_offsets must be ({len(views)}, 2), one row per view, got {view_offsets.shape}")
    names = [v.name for v in views]
    by_name = {v.name: v for v in views}
    in_views = [by_name[n] for n in inputs]
    need = int(round(seconds * fs))
    if x.shape[1] < need:
        return Transfer(in_views, reason=f"only {x.shape[1] / fs:.1f} s recorded, {seconds:g} s asked")
    x = x[:, :need]
    flags = dict(zip(names, screen_leads(x, fs)))
    bad = [f"{n} {flags[n]}" for n in inputs if flags[n] != "ok"]
    usable = tuple(n for n in inputs if flags[n] == "ok")  # what the line may draw from
    if bad:
        return Transfer(in_views, reason=f"input lead(s) unusable in the first {seconds:g} s: {', '.join(bad)}",
                        line_blend=line_blend, line_inputs=usable)
    others = [i for i, n in enumerate(names) if n not in inputs and flags[n] == "ok"]
    if sum(by_name[n].group == "limb" for n in inputs) >= 2:  # the frontal plane is recorded
        others = [i for i in others if views[i].group != "limb"]
    if not others:  # nothing to continue; the inputs may still be interpolated along the line
        return Transfer(in_views, reason="no usable recorded lead beside the inputs", line_blend=line_blend,
                        line_inputs=usable)

    xin = np.stack([x[names.index(n)] for n in inputs])
    targets = [views[i] for i in others]
    pred = np.asarray(synth(xin.astype(np.float32), in_views, targets, offsets=offsets), dtype=np.float64)
    residual = centre(x[others]) - centre(pred)  # (leads, T)
    lag = _lagged(centre(xin), lags)  # (lags·inputs, T)
    a = lag @ lag.T
    a += ridge * np.trace(a) / len(a) * np.eye(len(a))
    filters = np.linalg.solve(a, lag @ residual.T).T  # (leads, lags·inputs)
    after = residual - filters @ lag
    return Transfer(in_views, targets, filters, "fitted", float(np.mean(np.abs(residual)) * 1000),
                    float(np.mean(np.abs(after)) * 1000), max_neighbour_deg, lags=tuple(lags),
                    lead_offsets=None if view_offsets is None else view_offsets[others], line_blend=line_blend,
                    line_inputs=usable)
