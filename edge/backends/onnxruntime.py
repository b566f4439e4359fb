"""The ONNX Runtime backend: the checkpoint exported once (export.onnx.cached_onnx: cached by
its hash) or an exported .onnx, run on the CPU provider, or on CUDA's where the device asks
for it (a BackendError where this ONNX Runtime has none: never a silent fall back to the CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.onnx import cached_onnx
from panorama.devices import device_index
from panorama.errors import BackendError
from panorama.model import DOWNSAMPLE


def check_cuda_provider(device: str) -> None:
    """BackendError unless this ONNX Runtime can run on CUDA (onnxruntime-gpu)."""
    have = ort.get_available_providers()
    if "CUDAExecutionProvider" not in have:
        raise BackendError(f"device {device}: this ONNX Runtime ({ort.__version__}) has no CUDA provider, only "
                           f"{', '.join(have)}; install onnxruntime-gpu, or use device cpu")


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, ckpt: Path, device: str = "cpu", threads: int | None = None):
        path = cached_onnx(ckpt)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        providers: list = ["CPUExecutionProvider"]
        cuda = str(device).startswith("cuda")
        if cuda:
            check_cuda_provider(device)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_index(device)}))
        try:
            # no fall back to the CPU on an error (ONNX Runtime's default): the device was asked for
            extra = {"enable_fallback": 0} if cuda else {}
            self.session = ort.InferenceSession(str(path), opts, providers=providers, **extra)
        except Exception as exc:
            if not cuda:
                raise
            # e.g. "invalid device ordinal": cuda:N past the GPUs this machine has
            raise BackendError(f"device {device}: ONNX Runtime could not start on CUDA device "
                               f"{device_index(device)}: {exc}; nvidia-smi -L lists this machine's GPUs, "
                               "or use device cpu") from exc
        self.providers = self.session.get_providers()
        if cuda and "CUDAExecutionProvider" not in self.providers:  # ONNX Runtime falls back without a word
            raise BackendError(f"device {device}: ONNX Runtime could not start its CUDA provider (CUDA or cuDNN "
                               "libraries missing? its log above says which); or use device cpu")

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
