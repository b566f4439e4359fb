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
from .devices import check_torch_device
from .errors import CheckpointError
from .geometry import View, descriptors, redundant_limb_leads
from .model import DOWNSAMPLE

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


CHUNK = 30_000  # samples (60 s at 500 Hz) a model call emits at most
MARGIN = 256  # samples of context each side of a chunk: past the receptive field (±224)
SILENCE_T = 512  # samples of silence the model's response to a silent heart is read from (at the middle)


def silence(draw, n_inputs: int) -> np.ndarray:
    """(views,) mV: what ``draw(x) -> (views, T)`` makes of a silent heart, every input flat
    at zero, read at the middle of ``SILENCE_T`` samples. The training loss ignores each
    view's DC (views are scored centred on their median), so the model adds a constant of its
    own to every view: -0.10 to -0.16 mV for the shipped one (I asked back as a view: -0.15 mV,
    the same on every record within 3 uV). A silent heart draws flat zero: ``panorama
    synthesize`` and the daemon subtract this; ``eval`` scores are unchanged by it."""
    return np.asarray(draw(np.zeros((n_inputs, SILENCE_T), np.float32)))[:, SILENCE_T // 2].copy()


class Synthesizer:
    """``runner``: an inference backend's ``run`` (numpy in, numpy out) to use instead of the
    PyTorch model; the model stays for on-the-fly calibration, which needs gradients.

    A recording longer than ``chunk`` samples is drawn in chunks, each with ``MARGIN``
    samples of context either side, starting on the encoder's stride: nothing in the model
    reaches further or pools over time, so the chunks join into what one pass gives (as the
    daemon's windows do) while memory stays that of one chunk, whatever the length (a
    60-minute record took 1.6 GB in one pass)."""

    def __init__(self, model, meta: dict | None = None, device: str = "cpu", runner=None, chunk: int = CHUNK):
        self.device = torch.device(check_torch_device(str(device)))  # a clear error where there is no such GPU
        self.model = model.to(self.device).eval()
        self.meta = meta or {}
        self.runner = runner
        self.chunk = chunk

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
        ia, qa = self.angles(inputs, offsets), self.angles(queries)
        n = x.shape[1]
        if self.chunk < DOWNSAMPLE:
            raise ValueError(f"chunk {self.chunk} is shorter than the encoder's stride ({DOWNSAMPLE} samples)")
        if n <= self.chunk + 2 * MARGIN:
            return self._run(x, ia, keep, qa)
        out = np.empty((len(queries), n), dtype=np.float32)
        for o0 in range(0, n, self.chunk):
            o1 = min(o0 + self.chunk, n)
            s = max(0, o0 - MARGIN)
            s -= s % DOWNSAMPLE  # the encoder's stride, counted from the record's first sample
            e = n if n - o1 <= MARGIN else s + -(-(o1 + MARGIN - s) // DOWNSAMPLE) * DOWNSAMPLE
            out[:, o0:o1] = self._run(x[:, s:e], ia, keep, qa)[:, o0 - s: o1 - s]
        return out

    def _run(self, x: np.ndarray, ia: np.ndarray, keep: np.ndarray, qa: np.ndarray) -> np.ndarray:
        if self.runner is not None:
            return self.runner(x[None], ia[None], keep[None], qa[None])[0]
        dev = self.device
        t = [torch.from_numpy(np.ascontiguousarray(a))[None].to(dev) for a in (x, ia, keep, qa)]
        return self.model(*t)[0].cpu().numpy()
