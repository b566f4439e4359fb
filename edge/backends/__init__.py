"""Inference backends behind one small interface, one module each, chosen by name.

    run(x, in_views, mask, q_views) -> y     numpy in, numpy out:
        x (B, L, T) float32 mV, in_views (B, L, 3), mask (B, L) bool, q_views (B, Q, 3) → (B, Q, T)

Hardware SDKs are imported only when their backend is chosen; choosing one that is not
installed fails with a message naming what to install.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import numpy as np

from panorama.errors import BackendError

# name → (module, class): an explicit table, no import side effects
BACKENDS = {"torch": ("edge.backends.torch", "TorchBackend"),
            "onnxruntime": ("edge.backends.onnxruntime", "OnnxRuntimeBackend")}


class Backend(Protocol):
    name: str

    def run(self, x: np.ndarray, in_views: np.ndarray, mask: np.ndarray, q_views: np.ndarray) -> np.ndarray:
        ...


def make_backend(name: str, checkpoint: Path, device: str = "cpu") -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise BackendError(f"backend {name!r} needs a package that is not installed ({exc.name}); "
                           f"install it, e.g. pip install {exc.name}") from exc
    return getattr(mod, cls)(checkpoint, device)
