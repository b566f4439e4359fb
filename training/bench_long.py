"""``panorama bench long``: a recording of any length in bounded memory.

Tiles 10 s of a simulated 12-lead patient to ``minutes`` and draws I, II, V3 → V2, V6, V7 with
the shipped model: first in ``Synthesizer``'s chunks, then (``one_pass``) as one model call,
reporting the time, the process's peak resident memory after each, and how far the two agree.
The chunked run comes first because peak memory only ever rises.
"""

from __future__ import annotations

import resource
import time

import numpy as np

from panorama.geometry import resolve_views

from .simulator import simulate


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def bench_long(synth, minutes: float = 20.0, one_pass: bool = True) -> dict:
    if not minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {minutes}")
    sim = simulate(0, duration_s=10.0, device="diagnostic")
    inputs = resolve_views("I,II,V3")
    x = np.tile(sim.signals[[sim.names.index(v.name) for v in inputs]].astype(np.float32),
                (1, max(1, int(round(minutes * 6)))))
    views = resolve_views("V2,V6,V7")
    res = {"minutes": round(x.shape[1] / 500 / 60, 2), "samples": int(x.shape[1]), "chunk": synth.chunk,
           "start_rss_mb": round(_peak_mb())}
    t = time.perf_counter()
    y = synth(x, inputs, views)
    res.update(chunked_s=round(time.perf_counter() - t, 2), chunked_peak_rss_mb=round(_peak_mb()))
    if one_pass:
        chunk, synth.chunk = synth.chunk, x.shape[1]
        try:
            t = time.perf_counter()
            ref = synth(x, inputs, views)
        finally:
            synth.chunk = chunk
        res.update(one_pass_s=round(time.perf_counter() - t, 2), one_pass_peak_rss_mb=round(_peak_mb()),
                   max_diff_uv=round(float(np.abs(y - ref).max() * 1000), 4))
    return res


def format_long(res: dict) -> str:
    return "\n".join(f"{k:>24}: {v}" for k, v in res.items())
