"""Training examples for any-pairs pretraining: real records and simulated patients.

Every example is a set of views of one patient, each a signal with the angle the model is
TOLD (the table angle for named leads; for the simulator's random views, their exact
angle). Batches split each example's views at random into recorded inputs and queries.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from panorama.geometry import NAMED, STANDARD_12, descriptors
from panorama.errors import ConfigError, RecordError
from panorama.records import MODEL_FS, lead_quality, read_record

from . import splits

log = logging.getLogger(__name__)


@dataclass
class Example:
    """All usable views of one patient: signals (V, T) float32 mV, angles (V, 3) descriptors
    (θ°, φ°, far-field flag)."""

    name: str
    signals: np.ndarray
    angles: np.ndarray
    names: list[str]
    source: str
    true_angles: np.ndarray | None = None  # simulator only: where the electrodes really were


def load_real(folder: Path, split: str, hidden: list[str], sources: list[str] | None = None,
              val_names: list[str] | None = None) -> list[Example]:
    """Real records of a split with their good leads; ``hidden`` leads are dropped entirely
    (never an input, never a target), and ``sources`` filters by the header's source (its
    ``# source:`` comment); ``val_names`` set the split as ``splits.split_of`` says. An
    unreadable record is skipped with a warning, as evaluation skips it; labels no lead name
    matches are dropped and said, counted over the records used. ConfigError when
    ``sources`` matches no record, naming the sources the folder holds."""
    out, found, unread, unknown = [], Counter(), 0, Counter()
    paths = splits.select(sorted(p.with_suffix("") for p in Path(folder).rglob("*.hea")), split, val_names)
    for p in tqdm(paths, desc=f"loading {split} records", unit="rec", leave=False):
        try:
            rec = read_record(p, fs=MODEL_FS)
        except RecordError as exc:
            log.warning("skipping %s", exc)
            unread += 1
            continue
        found[rec.source] += 1
        if not splits.from_sources(rec.source, sources):
            continue
        unknown.update(rec.unrecognised)
        keep = [i for i, (n, f) in enumerate(zip(rec.leads, lead_quality(rec.signals)))
                if f == "ok" and n not in hidden and n in NAMED and np.isfinite(rec.signals[i]).all()]
        if len(keep) < 3:
            continue
        sig = rec.signals[keep]
        sig = sig - np.median(sig, axis=1, keepdims=True)
        names = [rec.leads[i] for i in keep]
        angles = descriptors([NAMED[n] for n in names])
        out.append(Example(rec.name, sig.astype(np.float32), angles, names, rec.source))
    if unread:
        log.warning("%d of the %d %s records in %s could not be read and were skipped", unread, len(paths), split,
                    folder)
    if unknown:
        log.warning("lead labels no lead name matches, dropped: %s",
                    ", ".join(f"{lab!r} ({n} record{'s' * (n > 1)})" for lab, n in unknown.most_common()))
    if sources and found and not any(splits.from_sources(src, sources) for src in found):
        raise ConfigError(f"data.sources {sources} matches none of the {sum(found.values())} {split} records in "
                          f"{folder}: a record's source is its header's '# source:' comment, and these hold "
                          + ", ".join(f"{src or 'no such comment'} ({n})" for src, n in found.most_common())
                          + "; name one of them, or give sources: [] to use every record of the folder")
    return out


def random_directions(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 2) angles: half uniform on the sphere, half in the chest band where electrodes go."""
    theta = np.degrees(np.arccos(rng.uniform(-1, 1, n)))
    band = rng.random(n) < 0.5
    theta[band] = rng.uniform(60, 125, band.sum())
    phi = rng.uniform(-180, 180, n)
    return np.stack([theta, phi], 1)


def simulate_example(seed: int, n_random: int = 12, seconds: float = 10.0, device: str = "random",
                     displacement_deg: float = 10.6, hidden: tuple[str, ...] = (), anatomy: str = "v1") -> Example:
    """One simulated patient: the 12 standard leads (chest electrodes displaced, angles as
    the table says, like a real recording) but the ``hidden`` ones, plus ``n_random`` views
    at exact random angles (which may fall anywhere, as physics, not as a named lead)."""
    from .simulator import apply_device, render, sample_patient
    from .simulator.device import resolve_device
    from .simulator.render import lead_kind

    rng = np.random.default_rng([seed, 7])
    params = sample_patient(rng, anatomy=anatomy)
    told = descriptors([NAMED[n] for n in STANDARD_12]).astype(float)
    true = told[:, :2].copy()
    chest = [i for i, n in enumerate(STANDARD_12) if lead_kind(n) == "chest"]
    true[chest] += rng.normal(0, displacement_deg, (len(chest), 2))
    rand = random_directions(rng, n_random)
    names = [*STANDARD_12, *(f"{t:.1f}:{p:.1f}" for t, p in rand)]
    clean = render(params, np.concatenate([true, rand]), names, seconds, MODEL_FS)
    rand = np.concatenate([rand, np.zeros((n_random, 1))], 1)  # torso electrodes: near field
    sig = apply_device(clean, MODEL_FS, resolve_device(device, rng), rng)
    sig = sig - np.median(sig, axis=1, keepdims=True)
    keep = [i for i, n in enumerate(names) if n not in hidden]
    angles = np.concatenate([told, rand]).astype(np.float32)
    really = np.concatenate([np.concatenate([true, told[:, 2:]], 1), rand]).astype(np.float32)
    return Example(f"sim{seed}", sig[keep].astype(np.float32), angles[keep], [names[i] for i in keep], "simulator",
                   really[keep])


@dataclass
class Batch:
    x: torch.Tensor  # (B, L, T) inputs, mV
    in_angles: torch.Tensor  # (B, L, 3) view descriptors
    mask: torch.Tensor  # (B, L) bool
    q_angles: torch.Tensor  # (B, Q, 3)
    y: torch.Tensor  # (B, Q, T) targets, mV
    q_mask: torch.Tensor  # (B, Q) bool

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.x, self.in_angles, self.mask, self.q_angles, self.y, self.q_mask)))


class AnyPairsSampler:
    """Random crops with random recorded/query splits (the paper's any-pairs pretraining).

    Inputs include I and II with probability ``p_limb`` (the paper fixes two limb leads as
    reference potentials; the deployed montage I, II, V3 has them too). A simulated
    patient's displaced electrodes are told their true angles with probability ``p_true``
    (else the table's, as a real recording would be): a model that has seen where
    electrodes really were answers to angles physically, which is what on-the-fly
    calibration needs to find a patient's offsets.
    """

    def __init__(self, examples: list[Example], crop: int, max_inputs: int, max_queries: int,
                 seed: int, p_limb: float = 0.6, gain_jitter: float = 0.2, p_true: float = 0.0):
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.crop = examples, crop
        self.max_inputs, self.max_queries = max_inputs, max_queries
        self.rng = np.random.default_rng(seed)
        self.p_limb, self.gain_jitter, self.p_true = p_limb, gain_jitter, p_true

    def _one(self, ex: Example):
        rng = self.rng
        v, t = ex.signals.shape
        start = int(rng.integers(0, max(1, t - self.crop + 1)))
        sig = ex.signals[:, start:start + self.crop]
        if sig.shape[1] < self.crop:
            sig = np.pad(sig, ((0, 0), (0, self.crop - sig.shape[1])))
        order = list(rng.permutation(v))
        if rng.random() < self.p_limb and "I" in ex.names and "II" in ex.names:
            for n in ("II", "I"):
                order.remove(ex.names.index(n))
                order.insert(0, ex.names.index(n))
        n_in = int(rng.integers(2, min(self.max_inputs, v - 1) + 1))
        ins, qs = order[:n_in], order[n_in:n_in + self.max_queries]
        gain = 1.0 + self.gain_jitter * rng.uniform(-1, 1)  # the physics is linear in amplitude
        angles = ex.true_angles if ex.true_angles is not None and rng.random() < self.p_true else ex.angles
        return sig[ins] * gain, angles[ins], sig[qs] * gain, angles[qs]

    def batch(self, size: int) -> Batch:
        b_l, b_q = self.max_inputs, self.max_queries
        x = np.zeros((size, b_l, self.crop), np.float32)
        ia = np.zeros((size, b_l, 3), np.float32)
        m = np.zeros((size, b_l), bool)
        y = np.zeros((size, b_q, self.crop), np.float32)
        qa = np.zeros((size, b_q, 3), np.float32)
        qm = np.zeros((size, b_q), bool)
        for i in range(size):
            xs, a, ys, qang = self._one(self.examples[int(self.rng.integers(len(self.examples)))])
            x[i, :len(xs)], ia[i, :len(xs)], m[i, :len(xs)] = xs, a, True
            y[i, :len(ys)], qa[i, :len(ys)], qm[i, :len(ys)] = ys, qang, True
        t = torch.from_numpy
        return Batch(t(x), t(ia), t(m), t(qa), t(y), t(qm))


def _centred_error(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """pred − y with each view's median removed (DC carries no information, as in the metric)."""
    err = pred - y
    return err - err.median(dim=-1, keepdim=True).values


def masked_l1(pred: torch.Tensor, y: torch.Tensor, q_mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over valid queries, ignoring each view's DC offset (median of the
    error), as the metric does."""
    per_view = _centred_error(pred, y).abs().mean(-1)
    return (per_view * q_mask).sum() / q_mask.sum().clamp(min=1)


def masked_log_rmse(pred: torch.Tensor, y: torch.Tensor, q_mask: torch.Tensor, floor_mv: float = 0.005) -> torch.Tensor:
    """Mean over valid queries of log RMSE, each view's DC offset removed (median of the
    error). The metric's PSNR is −20·log10 of a view's RMSE over a per-record scale, averaged
    over views: this is that, up to constants (the scale only adds one per record). The floor
    (5 µV) keeps a view drawn almost exactly from outweighing the rest."""
    per_view = torch.log(torch.sqrt(_centred_error(pred, y).square().mean(-1) + floor_mv ** 2))
    return (per_view * q_mask).sum() / q_mask.sum().clamp(min=1)


LOSSES = {"l1": masked_l1, "log_rmse": masked_log_rmse}
