"""Torch device names: what a config may say, and whether this machine can compute there.

A config names ``cpu``, ``cuda`` or ``cuda:N``. Whether that device exists is a fact of
the machine, not of the file: PyPI's aarch64 torch wheel has no CUDA, so a Jetson with the
wrong wheel sees no GPU (deploy/README.md). Each program checks before it loads anything.
"""

from __future__ import annotations

import re

NAMES = "cpu, cuda or cuda:N"


def check_device_name(name) -> str:
    """``name`` if it is a device a config may name; ValueError otherwise."""
    if not isinstance(name, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"device {name!r}: use {NAMES}")
    return name


def device_index(name: str) -> int:
    """N of ``cuda:N`` (0 for ``cuda``)."""
    return int(str(name).partition(":")[2] or 0)


def cuda_index(name, what: str) -> int:
    """N of a CUDA device ``what`` must run on; ValueError for any other device."""
    if str(name).partition(":")[0] != "cuda":
        raise ValueError(f"{what} runs on a CUDA device (cuda or cuda:N), not {name!r}")
    return device_index(name)


def check_torch_device(name: str) -> str:
    """``name`` if this torch can compute there; ValueError saying why not otherwise."""
    import torch

    check_device_name(name)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name}: this torch ({torch.__version__}) sees no CUDA GPU (a CPU-only "
                             "build? on a Jetson, NVIDIA's torch wheel: deploy/README.md); or use cpu")
        index, count = device_index(name), torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"device {name}: this machine has {count} CUDA GPU{'s' if count != 1 else ''} "
                             f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return name
