"""``panorama synthesize``: WFDB records in, one WFDB record of synthesised views out each."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from panorama.adapt import adapt, synthesize_split
from panorama.calibrate import calibrate, check_seconds
from panorama.electrodes import check_electrodes
from panorama.errors import PanoramaError, RecordError
from panorama.files import file_in_the_way
from panorama.geometry import resolve_view, resolve_views
from panorama.records import (MODEL_FS, Record, dc_offsets, dc_warning, find_records, lead_quality, read_record,
                              resample, screen_leads, write_record)
from panorama.model import DOWNSAMPLE
from panorama.synth import MARGIN, Synthesizer, default_checkpoint, silence
from panorama.transfer import LINE_BLEND, fit_neighbour_offsets, fit_transfer
from panorama.wander import WANDER

from .backends import make_backend
from .lead_off import BRIDGE_S, drawn_around, fill_gaps, leads_off

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
    p.add_argument("--model", type=Path, help="checkpoint (default: the shipped one)")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "tensorrt"),
                   help="inference backend (default torch); calibration always uses PyTorch")
    p.add_argument("--calibrate", type=float, default=0.0, metavar="SECONDS",
                   help="fit the inputs' angle offsets on the first SECONDS of every lead in the record "
                   "but the views asked for (e.g. 5; limb leads keep their table angles unless every recorded "
                   "lead is an input; a recorded lead asked "
                   "for as a view, unless it is an input, is not used, so the output can be compared with it); "
                   "the offsets and the verdict go into the output header's comments")
    p.add_argument("--transfer", action="store_true",
                   help="with --calibrate: also continue the same recorded leads past those SECONDS (the model "
                   "plus a residual filter fitted on them) and give each view its nearest one of the same kind within "
                   "45 deg as an extra input, at the angle a second, leave-one-out calibration of those leads fits (neighbour "
                   "transfer; views with none that near are unchanged; asking for a recorded lead as a view takes it away "
                   f"from its neighbours); a view on the precordial line V1-V6 beside recorded ones also takes {LINE_BLEND:g} of "
                   "their linear interpolation along the line (V2 between V1 and V3; V6 extrapolated from V4 and V5), "
                   "named in the header, also when every recorded lead "
                   "is an input and there is nothing to continue)")
    p.add_argument("--adapt", action="store_true",
                   help="with --calibrate: first fine-tune a copy of the model's fusion blocks on the same leads and "
                   "SECONDS (patient adaptation: each recorded chest lead predicted from what synthesis would give it; "
                   "about 0.6 s a record; PyTorch backend only)")
    p.add_argument("--wander", action="store_true",
                   help=f"draw chest views from the leads without their baseline drift (below {WANDER.cutoff_hz:g} Hz; with "
                   "--calibrate the fitted seconds too) and give them back the drift chest leads share, that of "
                   "the chest inputs (panorama/wander.py); without a chest lead among --inputs it does nothing (the "
                   "header says so); limb and Frank views are drawn as without it")
    p.add_argument("--blend-with", metavar="LEADS",
                   help="with --calibrate: also draw every view from these leads of --inputs alone (the other inputs "
                   "then only supervise calibration and adaptation on the first SECONDS and are continued past them "
                   "with --transfer, as in the evaluation protocol) and write the mean of the two draws, named in the "
                   "header. For a monitor recording I,II,III,aVR,aVL,aVF,V1,V3,V4,V5, --blend-with I,II,V3 draws V2 "
                   "and V6 better than either draw alone with --transfer --adapt --wander (panorama bench blend; "
                   "README); about twice the time")
    p.set_defaults(func=run)


def _leads_arg(flag: str, spec: str) -> list:
    """``--inputs``/``--views``/``--blend-with`` resolved, its errors naming the option."""
    try:
        return resolve_views(spec)
    except ValueError as exc:
        raise ValueError(f"--{flag}: {exc}") from None


def run(args) -> int:
    inputs, views = _leads_arg("inputs", args.inputs), _leads_arg("views", args.views)
    check_seconds(args.calibrate)
    for flag in ("transfer", "adapt"):
        if getattr(args, flag) and not args.calibrate:
            raise ValueError(f"--{flag} fits on the calibration window: give --calibrate SECONDS too")
    if args.adapt and args.backend != "torch":
        raise ValueError("--adapt fine-tunes the PyTorch model for each record: use --backend torch")
    blend_with = _leads_arg("blend-with", args.blend_with) if args.blend_with is not None else None
    check_blend(inputs, blend_with, args.calibrate)
    if (blocked := file_in_the_way(args.out)) is not None:  # said once, before any record
        raise ValueError(f"{blocked} is a file, where a folder is wanted (--out names a folder)")
    synth = Synthesizer.load(args.model)
    if args.backend != "torch":
        backend = make_backend(args.backend, args.model or default_checkpoint())
        synth.runner = backend.run
        if getattr(backend, "profile", None) is not None:  # an engine's longest input bounds a chunk
            synth.chunk = min(synth.chunk, backend.profile.time[2] - 2 * MARGIN - 2 * DOWNSAMPLE)
            if synth.chunk < DOWNSAMPLE:
                raise ValueError(f"the engine's profile takes at most {backend.profile.time[2]} samples; "
                                 f"synthesis needs {2 * MARGIN + 3 * DOWNSAMPLE} or more (rebuild it with --profile)")
    paths, failed = [], 0
    for arg in args.records:  # a bad path is reported, the others still run
        try:
            paths.extend(find_records(arg))
        except PanoramaError as exc:
            failed += 1
            print(f"panorama synthesize: skipped {arg}: {exc}", file=sys.stderr)
    seen: dict[str, list[Path]] = {}
    for path in dict.fromkeys(p.resolve() for p in paths):  # a record named twice is drawn once
        seen.setdefault(path.name, []).append(path)
    paths = []
    for name, same in seen.items():
        if len(same) == 1:
            paths += same
            continue
        failed += len(same)  # one output file each would be written over: none is drawn
        print(f"panorama synthesize: skipped {len(same)} records named {name} ({', '.join(map(str, same))}): "
              f"each would be written to {args.out / name}.hea; synthesize them into different --out folders",
              file=sys.stderr)
    for path in paths:
        if path.parent.resolve() == args.out.resolve():
            failed += 1
            print(f"panorama synthesize: skipped {path}: --out is the record's own folder; "
                  "writing there would overwrite the recording", file=sys.stderr)
            continue
        try:
            out = synthesize_record(synth, path, inputs, views, args.out, calibrate_s=args.calibrate,
                                    transfer=args.transfer, adapt_model=args.adapt, wander=args.wander,
                                    blend_with=blend_with, backend=args.backend)
            print(f"wrote {out}.hea")
        except (PanoramaError, ValueError, OSError) as exc:  # one bad record never stops the others
            failed += 1
            print(f"panorama synthesize: skipped {path}: {exc}", file=sys.stderr)
    if failed:
        print(f"{failed} record(s) or path(s) failed", file=sys.stderr)
    return 1 if failed else 0


def check_blend(inputs, blend_with, calibrate_s: float) -> None:
    """ValueError unless ``blend_with`` is None or some but not all of ``inputs`` with calibration."""
    if blend_with is None:
        return
    if calibrate_s <= 0:
        raise ValueError("--blend-with draws from a subset with the other inputs supervising calibration: "
                         "give --calibrate SECONDS too")
    names, subset = [v.name for v in inputs], [v.name for v in blend_with]
    outside = [n for n in subset if n not in names]
    if outside:
        raise ValueError(f"--blend-with must name some but not all of --inputs ({','.join(names)}): "
                         f"{','.join(outside)} {'is' if len(outside) == 1 else 'are'} not among them")
    if set(subset) >= set(names):
        raise ValueError(f"--blend-with must name some but not all of --inputs ({','.join(names)}): "
                         "it names them all, so both draws would be the same")


def synthesize_record(synth: Synthesizer, path: Path, inputs, views, out_dir: Path,
                      calibrate_s: float = 0.0, transfer: bool = False, adapt_model: bool = False,
                      wander: bool = False, blend_with=None, backend: str = "torch") -> Path:
    """Synthesise ``views`` of the record at ``path`` from its ``inputs`` and write them to
    ``out_dir``. ``blend_with`` (views, a proper subset of ``inputs``; needs ``calibrate_s``):
    also draw every view from those leads alone, the other inputs supervising calibration
    and adaptation and continued past the calibration window by transfer, and write the
    mean of the two draws (``panorama bench blend`` measures it)."""
    check_blend(inputs, blend_with, check_seconds(calibrate_s))
    names = [v.name for v in inputs]
    subset = [v.name for v in blend_with or []]
    # every lead is read: calibration fits on them, and without it the electrode check looks at them all;
    # one the inputs do not need that cannot be read (odd units) leaves the others to the inputs alone
    unread = ""
    try:
        whole = read_record(path, fs=None)
    except RecordError as exc:
        whole, unread = read_record(path, leads=names, fs=None), str(exc).removeprefix(f"{path}: ")
        log.warning("%s: the leads besides the inputs are not used: %s", path.name, unread)
    if any(n not in whole.leads for n in names):
        read_record(path, leads=names, fs=None)  # says which leads it lacks and what the labels were
    native = Record(whole.name, np.stack([whole.lead(n) for n in names]), names, whole.fs, whole.source)
    mostly_missing = lead_quality(native.signals)  # over half the samples NaN: nothing to bridge
    filled, gaps, bridged = fill_gaps(native.signals, native.fs)
    native = Record(native.name, filled, names, native.fs, native.source)
    for n, row in zip(names, filled):  # the calibration and the electrode check see the inputs as synthesis does
        whole.signals[whole.leads.index(n)] = row
    at_model = resample(whole, MODEL_FS)  # once: resampling is lead by lead, so every step below takes its rows
    rec = Record(native.name, np.stack([at_model.lead(n) for n in names]), names, MODEL_FS, native.source)
    # screened at the record's own rate too: resampling smears an amplifier's flat rail
    flags = [m if m == "missing" else a if a != "ok" else b
             for m, a, b in zip(mostly_missing, screen_leads(native.signals, native.fs),
                                screen_leads(rec.signals, MODEL_FS))]
    bad = [f"{n} {f}" for n, f in zip(names, flags) if f != "ok"]
    if bad:
        hint = ""
        if all(f == "flat" for f in flags) and (native.signals.std(axis=1) > 0).all():
            hint = (f" (every input varies, by at most {native.signals.std(axis=1).max() * 1000:.2g} uV rms: "
                    "a record in volts labelled mV? check the header's units)")
        raise PanoramaError(f"{path}: input lead(s) unusable: {', '.join(bad)}{hint}; choose other --inputs")
    for lead, mv in dc_offsets(rec.signals, names).items():
        log.warning("%s: %s", path.name, dc_warning(lead, mv))
    off = leads_off(rec.signals, native.signals, gaps, native.fs)
    if off.any:
        log.warning("%s: %s; the views there are drawn from the other inputs", path.name, "; ".join(off.spans(names)))
    left_out, every = [], None
    if calibrate_s > 0:  # the other leads only supervise the first seconds: unusable there, left out
        window = whole.signals[:, :int(round(calibrate_s * whole.fs))]
        keep = []
        for i, (n, f) in enumerate(zip(whole.leads, screen_leads(window, whole.fs))):
            if f == "ok" or n in names:
                keep.append(i)
            else:
                left_out.append(f"{n} {f}")
        every = Record(whole.name, at_model.signals[keep], [whole.leads[i] for i in keep], MODEL_FS, whole.source)
    wiring = None
    if every is None:  # calibration checks every lead it fits on; without it, every usable lead is checked
        usable = [i for i, f in enumerate(screen_leads(whole.signals, whole.fs)) if f == "ok"]
        wiring = check_electrodes(at_model.signals[usable], [whole.leads[i] for i in usable], MODEL_FS)
        if wiring.suspect:
            log.warning("%s: %s; views drawn as labelled", path.name, wiring.reason)

    def drawn(ins: list) -> tuple[np.ndarray, list[str]]:
        """Every view from the inputs ``ins``, a subset of ``inputs``, with the Stage III steps asked for."""
        return _draw(synth, path, rec.signals[[names.index(v.name) for v in ins]], every, list(ins), views,
                     calibrate_s, transfer, adapt_model, wander)

    y, notes, off_notes = _around(drawn, list(inputs), off, rec.signals.shape[1])
    if blend_with is not None:
        pick = [names.index(n) for n in subset]
        y_sub, notes_sub, off_sub = _around(drawn, list(blend_with), leads_off(
            rec.signals[pick], native.signals[pick], [gaps[i] for i in pick], native.fs), rec.signals.shape[1])
        with np.errstate(invalid="ignore"):  # where one draw has no input left, the other alone
            y = np.where(np.isnan(y_sub), y, np.where(np.isnan(y), y_sub, 0.5 * (y + y_sub)))
        # where the subset had no input left, the draw from every input stands alone: said so, not "missing"
        off_sub = [n.replace(" left missing: no input usable there",
                             f": the draw from {','.join(names)} alone (no input of {','.join(subset)} usable there)")
                   for n in off_sub]
        notes = [f"blend: the mean of the draw from {','.join(names)} and the draw from {','.join(subset)}",
                 *notes, *(f"from {','.join(subset)}: {n}" for n in off_sub + notes_sub)]
    notes = off_notes + ([f"{bridged} gap(s) of at most {BRIDGE_S:g} s bridged by a straight line"] if bridged else [])\
        + notes
    # NaN where no input was usable: missing samples in the record (resample carries them), not a made-up line
    back = resample(Record(rec.name, y, [v.name for v in views], MODEL_FS), native.fs)
    n = native.signals.shape[1]
    sig = back.signals[:, :n]
    if sig.shape[1] < n:  # rounding in the rate change: repeat the last sample
        sig = np.pad(sig, ((0, 0), (0, n - sig.shape[1])), mode="edge")
    comments = [f"synthesised by panorama from {','.join(names)} of {Path(path).resolve()}",
                f"model sha256 {synth.meta.get('sha256', '?')[:16]}, backend {backend}",
                "views at table angles (theta, phi deg): " + ", ".join(f"{v.name} ({v.theta:g}, {v.phi:g})"
                                                                      for v in views),
                *([f"left out of Stage III, unusable in the first {calibrate_s:g} s: {', '.join(left_out)}"]
                  if left_out else []),
                *([f"the record's other leads not used ({unread}): calibration and the electrode check had the "
                   "inputs alone"] if unread else []),
                *([f"warning: {wiring.reason}; views drawn as labelled"] if wiring and wiring.suspect else []), *notes]
    if native.fs != MODEL_FS:
        comments.insert(3, f"drawn at the model's {MODEL_FS:g} Hz, written at the record's {native.fs:g} Hz")
    return write_record(out_dir, rec.name, sig, [v.name for v in views], native.fs, comments, missing_ok=True)


def _around(drawn, inputs: list, off, n: int) -> tuple[np.ndarray, list[str], list[str]]:
    """(views, notes of the draw from every input, notes on the inputs off and of each draw
    from fewer, for the seconds where some were off): :func:`drawn_around`."""
    said: list[tuple[list, list[str]]] = []

    def draw(ins):
        y, notes = drawn(ins)
        said.append((ins, notes))
        return y

    y, off_notes = drawn_around(draw, inputs, off, n)
    fewer = [f"drawn from {','.join(v.name for v in ins)} alone: {note}" for ins, notes in said[1:] for note in notes]
    return y, said[0][1], off_notes + fewer


def _draw(synth: Synthesizer, path: Path, x: np.ndarray, every: Record | None, inputs: list, views: list,
          calibrate_s: float, transfer: bool, adapt_model: bool, wander: bool) -> tuple[np.ndarray, list[str]]:
    """(views, T) at the model rate from ``x`` (the inputs, there), with every Stage III step
    asked for fitted on ``every`` (the whole record there; None without calibration), and the
    notes for the header."""
    names = [v.name for v in inputs]
    offsets, notes, transfers, adaptation, shared = None, [], {}, None, synth
    idle = wander and not any(WANDER.applies(v, inputs) for v in views)
    wander = wander and not idle  # nothing for it to do: no step may change for it either
    if every is not None:  # every lead of the record but the views asked for (inputs always)
        asked = {v.name for v in views}
        keep = [i for i, n in enumerate(every.leads) if n in names or n not in asked]
        x_cal, cal_views = every.signals[keep], [resolve_view(every.leads[i]) for i in keep]
        if wander:  # the fit window alone, so that nothing after it leaks in
            x_cal = WANDER.strip(x_cal[:, :int(round(calibrate_s * MODEL_FS))])
        res = calibrate(synth.model, x_cal, cal_views, seconds=calibrate_s, inputs=names, device=synth.device)
        offsets = res.offsets_for(names)
        (log.warning if res.swap else log.info)("%s: %s", path.name, res.summary())
        notes = [res.summary()] + [f"offset {n}: dtheta {d[0]:+.2f} dphi {d[1]:+.2f} deg"
                                   for n, d in zip(names, offsets)]
        if res.swap_refused and (adapt_model or transfer):  # they would fit on the same swapped leads
            notes.append(f"patient adaptation and neighbour transfer skipped too: {res.swap}?")
            adapt_model = transfer = False
        if adapt_model:
            if synth.runner is not None:
                raise ValueError("patient adaptation needs the PyTorch backend")
            adaptation = adapt(synth.model, x_cal, cal_views, names, seconds=calibrate_s, offsets=offsets,
                               device=synth.device)
            log.info("%s: %s", path.name, adaptation.summary())
            notes.append(adaptation.summary())
            if adaptation.accepted:  # this record's own copy; the shared model is untouched
                synth = Synthesizer(adaptation.model, synth.meta, synth.device)
                far = [v.name for v in views if not adaptation.covers(v)]
                if far:
                    notes.append(f"views beyond 45 deg of the adapted leads, drawn by the shared model: {','.join(far)}")
        if transfer:  # fitted with the model that will use it: the adapted copy, and the shared one
            # the neighbours enter synthesis at their own angles, from a second fit of every
            # recorded lead leave-one-out (the inputs keep the fit above)
            # (none when every recorded lead is an input: then it only interpolates along the line)
            every_fit = fit_neighbour_offsets(shared.model, x_cal, cal_views, seconds=calibrate_s,
                                              device=shared.device, inputs=names)
            if every_fit is not None:
                log.info("%s: neighbours' %s", path.name, every_fit.summary())
            view_offsets = None if every_fit is None else every_fit.offsets_deg
            transfers[synth] = tr = fit_transfer(synth, x_cal, cal_views, names, seconds=calibrate_s,
                                                 offsets=offsets, view_offsets=view_offsets)
            far = [v for v in views if adaptation is not None and not adaptation.covers(v)]
            if shared is not synth and any(tr.neighbours(far)):  # rare: only limb or Frank views
                transfers[shared] = fit_transfer(shared, x_cal, cal_views, names, seconds=calibrate_s,
                                                 offsets=offsets, view_offsets=view_offsets)
            log.info("%s: %s", path.name, tr.summary())
            notes.append(tr.summary())
            notes += tr.line_summary(views if synth is shared else [v for v in views if adaptation.covers(v)])
            if tr.fitted:
                notes += [f"neighbour offset {v.name}: dtheta {d[0]:+.2f} dphi {d[1]:+.2f} deg "
                          f"(leave-one-out fit, {'accepted' if every_fit.accepted else 'rejected'})"
                          for v, d in zip(tr.leads, tr.lead_offsets)]

    def draw(xx, qs):
        def via(s):
            if s in transfers:
                return lambda q: transfers[s].synthesize(s, xx, q, offsets=offsets)
            return lambda q: s(xx, inputs, q, offsets=offsets)
        return synthesize_split(adaptation, via(synth), via(shared), qs, xx.shape[1])

    def pipeline(xx):
        return WANDER.synthesize(draw, xx, inputs, views) if wander else draw(xx, views)

    # less what the whole pipeline draws of a silent heart: the model's own constant per view
    y = pipeline(x) - silence(pipeline, len(inputs))[:, None]
    if wander:
        changed = [v.name for v in views if WANDER.applies(v, inputs)]
        on_line = [v.name for v in views if WANDER.line(v, inputs)]
        notes.append(f"wander: {WANDER.summary()} (chest views given the drift: "
                     f"{','.join(changed) or 'none, no chest view or no chest input'}; on the line beside chest "
                     f"inputs: {','.join(on_line) or 'none'})")
    if idle:
        notes.append("wander: not applied (no chest view asked for, or no chest lead among the inputs)")
    return y, notes
