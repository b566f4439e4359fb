"""``panorama demo``: the main job on an embedded default, runnable on a fresh machine.

Setup → simulate a few patients → run the baselines and the shipped model on them and,
when the real records are beside the repo, on those → print the tables → write the figure.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from panorama.geometry import STANDARD_12, resolve_views
from panorama.records import MODEL_FS, default_data_dir, find_records
from training import splits
from training.cli import sim_cases
from training.evaluate import Task, evaluate, format_table, load_cases

log = logging.getLogger(__name__)

DEMO_METHODS = ("zero", "dipole", "lsq", "model")


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="the main job: simulate patients, score the baselines and the model, write a figure",
        description="Simulate a few patients, score the baselines and the shipped model on them (and on the real "
        "records in ../shared/data/ecg when present) for I,II,V3 -> V2,V6, print the tables "
        "and write a figure of simulated beside real 12-lead ECGs.")
    p.add_argument("--patients", type=int, default=40, help="simulated patients (default 40)")
    p.add_argument("--data", type=Path, default=None, help="real records (default ../shared/data/ecg if present)")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    p.set_defaults(func=run)


def run(args) -> int:
    task = Task(resolve_views("I,II,V3"), resolve_views("V2,V6"))
    args.out.mkdir(parents=True, exist_ok=True)

    sim = sim_cases(args.patients, task, device="diagnostic", seed=1000)
    rows = {f"sim {m}": evaluate(sim, task, m, progress=False).summary for m in DEMO_METHODS}
    print(f"Simulated patients ({len(sim)}), I,II,V3 -> V2,V6, scored on 5-10 s:")
    print(format_table(rows))

    data = args.data or default_data_dir()
    real = []
    if data is None:
        print("\nReal records not found (../shared/data/ecg); skipping the real-data table.")
    else:
        # the validation split: the model never trained on these records
        real, skipped = load_cases(splits.select(find_records(data), "val"), task, progress=False)
        rows = {f"real {m}": evaluate(real, task, m, progress=False).summary for m in DEMO_METHODS}
        print(f"\nReal records in {data}, validation split ({len(real)} scored, "
              f"{sum(skipped.values())} not scored):")
        print(format_table(rows))

    fig = args.out / "sim_vs_real.png"
    typical = next((c.record for c in real if c.record.name.startswith("ludb")), real[0].record if real else None)
    _figure(typical, fig)
    print(f"\nwrote {fig}")
    return 0


def _figure(real_rec, path: Path) -> None:
    """A simulated sinus-rhythm patient beside a real record, 5 s on ECG paper."""
    from training.simulator import simulate
    from training.simulator.figure import plot_sim_vs_real

    sim = simulate(7, rhythm="sinus", device="diagnostic").signals
    real = np.stack([real_rec.lead(n) for n in STANDARD_12]) if real_rec is not None else None
    plot_sim_vs_real(sim, real, MODEL_FS, list(STANDARD_12), path, seconds=5.0)
