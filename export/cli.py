"""Subcommands of the export side: ``panorama export onnx``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint for deployment (ONNX)",
                       description="Export a checkpoint to ONNX (opset 17): spectral norm folded, angles "
                       "as inputs, dynamic batch, leads, views and time (a multiple of 8); checked with "
                       "onnx.checker; model hash, sampling rate and lead table in the metadata.")
    p.add_argument("format", choices=("onnx",))
    p.add_argument("--model", type=Path, help="checkpoint (default: the shipped one)")
    p.add_argument("--out", type=Path, required=True, help="output .onnx file")
    p.set_defaults(func=run)


def run(args) -> int:
    from panorama.synth import default_checkpoint

    from .onnx import export_onnx

    out = export_onnx(args.model or default_checkpoint(), args.out)
    print(f"wrote {out}")
    return 0
