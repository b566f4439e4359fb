"""The evaluation harness: one protocol for every method (baselines now, the model later).

Protocols (``../shared/data/README.md``):
- ``synthesis``: resample to 500 Hz, cut to the first 10 s (shorter records are not
  scored), the method sees the inputs over 0–10 s (calibration may use 0–5 s), and the
  views are scored over 5–10 s only. Records with a flat or missing lead among the 12 are
  not scored.
- ``whole``: the whole record at 500 Hz is scored (the Frank-lead protocol).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from panorama.baselines import DipoleMethod, KorsMethod, LeastSquaresMethod, Method, ZeroMethod
from panorama.errors import RecordError
from panorama.geometry import FRANK, STANDARD_12, View
from panorama.metrics import RecordScore, band_names, centre, error_bands, score_record, summarise
from panorama.records import MODEL_FS, Record, lead_quality, read_record

log = logging.getLogger(__name__)

PROTOCOLS = ("synthesis", "whole")
RECORD_S, CALIB_S = 10.0, 5.0
METHODS = ("zero", "dipole", "lsq", "patient_lsq", "kors", "model")
LSQ_FOLDS = 5


@dataclass
class Task:
    inputs: list[View]
    views: list[View]
    protocol: str = "synthesis"

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        leaked = sorted({v.name for v in self.views} & {v.name for v in self.inputs})
        if leaked:
            raise ValueError(f"a scored view must never be an input: {', '.join(leaked)}")

    @property
    def scored_slice(self) -> slice:
        if self.protocol == "synthesis":
            return slice(int(CALIB_S * MODEL_FS), int(RECORD_S * MODEL_FS))
        return slice(None)


def default_protocol(views: list[View]) -> str:
    """Frank views are scored over the whole record; everything else by the synthesis protocol."""
    return "whole" if all(v.name in FRANK for v in views) else "synthesis"


@dataclass
class Case:
    """One eligible record, cut to the protocol's window."""

    path: Path
    record: Record

    @property
    def scale_n(self) -> int:
        """The record's first leads, the standard ones it holds, set the PSNR scale."""
        return sum(n in STANDARD_12 for n in self.record.leads) or len(self.record.leads)


@dataclass
class Result:
    summary: dict
    scores: dict[str, RecordScore]
    skipped: Counter = field(default_factory=Counter)
    by_source: dict[str, dict] = field(default_factory=dict)
    notes: Counter = field(default_factory=Counter)  # what the method said per record, counted
    bands: dict[str, dict] = field(default_factory=dict)  # per view: where the error lies (evaluate(bands=True))


def eligible(rec: Record, task: Task, all_standard: bool = True) -> tuple[Record | None, str]:
    """The record cut to the protocol's window with the leads it needs, or None and why not:
    the 12 standard leads first (they set the PSNR scale), then the task's others. Without
    ``all_standard`` (a device that records fewer, validating a Stage II model on its own
    leads) the standard leads it holds set the scale and only the task's are needed."""
    standard = STANDARD_12 if all_standard else [n for n in STANDARD_12 if n in rec.leads]
    need = list(dict.fromkeys([*standard, *(v.name for v in task.inputs), *(v.name for v in task.views)]))
    lacking = [n for n in need if n not in rec.leads]
    if lacking:
        said = ",".join(lacking) if len(lacking) <= 6 else ",".join(lacking[:5]) + f"… ({len(lacking)} leads)"
        if rec.unrecognised:  # a lead under a name no one knows
            said += f" (labels not recognised: {','.join(rec.unrecognised)})"
        return None, f"lacks {said}"
    sig = rec.signals
    if task.protocol == "synthesis":
        n = int(RECORD_S * MODEL_FS)
        if sig.shape[1] < n:
            return None, "shorter than 10 s"
        sig = sig[:, :n]
    sig = np.stack([sig[rec.leads.index(n)] for n in need])
    if any(f in ("flat", "missing") for f in lead_quality(sig[: max(len(standard), 1)])):
        return None, "flat or missing lead"
    if not np.isfinite(sig).all():
        return None, "missing samples"
    return Record(rec.name, sig, need, rec.fs, rec.source, rec.comments), ""


def load_cases(paths: list[Path], task: Task, progress: bool = True,
               all_standard: bool = True) -> tuple[list[Case], Counter]:
    """Read the records the protocol can score; count why the others were skipped
    (``all_standard``: ``eligible``'s)."""
    cases, skipped = [], Counter()
    for path in tqdm(paths, desc="reading records", unit="rec", disable=not progress, leave=False):
        try:
            rec = read_record(path, fs=MODEL_FS)
        except RecordError as exc:
            log.warning("skipping %s", exc)
            skipped["unreadable"] += 1
            continue
        rec, why = eligible(rec, task, all_standard)
        if rec is None:
            skipped[why] += 1
        else:
            cases.append(Case(path, rec))
    return cases, skipped


def _xy(case: Case, task: Task) -> tuple[np.ndarray, np.ndarray]:
    rec = case.record
    x = np.stack([rec.lead(v.name) for v in task.inputs])
    y = np.stack([rec.lead(v.name) for v in task.views])
    return x, y


class ModelMethod:
    """The learned model through the same harness as the baselines."""

    name = "model"

    def __init__(self, synth, wander=None):
        self.synth = synth
        self.wander = wander  # panorama.wander.Wander: drift stripped before, restored after; or None
        self.name = method_label(0.0, wander=wander is not None)

    def predict(self, x, inputs, queries):
        if self.wander is None:
            return self.draw(x, inputs, queries)
        return self.wander.synthesize(lambda xx, qs: self.draw(xx, inputs, qs), x, inputs, queries)

    def draw(self, x, inputs, queries):
        return self.synth(x, inputs, queries)


class CalibratedModelMethod(ModelMethod):
    """The model after on-the-fly calibration on the first ``seconds`` of every recorded
    lead except the scored views (which are never inputs, not even for calibration)."""

    def __init__(self, synth, seconds: float = CALIB_S, inputs_only: bool = True, transfer: bool = False,
                 adapt: bool = False, adapt_options: dict | None = None, wander=None):
        super().__init__(synth, wander)
        self.name = method_label(seconds, transfer, adapt, wander is not None)
        self.seconds = seconds
        self.inputs_only = inputs_only  # fit only the synthesis inputs' offsets
        self.transfer = transfer  # also give each view its reconstructed recorded neighbour
        self.adapt = adapt  # fine-tune a copy of the model's fusion blocks on the patient first
        self.adapt_options = adapt_options or {}  # passed to panorama.adapt.adapt (part, steps, lr)
        self.offsets = None
        self.view_offsets = None  # (recorded leads, 2) for transfer's neighbours, from a leave-one-out fit
        self.fitted_transfer = None
        self.shared_transfer = None
        self.adaptation = None
        self.active = synth  # this record's synthesizer: the shared one, or its adapted copy
        self.notes: Counter = Counter()  # per-record outcomes of adaptation and transfer

    def prepare(self, record: Record, task: Task) -> None:
        from panorama.calibrate import calibrate
        from panorama.geometry import resolve_view

        scored = {v.name for v in task.views}
        names = [n for n in record.leads if n not in scored]
        views = [resolve_view(n) for n in names]
        inputs = [v.name for v in task.inputs]
        x = np.stack([record.lead(n) for n in names])[:, : int(round(self.seconds * MODEL_FS))]
        if self.wander is not None:  # the fit window alone: nothing after it leaks in
            x = self.wander.strip(x)
        res = calibrate(self.synth.model, x, views, seconds=self.seconds,
                        inputs=inputs if self.inputs_only else None, device=self.synth.device)
        self.offsets = res.offsets_for(inputs)
        self.view_offsets = None
        if res.swap_refused:  # adaptation and transfer would fit on the same swapped leads: the plain draw
            self.notes[f"electrodes look swapped: {res.swap}"] += 1
            self.active, self.adaptation, self.fitted_transfer, self.shared_transfer = self.synth, None, None, None
            return
        # counted by kind: a reason's figures (seconds, residuals) would give every record a line of its own
        self.notes["calibration accepted" if res.accepted else
                   "calibration rejected: " + re.sub(r"\d+(\.\d+)?", "n", res.reason.split(";")[0])] += 1
        if res.swap:
            self.notes[f"electrodes look swapped, fitted on (within the offsets' reach, or limb leads): {res.swap}"] += 1
        if self.transfer:  # the neighbours' own angles: every recorded lead fitted leave-one-out
            from panorama.transfer import fit_neighbour_offsets  # (none with every recorded lead an input)

            every = fit_neighbour_offsets(self.synth.model, x, views, seconds=self.seconds, device=self.synth.device,
                                          inputs=inputs)
            self.view_offsets = None if every is None else every.offsets_deg
        self.active = self.synth
        if self.adapt:
            from panorama.adapt import adapt
            from panorama.synth import Synthesizer

            ad = adapt(self.synth.model, x, views, inputs, seconds=self.seconds, offsets=self.offsets,
                       device=self.synth.device, **self.adapt_options)
            self.adaptation = ad
            self.notes["adapted" if ad.accepted else f"adaptation not used: {ad.reason}"] += 1
            if ad.accepted:
                self.active = Synthesizer(ad.model, self.synth.meta, self.synth.device)
        if self.transfer:  # with every recorded lead an input, it only interpolates along the line
            from panorama.transfer import fit_transfer

            tr = fit_transfer(self.active, x, views, inputs, seconds=self.seconds, offsets=self.offsets,
                              view_offsets=self.view_offsets)
            self.fitted_transfer = tr
            # views the adaptation does not cover are drawn by the shared model, with neighbours
            # continued by it; only limb or Frank views can have one (every torso lead is
            # covered), so that second fit is rare
            self.shared_transfer = tr
            if self.active is not self.synth:
                far = [v for v in task.views if not self.adaptation.covers(v)]
                self.shared_transfer = fit_transfer(
                    self.synth, x, views, inputs, seconds=self.seconds, offsets=self.offsets,
                    view_offsets=self.view_offsets) if any(tr.neighbours(far)) else None
            if tr.fitted:
                self.notes["transfer fitted"] += 1
            elif any(tr.line(task.views)):
                self.notes[f"transfer along the precordial line only ({tr.reason})"] += 1
            else:
                self.notes[f"transfer not used: {tr.reason}"] += 1

    def draw(self, x, inputs, queries):
        from panorama.adapt import synthesize_split

        def via(synth, transfer):
            if transfer is not None:
                return lambda qs: transfer.synthesize(synth, x, qs, offsets=self.offsets)
            return lambda qs: synth(x, inputs, qs, offsets=self.offsets)

        return synthesize_split(self.adaptation, via(self.active, self.fitted_transfer),
                                via(self.synth, self.shared_transfer), queries, x.shape[1])


class PatientLeastSquaresMethod:
    """Per-patient least squares from the inputs to each scored view, fitted on the first
    ``seconds`` of the same record — with the scored views themselves, which no synthesis
    method may see. A reference for what a patient's own linear map reaches (the data
    README's "per-patient least squares on the first 5 s"), not a synthesis method."""

    name = "patient_lsq"

    def __init__(self, seconds: float = CALIB_S):
        self.seconds = seconds
        self.weights: np.ndarray | None = None

    def prepare(self, record: Record, task: Task) -> None:
        n = int(round(self.seconds * MODEL_FS))
        x, y = _xy(Case(Path(record.name), record), task)
        x, y = centre(x[:, :n]), centre(y[:, :n])
        self.weights = np.linalg.lstsq(x.T, y.T, rcond=None)[0].T  # (views, inputs)

    def predict(self, x, inputs, queries):
        if self.weights is None:
            raise ValueError("per-patient least squares is fitted per record: call prepare first")
        return (self.weights @ x.astype(np.float64)).astype(np.float32)


def method_label(calibrate_s: float, transfer: bool = False, adapt: bool = False, wander: bool = False) -> str:
    """The evaluation table's row name for the model with these Stage III steps."""
    tail = "+wander" if wander else ""
    if calibrate_s <= 0:
        return "model" + tail
    return f"model+calib{calibrate_s:g}s" + ("+adapt" if adapt else "") + ("+transfer" if transfer else "") + tail


def make_method(name: str, model_path: Path | None = None, calibrate_s: float = 0.0,
                calibrate_fit: str = "inputs", transfer: bool = False, adapt: bool = False,
                wander: bool = False) -> Method:
    if (transfer or adapt) and calibrate_s <= 0:
        raise ValueError("neighbour transfer and patient adaptation fit on the calibration window: "
                         "give calibrate_s > 0 (--calibrate SECONDS)")
    if name == "model":
        from panorama.synth import Synthesizer
        from panorama.wander import WANDER

        synth = Synthesizer.load(model_path)
        w = WANDER if wander else None
        if calibrate_s > 0:
            return CalibratedModelMethod(synth, calibrate_s, inputs_only=calibrate_fit == "inputs",
                                         transfer=transfer, adapt=adapt, wander=w)
        return ModelMethod(synth, w)
    table = {"zero": ZeroMethod, "dipole": DipoleMethod, "kors": KorsMethod, "lsq": LeastSquaresMethod,
             "patient_lsq": PatientLeastSquaresMethod}
    if name not in table:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(table)}")
    return table[name]()


def evaluate(cases: list[Case], task: Task, method: Method | str,
             fit_cases: list[Case] | None = None, progress: bool = True, model_path: Path | None = None,
             calibrate_s: float = 0.0, calibrate_fit: str = "inputs", transfer: bool = False,
             adapt: bool = False, wander: bool = False, bands: bool = False) -> Result:
    """Score ``method`` on every case. Population least squares is fitted on ``fit_cases``
    when given, else cross-fitted in folds so no record is predicted by a fit that saw it.
    ``bands``: also say, per view, where in frequency the error lies (``Result.bands``: the
    mean over records of each band's share of the squared error, and of the PSNR without
    that band's error, over the records where some error is left; :func:`panorama.metrics.error_bands`)."""
    if not cases:
        raise RecordError("no record could be scored under this protocol")
    method = (make_method(method, model_path, calibrate_s, calibrate_fit, transfer, adapt, wander)
              if isinstance(method, str) else method)
    preds: dict[str, np.ndarray] = {}
    if isinstance(method, LeastSquaresMethod):
        preds = _lsq_predictions(cases, task, fit_cases)
    scores, parts = {}, []  # parts: per record, error_bands(...) when bands
    sl = task.scored_slice
    for case in tqdm(cases, desc=f"scoring {method.name}", unit="rec", disable=not progress, leave=False):
        x, y = _xy(case, task)
        if hasattr(method, "prepare"):
            method.prepare(case.record, task)
        p = preds[case.record.name] if preds else method.predict(x, task.inputs, task.views)
        scale = case.record.signals[: case.scale_n, sl]
        scores[case.record.name] = score_record(y[:, sl], p[:, sl], scale, [v.name for v in task.views])
        if bands:
            parts.append(error_bands(y[:, sl], p[:, sl], scale, MODEL_FS))
    sources = {c.record.name: c.record.source.split(" (")[0] or "unknown" for c in cases}
    by_source = {src: summarise([sc for n, sc in scores.items() if sources[n] == src])
                 for src in sorted(set(sources.values()))}
    per_view = {}
    if parts:
        shares = np.mean([a for a, _ in parts], axis=0)
        without = np.stack([w for _, w in parts])  # a record whose error lies in one band has inf there:
        without = np.nanmean(np.where(np.isfinite(without), without, np.nan), axis=0)  # the others' mean
        per_view = {v.name: {"bands": band_names(), "share": [round(float(x), 4) for x in shares[i]],
                             "psnr_db_without": [round(float(x), 2) for x in without[i]]}
                    for i, v in enumerate(task.views)}
    return Result(summarise(list(scores.values())), scores, by_source=by_source,
                  notes=Counter(getattr(method, "notes", {})), bands=per_view)


def _lsq_predictions(cases, task, fit_cases) -> dict[str, np.ndarray]:
    out = {}
    if fit_cases:
        m = LeastSquaresMethod().fit(*zip(*(_xy(c, task) for c in fit_cases)), task.inputs, task.views)
        return {c.record.name: m.predict(_xy(c, task)[0], task.inputs, task.views) for c in cases}
    folds = max(2, min(LSQ_FOLDS, len(cases)))
    if len(cases) < 2:
        raise RecordError("population least squares needs at least 2 scorable records to cross-fit")
    for k in range(folds):
        test = [c for i, c in enumerate(cases) if i % folds == k]
        train = [c for i, c in enumerate(cases) if i % folds != k]
        m = LeastSquaresMethod().fit(*zip(*(_xy(c, task) for c in train)), task.inputs, task.views)
        out.update({c.record.name: m.predict(_xy(c, task)[0], task.inputs, task.views) for c in test})
    return out


def format_bands(label: str, bands: dict[str, dict], psnr: dict[str, float]) -> str:
    """Lines saying where each view's error lies: each band's share of the squared error and
    the PSNR the view would have without that band's error (``psnr``: the view's as scored)."""
    lines = [f"{label}: where the error lies (share of the squared error; PSNR without that band's error)"]
    for v, b in bands.items():
        parts = [f"{name} {share:.0%} ({w:.2f})" for name, share, w in zip(b["bands"], b["share"], b["psnr_db_without"])]
        lines.append(f"  {v} ({psnr[v]:.2f} dB): " + ", ".join(parts))
    return "\n".join(lines)


def format_table(rows: dict[str, dict]) -> str:
    """Rows of ``summarise`` outputs keyed by label → an aligned text table (overall + per view)."""
    w = max(24, *(len(label) + 2 for label in rows))
    head = f"{'method':<{w}}{'view':<8}{'PSNR dB':>9}{'SSIM':>8}{'RMSE µV':>10}{'r':>7}{'records':>9}"
    lines = [head, "-" * len(head)]
    for label, s in rows.items():
        o = s["overall"]
        lines.append(f"{label:<{w}}{'all':<8}{o['psnr_db']:>9.2f}{o['ssim']:>8.3f}"
                     f"{o['rmse_uv_median']:>10.0f}{o['r_median']:>7.3f}{o['records']:>9d}")
        for v, pv in s["per_view"].items():
            lines.append(f"{'':<{w}}{v:<8}{pv['psnr_db']:>9.2f}{pv['ssim']:>8.3f}"
                         f"{pv['rmse_uv_median']:>10.0f}{pv['r_median']:>7.3f}")
    return "\n".join(lines)
