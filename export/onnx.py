"""ONNX export of a checkpoint, with the angles as inputs (calibration offsets apply at run time).

The exported graph is the model without its training-time machinery: spectral norm is
folded into plain weights, the zero-mean stem kernels are centred once. Inputs:

    x          (batch, leads, time) float32 mV, time a multiple of 8 (the runtime pads)
    in_views   (batch, leads, 3)    float32 (θ°, φ°, far-field flag)
    mask       (batch, leads)       bool, the leads present
    q_views    (batch, views, 3)    float32
    -> y       (batch, views, time) float32 mV

batch, leads, views and time are dynamic axes. Masked slots are still encoded (their
features are ignored by the attention, the skips and the mixing).

Two parts of the model are rewritten for export with the same arithmetic in plainer ops
(ONNX Runtime's Einsum and linear Resize are slow on the CPU: together they were a third of
its time): the fusion of the view blocks as a batched MatMul, and the head's ×2 linear
upsampling as slices and adds. ``precision="fp16"`` exports the encoder, the view blocks and
the head in half precision, with float32 inputs and outputs and the geometry (directions,
attention, the dipole skip's 3×3 inverse, the mixing) kept in float32: TensorRT 11 takes
precision from the ONNX itself.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from panorama.errors import BackendError
from panorama.model import DOWNSAMPLE, NefNetV2, ReconstructionHead, ViewTransformBlock, ZeroMeanConv1d

from .cache import cache_root, sweep_stale, writable_dir

log = logging.getLogger(__name__)

OPSET = 17
INPUTS = ("x", "in_views", "mask", "q_views")
PRECISIONS = ("fp32", "fp16")
EXPORT_VERSION = 2  # names the cached exports: bump it whenever the exported graph changes


class _FusedBlock(nn.Module):
    """A ViewTransformBlock whose fusion Σ_l GAA·(fv·(1+γ) + β) is one batched MatMul
    instead of repeat_interleave + einsum; it runs in its weights' dtype."""

    def __init__(self, block: ViewTransformBlock):
        super().__init__()
        self.block = block

    def forward(self, fv, fo, attn, pair):
        # fv (B, L, C, T'), fo (B, Q, C, T'), attn (B, Q, H, L), pair (B, Q, L, 2D)
        blk = self.block
        b, l, c, t = fv.shape
        q, h = fo.shape[1], blk.heads
        fo, attn, pair = fo.to(fv.dtype), attn.to(fv.dtype), pair.to(fv.dtype)
        fv = blk.proj(fv.reshape(b * l, c, t)).reshape(b, l, c, t)
        gamma, beta = blk.pair_film(pair).chunk(2, dim=-1)  # (B, Q, L, C) each
        a = attn.transpose(2, 3)[..., None].expand(b, q, l, h, c // h).reshape(b, q, l, c)
        w = (a * (1 + gamma)).permute(0, 3, 1, 2)  # (B, C, Q, L)
        fused = (w @ fv.transpose(1, 2)).transpose(1, 2) + (a * beta).sum(2)[..., None]  # (B, Q, C, T')
        fused = fused.reshape(b * q, c, t)
        new = blk.extract(fused)
        old = fo.reshape(b * q, c, t)
        g = torch.sigmoid(blk.gate(torch.cat([old, new], 1)))
        return (old * (1 - g) + new * g).reshape(b, q, c, t), fv


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=2, mode="linear", align_corners=False) in slices and adds:
    output 2i is ¾x[i] + ¼x[i-1], output 2i+1 is ¾x[i] + ¼x[i+1], the ends clamped."""
    prev = torch.cat([x[..., :1], x[..., :-1]], -1)
    nxt = torch.cat([x[..., 1:], x[..., -1:]], -1)
    mid = 0.75 * x
    return torch.stack([mid + 0.25 * prev, mid + 0.25 * nxt], -1).flatten(-2)


class _Head(nn.Module):
    """The reconstruction head with ``upsample2``; returns float32 whatever it runs in."""

    def __init__(self, head: ReconstructionHead):
        super().__init__()
        self.head = head

    def forward(self, x):  # (N, C, T') → (N, 1, 8·T')
        for st in self.head.stages:
            x = nn.functional.gelu(st["norm"](st["conv"](upsample2(x))))
        return self.head.out(x).float()


class _Exportable(nn.Module):
    def __init__(self, model: NefNetV2, precision: str = "fp32"):
        super().__init__()
        model.blocks = nn.ModuleList(_FusedBlock(b) for b in model.blocks)
        model.head = _Head(model.head)
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        for part in (model.encoder, model.blocks, model.head):
            part.to(self.dtype)
        self.model = model

    def forward(self, x, in_views, mask, q_views):
        b, l, t = x.shape
        f = self.model.encoder(x.reshape(b * l, 1, t).to(self.dtype))
        fv = f.reshape(b, l, f.shape[1], f.shape[2])
        # the (B, Q, L) mask built in float: TensorRT's Expand has refused bool tensors (onnx-tensorrt#390)
        qmask = mask.to(x.dtype)[:, None, :].expand(b, q_views.shape[1], l) > 0.5
        return self.model.decode(x, fv, in_views, qmask, q_views)


def plain_copy(model: NefNetV2) -> NefNetV2:
    """A copy with spectral norm folded into plain weights and the stem kernels centred."""
    # a fresh model, not copy.deepcopy: a parametrised module's class is made per instance,
    # and a deep copy shares it, so removing the copy's parametrisation would break ``model``
    m = NefNetV2(model.cfg)
    m.load_state_dict(model.state_dict())
    m.eval()
    for module in m.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    stem = m.encoder.stem
    if isinstance(stem, ZeroMeanConv1d):
        plain = nn.Conv1d(stem.in_channels, stem.out_channels, stem.kernel_size[0], stride=stem.stride,
                          padding=stem.padding)
        with torch.no_grad():
            plain.weight.copy_(stem.weight - stem.weight.mean(dim=-1, keepdim=True))
            plain.bias.copy_(stem.bias)
        m.encoder.stem = plain
    return m


def exportable(model: NefNetV2, precision: str = "fp32") -> nn.Module:
    """The module that is traced: the same inputs and output as the model, on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return _Exportable(plain_copy(model), precision).eval()


def export_model(model: NefNetV2, out: str | Path, precision: str = "fp32", meta: dict | None = None,
                 verify: Callable[[NefNetV2, Path], None] | None = None) -> Path:
    """Export a loaded model to ``out`` and check it with onnx.checker (and ``verify(model,
    written)``, which raises to refuse it); returns the path. Written beside ``out`` and renamed
    over it: a failed or refused export leaves what was there."""
    meta = meta or {}
    wrapped = exportable(model, precision)
    t = 16 * DOWNSAMPLE
    example = (torch.randn(1, 3, t) * 0.3, torch.tensor([[[90.0, 90.0, 1.0], [150.0, 90.0, 1.0], [95.0, 15.0, 0.0]]]),
               torch.ones(1, 3, dtype=torch.bool), torch.tensor([[[90.0, 10.0, 0.0], [96.0, 90.0, 0.0]]]))
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackendError(f"cannot write {out}: {exc}") from None
    if out.is_dir():
        raise BackendError(f"cannot write {out}: it is a folder; give a file name ending in .onnx")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.onnx")  # renamed over ``out`` once whole and checked
    try:
        tmp.touch()  # a folder it cannot write to is said as such, before the export runs
        _export_to(wrapped, example, tmp, meta, precision)
        if verify is not None:
            verify(model, tmp)
        tmp.replace(out)
    except OSError as exc:
        raise BackendError(f"cannot write {out}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _export_to(wrapped: nn.Module, example: tuple, out: Path, meta: dict, precision: str) -> None:
    import onnx

    dynamic = {"x": {0: "batch", 1: "leads", 2: "time"}, "in_views": {0: "batch", 1: "leads"},
               "mask": {0: "batch", 1: "leads"}, "q_views": {0: "batch", 1: "views"},
               "y": {0: "batch", 1: "views", 2: "time"}}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # about the dynamic axes we declare
            # the TorchScript exporter is chosen on purpose (dynamic axes as tested for parity)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(wrapped, example, str(out), input_names=list(INPUTS), output_names=["y"],
                              dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    except OSError:
        raise  # the output could not be written: said as such by export_model
    except Exception as exc:  # the exporter raises many types; one clear error for the user
        raise BackendError(f"ONNX export failed: {exc}") from exc
    proto = onnx.load(str(out))
    for key, value in {"model_sha256": meta.get("sha256", "unknown"), "fs": str(meta.get("fs", 500)),
                       "units": "mV", "time_multiple": str(DOWNSAMPLE), "precision": precision,
                       "export_version": str(EXPORT_VERSION),
                       "lead_table": json.dumps(meta.get("lead_table", {}))}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))


PARITY_UV = {"fp32": 1.0, "fp16": 10.0}  # most |ONNX Runtime − PyTorch| an export may show (fp16 measured 0.6)
PARITY_VIEWS = "V2,V6,V7,V8,V9,V3R,V4R,120:45"


def export_onnx(ckpt: str | Path, out: str | Path, precision: str = "fp32",
                verify: Callable[[NefNetV2, Path], None] | None = None) -> Path:
    """Export the checkpoint ``ckpt`` to ``out``; returns the path (``verify`` as export_model's)."""
    from panorama import checkpoint

    model, meta = checkpoint.load(ckpt)
    try:
        return export_model(model, out, precision, meta, verify)
    except BackendError as exc:
        raise BackendError(f"exporting {ckpt}: {exc}") from exc


def check_parity(model: NefNetV2, onnx_path: str | Path, precision: str = "fp32") -> float:
    """``parity_uv`` of an export of ``model``; BackendError past ``PARITY_UV[precision]``."""
    err = parity_uv(model, onnx_path)
    if not err <= PARITY_UV[precision]:
        raise BackendError(f"ONNX Runtime differs from PyTorch by {err:.3g} µV (at most {PARITY_UV[precision]:g} µV "
                           f"for {precision}): the export is refused")
    return err


def parity_uv(model: NefNetV2, onnx_path: str | Path, seconds: float = 10.0) -> float:
    """The largest |ONNX Runtime − PyTorch| in µV, drawing ``PARITY_VIEWS`` from 12 leads of a
    synthetic recording (``panorama.geometry.rotating_heart``) on the CPU."""
    import onnxruntime as ort

    from panorama.geometry import STANDARD_12, redundant_limb_leads, resolve_views, rotating_heart
    from panorama.synth import Synthesizer

    synth = Synthesizer(model)
    inputs, queries = resolve_views(list(STANDARD_12)), resolve_views(PARITY_VIEWS)
    x = rotating_heart(inputs, seconds)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {"x": x[None], "in_views": synth.angles(inputs)[None],
             "mask": ~redundant_limb_leads([v.name for v in inputs])[None],  # as the synthesizer masks
             "q_views": synth.angles(queries)[None]}
    y = sess.run(None, feeds)[0][0]
    return float(np.abs(y - synth(x, inputs, queries)).max() * 1000)


def cached_onnx(ckpt: str | Path, precision: str = "fp32") -> Path:
    """The checkpoint's ONNX export, made once and kept in ``$PANORAMA_CACHE/onnx`` under the
    checkpoint's content hash, the export version and the precision. An ``.onnx`` path is
    returned as it is."""
    if Path(ckpt).suffix == ".onnx":
        return Path(ckpt)
    from panorama import checkpoint

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    sha = checkpoint.read_header(ckpt)["sha256"]
    folder = writable_dir(cache_root() / "onnx", "ONNX")
    path = folder / f"{sha[:32]}-v{EXPORT_VERSION}-{precision}.onnx"
    if path.is_file() and (why := _cache_entry_problem(path, sha, precision)):
        log.warning("ONNX cache entry %s %s: exporting it again", path, why)
        path.unlink(missing_ok=True)
    if not path.is_file():  # export_onnx writes a temp file and renames it: it appears whole
        log.info("exporting %s to ONNX (%s) once, into %s", ckpt, precision, path)
        export_onnx(ckpt, path, precision)
        sweep_stale(folder, pattern=".*.tmp.onnx")  # what an interrupted export left
    return path


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The metadata an export wrote into an ONNX file (``export_model``)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _cache_entry_problem(path: Path, sha: str, precision: str) -> str:
    """Why a cached export cannot be used for the checkpoint ``sha`` ("" when it can): it must
    load as ONNX and carry that checkpoint's hash, this export version and the precision."""
    try:
        meta = onnx_metadata(path)
    except Exception as exc:  # protobuf's DecodeError and others: a truncated or foreign file
        return f"is not a readable ONNX model ({type(exc).__name__})"
    want = {"model_sha256": sha, "export_version": str(EXPORT_VERSION), "precision": precision}
    wrong = [f"{k} {meta.get(k)!r}, not {v!r}" for k, v in want.items() if meta.get(k) != v]
    return ("was made from something else: " + "; ".join(wrong)) if wrong else ""
