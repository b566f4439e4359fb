"""The GPU check's Stage III and training rows: calibration, the whole per-patient Stage III
and a short ``panorama train`` run, each on the CPU and on CUDA, compared
(``deploy/gpu_check.py`` runs them; its docstring says what each row means)."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np

from gpu_table import add, failed, out_of_time


def calibration_rows(model, realistic_input) -> None:
    try:
        import torch

        from panorama.calibrate import calibrate, warm_up
        from panorama.geometry import STANDARD_12, resolve_views
    except ImportError as exc:
        add("calibration", note=f"{exc.name} not installed")
        return
    try:
        x, source = realistic_input(5.0)
        views = resolve_views(",".join(STANDARD_12))
        results = {}
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            import copy

            m = copy.deepcopy(model).to(device)
            t0 = time.perf_counter()
            warm_up(m, device=device)  # as panorama serve does at start: kernels, allocator, autograd
            add(f"calibration warm-up {device}", seconds=time.perf_counter() - t0,
                note="panorama.calibrate.warm_up: the first fit in a process")
            t0 = time.perf_counter()
            results[device] = calibrate(m, x, views, device=device)
            add(f"calibration {device}", seconds=time.perf_counter() - t0,
                note=f"12 leads x 5 s ({source}); {results[device].steps} steps; "
                f"{'accepted' if results[device].accepted else 'rejected'}")
        if "cuda" not in results:
            add("calibration cuda", note="CUDA unavailable")
            return
        diff = float(np.abs(results["cpu"].offsets_deg - results["cuda"].offsets_deg).max())
        same = results["cpu"].accepted == results["cuda"].accepted
        add("calibration cpu vs cuda", err_deg=diff,
            note=f"offsets {'agree' if diff <= 0.1 and same else 'DIFFER'} (max |d offset| {diff:.3f} deg; "
            f"verdicts {'equal' if same else 'differ'})")
    except Exception as exc:
        failed("calibration", exc)


def stage3_chain(model, x10: np.ndarray, device: str) -> tuple[np.ndarray, dict]:
    """The whole per-patient Stage III of ``panorama synthesize --calibrate 5 --adapt --transfer
    --wander`` on one record: (views drawn over 10 s, seconds per step). Recorded: the 12 leads
    but V2 and V6; inputs I, II, V3; views V2, V6, V7, V4R."""
    import torch

    from panorama.adapt import adapt, synthesize_split
    from panorama.calibrate import calibrate
    from panorama.geometry import STANDARD_12, resolve_views
    from panorama.synth import Synthesizer
    from panorama.transfer import fit_neighbour_offsets, fit_transfer
    from panorama.wander import WANDER

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    names = [n for n in STANDARD_12 if n not in ("V2", "V6")]
    views, inputs, queries = resolve_views(",".join(names)), ["I", "II", "V3"], resolve_views("V2,V6,V7,V4R")
    in_views = resolve_views(",".join(inputs))
    rec = x10[[STANDARD_12.index(n) for n in names]]
    x = rec[[names.index(n) for n in inputs]]
    synth = Synthesizer(model, device=device)
    times = {}
    t0 = time.perf_counter()
    fit = WANDER.strip(rec[:, :2500])
    cal = calibrate(synth.model, fit, views, inputs=inputs, device=device)
    sync()
    times["calibrate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ad = adapt(synth.model, fit, views, inputs, offsets=cal.offsets_for(inputs), device=device)
    sync()
    times["adapt"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    own = Synthesizer(ad.model, device=device) if ad.accepted else synth
    offsets = cal.offsets_for(inputs)
    every = fit_neighbour_offsets(synth.model, fit, views, device=device)  # the neighbours' own angles
    tr = fit_transfer(own, fit, views, inputs, offsets=offsets, view_offsets=every.offsets_deg)
    sync()
    times["transfer"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    def draw(xx, qs):
        near = (lambda q: tr.synthesize(own, xx, q, offsets=offsets)) if tr.fitted else \
            (lambda q: own(xx, in_views, q, offsets=offsets))
        return synthesize_split(ad, near, lambda q: synth(xx, in_views, q, offsets=offsets), qs, xx.shape[1])

    y = WANDER.synthesize(draw, x, in_views, queries)
    sync()
    times["synthesize"] = time.perf_counter() - t0
    times["verdicts"] = (f"calibration {'accepted' if cal.accepted else 'rejected'}, adaptation "
                         f"{'accepted' if ad.accepted else 'rejected'}, transfer {'fitted' if tr.fitted else 'not used'}")
    return y, times


def stage3_rows(model, realistic_input) -> None:
    """Calibration, patient adaptation, neighbour transfer and baseline wander for one patient,
    on the CPU and on CUDA: seconds per step, and the views both draw compared."""
    try:
        import copy

        import torch

        x10, source = realistic_input(10.0)
        out = {}
        for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            if out_of_time():
                add(f"Stage III chain {device}", note="skipped: time budget spent")
                continue
            m = copy.deepcopy(model).to(device)
            stage3_chain(m, x10, device)  # warm-up: kernels, allocator
            out[device], t = stage3_chain(m, x10, device)
            total = sum(v for v in t.values() if isinstance(v, float))
            add(f"Stage III chain {device}", seconds=total,
                note=f"calibrate {t['calibrate']:.2f} s, adapt {t['adapt']:.2f} s, transfer {t['transfer']:.2f} s "
                f"(the neighbours' fit included), synthesize {t['synthesize']:.2f} s ({source}; 10 leads x 5 s "
                f"fit, I,II,V3 -> V2,V6,V7,V4R over 10 s); {t['verdicts']}")
        if "cuda" not in out:
            add("Stage III cpu vs cuda", note="CUDA unavailable")
            return
        err = float(np.abs(out["cpu"] - out["cuda"]).max() * 1000)
        add("Stage III cpu vs cuda", err_uv=err,
            note=f"max |y_cpu - y_cuda| over the 4 views; {'agree' if err <= 5 else 'DIFFER'} (5 µV allowed: "
            "40 Adam steps of the adapted blocks amplify float rounding)")
    except Exception as exc:
        failed("Stage III chain", exc)


def training_rows(work: Path, steps: int = 60) -> None:
    """``panorama train`` on each device: the same short Stage I run (simulator only, seed 0,
    the shipped model shape, batch 32) on the CPU and on CUDA, its time a step and its loss
    over the last third of the steps, which should agree (the batches are the same; float
    rounding differs)."""
    tail = steps // 3
    try:
        import torch

        from training.config import TrainConfig
        from training.train import run
    except ImportError as exc:
        add("training", note=f"{exc.name} not installed (the training side needs it)")
        return
    losses = {}
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        if out_of_time():
            add(f"training {device}", note="skipped: the check's time budget is spent")
            return
        try:
            out = work / f"train-{device}"
            cfg = TrainConfig.model_validate({
                "out": str(out), "seed": 0, "device": device, "threads": 2,
                "data": {"sim_patients": 8}, "optim": {"steps": steps, "batch": 32, "warmup": 10},
                "val": {"every": steps - tail}})
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # its progress bars: the table is the output
                run(cfg)
            log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            losses[device] = log[-1]["loss"]
            step_ms = (log[-1]["elapsed_s"] - log[0]["elapsed_s"]) / tail * 1000
            add(f"training {device}", seconds=time.perf_counter() - t0,
                note=f"panorama train, {steps} steps of 32 (simulator only): {step_ms:.0f} ms a step over the "
                f"last {tail}; loss {losses[device]:.4f}")
        except Exception as exc:
            failed(f"training {device}", exc)
    if "cuda" not in losses:
        add("training cuda", note="CUDA unavailable")
    elif "cpu" in losses:
        rel = abs(losses["cuda"] - losses["cpu"]) / losses["cpu"]
        add("training cpu vs cuda", note=f"losses {'agree' if rel < 0.05 else 'DIFFER'} "
            f"({rel:.1%} apart over the last {tail} steps; 5 % allowed)")
