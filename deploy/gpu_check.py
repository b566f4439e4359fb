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

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from gpu_stage3 import calibration_rows, stage3_rows, training_rows  # noqa: E402
from gpu_table import QUICK, VIEWS, add, failed, median_ms, out_of_time, print_table, rows  # noqa: E402

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
    if "CUDAExecutionProvider" in ort.get_available_providers() and not out_of_time():
        label = "ONNX Runtime cuda:63 (no such GPU)"
        try:
            OnnxRuntimeBackend(onnx_path, "cuda:63")
            add(label, note="FAILED: opened without a BackendError")
        except Exception as exc:  # the daemon must refuse it, naming the device
            ok = type(exc).__name__ == "BackendError" and "could not start on CUDA device 63" in str(exc)
            add(label, note=("refused: " if ok else "FAILED: ") + f"{type(exc).__name__}: {str(exc)[:120]}")


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
    calibration_rows(model, realistic_input)
    stage3_rows(model, realistic_input)
    training_rows(work, 15 if QUICK else 60)
    print_table(env)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_check.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2, default=float))
        print(f"wrote {Path(out, 'gpu_check.json')}")
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repetitions a timing and a shorter training run: "
                        "checks that every section runs, not the speed (read by deploy/gpu_table.py)")
    parser.parse_args()  # --help, and a clear error for a flag it does not know, before any work
    sys.exit(main())
