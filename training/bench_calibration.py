"""``panorama bench calibration``: on-the-fly calibration on simulated patients with displaced
electrodes (offset recovery, synthesis gain, time) and how well the model could identify an
electrode's angle at all (``--identifiability``). The command is in training/bench.py."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from tqdm import tqdm

from panorama.calibrate import calibrate, warm_up
from panorama.geometry import NAMED, STANDARD_12, redundant_limb_leads, resolve_views
from panorama.metrics import centre, score_record, summarise
from panorama.records import MODEL_FS
from panorama.synth import Synthesizer


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
