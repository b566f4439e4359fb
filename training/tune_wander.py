"""``panorama bench wander``: fit the gains that give chest views their drift back
(panorama/wander.py), without the scored leads.

Leave one lead out, as ``bench transfer`` does, on the validation split by default: on each
record V1, V4 and V5 are held out in turn and drawn by the whole pipeline of the evaluation
(calibration, patient adaptation, neighbour transfer on 0-5 s of the other leads but V2
and V6) from I, II, V3, every lead stripped of its slow part first. For each cutoff the two
gains are the least-squares ones for the held-out leads' 5-10 s as recorded (with a free
offset each: the protocol centres every lead), pooled over leads and records, and every
cutoff is scored with its own gains; "off" is the pipeline without stripping. The records
are read once. V2 and V6 are
neither fitted, nor scored, nor in the PSNR scale. Not the training split: the model has
learned those records' V1, V4 and V5, drift included, so its errors there are smaller than
on a view it never saw (the gains fitted there keep most of the model's drift).
"""

from __future__ import annotations

import sys

import numpy as np
from tqdm import tqdm

from panorama.geometry import resolve_views
from panorama.records import MODEL_FS, Record
from panorama.transfer import view_kind
from panorama.wander import Wander, slow_part

from .evaluate import CALIB_S, CalibratedModelMethod, Task
from .tune_transfer import HELD, INPUTS, SCORE, _folds, _held_cells, _held_row, _score

CUTOFFS = (0.5, 0.67, 1.0)


def fit_gains(preds: list[np.ndarray], truths: list[np.ndarray], commons: list[np.ndarray],
              cutoff_hz: float) -> Wander:
    """The gains that minimise the squared error over 5-10 s of ``truths`` (each (T,), 0-10 s)
    for the predictions ``preds`` given the chest inputs' mean ``commons``."""
    def c(v):  # the scored window; its offset is free (the protocol centres every lead)
        v = v[SCORE]
        return v - v.mean()

    rows, target = [], []
    for p, t, m in zip(preds, truths, commons):
        rows.append(np.stack([c(slow_part(p, cutoff_hz)), c(slow_part(m, cutoff_hz))], 1))
        target.append(c(t - p))
    (extra, common), *_ = np.linalg.lstsq(np.concatenate(rows), np.concatenate(target), rcond=None)
    return Wander(model_gain=round(float(1.0 + extra), 2), common_gain=round(float(common), 2), cutoff_hz=cutoff_hz)


def tune_wander(synth, data, split: str = "val", cutoffs=CUTOFFS) -> dict:
    inputs = resolve_views(",".join(INPUTS))
    chest = [i for i, v in enumerate(inputs) if view_kind(v) == "torso"]
    n_records, folds = _folds(data, split, "reading records")
    folds = list(folds)  # read once, drawn once per cutoff
    if not folds:
        raise ValueError(f"no record of split {split!r} can be scored under the synthesis protocol")
    runs = {}  # cutoff (None: no stripping) → predictions over 0-10 s, one per fold
    for cut in (None, *cutoffs):
        strip = None if cut is None else Wander(1.0, 0.0, cut)  # strip, restore nothing
        method = CalibratedModelMethod(synth, CALIB_S, transfer=True, adapt=True, wander=strip)
        runs[cut] = []
        for fold in tqdm(folds, desc=f"leave one lead out, {'no stripping' if cut is None else f'{cut:g} Hz'}",
                         unit="fold", disable=not sys.stderr.isatty(), leave=False):
            method.prepare(Record(fold.record, fold.x_cal, [v.name for v in fold.views], MODEL_FS),
                           Task(inputs, [fold.held]))
            runs[cut].append(method.predict(fold.x_in, inputs, [fold.held]))
    table = {"off": _row(folds, runs[None], inputs, None)}
    for cut in cutoffs:
        w = fit_gains([p[0] for p in runs[cut]], [f.truth[0] for f in folds],
                      [f.x_in[chest].mean(axis=0) for f in folds], cut)
        table[f"{cut:g} Hz"] = _row(folds, runs[cut], inputs, w)
    best = max((k for k in table if k != "off"), key=lambda k: table[k]["mean_psnr_db"])
    return {"records": n_records, "split": split, "table": table, "best": best}


def _row(folds, preds, inputs, w: Wander | None) -> dict:
    """Scores of the held-out leads: the predictions as drawn (``w`` None) or restored by ``w``."""
    scores = {h: {} for h in HELD}
    for fold, pred in zip(folds, preds):
        p = pred if w is None else w.restore(pred, [fold.held], fold.x_in, inputs)
        scores[fold.held.name][fold.record] = _score(fold, p)
    row = _held_row(scores)
    if w is not None:
        row.update(model_gain=w.model_gain, common_gain=w.common_gain)
    return row


def format_wander_tuning(res: dict) -> str:
    lines = [f"leave one lead out, whole pipeline from {','.join(INPUTS)}, {res['records']} records "
             f"(split {res['split']}); V2, V6 unused",
             f"{'cutoff':<9}{'model':>7}{'common':>8}" + "".join(f"{h + ' dB / r':>16}" for h in HELD) + f"{'mean dB':>10}"]
    for k, row in res["table"].items():
        gains = f"{row['model_gain']:>7.2f}{row['common_gain']:>8.2f}" if "model_gain" in row else f"{'1':>7}{'0':>8}"
        lines.append(f"{k:<9}{gains}{_held_cells(row)}{row['mean_psnr_db']:>10.2f}")
    lines.append(f"best: {res['best']}")
    return "\n".join(lines)
