"""Synthesis with a trained model: numpy in, numpy out, angles from the lead table.

``Synthesizer`` is what ``panorama synthesize``, ``eval --method model`` and the daemon
call. Angle offsets (dθ, dφ) from on-the-fly calibration are added to the input leads'
table angles at run time: the model takes angles as inputs, so nothing is retrained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .errors import CheckpointError
from .geometry import View, descriptors, redundant_limb_leads

WEIGHTS = Path(__file__).resolve().parent / "weights"
DEFAULT_CHECKPOINTS = {
    "pretrained": WEIGHTS / "nefnet_v2_stage1.safetensors",
    "calibrated": WEIGHTS / "nefnet_v2_stage2.safetensors",
}


def default_checkpoint() -> Path:
    """The pretrained (Stage I) checkpoint: on validation records of every source it is as
    good as the LUDB-calibrated one (28.77 vs 28.75 dB), and unknown devices are the common
    case. Pass the device-calibrated checkpoint with --model for that device."""
    for key in ("pretrained", "calibrated"):
        if DEFAULT_CHECKPOINTS[key].is_file():
            return DEFAULT_CHECKPOINTS[key]
    raise CheckpointError(f"no shipped checkpoint in {WEIGHTS}; train one with `panorama train` "
                          "or pass --model PATH")


class Synthesizer:
    """``runner``: an inference backend's ``run`` (numpy in, numpy out) to use instead of the
    PyTorch model; the model stays for on-the-fly calibration, which needs gradients."""

    def __init__(self, model, meta: dict | None = None, device: str = "cpu", runner=None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.meta = meta or {}
        self.runner = runner

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "cpu") -> "Synthesizer":
        model, meta = checkpoint.load(path or default_checkpoint())
        return cls(model, meta, device)

    @staticmethod
    def angles(views: list[View], offsets: np.ndarray | None = None) -> np.ndarray:
        """(n, 3) view descriptors for the model, with calibration offsets added."""
        return descriptors(views, offsets)

    @torch.inference_mode()
    def __call__(self, x: np.ndarray, inputs: list[View], queries: list[View],
                 offsets: np.ndarray | None = None) -> np.ndarray:
        """x (inputs, samples) mV → (queries, samples) mV. ``offsets`` (inputs, 2) degrees.
        Limb leads that are sums of two others (III, aVR, aVL, aVF beside I and II) are
        masked off: they carry nothing more (``redundant_limb_leads``)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] != len(inputs):
            raise ValueError(f"expected ({len(inputs)}, samples) input, got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("input holds NaN or Inf samples; mask or repair those leads first")
        if not queries:
            return np.zeros((0, x.shape[1]), dtype=np.float32)
        keep = ~redundant_limb_leads([v.name for v in inputs])
        if self.runner is not None:
            return self.runner(x[None], self.angles(inputs, offsets)[None], keep[None], self.angles(queries)[None])[0]
        dev = self.device
        xt = torch.from_numpy(x)[None].to(dev)
        ia = torch.from_numpy(self.angles(inputs, offsets))[None].to(dev)
        qa = torch.from_numpy(self.angles(queries))[None].to(dev)
        mask = torch.from_numpy(keep)[None].to(dev)
        return self.model(xt, ia, mask, qa)[0].cpu().numpy()
