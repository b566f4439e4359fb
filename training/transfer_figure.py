"""A typical record with and without a Stage III step, for people who would rather look than
read: ``panorama bench transfer --figure docs/transfer_example.png`` (neighbour transfer
against calibration alone), ``panorama bench adapt --figure docs/adapt_example.png --split
val`` (patient adaptation against calibration + transfer) and ``panorama bench wander
--figure docs/wander_example.png`` (baseline wander against calibration + adaptation +
transfer).

"Typical" is chosen, not picked: the record whose PSNR gain from the step is the median
over the split (validation by default). It shows the scored 5–10 s of V2 and V6 (never
inputs, never fitted), the recorded truth against the pipeline without and with the step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from panorama.geometry import resolve_views
from panorama.records import MODEL_FS, find_records

from . import splits
from .evaluate import CALIB_S, CalibratedModelMethod, Task, evaluate, load_cases


STEPS = {  # step → (what it is called, the pipeline without it, what adding it is called)
    "transfer": ("neighbour transfer", "model + calibration", "+ neighbour transfer"),
    "adapt": ("patient adaptation", "calibration + transfer", "+ patient adaptation"),
    "wander": ("baseline wander", "calibration + adaptation + transfer", "+ baseline wander"),
}


def _pipeline(synth, step: str, on: bool) -> CalibratedModelMethod:
    if step == "transfer":
        return CalibratedModelMethod(synth, CALIB_S, transfer=on)
    if step == "adapt":
        return CalibratedModelMethod(synth, CALIB_S, transfer=True, adapt=on)
    from panorama.wander import WANDER

    return CalibratedModelMethod(synth, CALIB_S, transfer=True, adapt=True, wander=WANDER if on else None)


def plot_transfer_example(synth, data: list[Path], out: Path, split: str = "val", step: str = "transfer") -> dict:
    """The pipeline with and without ``step`` (a key of ``STEPS``) on the record with the
    median gain from it."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; choose from {', '.join(STEPS)}")
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    task = Task(resolve_views("I,II,V3"), resolve_views("V2,V6"))
    cases, _ = load_cases(splits.select(find_records(*data), split), task, progress=False)
    if not cases:
        raise ValueError(f"no record of split {split!r} can be scored under the synthesis protocol")
    runs = {on: _pipeline(synth, step, on) for on in (False, True)}
    called, *names = STEPS[step]
    scores = {tr: evaluate(cases, task, m, progress=False).scores for tr, m in runs.items()}
    gains = sorted((scores[True][c.record.name].psnr_db - scores[False][c.record.name].psnr_db, c.record.name)
                   for c in cases)
    gain, name = gains[len(gains) // 2]
    case = next(c for c in cases if c.record.name == name)
    rec = case.record
    x = np.stack([rec.lead(v.name) for v in task.inputs])
    sl = task.scored_slice
    t = np.arange(sl.start, sl.stop) / MODEL_FS
    preds = {}
    for tr, m in runs.items():
        m.prepare(rec, task)
        preds[tr] = m.predict(x, task.inputs, task.views)
    fig, axes = plt.subplots(2, 1, figsize=(12, 5.5), sharex=True)
    for ax, i, v in zip(axes, range(2), task.views):
        def centred(z):
            return z[sl] - np.median(z[sl])
        ax.plot(t, centred(rec.lead(v.name)), color="black", lw=1.4, label=f"recorded {v.name} (never an input)")
        for tr, colour in ((False, "tab:blue"), (True, "tab:red")):
            score = scores[tr][name]
            label = names[tr] + f": {score.views[v.name].psnr_db:.1f} dB, r {score.views[v.name].r:.3f}"
            ax.plot(t, centred(preds[tr][i]), color=colour, lw=1.0, alpha=0.85, label=label)
        ax.set_ylabel(f"{v.name} (mV)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("time (s): the scored 5-10 s")
    fig.suptitle(f"{name} ({rec.source.split(' (')[0]}), inputs I, II, V3; the {split}-split record with the "
                 f"median gain from {called} ({gain:+.2f} dB)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")  # no label clipped at the edges
    plt.close(fig)
    return {"figure": str(out), "record": name, "gain_db": round(float(gain), 2)}
