"""``panorama bench model|calibration|stream|transfer|realism|adapt|wander|blend|long|electrodes``: rerunnable
speed and calibration benchmarks (the calibration benches themselves: training/bench_calibration.py).

Benchmarks are commands, not tests: timings depend on the machine, so they are measured
and reported (with the command) rather than asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from panorama.geometry import STANDARD_12, redundant_limb_leads, resolve_views
from panorama.records import MODEL_FS, require_data_dir
from panorama.synth import Synthesizer

# the calibration benches live in their own module; importable from here as before
from .bench_calibration import MONTAGES, bench_calibration, bench_identifiability  # noqa: F401

DATA_BENCHES = ("transfer", "realism", "adapt", "wander", "blend", "electrodes")  # the ones that read --data


def register(sub) -> None:
    p = sub.add_parser("bench", help="speed and calibration benchmarks (commands, not tests)",
                       description="model: latency of 8 views from 10 s of 12-lead input. calibration: "
                       "offset recovery and synthesis gain on simulated patients with displaced electrodes, "
                       "and the time of one 12-lead × 5 s calibration. stream: the daemon (a subprocess) "
                       "with --patients simulated monitors in real time through a real broker: latency, "
                       "delivery and memory after warm-up. transfer: how many reconstructed neighbours "
                       "a view gets, chosen by leave-one-lead-out on real records without V2 or V6. realism: how alike "
                       "the simulator's neighbouring leads are, against real records. adapt: which part of the "
                       "model patient adaptation fine-tunes, on the training split's never-supervised V2/V6. wander: the "
                       "gains of chest views' slow part, fitted by leave-one-lead-out on real records without V2 or V6. blend: "
                       "a monitor drawing V2, V6 from all ten other leads, from I, II, V3 with the rest supervising, "
                       "and the mean of the two. electrodes: the swapped-electrode check on real records.")
    p.add_argument("what", choices=("model", "calibration", "stream", "transfer", "realism", "adapt", "wander", "blend",
                                    "long", "electrodes"),
                   help="model: latency; calibration: offset recovery and its time; stream: patients the "
                        "daemon sustains in real time through a broker (edge/bench.py); transfer: "
                        "leave-one-lead-out choice of neighbour transfer and of its interpolation along the precordial line "
                        "(training/tune_transfer.py); realism: "
                        "the simulator's neighbouring leads against real records (training/realism.py); adapt: "
                        "which part patient adaptation fine-tunes (training/tune_adapt.py); wander: the slow-part gains "
                        "of chest views (training/tune_wander.py); blend: a monitor's own pipeline against a subset's and "
                        "their mean (training/tune_blend.py); long: time and peak memory of a --minutes recording drawn "
                        "in chunks and in one pass (training/bench_long.py); electrodes: false alarms and swaps "
                        "named by the swapped-electrode check (training/tune_electrodes.py)")
    p.add_argument("--data", nargs="+", type=Path, metavar="PATH",
                   help="transfer, realism, adapt, wander, blend, electrodes: real records (default $PANORAMA_DATA, "
                   "else ../shared/data/ecg beside the repo)")
    p.add_argument("--split", default=None, choices=("all", "train", "val"),
                   help="transfer, realism, adapt, wander, blend, electrodes: which split of --data (default val; "
                   "adapt: train)")
    p.add_argument("--filter-sweep", action="store_true",
                   help="transfer: also sweep the residual filter's span and ridge (one neighbour)")
    p.add_argument("--figure", type=Path, metavar="PNG",
                   help="calibration --identifiability: also draw the lead-vector floor (training/floor.py); "
                   "transfer: also draw the --split record with the median gain from transfer; adapt, wander: "
                   "draw the --split record with the median gain from that step, instead of the table")
    p.add_argument("--model", type=Path, help="checkpoint (default: the shipped one)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--patients", type=int, default=40,
                   help="simulated patients for calibration, realism and stream (default 40: stream's README figure "
                   "uses 32, and a smaller count, with --seconds, makes a quick check)")
    p.add_argument("--anatomy", default="v1", choices=("v1", "v2"),
                   help="calibration, realism: the simulator's ventricular sources (training/simulator/sources.py; "
                   "default v1)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs (default 30)")
    p.add_argument("--onnx", action="store_true",
                   help="model: also time ONNX Runtime (CPU) on the exported checkpoint, same input")
    p.add_argument("--identifiability", action="store_true",
                   help="calibration: also sweep each chest lead's angle with every other lead at its true "
                        "angle, and report how far the best-fitting angle lies from the truth; and how far "
                        "apart simulated patients' chest leads point at the same electrode angle (the floor)")
    p.add_argument("--axes", default=None, metavar="theta,phi",
                   help="calibration: which angles of each electrode are fitted (default: panorama.calibrate's "
                   "choice by montage: phi for 3, theta,phi for 12)")
    p.add_argument("--montage", choices=tuple(MONTAGES), default="3",
                   help="calibration: 3, I, II, V3 -> V2, V6, V7, V4R with V1, V4, V5 and the limb leads "
                   "supervising the fit (the evaluation protocol's); 12, a 12-lead monitor drawing V7-V9 "
                   "and V3R-V5R from all it records (the daemon's case) (default 3)")
    p.add_argument("--move-limb-leads", action=argparse.BooleanOptionalAction, default=None,
                   help="calibration: fit the limb input leads' offsets too, or not (default: panorama.calibrate's "
                   "choice by montage: chest leads only for 3, limb leads too for 12)")
    p.add_argument("--minutes", type=float, default=20.0, help="long: the recording's length (default 20)")
    p.add_argument("--no-one-pass", dest="one_pass", action="store_false",
                   help="long: time the chunks only (one pass needs memory that grows with the length)")
    p.add_argument("--write", action="store_true",
                   help="electrodes: also store the covariance fitted on the training split as the one the check "
                   "ships with (panorama/weights/lead_covariance.json)")
    p.add_argument("--json", type=Path, help="write the figures as JSON")
    from edge.bench import add_arguments  # the stream benchmark lives with the daemon

    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.what == "stream":
        from edge.bench import run_stream

        res = run_stream(args)
        print(f"largest number of patients sustained: {res['largest_sustained_patients']}")
        if args.json:
            args.json.write_text(json.dumps(res, indent=2, default=float))
        return 0
    split = args.split or ("train" if args.what == "adapt" else "val")
    if args.data is None and args.what in DATA_BENCHES:
        args.data = [require_data_dir()]  # or --data
    if args.what == "electrodes":
        from .tune_electrodes import COVARIANCE, format_electrodes, tune_electrodes

        res = tune_electrodes(args.data, split, COVARIANCE if args.write else None)
        print(format_electrodes(res))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return 0
    if args.what == "realism":
        from .realism import compare_realism, format_realism

        res = compare_realism(args.data, split, args.patients, anatomy=args.anatomy)
        print(format_realism(res))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return 0
    torch.set_num_threads(args.threads)
    synth = Synthesizer.load(args.model, device=args.device)
    if args.what in ("adapt", "wander") and args.figure:
        from .transfer_figure import plot_transfer_example

        res = plot_transfer_example(synth, args.data, args.figure, split, step=args.what)
        print(f"wrote {args.figure}: {res['record']} (gain {res['gain_db']:+.2f} dB)")
        return 0
    if args.what == "long":
        from .bench_long import bench_long, format_long

        res = bench_long(synth, args.minutes, args.one_pass)
        print(format_long(res))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return 0
    if args.what == "blend":
        from .tune_blend import compare_blend, format_blend

        res = compare_blend(synth, args.data, split)
        print(format_blend(res))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2, default=float))
        return 0
    if args.what in ("adapt", "wander"):
        from .tune_adapt import format_adapt_tuning, tune_adapt
        from .tune_wander import format_wander_tuning, tune_wander

        tune, fmt = {"adapt": (tune_adapt, format_adapt_tuning), "wander": (tune_wander, format_wander_tuning)}[args.what]
        res = tune(synth, args.data, split)
        print(fmt(res))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2, default=float))
        return 0
    if args.what == "transfer":
        from .tune_transfer import format_tuning, sweep_filters, tune_transfer

        res = tune_transfer(synth, args.data, split)
        print(format_tuning(res))
        if args.filter_sweep:
            res["filters_mean_psnr_db"] = sweep_filters(synth, args.data, split)
            print("one neighbour, mean dB by filter span and ridge:")
            for k, v in res["filters_mean_psnr_db"].items():
                print(f"  {k:<22}{v:>7.2f}")
        if args.figure:
            from .transfer_figure import plot_transfer_example

            res["figure"] = plot_transfer_example(synth, args.data, args.figure, split)
            print(f"wrote {args.figure}: {res['figure']['record']} (gain {res['figure']['gain_db']:+.2f} dB)")
        if args.json:
            args.json.write_text(json.dumps(res, indent=2, default=float))
        return 0
    if args.what == "model":
        res = bench_model(synth, args.repeats)
        if args.onnx:
            res.update(bench_onnxruntime(args.model, args.threads, args.repeats))
            res["onnxruntime_speedup"] = round(res["median_ms"] / res["onnxruntime_median_ms"], 2)
    else:
        res = bench_calibration(synth, args.patients, move_far_field=args.move_limb_leads, axes=args.axes,
                                anatomy=args.anatomy, montage=args.montage)
        if args.identifiability:
            res.update(bench_identifiability(synth, args.patients, anatomy=args.anatomy))
            from .floor import bench_lead_vectors

            res.update(bench_lead_vectors(args.patients, anatomy=args.anatomy, figure=args.figure))
    for k, v in res.items():
        print(f"{k:>32}: {v}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=float))
    return 0


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


BENCH_VIEWS = "V2,V6,V7,V8,V9,V3R,V4R,120:45"


def _workload() -> tuple[np.ndarray, ...]:
    """8 views from 10 s of 12 leads: x, input views, mask, query views (numpy, batch 1)."""
    inputs, queries = resolve_views(",".join(STANDARD_12)), resolve_views(BENCH_VIEWS)
    x = (np.random.default_rng(0).standard_normal((1, 12, 10 * MODEL_FS)) * 0.3).astype(np.float32)
    keep = ~redundant_limb_leads([v.name for v in inputs])  # as the synthesizer and the daemon do
    return x, Synthesizer.angles(inputs)[None], keep[None], Synthesizer.angles(queries)[None]


def _timed(fn, repeats: int, warmup: int = 5) -> list[float]:
    """Milliseconds per call of ``fn`` (which must return only when its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def bench_model(synth: Synthesizer, repeats: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    model, dev = synth.model, synth.device
    work = _workload()
    x, ia, mask, qa = (torch.from_numpy(a).to(dev) for a in work)

    def call():
        model(x, ia, mask, qa)
        _sync(dev)

    with torch.inference_mode():
        times = _timed(call, repeats)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:  # (not under inference_mode:
        model(x, ia, mask, qa)  # spectral norm's parametrisation refuses inference tensors there)
    flops, n_views, t = fc.get_total_flops(), qa.shape[1], x.shape[2]
    return {"device": str(dev), "threads": torch.get_num_threads(), "input": "12 leads x 10 s @ 500 Hz",
            "views": n_views, "median_ms": round(statistics.median(times), 2),
            "p90_ms": round(float(np.percentile(times, 90)), 2),
            "parameters": sum(p.numel() for p in model.parameters()),
            "gflop_per_call": round(flops / 1e9, 3),
            "kflop_per_output_sample": round(flops / (n_views * t) / 1e3, 1)}


def bench_onnxruntime(model_path, threads: int, repeats: int) -> dict:
    """The same workload through the ONNX Runtime backend (CPU provider)."""
    from edge.backends.onnxruntime import OnnxRuntimeBackend
    from panorama.synth import default_checkpoint

    backend = OnnxRuntimeBackend(model_path or default_checkpoint(), threads=threads)
    work = _workload()
    times = _timed(lambda: backend.run(*work), repeats)
    return {"onnxruntime_median_ms": round(statistics.median(times), 2),
            "onnxruntime_p90_ms": round(float(np.percentile(times, 90)), 2)}
