"""Subcommands of the export side: ``panorama export onnx`` and ``panorama export tensorrt``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint for deployment (ONNX, TensorRT engines)",
                       description="Export a checkpoint to ONNX, or build a TensorRT engine from the ONNX "
                       "on the device that will run it.")
    fmt = p.add_subparsers(dest="format", metavar="FORMAT", required=True)

    o = fmt.add_parser("onnx", help="ONNX (opset 17) with angles as inputs and dynamic axes",
                       description="Export a checkpoint to ONNX (opset 17): spectral norm folded, angles as "
                       "inputs, dynamic batch, leads, views and time (a multiple of 8); checked with "
                       "onnx.checker; model hash, sampling rate, precision and lead table in the metadata.")
    o.add_argument("--model", type=Path, help="checkpoint (default: the shipped one)")
    o.add_argument("--out", type=Path, required=True, help="output .onnx file")
    o.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="fp16: half precision inside, float32 inputs, outputs and geometry; for TensorRT 11+, "
                   "which builds fp16 engines only from fp16 models (default fp32)")
    o.set_defaults(func=run_onnx)

    t = fmt.add_parser("tensorrt", help="build a TensorRT engine into the engine cache (on the target device)",
                       description="Build a TensorRT engine from an ONNX export, on the GPU that will run it "
                       "(engines do not move between GPU models or TensorRT versions), into the engine cache "
                       "that the tensorrt backend reads. Takes minutes on a Jetson; a cached engine that fits "
                       "is reused. Shapes: one optimisation profile over batch, leads, views and time.")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--onnx", type=Path, help="an .onnx from `panorama export onnx`")
    src.add_argument("--model", type=Path, help="a checkpoint, exported as the tensorrt backend exports it, "
                     "so the engine is the one the backend will load (default, without --onnx: the shipped one)")
    t.add_argument("--out", type=Path, help="engine cache folder (default $PANORAMA_CACHE/engines, "
                   "else ~/.cache/panorama/engines)")
    t.add_argument("--fp16", action="store_true", help="half precision (TensorRT 11+ builds it from an fp16 export: "
                   "made automatically without --onnx, else pass one from `export onnx --precision fp16`)")
    t.add_argument("--profile", metavar="MIN,OPT,MAX", default="256,2560,5120",
                   help="time axis in samples at 500 Hz, multiples of 8 (default 256,2560,5120)")
    t.add_argument("--max-batch", type=int, help="largest batch (default 32)")
    t.add_argument("--max-leads", type=int, help="most input leads (default 12)")
    t.add_argument("--max-views", type=int, help="most views per call (default 16)")
    t.add_argument("--workspace-mib", type=int, default=1024, help="builder workspace limit, MiB (default 1024)")
    t.set_defaults(func=run_tensorrt)


def run_onnx(args) -> int:
    from panorama.synth import default_checkpoint

    from .onnx import check_parity, export_onnx

    errs: list[float] = []  # checked before it replaces what --out held: a refused export leaves it
    out = export_onnx(args.model or default_checkpoint(), args.out, args.precision,
                      verify=lambda model, path: errs.append(check_parity(model, path, args.precision)))
    err = errs[0]
    print(f"wrote {out}: ONNX Runtime matches PyTorch within {err:.3g} µV (8 views of 10 s from 12 synthetic leads)")
    return 0


def run_tensorrt(args) -> int:
    from .tensorrt import Profile

    # the arguments are checked before TensorRT is imported: a typo fails at once, anywhere
    profile = Profile(time=Profile.parse_time(args.profile)).with_max(args.max_batch, args.max_leads, args.max_views)
    if args.onnx is not None and not args.onnx.is_file():
        raise ValueError(f"no ONNX file at {args.onnx}; make one with `panorama export onnx --out FILE`")
    if args.workspace_mib < 64:
        raise ValueError(f"--workspace-mib {args.workspace_mib} is too small (64 or more)")
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        from panorama.errors import BackendError

        raise BackendError("TensorRT is not installed: on a Jetson it comes with JetPack 6 (TensorRT 10.3); "
                           "elsewhere pip install tensorrt; see deploy/README.md") from exc
    from .tensorrt import fp16_from_onnx, get_engine

    precision = "fp16" if args.fp16 else "fp32"
    onnx = args.onnx
    if onnx is None:  # the backend's own export (cached): its engine is the one the backend looks up
        from panorama.synth import default_checkpoint

        from .onnx import cached_onnx

        onnx = cached_onnx(args.model or default_checkpoint(), "fp16" if args.fp16 and fp16_from_onnx() else "fp32")
    loaded = get_engine(onnx, args.out, precision, profile, workspace_mib=args.workspace_mib)
    verb = "built" if loaded.built else "already cached (verified)"
    print(f"{verb}: {loaded.path} ({loaded.key.precision}, {profile.describe()}, TensorRT {loaded.key.tensorrt}, "
          f"{loaded.key.gpu} sm_{loaded.key.compute_capability.replace('.', '')}, {loaded.seconds:.1f} s)")
    return 0
