"""On-the-fly calibration: clean refusals, and recovery of known displacements on the simulator."""

import numpy as np
import pytest
import torch

from panorama.calibrate import calibrate
from panorama.geometry import NAMED, STANDARD_12, resolve_views
from panorama.model import ModelConfig, NefNetV2
from panorama.synth import DEFAULT_CHECKPOINTS, Synthesizer
from training.simulator import render, sample_patient

CAL = [n for n in STANDARD_12 if n not in ("V2", "V6")]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return NefNetV2(ModelConfig(channels=16, embed_dim=16, heads=2, blocks=1, encoder_blocks=2))


def _patient(seed, displacement):
    rng = np.random.default_rng(seed)
    table = np.array([[NAMED[n].theta, NAMED[n].phi] for n in CAL], dtype=float)
    true = table.copy()
    true[CAL.index("V1"):] += displacement
    return render(sample_patient(rng, "sinus"), true, CAL, 6.0, 500).astype(np.float32), true - table


def test_fewer_seconds_than_asked(tiny):
    x, _ = _patient(0, 0.0)
    res = calibrate(tiny, x[:, :1000], resolve_views(",".join(CAL)))
    assert not res.accepted and "only 2.0 s recorded, 5 s asked" in res.reason
    assert np.all(res.offsets_deg == 0)


def test_a_single_lead_or_flat_leads_cannot_calibrate(tiny):
    x, _ = _patient(0, 0.0)
    res = calibrate(tiny, x[:1], resolve_views("I"))
    assert not res.accepted and "usable lead" in res.reason
    flat = x.copy()
    flat[2:] = 0.05  # every lead but I and II off
    res = calibrate(tiny, flat, resolve_views(",".join(CAL)))
    assert not res.accepted and "V1 flat" in res.reason and np.all(res.offsets_deg == 0)


def test_limb_inputs_alone_keep_the_table_angles_unless_asked(tiny):
    x, _ = _patient(0, 12.0)
    views = resolve_views(",".join(CAL))
    res = calibrate(tiny, x, views, inputs=["I", "II", "III"])
    assert not res.accepted and "no usable chest lead" in res.reason and np.all(res.offsets_deg == 0)
    assert "V1" in res.used and res.fitted == []  # the leads were usable; nothing was fitted
    moved = calibrate(tiny, x, views, inputs=["I", "II", "V3"], move_far_field=True, min_gain=0.0)
    assert set(moved.fitted) == {"I", "II", "V3"}  # III beside I and II is predicted, never an input


def test_noise_only_leads_are_refused(tiny):
    noise = np.random.default_rng(1).standard_normal((len(CAL), 3000)).astype(np.float32) * 0.2
    res = calibrate(tiny, noise, resolve_views(",".join(CAL)))
    assert not res.accepted and "noise-only" in res.reason


def test_bad_arguments_are_value_errors(tiny):
    x, _ = _patient(0, 0.0)
    with pytest.raises(ValueError, match="expected"):
        calibrate(tiny, x, resolve_views("I,II"))
    with pytest.raises(ValueError, match="model rate"):
        calibrate(tiny, x, resolve_views(",".join(CAL)), fs=250)
    with pytest.raises(ValueError, match="axes"):
        calibrate(tiny, x, resolve_views(",".join(CAL)), axes="psi")
    with pytest.raises(ValueError, match="patience"):
        calibrate(tiny, x, resolve_views(",".join(CAL)), patience=0)


def _fit_displaced(shift, seeds=range(4), **kw):
    synth = Synthesizer.load(DEFAULT_CHECKPOINTS["pretrained"])
    chest = [CAL.index(n) for n in ("V1", "V3", "V4", "V5")]
    for seed in seeds:
        x, true_off = _patient(seed, shift)
        yield calibrate(synth.model, x, resolve_views(",".join(CAL)), **kw), true_off, chest


def test_calibration_lowers_the_residual_of_displaced_electrodes_deterministically():
    shift = np.array([0.0, 12.0])  # every chest electrode 12° further round to the left
    runs = list(_fit_displaced(shift, seeds=range(2)))
    for res, _, _ in runs:
        assert res.accepted and res.residual_after_uv < 0.98 * res.residual_before_uv
        assert np.all(np.abs(res.offsets_deg) <= 30.0 + 1e-6)  # bounded
        # a monitor's montage: I and II move too; the leads derived from them are never inputs
        derived = [CAL.index(n) for n in ("III", "aVR", "aVL", "aVF")]
        assert not res.offsets_deg[derived].any() and set(res.fitted) == {"I", "II", "V1", "V3", "V4", "V5"}
    kept = next(_fit_displaced(shift, seeds=[0], move_far_field=False))[0]  # asked: chest leads only
    assert set(kept.fitted) == {"V1", "V3", "V4", "V5"} and not kept.offsets_deg[[0, 1]].any()
    again = next(_fit_displaced(shift, seeds=[0]))[0]
    assert np.array_equal(again.offsets_deg, runs[0][0].offsets_deg)  # deterministic


def test_the_montage_chooses_which_angles_move():
    """Every recorded torso lead an input (a monitor): theta and phi move. Other torso leads
    supervising a subset of inputs: phi alone, theta stays at the table. Asked: as asked."""
    shift = np.array([0.0, 12.0])
    every, _, chest = next(_fit_displaced(shift, seeds=[0]))
    assert every.accepted and every.axes == "theta,phi"
    assert np.abs(every.offsets_deg[chest, 0]).max() > 1.0 and np.abs(every.offsets_deg[chest, 1]).max() > 1.0
    inputs = ["I", "II", "V3", "V4"]  # V1, V5 and the limb leads supervise
    subset, _, _ = next(_fit_displaced(shift, seeds=[0], inputs=inputs))
    assert subset.accepted and subset.axes == "phi" and not subset.offsets_deg[:, 0].any()
    assert set(subset.fitted) == {"V3", "V4"} and np.abs(subset.offsets_deg[:, 1]).max() > 1.0
    asked, _, _ = next(_fit_displaced(shift, seeds=[0], axes="phi"))
    assert asked.axes == "phi" and not asked.offsets_deg[:, 0].any()
    assert "(theta,phi, prior weight 0.03)" in every.summary() and "(phi, prior weight 0.03)" in asked.summary()


def test_supervising_chest_leads_move_as_queries_so_their_misplacement_is_not_pinned_on_the_inputs():
    """I, II, V3 as inputs, V1, V4, V5 supervising and displaced 15° to the left, V3 where
    the table says: the supervising leads' own offsets follow the displacement, V3's stays
    nearer zero than when they are held at the table, and the residual ends lower. A monitor
    (every lead an input) has no supervising lead to move."""
    synth = Synthesizer.load(DEFAULT_CHECKPOINTS["pretrained"])
    table = np.array([[NAMED[n].theta, NAMED[n].phi] for n in CAL], dtype=float)
    true = table.copy()
    true[[CAL.index(n) for n in ("V1", "V4", "V5")], 1] += 15.0
    views = resolve_views(",".join(CAL))
    for seed in (0, 1):
        x = render(sample_patient(np.random.default_rng(seed), "sinus"), true, CAL, 6.0, 500).astype(np.float32)
        free = calibrate(synth.model, x, views, inputs=["I", "II", "V3"], min_gain=0.0)
        held = calibrate(synth.model, x, views, inputs=["I", "II", "V3"], min_gain=0.0, move_supervising=False)
        assert free.nuisance == ["V1", "V4", "V5"] and held.nuisance == []
        assert not free.nuisance_offsets_deg[:, 0].any()  # the subset's axes: phi only
        assert np.median(free.nuisance_offsets_deg[:, 1]) > 5.0
        assert abs(free.offsets_for(["V3"])[0, 1]) < abs(held.offsets_for(["V3"])[0, 1])
        assert free.residual_after_uv < held.residual_after_uv
        assert free.fitted == ["V3"] and "moved as queries: V1, V4, V5" in free.summary()
    monitor = calibrate(synth.model, x, views, min_gain=0.0)
    assert monitor.nuisance == [] and "queries" not in monitor.summary()


def test_a_monitor_with_few_chest_leads_holds_its_offsets_harder(tiny):
    """A monitor with fewer than 4 chest leads (all inputs) fits under the heavier prior
    (README: with V1, V3, V5 it lifted V2, V4, V6 on validation and spared the posterior
    views on the simulator); with 4 or more, and in a subset, the weights as before."""
    x, _ = _patient(0, np.array([0.0, 12.0]))
    few = [CAL.index(n) for n in ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V3", "V5")]
    res = calibrate(tiny, x[few], resolve_views(",".join(CAL[i] for i in few)), min_gain=0.0)
    assert res.axes == "theta,phi" and res.prior_weight == 0.3 and {"I", "II"} <= set(res.fitted)
    every = calibrate(tiny, x, resolve_views(",".join(CAL)), min_gain=0.0)
    assert every.axes == "theta,phi" and every.prior_weight == 0.03
    subset = calibrate(tiny, x, resolve_views(",".join(CAL)), inputs=["I", "II", "V3"], min_gain=0.0)
    assert subset.axes == "phi" and subset.prior_weight == 0.1 and subset.fitted == ["V3"]


def test_the_fit_stops_after_patience_steps_without_progress():
    shift = np.array([0.0, 12.0])
    short = next(_fit_displaced(shift, seeds=[0], patience=1))[0]
    long = next(_fit_displaced(shift, seeds=[0], patience=6))[0]
    # the same deterministic path: the longer wait runs at least 5 steps past where the
    # shorter one stopped (or up to the step limit), and never ends worse
    assert short.steps < long.steps and (long.steps >= short.steps + 5 or long.steps == 15)
    assert long.residual_after_uv <= short.residual_after_uv * 1.02


@pytest.mark.xfail(strict=True, reason="issue 4 target not reached: the shipped model does not "
                   "identify electrode displacements (panorama bench calibration --montage 12: median error "
                   "8.4 deg where the table is 7.3 off; --identifiability: 9.3; an ideal fit in this "
                   "simulator would reach 5.4, the lead-vector floor)")
def test_recovers_a_known_displacement():
    shift = np.array([0.0, 12.0])
    errs = [np.abs(res.offsets_deg[chest] - off[chest]).mean() for res, off, chest in _fit_displaced(shift)]
    assert np.mean(errs) < 3.0  # the table itself is 6 deg off on average per component


def test_the_calibration_bench_reports_its_ceiling():
    """bench calibration scores no calibration, the fitted offsets, and the inputs' real
    offsets (what a perfect fit would give this model) on the same simulated patients, in
    the protocol's montage and in a 12-lead monitor's."""
    from training.bench import bench_calibration

    synth = Synthesizer.load(DEFAULT_CHECKPOINTS["pretrained"])
    for montage, view in (("3", "V2"), ("12", "V3R")):
        res = bench_calibration(synth, patients=2, montage=montage)
        assert res["patients"] == 2 and 0 <= res["accepted"] <= 2
        for key in ("gain_db", "gain_exact_offsets_db", f"gain_{view}_db", "calibration_12_leads_s_median",
                    "warm_up_s"):
            assert np.isfinite(res[key]), key
        # offset errors are over accepted fits' chest leads: none accepted, none measured
        assert np.isfinite(res["offset_err_chest_median_deg"]) == (res["accepted"] > 0)
        # the real offsets are the truth the model was trained to read: they never hurt much
        assert res["gain_exact_offsets_db"] > -0.1
        assert res["psnr_uncalibrated_db"] + res["gain_exact_offsets_db"] > 20
    assert res["accepted"] == 2 and res["montage"].endswith("-> V7,V8,V9,V3R,V4R,V5R")


def test_the_lead_vector_floor_measures_how_patients_differ(tmp_path):
    """bench calibration --identifiability's floor: one patient differs from no one; several
    point the same lead apart, less so once each one's common rotation is taken out, and a
    moved electrode turns its lead vector by about as much as it moved."""
    from training.floor import bench_lead_vectors

    one = bench_lead_vectors(1)
    assert one["leadvector_spread_deg_median"] == 0 and one["leadvector_floor_deg"] == 0
    res = bench_lead_vectors(4, figure=tmp_path / "floor.png")
    assert (tmp_path / "floor.png").stat().st_size > 10_000
    assert 0 < res["leadvector_spread_after_rotation_deg_median"] <= res["leadvector_spread_deg_median"]
    assert 0.5 < res["leadvector_turn_per_deg_median"] < 2
    assert res["leadvector_floor_deg"] == pytest.approx(
        res["leadvector_spread_after_rotation_deg_median"] / res["leadvector_turn_per_deg_median"], abs=0.1)
    assert res["leadvector_floor_per_axis_deg"] == pytest.approx(0.573 * res["leadvector_floor_deg"], abs=0.1)
    assert 0 < res["leadvector_nondipolar_share_median"] < 1
    # an ideal fit weighs the prior against the reading: better than either alone
    prior_median = 0.6745 * 10.6
    assert 0 < res["leadvector_ideal_fit_per_axis_deg"] < min(prior_median, res["leadvector_floor_per_axis_deg"])


def test_warm_up_runs_a_fit_and_leaves_the_model_as_it_was(tiny):
    from panorama.calibrate import warm_up

    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    flags = [p.requires_grad for p in tiny.parameters()]
    res = warm_up(tiny)
    assert res.steps > 0 and len(res.used) == 12  # the synthetic recording passes every check
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert [p.requires_grad for p in tiny.parameters()] == flags


def test_a_monitors_calibration_improves_v2_and_v6_on_real_validation_records(data_dir):
    """Every recorded lead but the scored V2, V6 an input: fitting theta and phi of every input
    lead, I and II included, lifts the unseen views on real records (README: +1.08 dB on all 59)."""
    from training import splits
    from training.evaluate import Task, evaluate, load_cases

    paths = splits.select(sorted(p.with_suffix("") for p in (data_dir / "ludb").glob("*.hea")), "val")[:12]
    task = Task(resolve_views("I,II,III,aVR,aVL,aVF,V1,V3,V4,V5"), resolve_views("V2,V6"))
    cases, _ = load_cases(paths, task, progress=False)
    plain = evaluate(cases, task, "model", progress=False).summary["overall"]
    cal = evaluate(cases, task, "model", progress=False, calibrate_s=5).summary["overall"]
    assert cal["records"] == plain["records"] >= 10
    # session 14 (15 steps, I and II moving): 30.43 -> 31.71 dB, median RMSE 88 -> 82 µV (median
    # r 0.956 -> 0.961); with I and II at the table 31.77 dB, 78 µV
    assert cal["psnr_db"] > plain["psnr_db"] + 0.5, (plain, cal)
    assert cal["rmse_uv_median"] < plain["rmse_uv_median"] - 4
