"""Patient adaptation: fine-tune the view-transformation blocks on this patient's first seconds.

Why: the model learned every angle that no real recording here holds (V2, V6, posterior,
right-sided) from the simulator, whose neighbouring chest leads are more alike than real
ones (`panorama bench realism`), and it knows nothing of this patient. In the first 5 s the
monitor records the patient's other chest leads too, and they can teach the model this
heart: each recorded chest lead is predicted from the leads synthesis will give it — the
limb leads, the chest inputs, and the nearest recorded chest lead that is not an input, as
neighbour transfer will add one — and the blocks that fuse the input leads for a query
(``model.blocks``: FiLM by the angle pair, extraction, gating) take a few Adam steps on the
error. The encoder, the angle embedding, the attention and the head stay as trained, so the
model still draws angles the way it learned to; it only mixes this patient's leads better.

It runs after calibration (whose offsets it keeps) and before neighbour transfer (which then
continues the recorded leads with the adapted model). 30 steps take about 0.6 s for 10 leads
× 5 s on 2 CPU cores; each step reuses the one encoder pass. The adapted model is a copy:
the shared model is never changed, so one patient's adaptation never touches another's.
It draws only the views within 45° of a torso lead it learned on (V2, V6, V3R, V4R with
I, II, V3 and the rest recorded); farther views (V7–V9, V5R, limb and Frank leads) stay
with the shared model, since on the simulator adaptation harms them.

The settings (which parameters, 30 steps, learning rate 1e-3, one neighbour per task) were
first explored on the validation split and then checked with ``panorama bench adapt`` on
the training split, whose V2 and V6 no training step ever saw; both agree (README,
"Patient adaptation").
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .geometry import View, angle_between, descriptors, redundant_limb_leads
from .records import MODEL_FS, check_fit_window, screen_leads
from .transfer import MAX_NEIGHBOUR_DEG, view_kind

__all__ = ["Adaptation", "adapt", "synthesize_split", "PARTS", "STEPS", "LR"]

STEPS = 30
LR = 1e-3
# With every recorded torso lead an input (a monitor), each chest input is predicted from the
# others; under this many there is too little to learn from (a conservative choice, not measured)
MIN_LEAVE_ONE_OUT = 3
# What may learn: the fusion blocks (the default), the reconstruction head, or everything
# after the encoder; ``panorama bench adapt`` compares them.
PARTS = {
    "blocks": lambda m: [p for blk in m.blocks for p in blk.parameters()],
    "head": lambda m: list(m.head.parameters()),
    "blocks+mix": lambda m: [p for blk in m.blocks for p in blk.parameters()] + list(m.mix.parameters()),
    "decoder": lambda m: [p for n, p in m.named_parameters() if not n.startswith("encoder.")],
}


@dataclass
class Adaptation:
    model: torch.nn.Module  # the adapted copy, or the model it was given when not accepted
    accepted: bool
    reason: str
    residual_before_uv: float = float("nan")  # mean |error| over the tasks, µV
    residual_after_uv: float = float("nan")
    steps: int = 0
    seconds: float = 0.0
    queries: list[View] = field(default_factory=list)  # the recorded leads it learned to predict
    max_deg: float = MAX_NEIGHBOUR_DEG

    def covers(self, view: View) -> bool:
        """Whether ``view`` lies within ``max_deg`` of a torso lead the adaptation learned on.
        Only such views are drawn by the adapted copy: on the simulator, adaptation harms
        far views (V8, V9, V5R) that no recorded lead vouches for (README)."""
        return self.accepted and view_kind(view) == "torso" and any(
            angle_between(view, q) <= self.max_deg for q in self.queries)

    def split(self, views: list[View]) -> tuple[list[int], list[int]]:
        """Indices of ``views`` for the adapted copy, and for the shared model."""
        near = [i for i, v in enumerate(views) if self.covers(v)]
        return near, [i for i in range(len(views)) if i not in near]

    def summary(self) -> str:
        if not self.accepted:
            return f"patient adaptation not used: {self.reason}"
        return (f"patient adaptation on {', '.join(q.name for q in self.queries)}: residual {self.residual_before_uv:.0f} -> "
                f"{self.residual_after_uv:.0f} µV in {self.steps} steps ({self.seconds:.2f} s)")


def adapt(model, x: np.ndarray, views: list[View], inputs: list[str], fs: float = MODEL_FS,
          seconds: float = 5.0, offsets: np.ndarray | None = None, steps: int = STEPS, lr: float = LR,
          min_gain: float = 0.02, device: str | torch.device | None = None, part: str = "blocks",
          neighbours: int = 1) -> Adaptation:
    """Adapt a copy of ``model`` to the patient recorded in ``x`` (leads, samples) mV at 500 Hz.

    ``views`` name the rows of ``x``; ``inputs`` are the leads synthesis will use (all among
    ``views``), ``offsets`` (inputs, 2) their calibrated angle offsets. Only the first
    ``seconds`` are used. Never give it a lead you will score. With every recorded torso
    lead an input (a monitor), there is no neighbour to add: each chest input is predicted
    from the others. Returns the model unchanged, with the reason, when adaptation cannot
    help: fewer seconds than asked, an input unusable, no usable torso lead recorded beside
    the inputs and fewer than ``MIN_LEAVE_ONE_OUT`` chest inputs, or a fit that lowers the
    residual by less than ``min_gain``. A lead named twice, or an input missing from
    ``views``, is a ValueError.
    ``part`` (a key of ``PARTS``) is what learns; ``neighbours`` how many recorded non-input
    chest leads each task adds (neighbour transfer adds one). Both default to what ships.
    """
    t0 = time.perf_counter()
    x = np.asarray(x, dtype=np.float32)
    check_fit_window(x, views, fs, "patient adaptation", inputs)
    names = [v.name for v in views]
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
    if steps < 1 or not lr > 0:
        raise ValueError(f"steps must be >= 1 and lr > 0, got {steps} and {lr}")
    keep = lambda reason: Adaptation(model, False, reason, seconds=time.perf_counter() - t0)  # noqa: E731
    need = int(round(seconds * fs))
    if x.shape[1] < need:
        return keep(f"only {x.shape[1] / fs:.1f} s recorded, {seconds:g} s asked")
    x = x[:, :need]
    flags = screen_leads(x, fs)
    bad = [f"{n} {flags[names.index(n)]}" for n in inputs if flags[names.index(n)] != "ok"]
    if bad:
        return keep(f"input lead(s) unusable in the first {seconds:g} s: {', '.join(bad)}")
    usable = [i for i, f in enumerate(flags) if f == "ok"]
    pool = [i for i, r in zip(usable, redundant_limb_leads([names[i] for i in usable])) if not r]
    torso = [i for i in pool if view_kind(views[i]) == "torso"]
    chest_inputs = [i for i in torso if names[i] in inputs]
    others = [i for i in torso if names[i] not in inputs]
    if not others and len(chest_inputs) < MIN_LEAVE_ONE_OUT:
        return keep(f"no usable torso lead recorded beside the inputs, and under {MIN_LEAVE_ONE_OUT} chest "
                    "inputs to predict from each other")

    off = {n: np.asarray(o, np.float32) for n, o in zip(inputs, offsets)} if offsets is not None else {}
    table = descriptors([views[i] for i in pool], np.stack([off.get(names[i], np.zeros(2, np.float32))
                                                            for i in pool]))
    far = [i for i in pool if view_kind(views[i]) != "torso"]  # limb (and Frank) leads: always given
    masks = []
    for j in torso:  # what synthesis would give lead j: limb leads, chest inputs, one neighbour
        near = sorted((angle_between(views[j], views[k]), k) for k in others if k != j)[:neighbours]
        allowed = set(far) | {k for k in chest_inputs if k != j} | {k for _, k in near}
        masks.append([k in allowed for k in pool])

    here = next(model.parameters()).device
    dev = torch.device(device) if device is not None else here
    if dev.type == here.type and dev.index is None:
        dev = here
    if here != dev:
        raise ValueError(f"the model is on {here}, adaptation asked for {dev}")
    xs = x[pool] - np.median(x[pool], axis=1, keepdims=True)
    xt = torch.from_numpy(xs)[None].to(dev)  # (1, n, T)
    ang = torch.from_numpy(table)[None].to(dev)  # (1, n, 3)
    mask = torch.tensor(masks, device=dev)[None]  # (1, q, n)
    rows = [pool.index(j) for j in torso]
    target, q_ang = xt[0, rows], ang[:, rows]

    local = copy.deepcopy(model).eval()
    for p in local.parameters():
        p.requires_grad_(False)
    params = PARTS[part](local)
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        fv = local.encode(xt)  # the one encoder pass; the encoder is not adapted

    def residual() -> torch.Tensor:
        err = local.decode(xt, fv, ang, mask, q_ang)[0] - target
        return (err - err.median(dim=1, keepdim=True).values).abs().mean()  # DC carries nothing

    opt = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        before = residual().item()
    for _ in range(steps):
        opt.zero_grad()
        loss = residual()
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        after = residual().item()
    common = dict(residual_before_uv=before * 1000, residual_after_uv=after * 1000, steps=steps,
                  seconds=time.perf_counter() - t0, queries=[views[j] for j in torso])
    if after > before * (1 - min_gain):
        return Adaptation(model, False, f"the residual fell by under {min_gain:.0%}; model kept", **common)
    return Adaptation(local, True, "adapted", **common)


def synthesize_split(adaptation: Adaptation | None, near_fn, far_fn, queries: list[View], samples: int) -> np.ndarray:
    """(queries, samples) float32: the views ``adaptation`` covers from ``near_fn(views)`` (the
    adapted copy), the others from ``far_fn(views)`` (the shared model); all from ``far_fn``
    without an accepted adaptation."""
    if adaptation is None or not adaptation.accepted:
        return np.asarray(far_fn(queries), dtype=np.float32)
    near, far = adaptation.split(queries)
    out = np.empty((len(queries), samples), np.float32)
    for idx, fn in ((near, near_fn), (far, far_fn)):
        if idx:
            out[idx] = fn([queries[i] for i in idx])
    return out
