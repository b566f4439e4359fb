"""``panorama bench model|calibration|stream|transfer|realism|adapt|wander``: rerunnable speed and calibration benchmarks.

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
from tqdm import tqdm

from panorama.calibrate import calibrate, warm_up
from panorama.geometry import NAMED, STANDARD_12, redundant_limb_leads, resolve_views
from panorama.metrics import centre, score_record, summarise
from panorama.records import MODEL_FS
from panorama.synth import Synthesizer


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
    p.add_argument("--data", nargs="+", type=Path, default=[Path("../shared/data/ecg")], metavar="PATH",
                   help="transfer, realism, adapt, wander, blend, electrodes: real records (default ../shared/data/ecg)")
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
                   help="simulated patients for calibration and realism (default 40)")
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


CAL_NAMES = [n for n in STANDARD_12 if n not in ("V2", "V6")]  # what calibration sees
# montage -> (recorded leads, synthesis inputs, exact-angle views scored after the fit window)
MONTAGES = {
    # the evaluation protocol's: V1, V4, V5 and the limb leads supervise I, II, V3's fit
    "3": (CAL_NAMES, "I,II,V3", "V2,V6,V7,V4R"),
    # a 12-lead monitor drawing the views it lacks from everything it records
    "12": (list(STANDARD_12), ",".join(STANDARD_12), "V7,V8,V9,V3R,V4R,V5R"),
}


def _displaced_patient(seed: int, anatomy: str = "v1", names: list[str] = CAL_NAMES):
    """Simulated patient ``seed`` of the calibration benchmarks: (rng, params, true angles of
    ``names``, indices of its chest leads), chest electrodes displaced by σ = 10.6°."""
    from training.simulator import sample_patient
    from training.simulator.render import lead_kind

    rng = np.random.default_rng([seed, 4242])
    params = sample_patient(rng, anatomy=anatomy)
    true = np.array([[NAMED[n].theta, NAMED[n].phi] for n in names], dtype=float)
    chest = [i for i, n in enumerate(names) if lead_kind(n) == "chest"]
    true[chest] += rng.normal(0, 10.6, (len(chest), 2))
    return rng, params, true, chest


def _centred_mae(e: np.ndarray) -> np.ndarray:
    """Mean absolute value of each row after removing its median (DC carries no information)."""
    return np.abs(centre(e)).mean(-1)


def _clocked(fn, *args, **kw):
    """(fn's result, seconds it took)."""
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def bench_calibration(synth: Synthesizer, patients: int, move_far_field: bool | None = None, axes: str | None = None,
                      anatomy: str = "v1", montage: str = "3") -> dict:
    """Simulated patients with chest electrodes displaced by σ = 10.6°: calibrate on 0–5 s
    of the recorded leads of ``montage`` (MONTAGES) as synthesis would, synthesise its
    exact-angle views from its inputs: uncalibrated, calibrated, and told the inputs' real
    offsets θ and φ (what a perfect fit would give this model). Offset errors are over the
    fitted chest leads and angles, beside the table's own error there. Timed after one
    warm-up fit, as the daemon does; also timed on all 12 leads (every lead an input), the
    speed target's case."""
    from training.simulator import apply_device, render
    from training.simulator.device import resolve_device

    cal_names, in_spec, view_spec = MONTAGES[montage]
    inputs, targets = resolve_views(in_spec), resolve_views(view_spec)
    cal_views = resolve_views(",".join(cal_names))
    table = np.array([[v.theta, v.phi] for v in cal_views], dtype=float)
    plain, calibrated, oracle, times, times12, accepted, errs, table_errs = [], [], [], [], [], 0, [], []
    rows = [cal_names.index(v.name) for v in inputs]  # the inputs among the recorded leads
    in_names, target_names = [v.name for v in inputs], [v.name for v in targets]
    kw = dict(device=synth.device, move_far_field=move_far_field, axes=axes)
    fit_n = 5 * MODEL_FS  # calibration window; synthesis is scored on what follows it
    exact = np.array([[v.theta, v.phi] for v in targets])  # the targets at their exact angles
    names = [*cal_names, *(f"target{v.name}" for v in targets)]
    twelve = [cal_names.index(n) if n in cal_names else len(cal_names) + target_names.index(n) for n in STANDARD_12]
    _, warm_s = _clocked(warm_up, synth.model, device=synth.device)  # as the daemon does at start
    for seed in tqdm(range(patients), desc="calibration bench", unit="pt", leave=False):
        rng, params, true, chest = _displaced_patient(seed, anatomy, cal_names)
        clean = render(params, np.concatenate([true, exact]), names, 10.0, MODEL_FS)
        sig = apply_device(clean, MODEL_FS, resolve_device("diagnostic", rng), rng).astype(np.float32)
        rec, truth = sig[: len(cal_names)], sig[len(cal_names):]
        cal, s = _clocked(calibrate, synth.model, rec[:, :fit_n], cal_views, inputs=in_names, **kw)
        times.append(s)
        accepted += cal.accepted
        if montage == "12":
            times12.append(s)
        else:  # the speed target's case: all 12 leads (V2 and V6 here at their table angles), timed only
            rec12 = np.concatenate([rec, truth[:2]])[:, :fit_n]  # the targets V2 and V6 last
            times12.append(_clocked(calibrate, synth.model, rec12, [*cal_views, *targets[:2]], **kw)[1])
        fitted = [i for i in chest if cal_names[i] in cal.fitted]
        free = np.array(["theta" in cal.axes, "phi" in cal.axes])
        errs += list(np.abs(cal.offsets_deg[fitted] - (true[fitted] - table[fitted]))[:, free].ravel())
        table_errs += list(np.abs(true[fitted] - table[fitted])[:, free].ravel())
        scale = np.concatenate([rec, truth])[twelve, fit_n:]  # the 12 standard leads set the scale
        told = (true - table)[rows]  # the inputs' real offsets
        for offsets, bucket in ((None, plain), (cal.offsets_for(in_names), calibrated), (told, oracle)):
            pred = synth(rec[rows], inputs, targets, offsets=offsets)
            bucket.append(score_record(truth[:, fit_n:], pred[:, fit_n:], scale, target_names))
    p, c, o = summarise(plain), summarise(calibrated), summarise(oracle)
    out = {"montage": f"{in_spec} -> {view_spec}", "patients": patients, "accepted": accepted,
           "psnr_uncalibrated_db": round(p["overall"]["psnr_db"], 2),
           "psnr_calibrated_db": round(c["overall"]["psnr_db"], 2),
           "gain_db": round(c["overall"]["psnr_db"] - p["overall"]["psnr_db"], 2),
           # the ceiling: the model told where the input electrodes really were (θ and φ)
           "gain_exact_offsets_db": round(o["overall"]["psnr_db"] - p["overall"]["psnr_db"], 2)}
    for v in targets:
        out[f"gain_{v.name}_db"] = round(c["per_view"][v.name]["psnr_db"] - p["per_view"][v.name]["psnr_db"], 2)
    out["offset_err_chest_median_deg"] = round(float(np.median(errs)), 2) if errs else float("nan")
    out["offset_err_table_median_deg"] = round(float(np.median(table_errs)), 2) if errs else float("nan")
    out["calibration_s_median"] = round(statistics.median(times), 3)
    out["calibration_s_max"] = round(max(times), 3)
    out["calibration_12_leads_s_median"] = round(statistics.median(times12), 3)
    out["calibration_12_leads_s_max"] = round(max(times12), 3)
    out["warm_up_s"] = round(warm_s, 3)
    return out


def bench_identifiability(synth: Synthesizer, patients: int, sweep_deg: float = 30.0, step_deg: float = 3.0,
                          anatomy: str = "v1") -> dict:
    """The best calibration could do with this model: every lead but one at its TRUE angle,
    the one lead's θ (then φ) swept over ±``sweep_deg`` as the query; the angle where the
    model predicts it best from the others (as recorded, noise included), against where its
    electrode really was. Beside it: the model's error against the noise-free lead at its
    true angle, what the device adds (noise, wander, mains), and how much 10° of
    displacement changes the noise-free lead — all mean absolute µV, median over leads."""
    from training.simulator import apply_device, render
    from training.simulator.device import resolve_device

    cal_names = CAL_NAMES
    views = resolve_views(",".join(cal_names))
    table = np.array([[v.theta, v.phi] for v in views], dtype=float)
    sweep = np.arange(-sweep_deg, sweep_deg + 1e-9, step_deg)
    found, truth, model_err, change, noise = [], [], [], [], []
    model = synth.model
    for seed in tqdm(range(patients), desc="identifiability", unit="pt", leave=False):
        rng, params, true, chest = _displaced_patient(seed, anatomy)  # the same patients as bench_calibration
        moved = np.concatenate([true[chest] + [10.0, 0.0], true[chest] + [0.0, 10.0]])  # each lead 10° off
        names = [*cal_names, *(f"moved{k}" for k in range(len(moved)))]
        clean = render(params, np.concatenate([true, moved]), names, 5.0, MODEL_FS)
        sig = apply_device(clean[: len(cal_names)], MODEL_FS, resolve_device("diagnostic", rng), rng).astype(np.float32)
        sig -= np.median(sig, axis=1, keepdims=True)
        ref = clean[: len(cal_names)] - np.median(clean[: len(cal_names)], axis=1, keepdims=True)
        for k, j in enumerate(chest):  # how much 10° of displacement changes what the lead records
            for d in (clean[len(cal_names) + k] - clean[j], clean[len(cal_names) + len(chest) + k] - clean[j]):
                change.append(_centred_mae(d) * 1000)
        ang = Synthesizer.angles(views)
        ang[:, :2] = true
        for j in chest:
            others = [k for k in range(len(views)) if k != j]
            x = torch.from_numpy(sig[others])[None].to(synth.device)
            ia = torch.from_numpy(ang[others])[None].to(synth.device)
            keep = ~redundant_limb_leads([cal_names[k] for k in others])  # as calibration does
            mask = torch.from_numpy(keep)[None].to(synth.device)
            noise.append(_centred_mae(sig[j] - ref[j]) * 1000)
            for dim in (0, 1):
                q = np.repeat(ang[j][None], len(sweep), 0)
                q[:, dim] = table[j, dim] + sweep
                with torch.inference_mode():
                    p = model(x, ia, mask, torch.from_numpy(q)[None].to(synth.device))[0].cpu().numpy()
                found.append(sweep[_centred_mae(p - sig[j]).argmin()])  # as recorded: what calibration sees
                truth.append(true[j, dim] - table[j, dim])
                own = _centred_mae(p - ref[j])  # against the noise-free lead: the model's own error
                model_err.append(float(np.interp(truth[-1], sweep, own)) * 1000)
    found, truth = np.array(found), np.array(truth)
    per_axis = {}
    for k, axis in enumerate(("theta", "phi")):  # found and truth alternate θ, φ
        per_axis[f"identifiability_err_{axis}_median_deg"] = round(float(np.median(np.abs(found[k::2] - truth[k::2]))), 2)
        per_axis[f"identifiability_table_err_{axis}_median_deg"] = round(float(np.median(np.abs(truth[k::2]))), 2)
    return {"identifiability_err_median_deg": round(float(np.median(np.abs(found - truth))), 2),
            "identifiability_table_err_median_deg": round(float(np.median(np.abs(truth))), 2),
            **per_axis,
            "identifiability_corr": round(float(np.corrcoef(found, truth)[0, 1]), 3),
            "identifiability_model_err_at_truth_uv_median": round(float(np.median(model_err)), 1),
            "identifiability_change_per_10deg_uv_median": round(float(np.median(change)), 1),
            "identifiability_device_noise_uv_median": round(float(np.median(noise)), 1)}
