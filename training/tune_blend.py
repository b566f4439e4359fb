"""``panorama bench blend``: a monitor drawing V2 and V6 from all its leads or from a subset.

A monitor that records the ten leads I, II, III, aVR, aVL, aVF, V1, V3, V4, V5 can draw
V2 and V6 two ways, each with every Stage III step that applies (calibration and patient
adaptation on 0-5 s, baseline wander):

- ``monitor``: every recorded lead an input (what ``panorama eval --inputs`` those ten
  ``--transfer`` does; transfer has no lead beside the inputs to continue, and only
  interpolates V2 and V6 along the precordial line from the recorded V1, V3, V4, V5);
- ``subset``: I, II, V3 as inputs, V1, V4, V5 and the limb leads supervising calibration
  and adaptation and continued by neighbour transfer (the evaluation protocol's pipeline,
  which may look at those leads only in 0-5 s; a monitor has them throughout, so this is
  a choice, not a protocol);

and ``blend``, the mean of the two draws. Scored over 5-10 s on the same records.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

from panorama.geometry import STANDARD_12, resolve_views
from panorama.metrics import score_record, summarise
from panorama.records import find_records
from panorama.wander import WANDER

from . import splits
from .evaluate import CALIB_S, CalibratedModelMethod, Task, _xy, load_cases

MONITOR = "I,II,III,aVR,aVL,aVF,V1,V3,V4,V5"
SUBSET = "I,II,V3"
VIEWS = "V2,V6"


def compare_blend(synth, data: list[Path], split: str = "val", subset: str = SUBSET, weight: float = 0.5) -> dict:
    """PSNR and r of the monitor's own pipeline, the subset's, and ``weight`` · subset +
    (1 − ``weight``) · monitor, overall, per view and per source database."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must lie in [0, 1], got {weight}")
    views = resolve_views(VIEWS)
    monitor, part = Task(resolve_views(MONITOR), views), Task(resolve_views(subset), views)
    if not {v.name for v in part.inputs} <= {v.name for v in monitor.inputs}:
        raise ValueError(f"the subset {subset} must be drawn from the monitor's leads {MONITOR}")
    show = sys.stderr.isatty()
    cases, _ = load_cases(splits.select(find_records(*data), split), monitor, progress=show)
    if not cases:
        raise ValueError(f"no record of split {split!r} can be scored under the synthesis protocol")
    own = CalibratedModelMethod(synth, CALIB_S, transfer=True, adapt=True, wander=WANDER)
    sub = CalibratedModelMethod(synth, CALIB_S, transfer=True, adapt=True, wander=WANDER)
    scored, names = monitor.scored_slice, [v.name for v in views]
    scores: dict[str, list] = {"monitor": [], "subset": [], "blend": []}
    sources = []
    t0 = time.perf_counter()
    for case in tqdm(cases, desc="monitor, subset, blend", unit="rec", disable=not show, leave=False):
        x, y = _xy(case, monitor)
        own.prepare(case.record, monitor)
        p_own = own.predict(x, monitor.inputs, views)
        sub.prepare(case.record, part)
        p_sub = sub.predict(_xy(case, part)[0], part.inputs, views)
        scale = case.record.signals[: len(STANDARD_12), scored]
        for key, p in (("monitor", p_own), ("subset", p_sub), ("blend", weight * p_sub + (1 - weight) * p_own)):
            scores[key].append(score_record(y[:, scored], p[:, scored], scale, names))
        sources.append(case.record.source.split(" (")[0] or "unknown")
    table = {}
    for key, got in scores.items():
        s = summarise(got)
        table[key] = {"psnr_db": round(s["overall"]["psnr_db"], 2), "r_median": round(s["overall"]["r_median"], 3),
                      **{f"{v}_psnr_db": round(d["psnr_db"], 2) for v, d in s["per_view"].items()},
                      "by_source_psnr_db": {src: round(summarise([g for g, o in zip(got, sources) if o == src])
                                                       ["overall"]["psnr_db"], 2) for src in sorted(set(sources))}}
    return {"records": len(cases), "split": split, "monitor": MONITOR, "subset": subset, "weight": weight,
            "table": table, "minutes": round((time.perf_counter() - t0) / 60, 1)}


def format_blend(res: dict) -> str:
    lines = [f"{res['monitor']} -> {VIEWS}, {res['records']} records (split {res['split']}), calibration + "
             f"adaptation + transfer + wander; subset {res['subset']}; blend {res['weight']:g} subset",
             f"{'draw':<10}{'all dB':>8}{'r':>7}{'V2 dB':>8}{'V6 dB':>8}  per source dB"]
    for key, r in res["table"].items():
        per = ", ".join(f"{src} {v:.2f}" for src, v in r["by_source_psnr_db"].items())
        lines.append(f"{key:<10}{r['psnr_db']:>8.2f}{r['r_median']:>7.3f}{r['V2_psnr_db']:>8.2f}"
                     f"{r['V6_psnr_db']:>8.2f}  {per}")
    return "\n".join(lines)
