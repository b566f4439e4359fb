"""``panorama bench transfer``: choose how many reconstructed neighbours a view gets,
without the scored leads.

Leave one lead out on real records: the synthesis inputs stay I, II, V3; one of the other
recorded chest leads (V1, V4, V5) is held out in turn and synthesised, with neighbour
transfer fitted on 0–5 s of the remaining leads (no angle calibration). V2 and V6 are
neither transfer-fit leads, nor scored, nor in the PSNR scale (the ten other leads set it);
they only have to be present and not flat for a record to be eligible.
The held-out lead is scored over 5–10 s as the protocol scores V2 and V6. The fit does not
depend on the number of neighbours, so each record is fitted once and every choice is
scored from it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from panorama.geometry import STANDARD_12, View, resolve_view, resolve_views
from panorama.metrics import score_record, summarise
from panorama.records import MODEL_FS, find_records
from panorama.transfer import fit_transfer

from . import splits
from .evaluate import CALIB_S, RECORD_S, Task, load_cases

INPUTS = ("I", "II", "V3")
HELD = ("V1", "V4", "V5")
SCORED = ("V2", "V6")  # the protocol's scored views: never touched here
CHOICES = (0, 1, 2, 3)  # neighbours per view (0: no transfer)
LINE_CHOICES = (0.0, 0.1, 0.2, 0.25, 0.4, 0.6)  # shares of interpolation along the precordial line, one neighbour
FIT, SCORE = slice(0, int(CALIB_S * MODEL_FS)), slice(int(CALIB_S * MODEL_FS), int(RECORD_S * MODEL_FS))


class Fold(NamedTuple):
    """One record with one lead held out: what the transfer is fitted on and scored against."""

    record: str
    held: View
    x_cal: np.ndarray  # (leads, 0–5 s) every lead but the held one, V2 and V6
    views: list[View]  # their views
    x_in: np.ndarray  # (inputs, 0–10 s)
    truth: np.ndarray  # (1, 0–10 s) the held-out lead (scored over 5–10 s)
    scale: np.ndarray  # (10 leads, 5–10 s) the PSNR scale: every lead but V2 and V6


def _folds(data: list[Path], split: str, desc: str) -> tuple[int, Iterator[Fold]]:
    """The number of records of ``split`` the protocol can score, and their folds."""
    task = Task(resolve_views(",".join(INPUTS)), resolve_views(",".join(HELD)))
    cases, _ = load_cases(splits.select(find_records(*data), split), task, progress=sys.stderr.isatty())
    if not cases:
        raise ValueError(f"no record of split {split!r} can be scored under the synthesis protocol")
    others = [n for n in STANDARD_12 if n not in SCORED]

    def folds():
        for case in tqdm(cases, desc=desc, unit="rec", disable=not sys.stderr.isatty(), leave=False):
            rec = case.record
            x_in = np.stack([rec.lead(n) for n in INPUTS])
            scale = np.stack([rec.lead(n) for n in others])[:, SCORE]
            for h in HELD:
                names = [n for n in others if n != h]
                yield Fold(rec.name, resolve_view(h), np.stack([rec.lead(n) for n in names])[:, FIT],
                           [resolve_view(n) for n in names], x_in, rec.lead(h)[None], scale)

    return len(cases), folds()


def _score(fold: Fold, pred: np.ndarray):
    return score_record(fold.truth[:, SCORE], pred[:, SCORE], fold.scale, [fold.held.name])


def _mean_psnr(scores: dict) -> float:
    """Mean over the held-out leads of their PSNR; ``scores``: lead → record → RecordScore."""
    return round(float(np.mean([summarise(list(s.values()))["overall"]["psnr_db"] for s in scores.values()])), 2)


def _held_row(scores: dict) -> dict:
    """PSNR and median r per held-out lead, and their mean PSNR; ``scores`` as for ``_mean_psnr``."""
    over = {h: summarise(list(scores[h].values()))["overall"] for h in HELD}
    return {"psnr_db": {h: round(over[h]["psnr_db"], 2) for h in HELD},
            "r_median": {h: round(over[h]["r_median"], 3) for h in HELD},
            "mean_psnr_db": _mean_psnr(scores)}


def _held_header(label: str) -> str:
    """The header over ``_held_cells`` columns, ``label`` naming the choice."""
    return f"{label:>10}" + "".join(f"{h + ' dB / r':>16}" for h in HELD) + f"{'mean dB':>10}"


def _held_cells(row: dict) -> str:
    """A ``_held_row`` as table cells: dB / r per held-out lead."""
    return "".join(f"{row['psnr_db'][h]:>9.2f} / {row['r_median'][h]:.3f}" for h in HELD)


def tune_transfer(synth, data: list[Path], split: str = "val", choices=CHOICES, line_choices=LINE_CHOICES) -> dict:
    """PSNR and r of each held-out lead for each number of neighbours (without interpolation
    along the precordial line), and, with one neighbour, for each share of that
    interpolation (V4 between V3 and V5, V5 one place past V3 and V4; V1 has none); the
    best of each by mean PSNR."""
    n_records, folds = _folds(data, split, "leave one lead out")
    scores = {k: {h: {} for h in HELD} for k in choices}
    line = {b: {h: {} for h in HELD} for b in line_choices}
    times = {"fit": [], **{k: [] for k in choices}}  # ms: one fit, one 10 s synthesis per choice
    for fold in folds:
        t0 = time.perf_counter()
        tr = fit_transfer(synth, fold.x_cal, fold.views, list(INPUTS), line_blend=0)
        times["fit"].append((time.perf_counter() - t0) * 1000)
        for k in choices:
            tr.per_view = k
            t0 = time.perf_counter()
            pred = tr.synthesize(synth, fold.x_in, [fold.held])
            times[k].append((time.perf_counter() - t0) * 1000)
            scores[k][fold.held.name][fold.record] = _score(fold, pred)
        tr.per_view = 1
        for b in line_choices:
            tr.line_blend = b
            line[b][fold.held.name][fold.record] = _score(fold, tr.synthesize(synth, fold.x_in, [fold.held]))
    table = {k: _held_row(scores[k]) for k in choices}
    best = max(choices, key=lambda k: table[k]["mean_psnr_db"])
    line_table = {b: _held_row(line[b]) for b in line_choices}
    return {"records": n_records, "split": split, "table": table, "best_neighbours": best,
            "line_table": line_table,
            "best_line_blend": max(line_choices, key=lambda b: line_table[b]["mean_psnr_db"]) if line_choices else None,
            "fit_ms_median": round(float(np.median(times["fit"])), 1),
            "synthesis_ms_median": {k: round(float(np.median(times[k])), 1) for k in choices}}


FILTERS = {"no lags": (0,), "±20 ms": tuple(range(-10, 11, 2)), "±40 ms": tuple(range(-20, 21, 4)),
           "±80 ms": tuple(range(-40, 41, 8)), "±120 ms": tuple(range(-60, 61, 10))}
RIDGES = (0.01, 0.03, 0.1)


def sweep_filters(synth, data: list[Path], split: str = "val") -> dict:
    """Mean leave-one-lead-out PSNR (one neighbour) for each filter span and ridge."""
    _, folds = _folds(data, split, "filter sweep")
    grid = [(f, r) for f in FILTERS for r in RIDGES]
    scores = {g: {h: {} for h in HELD} for g in grid}
    for fold in folds:
        for f, r in grid:
            tr = fit_transfer(synth, fold.x_cal, fold.views, list(INPUTS), ridge=r, lags=FILTERS[f], line_blend=0)
            scores[(f, r)][fold.held.name][fold.record] = _score(fold, tr.synthesize(synth, fold.x_in, [fold.held]))
    return {f"{f}, ridge {r:g}": _mean_psnr(scores[(f, r)]) for f, r in grid}


def format_tuning(res: dict) -> str:
    lines = [f"leave one lead out, inputs {','.join(INPUTS)}, {res['records']} records (split {res['split']}); "
             "V2, V6 unused", _held_header("neighbours")]
    for k, row in res["table"].items():
        lines.append(f"{'off' if k == 0 else k:>10}{_held_cells(row)}{row['mean_psnr_db']:>10.2f}")
    lines.append(f"best: {res['best_neighbours']} neighbour(s) per view")
    if res.get("line_table"):
        lines.append(_held_header("line share") + "   (one neighbour; the share of interpolation along the precordial line)")
        for b, row in res["line_table"].items():
            lines.append(f"{b:>10g}{_held_cells(row)}{row['mean_psnr_db']:>10.2f}")
        lines.append(f"best: a share of {res['best_line_blend']:g}")
    syn = ", ".join(f"{'off' if k == 0 else k} {v:g}" for k, v in res["synthesis_ms_median"].items())
    lines.append(f"median time: fit {res['fit_ms_median']:g} ms (9 leads x 5 s); one view from 10 s: {syn} ms")
    return "\n".join(lines)
