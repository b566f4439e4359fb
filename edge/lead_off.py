"""Inputs that are off for part of a record, for ``panorama synthesize``.

A whole-record screen (``panorama.records.screen_leads``) passes a lead that is off for a
few seconds: its standard deviation over the record is a real ECG's. Drawn from such a
lead, a view follows the flat line or the rail over that span with nothing said. So the
inputs are judged second by second, much as the daemon judges its windows
(``edge.batch.window_quality``: flat, implausibly large, missing), and over the whole record
for a value held exactly 0.75 s or more (off, wherever the seconds fall) or a rail (held at
the record's extreme 0.1 s; :func:`leads_off` says why), and over a second where an input is off the views are drawn from the other inputs, as the
daemon masks a lead off; where none is left they are written as missing samples. Short
gaps (NaN) are bridged by a straight line, as the daemon bridges a lost chunk; a longer one
is a lead off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from panorama.records import MODEL_FS

from .batch import runs, window_quality

BLOCK_S = 1.0  # judged second by second: about the daemon's window (context 256 + hop 128 + lookahead)
RAIL_S = 0.1  # a lead held at its extreme this long is at a rail (real records here plateau at theirs for up to 0.09 s)
HELD_S = 0.75  # a lead exactly constant this long is off, wherever it sits (real records here: at most 0.7 s)
BRIDGE_S = 0.5  # NaN gaps up to this long are bridged (the daemon bridges 256 samples, 0.51 s)


def fill_gaps(x: np.ndarray, fs: float) -> tuple[np.ndarray, list[list[tuple[int, int]]], int]:
    """(filled copy, each lead's gaps longer than ``BRIDGE_S`` as (start, stop) samples, how
    many shorter gaps were bridged). Every NaN is filled by a straight line between the
    finite samples either side (flat before the first and after the last), so that the
    record can be resampled; the long gaps are then treated as the lead off."""
    x = np.array(x, dtype=np.float32, copy=True)
    long: list[list[tuple[int, int]]] = []
    bridged = 0
    for row in x:
        bad = ~np.isfinite(row)
        holes = runs(bad)
        long.append([(a, b) for a, b in holes if b - a > BRIDGE_S * fs])
        bridged += len(holes) - len(long[-1])
        if bad.any() and not bad.all():
            good = np.flatnonzero(~bad)
            row[bad] = np.interp(np.flatnonzero(bad), good, row[good])
    return x, long, bridged


@dataclass
class LeadsOff:
    """Which inputs are off in which second of a record at the model rate."""

    off: np.ndarray  # (inputs, blocks) bool
    why: np.ndarray  # (inputs, blocks) str: "ok", "flat", "saturated", "implausible", "missing"
    bounds: list[tuple[int, int]]  # each block's (start, stop) samples

    @property
    def any(self) -> bool:
        return bool(self.off.any())

    def spans(self, names: list[str]) -> list[str]:
        """Each input's spans off, with why: "V3 flat over 5-10 s"."""
        said = []
        for i, name in enumerate(names):
            for a, b in runs(self.off[i]):
                reasons = sorted(set(self.why[i, a:b]) - {"ok"})
                said.append(f"{name} {'/'.join(reasons)} over {self._s(a, b)}")
        return said

    def _s(self, a: int, b: int) -> str:
        return f"{self.bounds[a][0] / MODEL_FS:g}-{self.bounds[b - 1][1] / MODEL_FS:g} s"


def leads_off(x: np.ndarray, native: np.ndarray, gaps: list[list[tuple[int, int]]], native_fs: float) -> LeadsOff:
    """Judge ``x`` (inputs, T) at the model rate second by second: flat or implausibly large
    there; flat too wherever ``native`` (the same inputs at ``native_fs``, gaps filled) holds
    one value exactly for ``HELD_S`` or more, however the seconds fall (a lead off for 1.3 s
    from 5.3 s fills no whole second); saturated where it holds its extreme over the whole
    record for ``RAIL_S`` in a row; and off wherever ``gaps`` (from :func:`fill_gaps`) reach.
    Saturation is judged against the whole record's extremes, not each second's: within one
    second a clean, quantised baseline is often the lowest value. A lead off for less than
    ``HELD_S`` within seconds that are otherwise live is not found: clean quantised ECG holds
    one value for up to 0.7 s (LUDB), and within a second its spread can be as small."""
    block = int(BLOCK_S * MODEL_FS)
    n = x.shape[1]
    starts = list(range(0, max(n - block // 2, 1), block))  # a short tail joins the block before it
    bounds = [(s, starts[k + 1] if k + 1 < len(starts) else n) for k, s in enumerate(starts)]
    why = np.array([window_quality(x[:, a:b], rail_run=b - a + 1) for a, b in bounds],  # rails below
                   dtype=object).T.reshape(len(x), len(bounds))
    scale = MODEL_FS / native_fs
    run = max(2, int(round(RAIL_S * native_fs)))

    def mark(i: int, a: float, b: float, what: str) -> None:
        for k, (s, e) in enumerate(bounds):
            if a * scale < e and b * scale > s and (why[i, k] == "ok" or what == "missing"):  # a gap says why
                why[i, k] = what

    held = max(2, int(round(HELD_S * native_fs)))
    for i, row in enumerate(native):
        for a, b in runs(np.diff(row) == 0):  # b - a + 1 samples of one value
            if b - a + 1 >= held:
                mark(i, a, b + 1, "flat")
        for extreme in (row.max(), row.min()):
            for a, b in runs(row == extreme):
                if b - a >= run:
                    mark(i, a, b, "saturated")
        for a, b in gaps[i]:
            mark(i, a, b, "missing")
    return LeadsOff(why != "ok", why, bounds)


def drawn_around(draw, inputs: list, lo: LeadsOff, n: int) -> tuple[np.ndarray, list[str]]:
    """(views, n) drawn by ``draw(inputs) -> (views, n)`` from every input, and over each
    second where some are off (and the second either side, which the model reads as
    context) from the others; NaN where none is left (a second beside such a one keeps its
    own inputs). Returns the notes for the header."""
    y = np.array(draw(inputs), dtype=np.float32, copy=True)
    if not lo.any:
        return y, []
    off = lo.off.copy()
    off[:, 1:] |= lo.off[:, :-1]
    off[:, :-1] |= lo.off[:, 1:]
    lone = off.all(axis=0) & ~lo.off.all(axis=0)  # a usable second beside one with no input: its own inputs
    off[:, lone] = lo.off[:, lone]
    names = [v.name for v in inputs]
    notes = [f"input off: {s}" for s in lo.spans(names)]
    for pattern in sorted({tuple(col) for col in off.T if col.any()}):
        blocks = [k for k in range(off.shape[1]) if tuple(off[:, k]) == pattern]
        keep = [v for v, gone in zip(inputs, pattern) if not gone]
        spans = ", ".join(lo._s(a, b) for a, b in runs(np.isin(np.arange(off.shape[1]), blocks)))
        if keep:
            part = draw(keep)
            for k in blocks:
                a, b = lo.bounds[k]
                y[:, a:b] = part[:, a:b]
            notes.append(f"views over {spans} drawn from {','.join(v.name for v in keep)} alone")
        else:
            for k in blocks:
                a, b = lo.bounds[k]
                y[:, a:b] = np.nan
            notes.append(f"views over {spans} left missing: no input usable there")
    return y, notes
