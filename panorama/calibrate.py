"""On-the-fly calibration (Stage III): fit each recorded lead's angle offset (dθ, dφ).

What moves depends on the montage (see ``axes``): where every recorded torso lead is a
synthesis input (a monitor), dθ and dφ of every input lead, I and II included; where other
recorded leads only supervise a subset of inputs, dφ of the chest inputs alone, dθ staying 0
and the limb leads at their table angles; there the supervising chest leads' dφ moves too,
as queries only, so that their own misplacement is not pinned on the inputs.

Electrodes are never exactly where the angle table says. With the model frozen, the leads
recorded in the first seconds supervise each other: each lead is predicted from all the
others (leave-one-out), and the offsets of the input leads — as an input and as a query —
are moved to make those predictions agree with what was recorded. III, aVR, aVL and aVF
beside I and II are predicted but not used as inputs, exactly as synthesis uses the leads
(``redundant_limb_leads``), and never move. Only 2 numbers per lead are fitted; the
encoder runs once (its features do not depend on angles), so each step costs only the
geometry, fusion and head.

Offsets are bounded (``max_offset_deg`` through tanh) and pulled toward zero by a Gaussian
prior with the CT-measured spread (10.6°), so an offset the data cannot identify stays
near the table. A fit that does not reduce the leave-one-out residual (in-sample: the same leads and seconds) is rejected and the table
angles are kept. Every exit says why.

Before anything is fitted, the recording is checked for swapped electrodes
(``panorama.electrodes``): two chest electrodes exchanged further apart than the offsets'
bounds (V1 and V5) is an error no offset mends, and a fit would bend the geometry toward
it. Such a recording keeps the table angles, and the result names the swap (``swap``,
``swap_refused``). A swap of neighbours within the bounds, or of limb electrodes, is named
and fitted on (``swap_fitted_on``): on validation records that drew better views.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from .electrodes import check_electrodes
from .geometry import STANDARD_12, View, descriptors, redundant_limb_leads, resolve_views, rotating_heart
from .records import MODEL_FS, check_fit_window, screen_leads

class FitSettings(NamedTuple):
    """What a fit moves and how hard the prior holds it, chosen by montage (calibrate's docstring, README)."""
    axes: str  # "phi", "theta" or "theta,phi"
    prior_weight: float
    move_limb_leads: bool  # I and II move too (``move_far_field``)
    # prior weight of the supervising chest leads' own offsets (they move as queries only, so
    # their misplacement is not pinned on the inputs); None: they keep their table angles
    nuisance_weight: float | None = None


EVERY_LEAD = FitSettings("theta,phi", 0.03, True)  # every recorded torso lead is a synthesis input (a monitor)
FEW_CHEST = FitSettings("theta,phi", 0.3, True)  # such a monitor with fewer than MONITOR_MIN_CHEST chest inputs
MONITOR_MIN_CHEST = 4
SUBSET = FitSettings("phi", 0.1, False, 0.03)  # other torso leads supervise a subset of inputs; theta stays put
PRIOR_SD_DEG = 10.6  # electrode displacement spread measured by CT (the paper's Panobench)


MIN_SECONDS = 1.0  # a fit window shorter than a beat or two holds nothing to fit


def check_seconds(seconds: float) -> float:
    """The seconds a per-patient fit is asked for: 0 (no fit) or finite and at least
    ``MIN_SECONDS``. ValueError, saying so, if not."""
    if seconds != 0 and not (math.isfinite(seconds) and seconds >= MIN_SECONDS):
        raise ValueError(f"calibration takes 0 (none) or at least {MIN_SECONDS:g} s of recording "
                         f"(the paper and the daemon fit on 5), got {seconds:g}")
    return float(seconds)


@dataclass
class CalibrationResult:
    leads: list[str]
    offsets_deg: np.ndarray  # (leads, 2): dθ, dφ added to the table angles
    accepted: bool
    reason: str
    residual_before_uv: float = float("nan")  # mean |leave-one-out error|, µV
    residual_after_uv: float = float("nan")
    steps: int = 0
    seconds: float = 0.0
    axes: str = ""  # the angles that were free to move
    prior_weight: float = float("nan")  # how hard the prior held them
    used: list[str] = field(default_factory=list)  # leads that took part
    fitted: list[str] = field(default_factory=list)  # leads whose offsets were fitted
    # supervising chest leads that moved as queries only (``FitSettings.nuisance_weight``) and
    # their offsets: fitted so their misplacement is not pinned on the inputs, never used by synthesis
    nuisance: list[str] = field(default_factory=list)
    nuisance_offsets_deg: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    swap: str = ""  # electrodes that look swapped ("V1 and V5 swapped"); "" when the labels fit
    # the swap was named and the fit went on: chest electrodes within the offsets' bounds of
    # each other (the offsets reach them), or a limb reversal (fitting on drew better views);
    # otherwise nothing was fitted, and the steps after it should not fit either
    swap_fitted_on: bool = False

    @property
    def swap_refused(self) -> bool:
        """Chest electrodes look swapped beyond the offsets' reach: the patient keeps the plain draw."""
        return bool(self.swap) and not self.swap_fitted_on

    def offsets_for(self, names: list[str]) -> np.ndarray:
        """Offsets for ``names`` in that order (zeros for leads not calibrated)."""
        idx = {n: i for i, n in enumerate(self.leads)}
        return np.stack([self.offsets_deg[idx[n]] if n in idx else np.zeros(2) for n in names])

    def summary(self) -> str:
        fitted = ", ".join(f"{n} ({d[0]:+.1f}°, {d[1]:+.1f}°)" for n, d in zip(self.leads, self.offsets_deg)
                           if n in self.fitted)
        verdict = "accepted" if self.accepted else "rejected"
        how = f" ({self.axes}, prior weight {self.prior_weight:g})" if fitted else ""
        queries = (f"; supervising leads moved as queries: {', '.join(self.nuisance)}"
                   if fitted and self.nuisance else "")
        residual = (f"; residual {self.residual_before_uv:.0f} -> {self.residual_after_uv:.0f} µV"
                    if np.isfinite(self.residual_before_uv) else "")  # no fit ran: nothing to say
        return f"calibration {verdict}: {self.reason}{residual}; offsets{how} {fitted or 'none'}{queries}"


def _reject(views, reason, **kw) -> CalibrationResult:
    return CalibrationResult([v.name for v in views], np.zeros((len(views), 2)), False, reason, **kw)


def calibrate(model, x: np.ndarray, views: list[View], fs: float = MODEL_FS, seconds: float = 5.0,
              inputs: list[str] | None = None, max_offset_deg: float = 30.0, steps: int = 15,
              lr: float = 0.08, prior_weight: float | None = None, min_gain: float = 0.02, patience: int = 3,
              move_far_field: bool | None = None, axes: str | None = None,
              move_supervising: bool | None = None,
              device: str | torch.device | None = None) -> CalibrationResult:
    """Fit angle offsets for the recorded leads ``views`` from ``x`` (leads, samples) mV.

    ``inputs``: the leads that synthesis will use; only their offsets are fitted, and every
    recorded lead is predicted from them (each input from the other inputs). None: all
    recorded leads are inputs (plain leave-one-out). Either way the derived limb leads
    (III, aVR, aVL, aVF beside I and II) are predicted only, never inputs.

    ``move_far_field``: also fit the limb (far-field) input leads' offsets (I and II; the
    leads derived from them are never inputs). Limb leads take part as inputs and queries
    either way, and at least one chest lead must be fitted.

    ``axes``: which angles move, "phi", "theta" or "theta,phi"; ``prior_weight``: how hard
    the prior holds them. None (the default) chooses these and ``move_far_field`` by
    montage, measured on both splits of the real records and on the simulator (README):

    - every usable torso lead is an input (``inputs`` None, or a monitor synthesising from
      all it records): ``EVERY_LEAD``, θ and φ, prior weight 0.03, limb leads too. Every
      electrode moves as an input and as a query; fitting θ as well, with a lighter prior,
      lifted the 10 leads without V2/V6 -> V2, V6 from +0.42 to +0.88 dB on validation, and
      moving I and II too to +1.08 (training split +1.03 -> +1.19). The limb electrodes are
      not misplaced; their offsets absorb the model's frontal-plane error. With fewer than
      ``MONITOR_MIN_CHEST`` (4) chest inputs, ``FEW_CHEST``: the same under the prior weight
      0.3, which lifted the six limb leads with V1, V3, V5 -> V2, V4, V6 from +0.02 to +0.47
      dB on validation and spared the simulated posterior views (README).
    - other recorded torso leads supervise a subset of inputs (I, II, V3 with V1, V4, V5
      beside them): ``SUBSET``, φ only, prior weight 0.1, chest leads only (moving the limb
      leads there swings the views: README). There the shipped model cannot
      place θ (it puts a simulated electrode's θ 11.6° from the truth where the table is 8.3°
      off; ``panorama bench calibration --identifiability``) and fitting it lowered synthesis.
      The supervising chest leads (V1, V4, V5) move too, on the same axes, as queries only,
      under the prior weight 0.03 (``SUBSET.nuisance_weight``): held at the table, their own
      misplacement was pinned on V3 (validation's whole pipeline 31.09 -> 31.15 dB; weights
      0.01, 0.1, 0.3 gave 31.15, 31.11, 31.10; README).

    ``move_supervising``: let those supervising chest leads move as queries (True, under the
    montage's ``nuisance_weight``, else 0.03) or keep them at their table angles (False);
    None, the montage's choice (only ``SUBSET`` moves them). Their offsets are reported in
    ``nuisance``/``nuisance_offsets_deg`` and never used for synthesis.

    ``patience``: stop after this many steps without a 0.1 % lower objective (at most
    ``steps`` in all). 3 rather than 6 cut the time by about a third with the same result on
    the simulator and on both splits of the real records (README). ``steps`` 15 rather than
    40 bounds the monitor's longer θ-and-φ fits (worst 12-lead fit on 2 CPU cores 1.7 s with
    40, 1.1 s with 25, 0.5-0.7 s with 15, one window) with the same PSNR on both splits and
    on the simulator; the subset's fits rarely reach it.

    Uses the first ``seconds`` of ``x`` (at the model rate, ``fs`` must be 500 Hz). Returns
    table angles (zero offsets) with the reason when calibration cannot help: fewer seconds
    than asked, fewer than 3 usable leads (flat, missing, saturated or noise-only leads are
    left out), fewer than 2 usable inputs, no chest lead among the inputs, chest electrodes that
    look swapped further apart than ``max_offset_deg`` (``panorama.electrodes.check_electrodes``
    on the usable leads, first; named in ``swap``, ``swap_refused``), or a fit that does not
    lower the leave-one-out residual by ``min_gain``. Chest electrodes that look swapped within
    ``max_offset_deg`` of each other (V3 and V4), and limb reversals, are named too and fitted
    on (``swap_fitted_on``): on validation records with V1 and V3 swapped the whole pipeline
    gave 30.29 dB fitting on and 27.89 refusing, with LA/RA reversed 27.78 and 24.78, with V1
    and V5 swapped 22.91 and 29.00 (docs/stage3.md).
    """
    t0 = time.perf_counter()
    if check_seconds(seconds) == 0:
        raise ValueError("calibration needs seconds > 0")
    x = np.asarray(x, dtype=np.float32)
    check_fit_window(x, views, fs, "calibration")
    if axes is not None:
        _axis_columns(axes)
    if patience < 1 or steps < 1:
        raise ValueError(f"patience and steps must be at least 1, got {patience} and {steps}")
    need = int(round(seconds * fs))
    if x.shape[1] < need:
        return _reject(views, f"only {x.shape[1] / fs:.1f} s recorded, {seconds:g} s asked")
    x = x[:, :need]
    flags = screen_leads(x, fs)  # leads of one heart are coherent; a lead like no other is noise
    usable = [i for i, f in enumerate(flags) if f == "ok"]
    if len(usable) < 3:
        return _reject(views, f"{len(usable)} usable lead(s) (need 3: each is predicted from the others); "
                       + ", ".join(f"{v.name} {f}" for v, f in zip(views, flags) if f != "ok"))

    fit = [k for k, i in enumerate(usable) if inputs is None or views[i].name in inputs]
    # as synthesis will: III, aVR, aVL, aVF beside I and II are predicted, not inputs
    fit = [k for k, r in zip(fit, redundant_limb_leads([views[usable[k]].name for k in fit])) if not r]
    used = [views[i].name for i in usable]
    table = descriptors([views[i] for i in usable])  # (n, 3): θ, φ, far-field flag
    # a monitor: no recorded torso lead beyond the inputs (limb leads are functions of I, II)
    every = all(k in fit or table[k, 2] >= 0.5 for k in range(len(usable)))
    chest = table[fit, 2] < 0.5
    many = chest.sum() >= MONITOR_MIN_CHEST
    chosen = (EVERY_LEAD if many else FEW_CHEST) if every else SUBSET
    axes = chosen.axes if axes is None else axes
    prior_weight = chosen.prior_weight if prior_weight is None else prior_weight
    move_far_field = chosen.move_limb_leads if move_far_field is None else move_far_field
    if move_supervising is None:
        move_supervising = chosen.nuisance_weight is not None
    left_out = "".join(f"; {v.name} {f}, left out" for v, f in zip(views, flags) if f != "ok")
    # before any other verdict, so that the steps after calibration learn of a swap whatever it decides
    wiring = check_electrodes(x[usable], used, fs)  # a swap beyond the offsets' reach: a fit would bend to it
    if wiring.suspect and wiring.apart_deg > max_offset_deg:  # (nan, a limb reversal: fitted on)
        return _reject(views, f"{wiring.reason}; table angles kept" + left_out, used=used, swap=wiring.swap)
    # a swap within reach, or of the limb electrodes, is named and fitted on; an unchecked recording says so
    near = dict(swap=wiring.swap, swap_fitted_on=True) if wiring.suspect else {}

    def said(then: str = "") -> str:
        if wiring.suspect:
            where = ("limb electrodes" if math.isnan(wiring.apart_deg) else
                     f"{wiring.apart_deg:.0f} deg apart, within the offsets' {max_offset_deg:g} deg")
            return f"; {wiring.reason} ({where}{then})"
        return f"; electrodes {wiring.reason}" if not wiring.tested else ""

    if len(fit) < 2:
        return _reject(views, f"{len(fit)} usable input lead(s) among {', '.join(inputs or used)} (need 2)"
                       + left_out + said(), used=used, **near)
    if not chest.any():
        return _reject(views, "no usable chest lead among the inputs: limb leads keep their table angles"
                       + left_out + said(), used=used, **near)
    movable = np.ones(len(fit), bool) if move_far_field else chest  # (m,) offsets that move

    here = next(model.parameters()).device
    dev = torch.device(device) if device is not None else here
    if dev.type == here.type and dev.index is None:
        dev = here  # "cuda" means the model's own GPU
    if here != dev:
        raise ValueError(f"the model is on {here}, calibration asked for {dev}")
    cols = _axis_columns(axes)
    axis_on = np.array(["theta" in cols, "phi" in cols])
    # supervising chest leads free as queries only (the inputs' offsets are still what synthesis uses)
    nz = [k for k in range(len(usable)) if k not in fit and table[k, 2] < 0.5] if move_supervising else []
    movable = np.concatenate([movable[:, None] & axis_on[None], np.repeat(axis_on[None], len(nz), 0)])  # (m+q, 2)
    # each group's prior: offsets of one σ on every moving angle cost its weight of the residual
    nuisance_weight = SUBSET.nuisance_weight if chosen.nuisance_weight is None else chosen.nuisance_weight
    row_weight = np.concatenate([np.full(len(fit), prior_weight / movable[:len(fit)].sum()),
                                 np.full(len(nz), nuisance_weight / max(movable[len(fit):].sum(), 1))])
    xs = torch.from_numpy(x[usable] - np.median(x[usable], axis=1, keepdims=True)).to(dev)  # (n, T)
    table = torch.from_numpy(table).to(dev)
    model.eval()
    flags_before = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():  # only the offsets learn; restored below
            p.requires_grad_(False)
        res = _fit(model, xs, table, fit, nz, usable, used, views, flags, seconds, max_offset_deg, steps, lr,
                   row_weight, min_gain, patience, movable, dev, t0)
        res.axes, res.prior_weight = axes, prior_weight
        res.reason += said(": fitted on")  # a swap fitted on, or a recording not checked, says so
        for k, v in near.items():
            setattr(res, k, v)
        return res
    finally:
        for p, f in zip(model.parameters(), flags_before):
            p.requires_grad_(f)


def _axis_columns(axes: str) -> list[str]:
    cols = [a.strip() for a in axes.split(",") if a.strip()]
    if not cols or set(cols) - {"theta", "phi"}:
        raise ValueError(f"axes must name theta, phi or both, got {axes!r}")
    return cols


def _fit(model, xs, table, fit, nz, usable, used, views, flags, seconds, max_offset_deg, steps, lr, row_weight,
         min_gain, patience, movable_np, dev, t0) -> CalibrationResult:
    """Offsets of the inputs ``fit`` (as inputs and queries) and of the supervising leads
    ``nz`` (as queries only), one row each, under the per-row prior weights ``row_weight``."""
    n, m = len(usable), len(fit)
    free = fit + nz  # rows of the offsets, as indices into the usable leads
    movable = torch.from_numpy(movable_np.astype(np.float32)).to(dev)  # (m+q, 2): which angles move
    weight = torch.from_numpy(row_weight.astype(np.float32)).to(dev)[:, None]  # (m+q, 1)
    with torch.no_grad():
        fv = model.encode(xs[fit][None])  # (1, m, C, T'): the one encoder pass
    xin = xs[fit][None]  # (1, m, T)
    # query j predicts recorded lead j from every input but itself, all in one pass
    mask = torch.tensor([[k != j for k in fit] for j in range(n)], device=dev)[None]  # (1, n, m)
    scatter = torch.zeros(n, len(free), device=dev)  # offsets → per-lead query offsets
    scatter[free, torch.arange(len(free))] = 1.0

    def residual(offsets: torch.Tensor) -> torch.Tensor:  # offsets (m+q, 2)
        off3 = torch.nn.functional.pad(offsets, (0, 1))  # the far-field flag never moves
        ang_in = table[fit] + off3[:m]
        ang_q = table + scatter @ off3
        pred = model.decode(xin, fv, ang_in[None], mask, ang_q[None])[0]  # (n, T)
        err = pred - xs
        err = err - err.median(dim=1, keepdim=True).values  # DC carries no information
        return err.abs().mean()

    zero = torch.zeros(len(free), 2, device=dev)
    raw = zero.clone().requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=lr)
    offsets = lambda: max_offset_deg * torch.tanh(raw) * movable  # noqa: E731 - bounded by construction
    with torch.no_grad():
        before = residual(zero).item()
    best, best_off, stall, step = before, zero, 0, 0
    for step in range(1, steps + 1):
        off = offsets()
        fit_err = residual(off)
        # MAP: Gaussian prior with the CT spread, scaled to the residual so it neither
        # vanishes nor dominates whatever the signal amplitude: offsets of one σ on every
        # moving angle of a group cost that group's weight of the uncalibrated residual
        loss = fit_err + before * (weight * (off / PRIOR_SD_DEG) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < best * (1 - 1e-3):  # the MAP objective chooses, prior included
            best, best_off, stall = loss.item(), off.detach().clone(), 0
        else:
            stall += 1
            if stall >= patience:
                break
    with torch.no_grad():
        after = residual(best_off).item()
    best_off = best_off.cpu().numpy()
    out = np.zeros((len(views), 2))
    out[[usable[k] for k in fit]] = best_off[:m]
    moved = [views[usable[k]].name for k, mv in zip(fit, movable_np) if mv.any()]
    common = dict(residual_before_uv=before * 1000, residual_after_uv=after * 1000, steps=step,
                  seconds=time.perf_counter() - t0, used=used, fitted=moved)
    if after > before * (1 - min_gain):
        return _reject(views, f"offsets lowered the residual by under {min_gain:.0%}; table angles kept",
                       **{**common, "fitted": []})
    skipped = [f"{views[i].name} {flags[i]}" for i in range(len(views)) if i not in usable]
    reason = (f"fitted {len(moved)} lead(s) against {n} on {seconds:g} s"
              + (f" (left out: {', '.join(skipped)})" if skipped else ""))
    return CalibrationResult([v.name for v in views], out, True, reason, **common,
                             nuisance=[views[usable[k]].name for k in nz], nuisance_offsets_deg=best_off[m:])


def warm_up(model, device: str | torch.device | None = None, seconds: float = 5.0) -> CalibrationResult:
    """One calibration of a synthetic 12-lead recording (a rotating heart vector seen along
    each lead's direction), so that the first patient's fit does not pay for PyTorch's lazy
    start-up: on 2 CPU cores this first fit takes about 1.6 s, later ones about 0.4 s for
    12 leads (``panorama bench calibration``). The model is left as it was; returns the
    throw-away result."""
    views = resolve_views(list(STANDARD_12))
    return calibrate(model, rotating_heart(views, seconds, MODEL_FS), views, seconds=seconds, device=device)
