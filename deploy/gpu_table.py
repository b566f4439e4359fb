"""The GPU check's table: its rows, how a row is added or fails, its time budget and timing
helper, and how it prints (``deploy/gpu_check.py`` and ``deploy/gpu_stage3.py`` share it)."""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

VIEWS = "V2,V6,V7,V8,V9,V3R,V4R,120:45"  # the bench's 8 views
QUICK = "--quick" in sys.argv[1:]
BUDGET_S = 200  # sections after this are skipped: the whole check must stay under 4 minutes
START = time.perf_counter()
rows: list[dict] = []


def add(name: str, **fields) -> dict:
    row = {"row": name, **{k: float(v) if isinstance(v, np.floating) else v for k, v in fields.items()}}
    rows.append(row)
    return row


def failed(name: str, exc: BaseException) -> None:
    add(name, note=f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160])


def out_of_time() -> bool:
    return time.perf_counter() - START > BUDGET_S


def median_ms(fn, sync=lambda: None, budget_s: float = 4.0, reps: int = 20, warmup: int = 2) -> float:
    """Median milliseconds per call, at least 3 calls, about ``budget_s`` seconds at most."""
    if QUICK:
        reps, budget_s, warmup = 3, 0.0, 1
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(times) < reps and (len(times) < 3 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def print_table(env: dict) -> None:
    print("panorama GPU check: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    head = f"{'row':34} {'err µV':>10} {'b1 ms':>9} {'b32 ms':>9} {'s':>8}  note"
    print(head)
    print("-" * len(head))

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else ""

    for r in rows:
        err = num(r.get("err_uv"), ".3f") or (num(r.get("err_deg"), ".3f") + "°" if "err_deg" in r else "")
        print(f"{r['row']:34} {err:>10} {num(r.get('b1_ms'), '.2f'):>9} {num(r.get('b32_ms'), '.1f'):>9} "
              f"{num(r.get('seconds'), '.2f'):>8}  {r.get('note', '')}")
    print(f"(8 views from 10 s of 12 leads at 500 Hz; errors are max |y - y_torch_cpu|; "
          f"{time.perf_counter() - START:.0f} s in all)")
