"""Checkpoints without pickle: safetensors tensors plus JSON metadata in the same file.

The header's metadata holds the format tag, the model config, a content hash of every
tensor, and what the checkpoint is (stage, device, training data, code revision, lead
table, sampling rate, normalisation), so a checkpoint describes itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from .errors import CheckpointError
from .geometry import NAMED
from .model import ModelConfig, NefNetV2
from .records import MODEL_FS

FORMAT = "panorama-nefnet-v2"
FORMAT_VERSION = "1"


def content_hash(tensors: dict[str, torch.Tensor], config: dict) -> str:
    """sha256 over the model config and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(model: NefNetV2, path: str | Path, meta: dict | None = None) -> str:
    """Write atomically (temp file + rename); returns the content hash."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    digest = content_hash(tensors, model.cfg.to_dict())
    info = {"fs": MODEL_FS, "units": "mV", "normalisation": "none (inputs in mV, DC-blind network path)",
            "lead_table": {n: [v.theta, v.phi] for n, v in NAMED.items()}, **(meta or {})}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(model.cfg.to_dict()),
              "sha256": digest, "meta": json.dumps(info)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return digest


def read_header(path: str | Path) -> dict:
    """The metadata of a checkpoint, validated; a clear CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint (truncated or corrupted?): {exc}") from exc
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (format {header.get('format')!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {header.get('format_version')!r}, "
                              f"this code reads {FORMAT_VERSION!r}")
    try:
        return {"config": json.loads(header["config"]), "meta": json.loads(header["meta"]),
                "sha256": header["sha256"]}
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: checkpoint header is incomplete or corrupted: {exc}") from exc


def load(path: str | Path, map_location: str = "cpu") -> tuple[NefNetV2, dict]:
    """The model (in eval mode) and its metadata; verifies the content hash."""
    header = read_header(path)
    try:
        tensors = load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: tensors unreadable (truncated or corrupted?): {exc}") from exc
    if content_hash(tensors, header["config"]) != header["sha256"]:
        raise CheckpointError(f"{path}: content hash mismatch: the file is corrupted")
    try:
        model = NefNetV2(ModelConfig(**header["config"]))
        model.load_state_dict(tensors)
    except (TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: does not match this code's model: {exc}") from exc
    model.eval()
    return model, {**header["meta"], "sha256": header["sha256"], "config": header["config"]}


def val_psnr(meta: dict) -> float | None:
    """The validation PSNR a training run chose this checkpoint on (its meta), if any."""
    return ((meta.get("val") or {}).get("overall") or {}).get("psnr_db")
