"""``panorama synthesize``: WFDB records in, one WFDB record of synthesised views out each."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from panorama.errors import PanoramaError
from panorama.geometry import resolve_views
import numpy as np

from panorama.records import MODEL_FS, Record, find_records, read_record, resample, write_record
from panorama.synth import Synthesizer

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "synthesize", help="synthesise views from recorded leads of WFDB records",
        description="For each record, read only the named input leads, synthesise the requested "
        "views (names like V7 or V4R, or THETA:PHI in degrees) and write a WFDB record of the "
        "same name in --out, at the input's own sampling rate and length, in mV. The model loads once.")
    p.add_argument("records", nargs="+", type=Path, help="WFDB records (with or without .hea) or folders")
    p.add_argument("--inputs", default="I,II,V3", help="recorded leads to synthesise from (default I,II,V3)")
    p.add_argument("--views", required=True, help="views to write, e.g. V2,V6,V7,120:45")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--model", type=Path, help="checkpoint (default: the shipped device-calibrated one)")
    p.set_defaults(func=run)


def run(args) -> int:
    inputs, views = resolve_views(args.inputs), resolve_views(args.views)
    synth = Synthesizer.load(args.model)
    paths, failed = [], 0
    for arg in args.records:  # a bad path is reported, the others still run
        try:
            paths.extend(find_records(arg))
        except PanoramaError as exc:
            failed += 1
            print(f"panorama synthesize: skipped {arg}: {exc}", file=sys.stderr)
    for path in paths:
        try:
            out = synthesize_record(synth, path, inputs, views, args.out)
            print(f"wrote {out}.hea")
        except PanoramaError as exc:  # one bad record never stops the others
            failed += 1
            print(f"panorama synthesize: skipped {path}: {exc}", file=sys.stderr)
    if failed:
        print(f"{failed} record(s) or path(s) failed", file=sys.stderr)
    return 1 if failed else 0


def synthesize_record(synth: Synthesizer, path: Path, inputs, views, out_dir: Path,
                      extra_comments: list[str] | None = None) -> Path:
    names = [v.name for v in inputs]
    native = read_record(path, leads=names, fs=None)
    rec = resample(native, MODEL_FS)
    bad = [n for n, x in zip(names, rec.signals) if not np.isfinite(x).all()]
    if bad:
        raise PanoramaError(f"{path}: lead(s) {', '.join(bad)} hold missing samples")
    y = synth(rec.signals, inputs, views)
    back = resample(Record(rec.name, y, [v.name for v in views], MODEL_FS), native.fs)
    n = native.signals.shape[1]
    sig = back.signals[:, :n]
    if sig.shape[1] < n:  # rounding in the rate change: repeat the last sample
        sig = np.pad(sig, ((0, 0), (0, n - sig.shape[1])), mode="edge")
    comments = [f"synthesised by panorama from {','.join(names)} of {path.name}",
                f"model sha256 {synth.meta.get('sha256', '?')[:16]}", *(extra_comments or [])]
    return write_record(out_dir, rec.name, sig, [v.name for v in views], native.fs, comments)
