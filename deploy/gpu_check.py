#!/usr/bin/env python3
"""GPU check: every inference backend this machine has, against PyTorch on the CPU.

    python3 deploy/gpu_check.py            (from the repository root; about a minute or two)
    python3 deploy/gpu_check.py --quick    (3 repetitions a timing, a shorter training run:
                                            checks that every section runs, not the speed)

Prints one table: for each backend (PyTorch CPU as the reference, PyTorch CUDA, ONNX Runtime
CPU and CUDA, TensorRT fp32 and fp16) the largest error against PyTorch CPU in µV on a
realistic 10 s 12-lead input, and the median latency of 8 views × 10 s × 12 leads at batch 1
and batch 32; TensorRT's cold build and its second start from the engine cache; calibration
(12 leads × 5 s) on the CPU and on CUDA with their offsets compared; the whole per-patient Stage
III (calibration, patient adaptation, neighbour transfer, baseline wander) on both, step by
step, with the views they draw compared; and a short ``panorama train`` run on both, its time
a step and its losses compared. What is missing is a
row saying why. A failing section prints its error in its row and the check goes on. With
$OUT set, the table is also written to $OUT/gpu_check.json.

Needs torch and numpy; uses onnx, onnxruntime, tensorrt and cuda-python where present. It
reads the checkpoint without the safetensors package if that is missing (the format is a
length, a JSON header and raw tensors) and does not need wfdb, pydantic or the training code
(the simulator makes the input when scipy is present; otherwise a dipole-model input). Only
the training rows need pydantic (carry its wheels to a machine without it); without it they
say so.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

QUICK = "--quick" in sys.argv[1:]
BUDGET_S = 200  # sections after this are skipped: the whole check must stay under 4 minutes
VIEWS = "V2,V6,V7,V8,V9,V3R,V4R,120:45"  # the bench's 8 views
START = time.perf_counter()
rows: list[dict] = []


def add(name: str, **fields) -> dict:
    row = {"row": name, **{k: float(v) if isinstance(v, np.floating) else v for k, v in fields.items()}}
    rows.append(row)
    return row


def failed(name: str, exc: BaseException) -> None:
    add(name, note=f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160])


def out_of_time() -> bool:
    return time.perf_counter() - START > BUDGET_S


def median_ms(fn, sync=lambda: None, budget_s: float = 4.0, reps: int = 20, warmup: int = 2) -> float:
    """Median milliseconds per call, at least 3 calls, about ``budget_s`` seconds at most."""
    if QUICK:
        reps, budget_s, warmup = 3, 0.0, 1
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(times) < reps and (len(times) < 3 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


# --- the model and the input -----------------------------------------------------------------

def load_model(path: Path):
    """(model, meta, how): panorama's loader, or a plain safetensors reader without the package."""
    try:
        from panorama import checkpoint

        model, meta = checkpoint.load(path)
        return model, meta, "panorama.checkpoint (content hash verified)"
    except ImportError as exc:
        missing = exc.name
    import torch

    from panorama.model import ModelConfig, NefNetV2

    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    info = header.pop("__metadata__")
    dtypes = {"F32": torch.float32, "F16": torch.float16, "F64": torch.float64, "I64": torch.int64,
              "I32": torch.int32, "BOOL": torch.bool}
    tensors = {}
    for name, spec in header.items():
        lo, hi = spec["data_offsets"]
        buf = bytearray(raw[8 + n + lo: 8 + n + hi])
        t = torch.frombuffer(buf, dtype=dtypes[spec["dtype"]]) if buf else torch.empty(0, dtype=dtypes[spec["dtype"]])
        tensors[name] = t.reshape(spec["shape"])
    model = NefNetV2(ModelConfig(**json.loads(info["config"])))
    model.load_state_dict(tensors)
    model.eval()
    return model, {**json.loads(info["meta"]), "sha256": info["sha256"]}, f"own reader ({missing} not installed; hash not checked)"


def realistic_input(seconds: float = 10.0, fs: int = 500) -> tuple[np.ndarray, str]:
    """(12, samples) mV: the simulator's patient where it imports, else a moving heart dipole
    projected on the leads' directions (smooth, coherent across leads, ECG-sized)."""
    from panorama.geometry import STANDARD_12, resolve_views

    try:
        from training.simulator import simulate

        rec = simulate(7, None, seconds, fs)
        return np.stack([rec.lead(n) for n in STANDARD_12]).astype(np.float32), "simulator (seed 7)"
    except ImportError as exc:
        why = f"{exc.name} not installed"
    t = np.arange(int(seconds * fs)) / fs
    phase = (t * 1.2) % 1.0  # 72 bpm
    heart = np.zeros((3, t.size))
    for centre, width, direction in ((0.10, 0.025, (0.1, 0.3, -0.1)), (0.25, 0.012, (0.4, 1.4, -0.5)),
                                     (0.28, 0.010, (-0.3, -0.4, 0.2)), (0.55, 0.05, (0.2, 0.5, -0.1))):
        heart += np.outer(direction, np.exp(-0.5 * ((phase - centre) / width) ** 2))
    dirs = np.stack([v.direction for v in resolve_views(",".join(STANDARD_12))])
    x = dirs @ heart + 0.02 * np.sin(2 * np.pi * 0.3 * t)  # + slow baseline wander
    return x.astype(np.float32), f"dipole model ({why})"


def workload(x12: np.ndarray, batch: int):
    """x (B, 12, T), in_views, mask, q_views for 8 views; III, aVR, aVL, aVF masked off as the
    synthesizer and the daemon do."""
    from panorama.geometry import STANDARD_12, descriptors, redundant_limb_leads, resolve_views

    ia = descriptors(resolve_views(",".join(STANDARD_12)))
    qa = descriptors(resolve_views(VIEWS))
    keep = ~redundant_limb_leads(list(STANDARD_12))
    return (np.repeat(x12[None], batch, 0), np.repeat(ia[None], batch, 0), np.repeat(keep[None], batch, 0),
            np.repeat(qa[None], batch, 0))


# --- sections --------------------------------------------------------------------------------

def torch_rows(model, x12, ref_holder: dict) -> None:
    import torch

    w1, w32 = workload(x12, 1), workload(x12, 32)

    def runner(m, device):
        def run(*arrays):
            with torch.no_grad():
                t = [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays]
                return m(*t).cpu().numpy()
        return run

    try:
        cpu = runner(model, "cpu")
        ref_holder["y"] = cpu(*w1)
        add("torch CPU", err_uv=0.0, b1_ms=median_ms(lambda: cpu(*w1)),
            b32_ms=median_ms(lambda: cpu(*w32), budget_s=3.0, reps=5, warmup=1),
            note=f"reference; {torch.get_num_threads()} threads")
    except Exception as exc:
        failed("torch CPU", exc)
        return
    if not torch.cuda.is_available():
        add("torch CUDA", note=f"CUDA unavailable (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        return
    try:
        torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 for the comparison
        torch.backends.cuda.matmul.allow_tf32 = False
        import copy

        gpu_model = copy.deepcopy(model).to("cuda")
        gpu = runner(gpu_model, "cuda")
        err = np.abs(gpu(*w1) - ref_holder["y"]).max() * 1000
        add("torch CUDA", err_uv=err, b1_ms=median_ms(lambda: gpu(*w1), torch.cuda.synchronize),
            b32_ms=median_ms(lambda: gpu(*w32), torch.cuda.synchronize),
            note=f"{torch.cuda.get_device_name(0)}; TF32 off; includes host<->device copies")
    except Exception as exc:
        failed("torch CUDA", exc)


def onnxruntime_rows(onnx_path: Path | None, x12, ref) -> None:
    w1, w32 = workload(x12, 1), workload(x12, 32)
    try:
        import onnxruntime as ort

        from edge.backends.onnxruntime import OnnxRuntimeBackend
    except ImportError as exc:
        add("ONNX Runtime CPU", note=f"{exc.name} not installed")
        return
    if onnx_path is None:
        add("ONNX Runtime CPU", note="no ONNX export (see the export row)")
        return
    for device, label in (("cpu", "ONNX Runtime CPU"), ("cuda", "ONNX Runtime CUDA")):
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            add(label, note=f"CUDAExecutionProvider not available (onnxruntime {ort.__version__}: "
                f"{', '.join(ort.get_available_providers())})")
            continue
        if out_of_time():
            add(label, note="skipped: time budget spent")
            continue
        try:
            backend = OnnxRuntimeBackend(onnx_path, device)
            err = np.abs(backend.run(*w1) - ref).max() * 1000
            add(label, err_uv=err, b1_ms=median_ms(lambda: backend.run(*w1)),
                b32_ms=median_ms(lambda: backend.run(*w32), budget_s=3.0, reps=5, warmup=1),
                note=f"providers {', '.join(backend.providers)}")
        except Exception as exc:
            failed(label, exc)


def tensorrt_rows(paths: dict, x12, ref, work: Path) -> None:
    w1, w32 = workload(x12, 1), workload(x12, 32)
    try:
        import tensorrt as trt
    except ImportError:
        for p in ("fp32", "fp16"):
            add(f"TensorRT {p}", note="tensorrt not installed")
        add("TensorRT cold build", note="tensorrt not installed")
        add("TensorRT load from cache", note="tensorrt not installed")
        return
    try:
        from edge.backends.tensorrt import TensorRTBackend
        from export.tensorrt import fp16_from_onnx
    except ImportError as exc:
        for p in ("fp32", "fp16"):
            add(f"TensorRT {p}", note=f"{exc.name} not installed (cuda-python: pip install cuda-python)")
        return
    cache = work / "engines"
    for precision in ("fp32", "fp16"):
        label = f"TensorRT {precision}"
        if out_of_time():
            add(label, note="skipped: time budget spent")
            continue
        try:
            onnx = paths["fp16"] if precision == "fp16" and fp16_from_onnx() else paths["fp32"]
            t0 = time.perf_counter()
            backend = TensorRTBackend(onnx, "cuda", precision=precision, cache_dir=cache)
            cold = time.perf_counter() - t0
            err = np.abs(backend.run(*w1) - ref).max() * 1000
            add(label, err_uv=err, b1_ms=median_ms(lambda: backend.run(*w1)),
                b32_ms=median_ms(lambda: backend.run(*w32)),
                note=f"TensorRT {trt.__version__}; {backend.profile.describe()}")
            add(f"TensorRT cold build ({precision})", seconds=cold,
                note=f"built {backend.loaded.built}; export cached, build + load + warm-up")
            backend.close()
            t0 = time.perf_counter()
            again = TensorRTBackend(onnx, "cuda", precision=precision, cache_dir=cache, warmup=0)
            start = time.perf_counter() - t0
            add(f"TensorRT load from cache ({precision})", seconds=start,
                note=f"engine lookup + sha256 + deserialize {again.loaded.seconds:.2f} s; from cache: "
                f"{not again.loaded.built}; target < 2 s: {'met' if start < 2 else 'MISSED'}")
            again.close()
        except Exception as exc:
            failed(label, exc)


def calibration_rows(model) -> None:
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


def stage3_rows(model) -> None:
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


# --- the run ---------------------------------------------------------------------------------

def environment() -> dict:
    env = {"python": platform.python_version(), "machine": platform.machine()}
    for module in ("torch", "onnx", "onnxruntime", "tensorrt", "cuda.bindings", "safetensors", "scipy"):
        try:
            mod = __import__(module, fromlist=["_"])
            env[module] = getattr(mod, "__version__", "present")
        except ImportError:
            env[module] = "not installed"
    try:
        import torch

        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CUDA unavailable)"
    except Exception as exc:  # noqa: BLE001 (a check that must not crash)
        env["gpu"] = f"unknown ({exc})"
    return env


def print_table(env: dict) -> None:
    print("panorama GPU check: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    head = f"{'row':34} {'err µV':>10} {'b1 ms':>9} {'b32 ms':>9} {'s':>8}  note"
    print(head)
    print("-" * len(head))

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else ""

    for r in rows:
        err = num(r.get("err_uv"), ".3f") or (num(r.get("err_deg"), ".3f") + "°" if "err_deg" in r else "")
        print(f"{r['row']:34} {err:>10} {num(r.get('b1_ms'), '.2f'):>9} {num(r.get('b32_ms'), '.1f'):>9} "
              f"{num(r.get('seconds'), '.2f'):>8}  {r.get('note', '')}")
    print(f"(8 views from 10 s of 12 leads at 500 Hz; errors are max |y - y_torch_cpu|; "
          f"{time.perf_counter() - START:.0f} s in all)")


def main() -> int:
    env = environment()
    work = Path(tempfile.mkdtemp(prefix="panorama-gpu-check-"))
    os.environ["PANORAMA_CACHE"] = str(work / "cache")  # never touch the user's caches
    try:
        from panorama.synth import DEFAULT_CHECKPOINTS
    except ImportError:
        DEFAULT_CHECKPOINTS = {"pretrained": REPO / "panorama" / "weights" / "nefnet_v2_stage1.safetensors"}
    ckpt = DEFAULT_CHECKPOINTS["pretrained"]
    model, meta, how = load_model(ckpt)
    env["checkpoint"] = f"{ckpt.name} via {how}"
    x12, source = realistic_input(10.0)
    env["input"] = source
    ref: dict = {}
    torch_rows(model, x12, ref)
    paths: dict = {}
    try:
        from export.onnx import export_model

        for precision in ("fp32", "fp16"):
            t0 = time.perf_counter()
            paths[precision] = export_model(model, work / f"model-{precision}.onnx", precision, meta)
            add(f"ONNX export ({precision})", seconds=time.perf_counter() - t0, note=str(paths[precision].name))
    except Exception as exc:
        failed("ONNX export", exc)
    if "y" in ref:
        onnxruntime_rows(paths.get("fp32"), x12, ref["y"])
        tensorrt_rows(paths, x12, ref["y"], work)
    calibration_rows(model)
    stage3_rows(model)
    training_rows(work, 30 if QUICK else 60)
    print_table(env)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_check.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2, default=float))
        print(f"wrote {Path(out, 'gpu_check.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
