"""``panorama bench transfer``: choose the residual-transfer kernel width τ without the scored leads.

Leave one lead out on real records: the synthesis inputs stay I, II, V3; one of the other
recorded chest leads (V1, V4, V5) is held out in turn and synthesised from them, with the
residual transfer fitted on 0–5 s of the remaining leads. V2 and V6 take no part at all:
they are neither calibration leads, nor scored, nor in the PSNR scale (the ten other leads
set it). The held-out lead is scored over 5–10 s as the protocol scores V2 and V6. The
filters do not depend on τ, so each record is fitted once and every τ is scored from it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from panorama.geometry import STANDARD_12, resolve_view, resolve_views
from panorama.metrics import score_record, summarise
from panorama.records import MODEL_FS, find_records
from panorama.transfer import fit_transfer

from . import splits
from .evaluate import CALIB_S, RECORD_S, Task, load_cases

INPUTS = ("I", "II", "V3")
HELD = ("V1", "V4", "V5")
SCORED = ("V2", "V6")  # the protocol's scored views: never touched here
TAUS = (0.0, 10.0, 15.0, 20.0, 25.0, 30.0)


def tune_transfer(synth, data: list[Path], split: str = "val", taus=TAUS) -> dict:
    """PSNR and r of each held-out lead for each τ (0: no transfer); the τ with the best mean PSNR."""
    paths = splits.select(find_records(*data), split)
    task = Task(resolve_views(",".join(INPUTS)), resolve_views(",".join(HELD)))
    cases, _ = load_cases(paths, task, progress=sys.stderr.isatty())
    if not cases:
        raise ValueError(f"no record of split {split!r} can be scored under the synthesis protocol")
    others = [n for n in STANDARD_12 if n not in SCORED]
    inputs = [resolve_view(n) for n in INPUTS]
    cal, sl = slice(0, int(CALIB_S * MODEL_FS)), slice(int(CALIB_S * MODEL_FS), int(RECORD_S * MODEL_FS))
    scores = {(tau, h): {} for tau in taus for h in HELD}
    for case in tqdm(cases, desc="leave one lead out", unit="rec", disable=not sys.stderr.isatty(), leave=False):
        rec = case.record
        x_in = np.stack([rec.lead(n) for n in INPUTS])
        scale = np.stack([rec.lead(n) for n in others])[:, sl]
        for h in HELD:
            names = [n for n in others if n != h]
            tr = fit_transfer(synth, np.stack([rec.lead(n) for n in names])[:, cal],
                              [resolve_view(n) for n in names], list(INPUTS))
            view = [resolve_view(h)]
            base = synth(x_in, inputs, view)
            for tau in taus:
                tr.tau_deg = tau
                pred = base if tau == 0 else base + tr.correction(x_in, view)
                scores[(tau, h)][rec.name] = score_record(rec.lead(h)[None, sl], pred[:, sl], scale, [h])
    table = {}
    for tau in taus:
        row = {h: summarise(list(scores[(tau, h)].values()))["overall"] for h in HELD}
        table[tau] = {"psnr_db": {h: round(row[h]["psnr_db"], 2) for h in HELD},
                      "r_median": {h: round(row[h]["r_median"], 3) for h in HELD},
                      "mean_psnr_db": round(float(np.mean([row[h]["psnr_db"] for h in HELD])), 2)}
    best = max(taus, key=lambda t: table[t]["mean_psnr_db"])
    return {"records": len(cases), "split": split, "table": table, "best_tau_deg": best}


def format_tuning(res: dict) -> str:
    lines = [f"leave one lead out, inputs {','.join(INPUTS)}, {res['records']} records (split {res['split']}); "
             f"V2, V6 unused", f"{'tau deg':>8}" + "".join(f"{h + ' dB / r':>16}" for h in HELD) + f"{'mean dB':>10}"]
    for tau, row in res["table"].items():
        cells = "".join(f"{row['psnr_db'][h]:>9.2f} / {row['r_median'][h]:.3f}" for h in HELD)
        label = "off" if tau == 0 else f"{tau:g}"
        lines.append(f"{label:>8}{cells}{row['mean_psnr_db']:>10.2f}")
    lines.append(f"best tau: {res['best_tau_deg']:g} deg")
    return "\n".join(lines)
