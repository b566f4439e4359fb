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
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from panorama import checkpoint
from panorama.errors import BackendError
from panorama.model import DOWNSAMPLE, NefNetV2, ZeroMeanConv1d

OPSET = 17
INPUTS = ("x", "in_views", "mask", "q_views")


class _Exportable(nn.Module):
    def __init__(self, model: NefNetV2):
        super().__init__()
        self.model = model

    def forward(self, x, in_views, mask, q_views):
        b, l, t = x.shape
        f = self.model.encoder(x.reshape(b * l, 1, t))
        fv = f.reshape(b, l, f.shape[1], f.shape[2])
        return self.model.decode(x, fv, in_views, mask, q_views)


def plain_copy(model: NefNetV2) -> NefNetV2:
    """A copy with spectral norm folded into plain weights and the stem kernels centred."""
    m = copy.deepcopy(model).eval()
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


def export_onnx(ckpt: str | Path, out: str | Path) -> Path:
    """Export ``ckpt`` to ``out`` and check it with onnx.checker; returns the path."""
    import onnx

    model, meta = checkpoint.load(ckpt)
    wrapped = _Exportable(plain_copy(model)).eval()
    t = 16 * DOWNSAMPLE
    example = (torch.randn(1, 3, t) * 0.3, torch.tensor([[[90.0, 90.0, 1.0], [150.0, 90.0, 1.0], [95.0, 15.0, 0.0]]]),
               torch.ones(1, 3, dtype=torch.bool), torch.tensor([[[90.0, 10.0, 0.0], [96.0, 90.0, 0.0]]]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {"x": {0: "batch", 1: "leads", 2: "time"}, "in_views": {0: "batch", 1: "leads"},
               "mask": {0: "batch", 1: "leads"}, "q_views": {0: "batch", 1: "views"},
               "y": {0: "batch", 1: "views", 2: "time"}}
    try:
        with warnings.catch_warnings():  # the tracer's shape warnings are about dynamic axes we declare
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(wrapped, example, str(out), input_names=list(INPUTS), output_names=["y"],
                              dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    except Exception as exc:  # the exporter raises many types; one clear error for the user
        raise BackendError(f"ONNX export of {ckpt} failed: {exc}") from exc
    proto = onnx.load(str(out))
    for key, value in {"model_sha256": meta["sha256"], "fs": str(meta.get("fs", 500)), "units": "mV",
                       "time_multiple": str(DOWNSAMPLE),
                       "lead_table": json.dumps(meta.get("lead_table", {}))}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return out
