"""``panorama bench adapt``: which part of the model patient adaptation fine-tunes.

The whole pipeline of the evaluation protocol (I, II, V3 -> V2, V6; calibration, patient
adaptation and neighbour transfer on 0-5 s of the other leads; scored on 5-10 s), with
adaptation off and with each part of the model free to learn. Run it on the training
split (the default): no training step ever saw those records' V2 or V6, so choosing
there leaves the validation split for the figures the README reports.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from panorama.adapt import LR, STEPS
from panorama.geometry import resolve_views
from panorama.records import find_records

from . import splits
from .evaluate import CALIB_S, CalibratedModelMethod, Task, evaluate, load_cases

CHOICES = ("off", "head", "blocks", "decoder")  # decoder: everything after the encoder


class _Timed(CalibratedModelMethod):
    """The pipeline, timing each record's adaptation."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.adapt_s: list[float] = []

    def prepare(self, record, task):
        super().prepare(record, task)
        if self.adaptation is not None:
            self.adapt_s.append(self.adaptation.seconds)


def tune_adapt(synth, data: list[Path], split: str = "train", choices=CHOICES, steps: int = STEPS,
               lr: float = LR) -> dict:
    task = Task(resolve_views("I,II,V3"), resolve_views("V2,V6"))
    cases, _ = load_cases(splits.select(find_records(*data), split), task, progress=sys.stderr.isatty())
    if not cases:
        raise ValueError(f"no record of split {split!r} can be scored under the synthesis protocol")
    table = {}
    for part in choices:
        method = _Timed(synth, CALIB_S, transfer=True, adapt=part != "off",
                        adapt_options={} if part == "off" else {"part": part, "steps": steps, "lr": lr})
        t0 = time.perf_counter()
        res = evaluate(cases, task, method, progress=sys.stderr.isatty())
        s = res.summary
        table[part] = {"psnr_db": round(s["overall"]["psnr_db"], 2), "r_median": round(s["overall"]["r_median"], 3),
                       **{f"{v}_psnr_db": round(d["psnr_db"], 2) for v, d in s["per_view"].items()},
                       **{f"{v}_r_median": round(d["r_median"], 3) for v, d in s["per_view"].items()},
                       "adapt_s_median": round(float(np.median(method.adapt_s)), 2) if method.adapt_s else 0.0,
                       "minutes": round((time.perf_counter() - t0) / 60, 1)}
    best = max(choices, key=lambda k: table[k]["psnr_db"])
    return {"records": len(cases), "split": split, "steps": steps, "lr": lr, "table": table, "best": best}


def format_adapt_tuning(res: dict) -> str:
    lines = [f"calibration + adaptation + neighbour transfer, I,II,V3 -> V2,V6, {res['records']} records "
             f"(split {res['split']}); {res['steps']} steps, lr {res['lr']:g}",
             f"{'adapting':<10}{'all dB / r':>16}{'V2 dB / r':>16}{'V6 dB / r':>16}{'time s':>8}"]
    for k, r in res["table"].items():
        lines.append(f"{k:<10}{r['psnr_db']:>9.2f} / {r['r_median']:.3f}{r['V2_psnr_db']:>9.2f} / "
                     f"{r['V2_r_median']:.3f}{r['V6_psnr_db']:>9.2f} / {r['V6_r_median']:.3f}{r['adapt_s_median']:>8.2f}")
    lines.append(f"best: {res['best']}")
    return "\n".join(lines)
