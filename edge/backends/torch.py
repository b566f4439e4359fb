"""The PyTorch backend: the checkpoint itself, on the CPU or CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from panorama import checkpoint


class TorchBackend:
    name = "torch"

    def __init__(self, ckpt: Path, device: str = "cpu"):
        self.device = torch.device(device)
        self.model, self.meta = checkpoint.load(ckpt)
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def run(self, x, in_views, mask, q_views) -> np.ndarray:
        t = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in (x, in_views, mask, q_views)]
        return self.model(*t).cpu().numpy()
