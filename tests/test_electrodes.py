"""Swapped electrodes (panorama/electrodes.py): named on real and simulated records, never on
the same records as recorded, and what calibration, synthesis and the bench do with them."""

import json

import numpy as np
import pytest

from panorama.calibrate import calibrate
from panorama.electrodes import CHEST, LEADS, check_electrodes, load_covariance, relabel, swaps
from panorama.geometry import STANDARD_12, resolve_views
from panorama.records import read_record, write_record
from panorama.synth import Synthesizer
from training.simulator import simulate


@pytest.fixture(scope="module")
def ludb001(data_dir):
    return read_record(data_dir / "ludb" / "ludb001")  # (12, 5000) mV, the standard order


def swapped(x, names, a, b):
    y = x.copy()
    y[[names.index(a), names.index(b)]] = x[[names.index(b), names.index(a)]]
    return y


def test_a_real_record_fits_its_labels_and_each_swap_is_named(ludb001):
    x, names = ludb001.signals, ludb001.leads
    clean = check_electrodes(x, names, ludb001.fs)
    assert not clean.suspect and clean.reason.startswith("labels fit")
    assert len(clean.tested) == 2 + 15  # two limb reversals and every pair of the six chest leads
    for a, b in (("V1", "V5"), ("V2", "V6"), ("V1", "V4")):
        res = check_electrodes(swapped(x, names, a, b), names, ludb001.fs)
        assert res.swap == f"{a} and {b} swapped", res.reason
        assert res.misfit_swapped < 0.4 * res.misfit and "check the electrodes" in res.reason
    # the arm electrodes reversed: I inverted, II and III trade places (aVR and aVL too)
    i, ii, iii = (names.index(n) for n in ("I", "II", "III"))
    arms = x.copy()
    arms[i], arms[ii], arms[iii] = -x[i], x[iii], x[ii]
    assert check_electrodes(arms, names, ludb001.fs).swap == "LA/RA reversed (left and right arm)"
    # the right arm and left leg exchanged: I becomes -III, II becomes -II, III becomes -I, aVR and aVF trade
    avr, avf = names.index("aVR"), names.index("aVF")
    leg = x.copy()
    leg[i], leg[ii], leg[iii], leg[avr], leg[avf] = -x[iii], -x[ii], -x[i], x[avf], x[avr]
    assert check_electrodes(leg, names, ludb001.fs).swap == "RA/LL reversed (right arm and left leg)"


def test_a_simulated_patient_too():
    """Where ../shared is absent: the simulator's patients, with the same population model."""
    s = simulate(0, views=list(LEADS), duration_s=5.0, fs=500, device="diagnostic")
    names = list(s.names)
    assert not check_electrodes(s.signals, names, s.fs).suspect
    assert check_electrodes(swapped(s.signals, names, "V1", "V5"), names, s.fs).swap == "V1 and V5 swapped"
    # each swap is its own inverse: undoing one gives the recording back
    for _, how in swaps(names):
        assert np.allclose(relabel(relabel(s.signals, names, how), names, how), s.signals, atol=1e-6)


def test_too_few_leads_or_seconds_are_not_checked():
    s = simulate(0, views=list(LEADS), duration_s=5.0, fs=500, device="diagnostic")
    names = list(s.names)
    keep = [names.index(n) for n in ("I", "II", "V1", "V3", "V5")]  # 3 chest leads
    res = check_electrodes(swapped(s.signals, names, "V1", "V5")[keep], [names[k] for k in keep], s.fs)
    assert not res.suspect and res.reason == "not checked: needs I, II and 4 chest leads" and not res.tested
    res = check_electrodes(s.signals[:, :500], names, s.fs)
    assert not res.suspect and res.reason == "not checked: under 2 s"
    with pytest.raises(ValueError, match="5 leads of samples for 8 names"):
        check_electrodes(s.signals[:5], names, s.fs)
    holed = swapped(s.signals, names, "V1", "V5")
    holed[names.index("V3"), 100] = np.nan
    res = check_electrodes(holed, names, s.fs)
    assert not res.suspect and res.reason == "not checked: samples missing" and not res.tested


def test_the_shipped_covariance_and_a_bad_one(tmp_path):
    c = load_covariance()
    assert c.shape == (8, 8) and np.allclose(c, c.T) and np.all(np.linalg.eigvalsh(c) > 0)
    bad = tmp_path / "cov.json"
    bad.write_text(json.dumps({"leads": ["I", "II"], "covariance": [[1, 0], [0, 1]]}))
    with pytest.raises(ValueError, match="expected the covariance of I, II, V1"):
        load_covariance(bad)


@pytest.fixture(scope="module")
def synth():
    return Synthesizer.load()


def test_calibration_refuses_swapped_electrodes_and_names_them(synth, ludb001):
    views = resolve_views(ludb001.leads)
    x = swapped(ludb001.signals, ludb001.leads, "V1", "V5")
    res = calibrate(synth.model, x, views)
    assert not res.accepted and res.swap == "V1 and V5 swapped" and np.all(res.offsets_deg == 0)
    assert "check the electrodes; table angles kept" in res.reason and res.fitted == []
    assert res.swap_refused and not res.swap_fitted_on  # 70 deg apart: beyond the offsets' 30
    # V1 and V3, 25.5 deg apart: named, and fitted on (the offsets reach them)
    near = calibrate(synth.model, swapped(ludb001.signals, ludb001.leads, "V1", "V3"), views)
    assert near.swap == "V1 and V3 swapped" and near.swap_fitted_on and not near.swap_refused
    assert near.fitted and "(25 deg apart, within the offsets' 30 deg: fitted on)" in near.reason
    # the arm electrodes reversed: named, and fitted on (measured better for the views)
    i, ii, iii, avr, avl = (ludb001.leads.index(n) for n in ("I", "II", "III", "aVR", "aVL"))
    arms = ludb001.signals.copy()
    arms[[i, ii, iii, avr, avl]] = np.stack([-arms[i], arms[iii], arms[ii], arms[avl], arms[avr]])
    limb = calibrate(synth.model, arms, views)
    assert limb.swap == "LA/RA reversed (left and right arm)" and limb.swap_fitted_on and limb.fitted
    assert "(limb electrodes: fitted on)" in limb.reason
    # whatever else calibration decides, a swap is named first: inputs without a chest lead
    limbs = calibrate(synth.model, x, views, inputs=["I", "II"])
    assert limbs.swap_refused and "V1 and V5 swapped" in limbs.reason
    # a window too short to check says so instead of passing for checked
    short = calibrate(synth.model, x, views, seconds=1.5)
    assert short.swap == "" and "electrodes not checked: under 2 s" in short.reason
    # the same record as recorded is fitted (the protocol's leads: I, II, V3 with V1, V4, V5 supervising)
    keep = [i for i, n in enumerate(ludb001.leads) if n not in ("V2", "V6")]
    ok = calibrate(synth.model, ludb001.signals[keep], [views[i] for i in keep], inputs=["I", "II", "V3"])
    assert ok.accepted and ok.swap == ""


def test_synthesize_warns_and_skips_the_fits_on_swapped_electrodes(panorama, ludb001, tmp_path):
    src = write_record(tmp_path / "in", "swapped", swapped(ludb001.signals, ludb001.leads, "V1", "V5"),
                       ludb001.leads, ludb001.fs, [])
    plain = panorama("synthesize", src, "--inputs", ",".join(STANDARD_12), "--views", "V7", "--out", tmp_path / "a")
    assert plain.returncode == 0, plain.stderr
    assert "V1 and V5 swapped, by the look of it" in plain.stderr
    head = read_record(tmp_path / "a" / "swapped").comments
    assert any(c.startswith("warning: V1 and V5 swapped") and c.endswith("views drawn as labelled") for c in head)
    fitted = panorama("synthesize", src, "--views", "V2,V6", "--out", tmp_path / "b", "--calibrate", "5",
                      "--transfer", "--adapt")
    assert fitted.returncode == 0, fitted.stderr
    head = read_record(tmp_path / "b" / "swapped").comments
    assert any(c.startswith("calibration rejected: V1 and V5 swapped") for c in head), head
    assert "patient adaptation and neighbour transfer skipped too: V1 and V5 swapped?" in head
    assert not any(c.startswith(("patient adaptation on", "neighbour", "precordial line")) for c in head), head
    near = write_record(tmp_path / "in", "near", swapped(ludb001.signals, ludb001.leads, "V1", "V3"),
                        ludb001.leads, ludb001.fs, [])
    fitted = panorama("synthesize", near, "--views", "V2,V6", "--out", tmp_path / "c", "--calibrate", "5", "--transfer")
    assert fitted.returncode == 0 and "V1 and V3 swapped, by the look of it" in fitted.stderr
    head = read_record(tmp_path / "c" / "near").comments
    assert any(c.startswith("neighbour transfer from") for c in head), head  # within reach: fitted on
    limbs = panorama("synthesize", src, "--inputs", "I,II", "--views", "V2,V6", "--out", tmp_path / "d",
                     "--calibrate", "5", "--transfer")  # calibration has no chest input to fit: still named
    assert limbs.returncode == 0, limbs.stderr
    head = read_record(tmp_path / "d" / "swapped").comments
    assert "patient adaptation and neighbour transfer skipped too: V1 and V5 swapped?" in head
    assert not any(c.startswith(("neighbour", "precordial line")) for c in head), head


def test_bench_electrodes_on_a_few_records(panorama, data_dir, tmp_path):
    recs = [data_dir / "ludb" / f"ludb{i:03d}" for i in range(1, 21)]
    out = panorama("bench", "electrodes", "--data", *recs, "--split", "all", "--json", tmp_path / "e.json")
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["records"] == 20 and res["false_alarms"] == [] and res["lowest_ratio_as_recorded"] > 0.4
    assert res["swaps"]["V1 and V5 swapped"]["named"] >= 0.9 and "V1 and V5 swapped" in out.stdout
    assert "wrote" not in res  # the shipped covariance only changes with --write


def test_bench_electrodes_leaves_out_an_unreadable_record(panorama, data_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "gone.hea").write_text("gone 12 500 5000\n" + "".join(
        f"gone.dat 16 1000/mV 16 0 0 0 0 {n}\n" for n in ("I", "II", "III", "aVR", "aVL", "aVF", *CHEST)))
    recs = [data_dir / "ludb" / f"ludb{i:03d}" for i in range(1, 6)]
    out = panorama("bench", "electrodes", "--data", *recs, broken, "--split", "all", "--json", tmp_path / "e.json")
    assert out.returncode == 0, out.stderr
    assert "skipped" in out.stderr and "gone" in out.stderr
    assert json.loads((tmp_path / "e.json").read_text())["records"] == 5


def test_bench_electrodes_writes_a_covariance_the_check_loads(data_dir, tmp_path):
    from training.tune_electrodes import tune_electrodes

    recs = [data_dir / "ludb" / f"ludb{i:03d}" for i in range(1, 31)]
    out = tmp_path / "cov.json"
    with pytest.raises(ValueError, match="a population model wants 100 or more .* nothing was written"):
        tune_electrodes(recs, "all", write=out)  # 24 training records: too few to ship
    assert not out.exists()
    res = tune_electrodes(recs, "all", write=out, min_records=10)
    cov = load_covariance(out)
    assert res["wrote"] == str(out) and json.loads(out.read_text())["records"] == res["fitted_on_train_records"] > 0
    assert cov.shape == (8, 8) and np.allclose(cov, cov.T)
    # the fitted model names a swap as the shipped one does
    s = simulate(0, views=list(LEADS), duration_s=5.0, fs=500, device="diagnostic")
    assert check_electrodes(swapped(s.signals, list(s.names), "V1", "V5"), list(s.names), s.fs, cov).swap == \
        "V1 and V5 swapped"


def test_a_missing_population_model_leaves_the_check_undone_not_calibration(synth, monkeypatch, tmp_path):
    """An install that lost lead_covariance.json says the electrodes were not checked; the fit goes on."""
    import panorama.electrodes as electrodes

    s = simulate(0, views=list(STANDARD_12), duration_s=6.0, fs=500, device="diagnostic")
    monkeypatch.setattr(electrodes, "COVARIANCE", tmp_path / "gone.json")
    electrodes.load_covariance.cache_clear()
    try:
        check = check_electrodes(s.signals, list(s.names), s.fs)
        assert not check.tested and check.reason.startswith("not checked: the population model is unreadable")
        res = calibrate(synth.model, s.signals, resolve_views(list(s.names)), seconds=5.0)
        assert "electrodes not checked: the population model is unreadable" in res.reason
    finally:
        electrodes.load_covariance.cache_clear()
