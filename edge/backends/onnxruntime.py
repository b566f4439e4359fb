"""The ONNX Runtime backend: the checkpoint exported once (cached by its hash), run on the
CPU provider, or CUDA's where ONNX Runtime has it and the device asks for it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.onnx import export_onnx
from panorama import checkpoint
from panorama.model import DOWNSAMPLE

CACHE = Path(os.environ.get("PANORAMA_CACHE", Path.home() / ".cache" / "panorama")) / "onnx"


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, ckpt: Path, device: str = "cpu", threads: int | None = None):
        sha = checkpoint.read_header(ckpt)["sha256"]
        path = CACHE / f"{sha[:32]}.onnx"
        if not path.is_file():  # export_onnx writes, then this rename makes it appear whole
            tmp = export_onnx(ckpt, path.with_suffix(f".{os.getpid()}.tmp.onnx"))
            tmp.replace(path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), opts, providers=providers)

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
