"""Reassembling one (monitor, patient) stream of chunks by time, for ``panorama listen``.

A chunk is placed by its ``t0_ns`` relative to its segment's first chunk, rounded to samples
(never by seq × samples per chunk, which would assume fixed-length chunks); seq only counts
gaps, duplicates and chunks out of order. Samples no chunk covered are NaN. A segment ends,
and a new one begins, when the labels or the rate change, when the origin restarts (a seq
seen before with another ``t0_ns``) or when time jumps more than ``MAX_JUMP_S``. Chunks
marked missing are NaN where they are marked; those marked masked (drawn with an input lead
off) are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_JUMP_S = 60.0  # a stream that jumps further in time starts a new segment (no huge NaN spans)
RESTART_TOLERANCE_NS = 1_000_000_000  # a repeated seq whose t0 moved more than this is a restart
_WRAP = 2**32


@dataclass
class StreamStats:
    chunks: int = 0  # chunks placed (duplicates excluded)
    samples: int = 0  # samples per lead received
    gaps: int = 0  # seqs between the first and the last never received
    duplicates: int = 0
    out_of_order: int = 0
    malformed: int = 0
    restarts: int = 0
    missing_samples: int = 0  # samples of chunks that came marked missing (no input usable: drawn from nothing)
    masked_samples: int = 0  # samples of chunks drawn with an input lead off (marked masked)
    latency_ms: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        lat = np.asarray(self.latency_ms, dtype=np.float64)
        latency = ({"n": int(lat.size), "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                    "max": float(lat.max())} if lat.size else {"n": 0, "p50": None, "p99": None, "max": None})
        return {"chunks": self.chunks, "samples": self.samples, "gaps": self.gaps, "duplicates": self.duplicates,
                "out_of_order": self.out_of_order, "malformed": self.malformed, "restarts": self.restarts,
                "missing_samples": self.missing_samples, "masked_samples": self.masked_samples, "latency_ms": latency}


@dataclass
class Segment:
    """One stretch of a stream with the same views: what is written as one record."""

    views: list[str]
    signals: np.ndarray  # (n_views, n_samples) float32 mV, NaN where nothing arrived
    fs: float
    t0_ns: int  # time of the first sample


@dataclass
class Assembled:
    """A stream as received: its first segment's views and signals, and every segment."""

    monitor: str
    patient: str
    views: list[str]
    signals: np.ndarray
    fs: float
    t0_ns: int
    stats: StreamStats
    segments: list[Segment]


class Building:
    """A segment being filled: pieces placed by time, assembled on demand."""

    def __init__(self, chunk, u: int):
        self.views, self.fs, self.t0_ns = list(chunk.leads), float(chunk.fs), int(chunk.t0_ns)
        self.first_u = u
        self.pieces: list[tuple[int, np.ndarray]] = []
        self.lo, self.hi = 0, 0  # sample span covered so far

    def matches(self, chunk) -> bool:
        return list(chunk.leads) == self.views and abs(float(chunk.fs) - self.fs) < 1e-9

    def offset(self, chunk) -> int:
        return int(round((int(chunk.t0_ns) - self.t0_ns) * self.fs / 1e9))

    def fits(self, chunk) -> bool:
        off, jump = self.offset(chunk), MAX_JUMP_S * self.fs
        return self.lo - jump <= off <= self.hi + jump

    def add(self, chunk) -> None:
        data = np.array(chunk.data, dtype=np.float32)  # own copy: it is written into below
        if chunk.quality:
            for row, q in enumerate(chunk.quality):
                if q == "missing":
                    data[row] = np.nan
        off = self.offset(chunk)
        self.pieces.append((off, data))
        if len(self.pieces) == 1:
            self.lo, self.hi = off, off + data.shape[1]
        else:
            self.lo, self.hi = min(self.lo, off), max(self.hi, off + data.shape[1])

    def assemble(self) -> Segment:
        out = np.full((len(self.views), self.hi - self.lo), np.nan, dtype=np.float32)
        for off, data in self.pieces:  # in arrival order: a later chunk wins where two overlap
            out[:, off - self.lo: off - self.lo + data.shape[1]] = data
        return Segment(self.views, out, self.fs, self.t0_ns + int(round(self.lo * 1e9 / self.fs)))


class Stream:
    """One (monitor, patient): seq bookkeeping and its segments."""

    def __init__(self, key: tuple[str, str]):
        self.key = key
        self.stats = StreamStats()
        self.segments: list[Building] = []
        self.seen: dict[int, int] = {}  # unwrapped seq -> t0_ns
        self.lowest: int | None = None
        self.highest: int | None = None
        self.base_gaps = 0  # gaps of the origin's earlier runs (before a restart)

    def unwrap(self, seq: int) -> int:
        if self.highest is None:
            return seq
        d = (seq - self.highest) % _WRAP
        return self.highest + (d if d < _WRAP // 2 else d - _WRAP)

    def add(self, chunk, recv_ns: int) -> None:
        u = self.unwrap(int(chunk.seq))
        if u in self.seen:
            if abs(self.seen[u] - int(chunk.t0_ns)) <= RESTART_TOLERANCE_NS:
                self.stats.duplicates += 1
                return
            # the origin started again (seq from 0): keep what came before as its own segment
            self.stats.restarts += 1
            self.base_gaps = self.stats.gaps
            self.seen, self.lowest, self.highest = {}, None, None
            u = int(chunk.seq)
            self.segments.append(Building(chunk, u))
        elif self.highest is not None and u < self.highest:
            self.stats.out_of_order += 1
        self.seen[u] = int(chunk.t0_ns)
        self.highest = u if self.highest is None else max(self.highest, u)
        self.lowest = u if self.lowest is None else min(self.lowest, u)
        self._segment_for(chunk, u).add(chunk)
        self.stats.chunks += 1
        self.stats.samples += int(chunk.data.shape[1])
        quality = set(chunk.quality or ())
        if "missing" in quality:
            self.stats.missing_samples += int(chunk.data.shape[1])
        elif "masked" in quality:
            self.stats.masked_samples += int(chunk.data.shape[1])
        self.stats.gaps = self.base_gaps + self._gaps()
        if chunk.sent_ns:
            self.stats.latency_ms.append((recv_ns - int(chunk.sent_ns)) / 1e6)

    def _gaps(self) -> int:
        return (self.highest - self.lowest + 1 - len(self.seen)) if self.seen else 0

    def _segment_for(self, chunk, u: int) -> Building:
        if self.segments:
            cur = self.segments[-1]
            if cur.matches(chunk) and cur.fits(chunk):
                return cur
            # a late chunk of the views before the last change
            if len(self.segments) > 1 and u < cur.first_u and self.segments[-2].matches(chunk) \
                    and self.segments[-2].fits(chunk):
                return self.segments[-2]
        self.segments.append(Building(chunk, u))
        return self.segments[-1]

    def assembled(self) -> Assembled:
        segs = [b.assemble() for b in self.segments]
        first = segs[0]
        return Assembled(self.key[0], self.key[1], first.views, first.signals, first.fs, first.t0_ns,
                         self.stats, segs)
