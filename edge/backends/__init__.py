"""Inference backends behind one small interface, one module each, chosen by name.

    run(x, in_views, mask, q_views) -> y     numpy in, numpy out:
        x (B, L, T) float32 mV, in_views (B, L, 3), mask (B, L) bool, q_views (B, Q, 3) → (B, Q, T)

Hardware SDKs are imported only when their backend is chosen; choosing one that is not
installed fails with a message naming what to install.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Protocol

import numpy as np

from panorama.errors import BackendError

# name → (module, class): an explicit table, no import side effects
BACKENDS = {"torch": ("edge.backends.torch", "TorchBackend"),
            "onnxruntime": ("edge.backends.onnxruntime", "OnnxRuntimeBackend"),
            "tensorrt": ("edge.backends.tensorrt", "TensorRTBackend")}

# a missing top-level module → how to get it
INSTALL = {"onnxruntime": "pip install onnxruntime",
           "tensorrt": "TensorRT: on a Jetson it comes with JetPack 6 (TensorRT 10.3, python3-libnvinfer); "
                       "elsewhere pip install tensorrt; see deploy/README.md",
           "cuda": "cuda-python: pip install cuda-python (or pip install .[jetson])"}


class Backend(Protocol):
    name: str

    def run(self, x: np.ndarray, in_views: np.ndarray, mask: np.ndarray, q_views: np.ndarray) -> np.ndarray:
        ...


def make_backend(name: str, checkpoint: Path, device: str | None = None) -> Backend:
    """The backend ``name`` for ``checkpoint`` (or an exported .onnx for onnxruntime and
    tensorrt) on ``device`` (None: the backend's own default, cpu or cuda)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise _not_installed(name, (exc.name or "").split(".")[0] or str(exc)) from exc
    backend = getattr(mod, cls)
    return backend(checkpoint) if device is None else backend(checkpoint, device)


def _not_installed(name: str, module: str) -> BackendError:
    return BackendError(f"backend {name!r} needs {module}, which is not installed; install "
                        f"{INSTALL.get(module, f'it (pip install {module})')}")


def check_device(name: str, device: str) -> None:
    """Refuse, before anything loads, a device backend ``name`` cannot run on here: a
    BackendError naming what is missing (ValueError for a name no backend takes)."""
    if name == "torch":
        from panorama.devices import check_torch_device

        check_torch_device(device)
    elif name == "onnxruntime" and device.startswith("cuda"):
        from .onnxruntime import check_cuda_provider  # onnxruntime is a dependency: always there

        check_cuda_provider(device)
    elif name == "tensorrt":
        from panorama.devices import cuda_index

        cuda_index(device, "the tensorrt backend")
        for module in ("tensorrt", "cuda"):
            if importlib.util.find_spec(module) is None:
                raise _not_installed(name, module)
