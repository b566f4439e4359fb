"""The patient-level train/validation split of the real records.

The split is a pure function of the record name, so it is the same on every machine and
for every command. PTB-derived records (the Challenge ``S*`` records and ``ptb_frank``) are
all in validation: their patient identities are not in the headers, so they are kept
together rather than risk one patient on both sides, and it keeps the only real Frank
recordings unseen by training (they are the real test of arbitrary-view synthesis).
Everything else goes to validation with probability ``VAL_FRACTION`` by a stable hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from pathlib import Path

VAL_FRACTION = 0.2
SPLITS = ("all", "train", "val")


def is_ptb(path: Path) -> bool:
    name = path.name
    return path.parent.name == "ptb_frank" or name.startswith(("S0", "s0", "ptb_"))


def split_of(path: str | Path, val_names: Collection[str] | None = None) -> str:
    """"val" or "train" for a record; ``val_names`` (record names, a training config's
    ``data.val_records``), when given, are the validation records instead of the hash."""
    p = Path(path)
    if p.suffix in (".hea", ".dat"):
        p = p.with_suffix("")
    if val_names is not None:
        return "val" if p.name in val_names else "train"
    if is_ptb(p):
        return "val"
    h = int(hashlib.sha256(p.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < VAL_FRACTION else "train"


def select(paths: list[Path], split: str, val_names: Collection[str] | None = None) -> list[Path]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return list(paths) if split == "all" else [p for p in paths if split_of(p, val_names) == split]


def from_sources(source: str, sources: list[str] | None) -> bool:
    """Whether a record whose header says ``source`` (its ``# source:`` comment) is kept by
    the filter ``sources`` (any of them inside it, ignoring case; empty or None keeps all)."""
    return not sources or any(s.lower() in (source or "").lower() for s in sources)
