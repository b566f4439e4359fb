"""The daemon's model, swapped whole when the checkpoint at ``model.path`` changes.

A fleet update (deploy/agent.py) installs a new version into the model store and swaps its
``current`` link; the daemon, whose ``model.path`` goes through that link, sees the file
change within ``model.reload_check_s`` and loads it on its own thread: the checkpoint (the
torch model that calibration fits with), the inference backend, and one trial window on
that backend. Only when all three work does the slot swap, in one assignment each, so the
inference thread takes either the old model or the new one for a batch, never a mixture
of the two. A file that fails keeps the old model running and is not tried again until it
changes. Patients keep their fitted offsets across a swap (they are electrode angles);
patients that arrive later are calibrated against the new model.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from panorama import checkpoint
from panorama.geometry import descriptors, resolve_views
from panorama.synth import default_checkpoint

from .backends import make_backend
from .config import ModelConfig

log = logging.getLogger("panorama.serve")


def identity(path: Path) -> tuple | None:
    """(real path, mtime, size) of the file ``path`` leads to; None while it is missing."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return real, st.st_mtime_ns, st.st_size


class ModelSlot:
    def __init__(self, cfg: ModelConfig, calibration_device: str):
        self.cfg, self.calibration_device = cfg, calibration_device
        self.path = Path(cfg.path or default_checkpoint())
        self.ident = identity(self.path)
        self.model, self.meta, self.backend = self._load(self.ident[0] if self.ident else self.path)
        log.info("model %s", _described(self.ident[0] if self.ident else self.path, self.meta, self.backend))
        self.reloads = 0
        self.reload_error: str | None = None
        self.failed: tuple | None = None  # identity of the last file that failed to load
        self.inference_failures = 0  # batches the backend failed since this model was loaded

    def _load(self, real):
        """Everything from the one file ``real`` (the link may swap again meanwhile)."""
        model, meta = checkpoint.load(real)  # the torch model: calibration needs gradients
        model.to(self.calibration_device).eval()
        backend = make_backend(self.cfg.backend, Path(real), self.cfg.device)
        return model, meta, backend

    def reload_if_changed(self) -> str | None:
        """'reloaded', 'failed' (the old model keeps running) or None when nothing changed."""
        ident = identity(self.path)
        if ident == self.ident and self.failed:  # back to the file it runs (a fleet rollback): nothing failed now
            self.failed = self.reload_error = None
        if ident is None or ident == self.ident or ident == self.failed:
            return None
        t0 = time.perf_counter()
        try:
            model, meta, backend = self._load(ident[0])
            _trial(backend)
        except Exception as exc:
            self.failed, self.reload_error = ident, f"{type(exc).__name__}: {exc}"
            log.error("model at %s (%s) not loaded, the old one keeps running: %s", self.path, ident[0],
                      self.reload_error)
            return "failed"
        # in this order: a health report never shows the new hash with the old model's failures
        self.inference_failures = 0
        self.backend, self.model = backend, model
        self.meta = meta
        self.ident, self.failed, self.reload_error = ident, None, None
        self.reloads += 1
        log.info("model reloaded in %.1f s: %s", time.perf_counter() - t0, _described(ident[0], meta, backend))
        return "reloaded"

    def failed_batch(self, backend) -> None:
        """A batch failed on ``backend``: counted against the model now served only if it ran there."""
        if backend is self.backend:
            self.inference_failures += 1

    def info(self) -> dict:
        """The health report's model block: what runs, and the last reload that failed."""
        return {"sha256": self.meta["sha256"], "file": self.ident[0] if self.ident else str(self.path),
                "stage": self.meta.get("stage"), "reloads": self.reloads, "reload_error": self.reload_error,
                "failed_file": self.failed[0] if self.failed else None,
                "inference_failures": self.inference_failures}


def _trial(backend) -> None:
    """One small window through a freshly built backend: it must run and give finite views."""
    inputs, queries = resolve_views(["I", "II", "V3"]), resolve_views(["V2", "V7"])
    t = np.arange(512, dtype=np.float32) / 500
    x = np.stack([np.sin(2 * np.pi * 1.2 * t), np.cos(2 * np.pi * 1.2 * t), 0.5 * np.sin(2 * np.pi * 2.4 * t)])
    y = backend.run(x[None].astype(np.float32), descriptors(inputs)[None], np.ones((1, 3), bool),
                    descriptors(queries)[None])
    if y.shape != (1, 2, 512) or not np.isfinite(y).all():
        raise RuntimeError(f"trial window gave {'non-finite views' if y.shape == (1, 2, 512) else y.shape}")


def _described(path, meta: dict, backend) -> str:
    """What a log line says of the model being served."""
    calibrated = f", calibrated for {meta['device_id']}" if meta.get("device_id") else ""
    return f"{path} (sha256 {meta['sha256'][:12]}…, stage {meta.get('stage', '?')}{calibrated}) on {backend.name}"
