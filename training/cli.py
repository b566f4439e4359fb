"""Subcommands of the training side: ``eval`` and ``simulate``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter
from pathlib import Path

from panorama.argtypes import positive
from panorama.calibrate import check_seconds
from panorama.errors import RecordError
from panorama.geometry import FRANK, STANDARD_12, resolve_views
from panorama.records import MODEL_FS, Record, find_records
from panorama.transfer import LINE_BLEND
from panorama.wander import WANDER

from . import splits
from .simulator import RHYTHMS
from .evaluate import (CALIB_S, METHODS, PROTOCOLS, Case, Task, default_protocol, eligible, evaluate, format_bands,
                       format_table, load_cases, method_label)

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="score a method on real records or simulated patients",
        description="Score a synthesis method under the protocol of the data README: records "
        "resampled to 500 Hz and cut to 10 s, inputs over 0-10 s, views scored over 5-10 s "
        "(Frank views: the whole record). Prints a table; --json writes the figures.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", nargs="+", type=Path, metavar="PATH",
                     help="WFDB records or folders (searched recursively)")
    src.add_argument("--sim", type=int, metavar="N", help="score N simulated patients instead")
    p.add_argument("--inputs", default=None,
                   help="recorded leads given to the method (default I,II,V3; the 12 standard leads for Frank views)")
    p.add_argument("--views", default="V2,V6", help="views to synthesise and score (default V2,V6)")
    p.add_argument("--method", default="dipole",
                   help=f"one or more of {', '.join(METHODS)}, comma-separated (default dipole)")
    p.add_argument("--split", default="all", choices=splits.SPLITS,
                   help="real records: all, or the train/validation split (default all); in the folder a "
                   "--model was trained on with data.val_records, those records are its validation split")
    p.add_argument("--protocol", default="auto", choices=("auto", *PROTOCOLS),
                   help="auto: whole record for Frank views, else synthesis (default auto)")
    p.add_argument("--device", default="diagnostic", help="simulated device profile for --sim (default diagnostic)")
    p.add_argument("--seed", type=int, default=1000, help="first seed for --sim (default 1000)")
    p.add_argument("--sim-exact-views", action="store_true",
                   help="--sim: render the scored views at exactly their angles (the view asked for) "
                   "instead of at displaced electrodes, as a real recording of them would be (the default)")
    p.add_argument("--model", type=Path, metavar="PATH", action="append",
                   help="checkpoint for --method model (default: the shipped pretrained one); repeat it to "
                   "compare checkpoints on the same records, each row labelled with its file name")
    p.add_argument("--calibrate", type=float, default=0.0, metavar="SECONDS",
                   help="with --method model: also score the model after on-the-fly calibration on "
                   "the first SECONDS of the non-scored leads (e.g. 5)")
    p.add_argument("--calibrate-fit", choices=("inputs", "all"), default="inputs",
                   help="inputs: fit the synthesis inputs' offsets against every recorded lead; all: fit "
                   "every recorded lead's offset, leave-one-out (default inputs)")
    p.add_argument("--transfer", action="store_true",
                   help="with --calibrate: also score calibration plus neighbour transfer (each view gets its "
                   "nearest recorded non-input lead of the same kind within 45 deg, continued past the calibration "
                   "window, as an extra input; views with none that near are unchanged; a view on the precordial "
                   f"line V1-V6 beside recorded ones also takes {LINE_BLEND:g} of their interpolation along the line "
                   "(V2 between V1 and V3; V6 extrapolated from V4 and V5), "
                   "also when every recorded lead is an input and there is nothing to continue; panorama/transfer.py)")
    p.add_argument("--adapt", action="store_true",
                   help="with --calibrate: also score the model after patient adaptation (a copy of its fusion "
                   "blocks fine-tuned for 30 steps on the calibration window, each recorded chest lead predicted "
                   "from what synthesis would give it; with --transfer, before the neighbours are continued; "
                   "panorama/adapt.py)")
    p.add_argument("--wander", action="store_true",
                   help="also score the most complete model row with baseline wander handled: every lead loses "
                   f"its drift below {WANDER.cutoff_hz:g} Hz before anything is fitted or drawn (the calibration window on its own), "
                   "and chest views get back the drift chest leads share, that of the chest inputs "
                   "(panorama/wander.py; gains fitted by `panorama bench wander`)")
    p.add_argument("--by-source", action="store_true", help="also print a table per source database")
    p.add_argument("--any-leads", action="store_true",
                   help="also score records that hold --inputs and --views but not all 12 standard leads (a device "
                   "that records fewer: PSNR is then scaled by the standard leads each record holds, so its "
                   "figures compare between methods, not with the protocol's)")
    p.add_argument("--error-bands", action="store_true",
                   help="also say where each view's error lies in frequency: the share of its squared error below "
                   "0.5 Hz (baseline), 0.5-5 (T wave, ST), 5-15 and 15-40 (QRS) and above 40 Hz, and the PSNR "
                   "without each band's error (means over records)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the figures as JSON")
    p.set_defaults(func=run_eval)

    p = sub.add_parser(
        "train", help="train a model: stage 1 (any-pairs pretraining) or 2 (device calibration)",
        description="Train NEF-NET v2 from a YAML config (see training/configs/). The config is "
        "validated in full before any work starts; checkpoints are chosen on the validation split.")
    p.add_argument("--config", type=Path, required=True, help="YAML training config")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--validate-config", action="store_true", help="check the config and exit")
    p.add_argument("--ship", type=Path, metavar="PATH", help="copy the chosen checkpoint here when done")
    p.add_argument("--device", help="train on this torch device instead of the config's (cpu, cuda, cuda:N)")
    p.add_argument("--minutes", type=float, metavar="M",
                   help="fit the run into M minutes: the step count is fixed during warm-up from the measured "
                   "speed (optim.minutes; the run folder's config.json records it)")
    p.set_defaults(func=run_train)

    p = sub.add_parser(
        "simulate", help="write simulated patients as WFDB records",
        description="Simulate patients with the panorama simulator and write each as a WFDB "
        "record holding the requested views (ground truth at any angle).")
    p.add_argument("--patients", type=int, default=4, help="how many patients (default 4)")
    p.add_argument("--views", default=",".join(STANDARD_12), help="views to write (default the 12 standard leads)")
    p.add_argument("--seconds", type=positive, default=10.0, help="duration (default 10)")
    p.add_argument("--fs", type=int, default=MODEL_FS, help="sampling rate in Hz (default 500)")
    p.add_argument("--device", default="diagnostic", help="device profile (default diagnostic)")
    p.add_argument("--rhythm", default=None, choices=RHYTHMS, help="force a rhythm (default: drawn at random)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=run_simulate)


def sim_cases(n: int, task: Task, device: str, seed: int, exact_views: bool = False) -> list[Case]:
    """Simulated patients as evaluation cases. Every chest electrode is displaced (σ 10.6°),
    the scored views' too, as a real recording of them would be; ``exact_views``: the scored
    views at exactly their angles instead (what synthesis is asked for; the inputs and the
    other recorded leads stay displaced, and the same seed gives the same patient)."""
    from .simulator import simulate

    if n < 2:
        raise ValueError("--sim needs at least 2 patients")
    names = list(dict.fromkeys([*STANDARD_12, *(v.name for v in task.inputs), *(v.name for v in task.views)]))
    inputs = {v.name for v in task.inputs}
    exact = [v.name for v in task.views if v.name not in inputs] if exact_views else []
    cases = []
    for i in range(n):
        s = simulate(seed + i, views=names, duration_s=10.0, fs=MODEL_FS, device=device, exact=exact)
        rec, _ = eligible(Record(f"sim{seed + i}", s.signals, list(s.names), s.fs, "simulator"), task)
        if rec is not None:
            cases.append(Case(Path(rec.name), rec))
    return cases


def _model_said(path: Path | None) -> dict:
    """The checkpoint ``--method model`` runs: its file, hash, stage and what it trained on."""
    from panorama import checkpoint
    from panorama.synth import default_checkpoint

    path = Path(path or default_checkpoint())
    header = checkpoint.read_header(path)
    meta = header["meta"]
    return {"file": str(path), "sha256": header["sha256"], "stage": meta.get("stage"), "meta": meta}


def _found(given: str) -> Path:
    """A path as a training config gave it: from the working folder, else from the repo."""
    path = Path(given)
    return path if path.exists() or path.is_absolute() else Path(__file__).resolve().parents[1] / path


def _named_val_records(models: list[dict]) -> dict[Path, set[str]]:
    """The folders whose validation records a model's training named (``data.val_records``),
    each with those names: its ``--split`` there is that split, not the name hash."""
    named: dict[Path, set[str]] = {}
    for m in models:
        data = m["meta"].get("training_data") or {}
        if data.get("real") and data.get("val_records"):
            folder, names = _found(data["real"]).resolve(), set(data["val_records"])
            if named.setdefault(folder, names) != names:
                raise ValueError(f"--model: the checkpoints were validated on different records of {folder} "
                                 "(their data.val_records): score them one at a time")
    return named


def _select(paths: list[Path], split: str, named: dict[Path, set[str]]) -> list[Path]:
    """``splits.select``, with the validation records a model's training named where it named them."""
    if split not in splits.SPLITS or split == "all" or not named:
        return splits.select(paths, split)

    def val_names(p: Path) -> set[str] | None:
        where = p.resolve()
        return next((names for folder, names in named.items() if where.is_relative_to(folder)), None)

    return [p for p in paths if splits.split_of(p, val_names(p)) == split]


def _trained_on(meta: dict, depth: int = 4, who: tuple[str, int] = ("", 0)
                ) -> list[tuple[set[str], list[str], tuple[str, int]]]:
    """(record names, sources filter, which checkpoint) for each training folder of a
    checkpoint and the checkpoints it was fine-tuned from (``init``): the records of their
    training split. ``who`` is (its path, generations back): ("", 0) for the checkpoint itself."""
    from panorama import checkpoint

    out = []
    data = meta.get("training_data") or {}
    if data.get("real") and data.get("split") == "train":
        folder = _found(data["real"])
        if folder.is_dir():
            val = data.get("val_records") or None
            out.append(({p.stem for p in folder.rglob("*.hea") if splits.split_of(p, val) == "train"},
                        list(data.get("sources") or []), who))
    init = meta.get("init")
    if init and depth > 0:
        try:
            out += _trained_on(checkpoint.read_header(_found(init))["meta"], depth - 1, (str(init), who[1] + 1))
        except Exception:  # an init no longer there: what is known is said
            pass
    return out


def _json_safe(obj):
    """``obj`` with every non-finite float as null: JSON has no NaN (an r of a flat view)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _warn_trained_on(model: dict, cases: list) -> None:
    """Say when scored records are ones the model, or the model it was fine-tuned from,
    trained on (their folders' training split, within each one's sources)."""
    trained = _trained_on(model["meta"])
    by: Counter = Counter()  # (checkpoint, generations back) -> scored records it trained on
    seen = 0
    for c in cases:
        whose = [who for names, sources, who in trained
                 if c.record.name in names and splits.from_sources(c.record.source, sources)]
        by.update(whose)
        seen += bool(whose)
    if by:
        said = "; ".join(f"{n} in the training split of " + (
            model["file"] if not back else f"{path}, which {model['file']} was fine-tuned from"
            + (", or from a model fine-tuned from it" if back > 1 else "")) for (path, back), n in by.items())
        log.warning("%d of the %d scored records were trained on (by name: %s): their scores are not held out; "
                    "score records neither model trained on%s", seen, len(cases), said,
                    " (--split val holds out this model's own)" if ("", 0) in by else "")


def run_eval(args) -> int:
    views = resolve_views(args.views)
    default_inputs = ",".join(STANDARD_12) if all(v.name in FRANK for v in views) else "I,II,V3"
    args.inputs = args.inputs or default_inputs
    inputs = resolve_views(args.inputs)
    protocol = default_protocol(views) if args.protocol == "auto" else args.protocol
    check_seconds(args.calibrate)
    if args.calibrate and not (protocol == "synthesis" and 0 < args.calibrate <= CALIB_S):
        raise ValueError(f"--calibrate takes 0 < SECONDS <= {CALIB_S:g} under the synthesis protocol "
                         "(calibration must not reach the scored 5-10 s); whole-record scoring is uncalibrated")
    for flag in ("transfer", "adapt"):
        if getattr(args, flag) and not args.calibrate:
            raise ValueError(f"--{flag} fits on the calibration window: give --calibrate SECONDS too")
    task = Task(inputs, views, protocol)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if "patient_lsq" in methods and protocol != "synthesis":
        raise ValueError("patient_lsq fits on 0-5 s and scores 5-10 s: it needs the synthesis protocol")
    fit_cases = None
    models = args.model or [None]
    if len(set(models)) < len(models):
        raise ValueError("--model names the same checkpoint twice")
    said = {}  # checkpoint → what it is, for --method model
    if "model" in methods:
        said = {path: _model_said(path) for path in models}
    elif args.model:
        raise ValueError("--model is for --method model")
    if args.sim is not None:
        cases, skipped = sim_cases(args.sim, task, args.device, args.seed, args.sim_exact_views), {}
        source = (f"{args.sim} simulated patients (device {args.device}"
                  f"{'; scored views at their exact angles' if args.sim_exact_views else ''})")
    else:
        named = _named_val_records(list(said.values())) if args.split in ("train", "val") else {}
        found = find_records(*args.data)
        paths = _select(found, args.split, named)
        if not paths:
            raise RecordError(f"no records in split {args.split!r} of {', '.join(map(str, args.data))}")
        cases, skipped = load_cases(paths, task, progress=sys.stderr.isatty(), all_standard=not args.any_leads)
        count = f"{len(paths)} of the {len(found)} records" if len(paths) < len(found) else \
            f"{len(paths)} record{'s' if len(paths) != 1 else ''}"
        source = f"{count} in {', '.join(map(str, args.data))} (split {args.split}"
        if args.split in ("train", "val") and any(p.resolve().is_relative_to(f) for p in found for f in named):
            source += ", as the model's data.val_records names them in " + ", ".join(map(str, named))
        source += ")"
        if args.split == "val" and "lsq" in methods:
            fit_cases, _ = load_cases(_select(found, "train", named), task, progress=False,
                                      all_standard=not args.any_leads)
    if not cases:
        reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none readable"
        hint = ("; a device's records that hold fewer than the 12 standard leads are scored with --any-leads"
                if not args.any_leads and any(k.startswith("lacks") for k in skipped) else "")
        raise RecordError(f"no record could be scored under the {protocol} protocol ({reasons}){hint}")
    print(f"{source}; protocol {protocol}; inputs {args.inputs} -> views {args.views}")
    if skipped:
        print("not scored: " + ", ".join(f"{k} ({v})" for k, v in sorted(skipped.items())))
    if args.sim is None:
        for path in said:
            _warn_trained_on(said[path], cases)
    runs = [(m, 0.0, False, False, False) for m in methods]
    if (args.calibrate > 0 or args.wander) and "model" not in methods:
        raise ValueError(f"--{'calibrate' if args.calibrate > 0 else 'wander'} needs --method model")
    if args.calibrate > 0:
        runs.append(("model", args.calibrate, False, False, False))
        if args.transfer:
            runs.append(("model", args.calibrate, True, False, False))
        if args.adapt:
            runs.append(("model", args.calibrate, args.transfer, True, False))
    if args.wander:  # on top of the most complete model row
        runs.append([r for r in runs if r[0] == "model"][-1][:4] + (True,))
    full, checkpoint_of = {}, {}
    for m, cal, tr, ad, wa in runs:
        for path in models if m == "model" else [None]:
            label = method_label(cal, tr, ad, wa) if m == "model" else m
            if m == "model" and len(models) > 1:
                label += f" [{Path(path).stem}]"
                if label in full:
                    raise ValueError(f"--model: two checkpoints share the file name {Path(path).stem}; rename one")
            if m == "model":
                checkpoint_of[label] = said[path]
            full[label] = evaluate(cases, task, m, fit_cases, progress=sys.stderr.isatty(),
                                   model_path=path, calibrate_s=cal, calibrate_fit=args.calibrate_fit,
                                   transfer=tr, adapt=ad, wander=wa, bands=args.error_bands)
    results = {label: r.summary for label, r in full.items()}
    print(format_table(results))
    if args.error_bands:
        for label, r in full.items():
            print(format_bands(label, r.bands, {v: d["psnr_db"] for v, d in r.summary["per_view"].items()}))
            results[label]["error_bands"] = r.bands
    for label, r in full.items():
        if r.notes:
            print(f"{label}: " + ", ".join(f"{k} ({v} record{'s' if v != 1 else ''})" for k, v in sorted(
                r.notes.items(), key=lambda kv: (not kv[0].startswith("calibration"), kv[0]))))  # its steps' order
    if args.by_source:
        for src in next(iter(full.values())).by_source:
            print(f"\n{src}:")
            print(format_table({label: r.by_source[src] for label, r in full.items()}))
    if args.json:
        for label, summary in results.items():  # in each method's figures: a loop over methods meets only methods
            summary["records"] = {"scored": [c.record.name for c in cases], "not_scored": dict(skipped)}
            if label in checkpoint_of:
                summary["checkpoint"] = {k: checkpoint_of[label][k] for k in ("file", "sha256", "stage")}
        payload = results[methods[0]] if len(results) == 1 else results
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False))
        print(f"wrote {args.json}")
    return 0


def run_simulate(args) -> int:
    from panorama.records import write_record

    from .simulator import simulate

    views = resolve_views(args.views)
    if args.patients < 1:
        raise ValueError("--patients must be at least 1")
    for i in range(args.patients):
        s = simulate(args.seed + i, views=[v.name for v in views], duration_s=args.seconds,
                     fs=args.fs, rhythm=args.rhythm, device=args.device)
        comments = [f"source: panorama simulator seed {args.seed + i}"] + [
            f"{k}: {v}" for k, v in s.meta.items() if k != "seed"]
        base = write_record(args.out, f"sim{args.seed + i:04d}", s.signals, list(s.names), s.fs, comments)
        print(f"wrote {base}.hea ({s.meta.get('rhythm', '?')})")
    return 0


def run_train(args) -> int:
    from panorama.files import atomic_write

    from .config import load_config
    from .train import run

    overrides = {k: v for k, v in (("device", args.device), ("optim.minutes", args.minutes)) if v is not None}
    cfg = load_config(args.config, overrides)
    if args.validate_config:
        if cfg.init is not None:
            from panorama import checkpoint

            checkpoint.read_header(cfg.init)  # the stage-2 start must be a checkpoint this code reads
        budget = f" within {cfg.optim.minutes:g} min" if cfg.optim.minutes else ""
        print(f"{args.config}: valid (stage {cfg.stage}, {cfg.optim.steps} steps{budget} on {cfg.device}, out {cfg.out})")
        return 0
    final = run(cfg, resume=args.resume)
    if args.ship:
        from panorama import checkpoint
        from panorama.errors import ConfigError

        meta = checkpoint.read_header(final)["meta"]
        start, got = meta.get("init_val"), checkpoint.val_psnr(meta)
        if start and got is not None and got <= start["psnr_db"]:
            raise ConfigError(f"--ship: {final} scores {got:.2f} dB on validation, no better than the model it "
                              f"started from ({meta.get('init')}: {start['psnr_db']:.2f} dB on the same "
                              f"{start['records']} records); {args.ship} is left as it was")
        args.ship.parent.mkdir(parents=True, exist_ok=True)
        try:  # a failed write leaves the shipped file as it was
            atomic_write(args.ship, Path(final).read_bytes())
        except OSError as exc:
            raise OSError(f"--ship: could not write {args.ship} ({exc}); it is left as it was, "
                          f"and the run's checkpoint is at {final}") from None
        print(f"shipped {final} -> {args.ship}")
    return 0
