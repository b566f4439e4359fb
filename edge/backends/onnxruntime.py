"""The ONNX Runtime backend: the checkpoint exported once (export.onnx.cached_onnx: cached by
its hash) or an exported .onnx, run on the CPU provider, or CUDA's where ONNX Runtime has it
and the device asks for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.onnx import cached_onnx
from panorama.model import DOWNSAMPLE


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, ckpt: Path, device: str = "cpu", threads: int | None = None):
        path = cached_onnx(ckpt)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.providers = self.session.get_providers()

    def run(self, x, in_views, mask, q_views) -> np.ndarray:
        t = x.shape[-1]
        pad = (-t) % DOWNSAMPLE  # the graph takes whole multiples of the encoder's stride
        if pad:
            x = np.concatenate([x, np.repeat(x[..., -1:], pad, axis=-1)], axis=-1)
        feeds = {"x": np.ascontiguousarray(x, dtype=np.float32),
                 "in_views": np.ascontiguousarray(in_views, dtype=np.float32),
                 "mask": np.ascontiguousarray(mask, dtype=bool),
                 "q_views": np.ascontiguousarray(q_views, dtype=np.float32)}
        return self.session.run(None, feeds)[0][..., :t]
