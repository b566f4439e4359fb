"""panorama synthesize on real records: WFDB out, read back by wfdb itself."""

import numpy as np
import pytest
import wfdb

from panorama.geometry import resolve_views
from panorama.records import read_record
from panorama.synth import Synthesizer


def test_synthesize_writes_requested_views_at_the_input_rate(cli, data_dir, tmp_path):
    src = data_dir / "ptb_frank" / "ptb_tseal00"  # 1000 Hz: output must come back at 1000 Hz
    proc = cli("synthesize", str(src) + ".hea", data_dir / "ludb" / "ludb001", "--inputs", "I,II,V3",
               "--views", "V2,V6,V7,120:45", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = wfdb.rdrecord(str(tmp_path / "ptb_tseal00"))
    native = wfdb.rdheader(str(src))
    assert out.sig_name == ["V2", "V6", "V7", "120:45"]
    assert out.fs == native.fs and out.sig_len == native.sig_len
    assert out.units == ["mV"] * 4
    assert any("synthesised by panorama" in c for c in out.comments)
    # the written V2 is the model's V2, less what it draws of a silent heart (up to the int16
    # storage and the rate round trip)
    from panorama.synth import silence

    rec = read_record(src, leads=["I", "II", "V3"])
    s, ins, v2 = Synthesizer.load(), resolve_views("I,II,V3"), resolve_views("V2")
    offset = silence(lambda z: s(z, ins, v2), 3)[0]
    assert -0.2 < offset < -0.05  # the shipped model's own constant on V2
    want = s(rec.signals, ins, v2)[0] - offset
    back = read_record(tmp_path / "ptb_tseal00", leads=["V2"]).signals[0]
    n = min(len(want), len(back))
    assert np.sqrt(np.mean((want[50:n - 50] - back[50:n - 50]) ** 2)) < 0.005
    assert (tmp_path / "ludb001.hea").is_file()


def test_a_lead_asked_back_sits_where_it_was_recorded(panorama, data_dir, tmp_path):
    """The model's own constant is taken off: lead I drawn from I, II, V3 has the recorded I's
    level (it sat 0.15 mV low before), and so do the chest views on average."""
    proc = panorama("synthesize", data_dir / "ludb" / "ludb001", "--views", "I,II,V2,V6", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = wfdb.rdrecord(str(tmp_path / "ludb001")).p_signal.T
    rec = read_record(data_dir / "ludb" / "ludb001", fs=None)
    for i, lead in enumerate(("I", "II")):
        assert abs(np.median(got[i] - rec.lead(lead))) < 0.01, lead
    assert abs(np.mean([np.median(got[i]) - np.median(rec.lead(n)) for i, n in ((2, "V2"), (3, "V6"))])) < 0.03
    assert "from zero" not in proc.stderr
    sig = rec.signals.copy()
    sig[rec.leads.index("II")] += 20.0  # a DC-coupled amplifier's offset: said, not silently drawn from
    proc = panorama("synthesize", _write_like(rec, "dc", sig, tmp_path), "--views", "V2", "--out", tmp_path / "dc")
    assert proc.returncode == 0 and "dc: lead II sits +20 mV from zero: inputs are expected high-passed" in proc.stderr


def test_one_bad_record_does_not_stop_the_others(panorama, data_dir, tmp_path):
    proc = panorama("synthesize", data_dir / "ludb" / "ludb001", tmp_path / "nope", "--views", "V7", "--out", tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no WFDB record" in proc.stderr


def test_synthesize_with_calibration_records_the_offsets(panorama, data_dir, tmp_path):
    proc = panorama("synthesize", data_dir / "ludb" / "ludb001", "--inputs", "I,II,V3", "--views", "V2,V7",
               "--calibrate", "5", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    comments = wfdb.rdheader(str(tmp_path / "ludb001")).comments
    assert any(c.startswith("calibration accepted") or c.startswith("calibration rejected") for c in comments)
    offsets = [c for c in comments if c.startswith("offset ")]
    assert [c.split(":")[0] for c in offsets] == ["offset I", "offset II", "offset V3"]
    assert all(c.isascii() for c in comments)  # WFDB headers are ASCII


def test_onnxruntime_backend_writes_the_same_views_as_torch(panorama, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PANORAMA_CACHE", str(tmp_path / "cache"))
    rec = data_dir / "challenge2021" / "A0001"  # odd rate history, 15 s
    outs = {}
    for backend in ("torch", "onnxruntime"):
        proc = panorama("synthesize", rec, "--views", "V2,V6,V7,120:45", "--backend", backend,
                   "--out", tmp_path / backend)
        assert proc.returncode == 0, proc.stderr
        outs[backend] = wfdb.rdrecord(str(tmp_path / backend / "A0001")).p_signal
    assert np.abs(outs["torch"] - outs["onnxruntime"]).max() <= 1e-3  # 1 µV (the file's resolution)
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx"))  # exported once, cached by hash


def test_synthesize_with_neighbour_transfer_changes_near_views_only(panorama, data_dir, tmp_path):
    rec = data_dir / "ludb" / "ludb001"
    for tag, extra in (("cal", []), ("transfer", ["--transfer"])):
        proc = panorama("synthesize", rec, "--inputs", "I,II,V3", "--views", "V2,V8", "--calibrate", "5", *extra,
                   "--out", tmp_path / tag)
        assert proc.returncode == 0, proc.stderr
    comments = wfdb.rdheader(str(tmp_path / "transfer" / "ludb001")).comments
    assert any(c.startswith("neighbour transfer from") and "V1" in c for c in comments)
    assert [c for c in comments if c.startswith("precordial line:")] == [
        "precordial line: V2 takes 0.2 of 0.50 V1 +0.50 V3"]  # V8 is off the line
    # the neighbours' own offsets, from the leave-one-out fit of every lead but V2 and V8
    assert any(c.startswith("neighbour offset V1: dtheta +0.00 dphi ") and "(leave-one-out fit, " in c
               for c in comments), comments
    cal = read_record(tmp_path / "cal" / "ludb001").signals
    tr = read_record(tmp_path / "transfer" / "ludb001").signals
    assert np.abs(tr[0] - cal[0]).max() > 0.02  # V2, between V1 and V3: corrected
    assert np.abs(tr[1] - cal[1]).max() < 0.01  # V8, posterior: as the model drew it
    proc = panorama("synthesize", rec, "--views", "V2", "--transfer", "--out", tmp_path / "no")
    assert proc.returncode != 0 and "give --calibrate SECONDS too" in proc.stderr


def test_a_monitor_montage_synthesize_interpolates_along_the_precordial_line(panorama, data_dir, tmp_path):
    rec = data_dir / "ludb" / "ludb001"
    for tag, extra in (("cal", []), ("transfer", ["--transfer"])):
        proc = panorama("synthesize", rec, "--inputs", "I,II,III,aVR,aVL,aVF,V1,V3,V4,V5", "--views", "V2,V6",
                   "--calibrate", "5", *extra, "--out", tmp_path / tag)
        assert proc.returncode == 0, proc.stderr
    comments = wfdb.rdheader(str(tmp_path / "transfer" / "ludb001")).comments
    assert "neighbour transfer not used: no usable recorded lead beside the inputs" in comments
    assert [c for c in comments if c.startswith("precordial line:")] == [
        "precordial line: V2 takes 0.2 of 0.50 V1 +0.50 V3", "precordial line: V6 takes 0.2 of 2.00 V5 -1.00 V4"]
    assert not any(c.startswith("neighbour offset") for c in comments)  # nothing continued, nothing fitted
    cal = read_record(tmp_path / "cal" / "ludb001").signals
    tr = read_record(tmp_path / "transfer" / "ludb001").signals
    assert np.abs(tr - cal).max(axis=1).min() > 0.01  # both views moved toward the interpolation


def test_synthesize_with_patient_adaptation_notes_it_and_changes_the_views(panorama, data_dir, tmp_path):
    rec = data_dir / "ludb" / "ludb001"
    for tag, extra in (("transfer", []), ("adapt", ["--adapt"])):
        proc = panorama("synthesize", rec, "--inputs", "I,II,V3", "--views", "V2,V6", "--calibrate", "5", "--transfer",
                   *extra, "--out", tmp_path / tag)
        assert proc.returncode == 0, proc.stderr
    comments = wfdb.rdheader(str(tmp_path / "adapt" / "ludb001")).comments
    assert any(c.startswith("patient adaptation on V1, V3, V4, V5: residual") for c in comments), comments
    assert any(c.startswith("neighbour transfer from") for c in comments)
    assert "precordial line: V6 takes 0.2 of 2.00 V5 -1.00 V4" in comments  # drawn by the adapted copy
    tr = read_record(tmp_path / "transfer" / "ludb001").signals
    ad = read_record(tmp_path / "adapt" / "ludb001").signals
    assert ad.shape == tr.shape and np.abs(ad - tr).max() > 0.01
    proc = panorama("synthesize", rec, "--views", "V2", "--adapt", "--out", tmp_path / "no")
    assert proc.returncode != 0 and "give --calibrate SECONDS too" in proc.stderr
    proc = panorama("synthesize", rec, "--views", "V2", "--calibrate", "5", "--adapt", "--backend", "onnxruntime",
               "--out", tmp_path / "no")
    assert proc.returncode != 0 and "use --backend torch" in proc.stderr


def test_synthesize_with_wander_changes_chest_views_only_and_says_so(panorama, data_dir, tmp_path):
    rec = data_dir / "ludb" / "ludb001"
    for tag, extra in (("plain", []), ("wander", ["--wander"])):
        proc = panorama("synthesize", rec, "--inputs", "I,II,V3", "--views", "V2,V7,VX", *extra, "--out", tmp_path / tag)
        assert proc.returncode == 0, proc.stderr
    comments = wfdb.rdheader(str(tmp_path / "wander" / "ludb001")).comments
    assert any(c.startswith("wander: baseline below 0.5 Hz removed") and c.endswith(
        "(chest views given the drift: V2,V7; on the line beside chest inputs: none)") for c in comments), comments
    plain = read_record(tmp_path / "plain" / "ludb001").signals
    wa = read_record(tmp_path / "wander" / "ludb001").signals
    assert np.abs(wa[:2] - plain[:2]).max() > 0.02  # chest views: drawn without the drift, shared drift back
    # the Frank lead: as drawn from the recording. Not bit-equal: it is drawn in a batch of its
    # own there, and PyTorch's kernels may sum in another order for another batch shape
    # (0.04 uV on 2 of 5000 samples with the packages of session 9)
    assert np.abs(wa[2] - plain[2]).max() < 1e-3
    proc = panorama("synthesize", rec, "--inputs", "I,II,V3", "--views", "V2,V6", "--calibrate", "5", "--transfer",
               "--adapt", "--wander", "--out", tmp_path / "all")
    assert proc.returncode == 0, proc.stderr
    assert read_record(tmp_path / "all" / "ludb001").signals.shape[0] == 2


def test_an_input_asked_for_as_a_view_still_calibrates(panorama, data_dir, tmp_path):
    proc = panorama("synthesize", data_dir / "ludb" / "ludb001", "--inputs", "I,II,V3", "--views", "V3,V7",
               "--calibrate", "5", "--transfer", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    comments = wfdb.rdheader(str(tmp_path / "ludb001")).comments
    assert not any("no usable chest lead" in c for c in comments)  # V3 stays an input of the fit
    assert any(c.startswith("neighbour transfer from") for c in comments)


MONITOR = "I,II,III,aVR,aVL,aVF,V1,V3,V4,V5"


def test_blend_with_writes_the_mean_of_the_monitor_and_the_subset_draws(panorama, data_dir, tmp_path):
    from edge.synthesize import synthesize_record

    rec, views, synth = data_dir / "ludb" / "ludb001", resolve_views("V2,V6"), Synthesizer.load()
    stage3 = dict(calibrate_s=5.0, transfer=True, adapt_model=True, wander=True)
    for tag, inputs in (("monitor", MONITOR), ("subset", "I,II,V3")):
        synthesize_record(synth, rec, resolve_views(inputs), views, tmp_path / tag, **stage3)
    synthesize_record(synth, rec, resolve_views(MONITOR), views, tmp_path / "blend",
                      blend_with=resolve_views("I,II,V3"), **stage3)
    monitor, subset, blend = (read_record(tmp_path / t / "ludb001").signals for t in ("monitor", "subset", "blend"))
    assert np.abs(monitor - subset).mean() > 0.01  # two draws that differ ...
    assert np.abs(blend - (monitor + subset) / 2).max() < 1e-3  # ... and their mean (1 µV: the file's storage)
    comments = wfdb.rdheader(str(tmp_path / "blend" / "ludb001")).comments
    assert f"blend: the mean of the draw from {MONITOR} and the draw from I,II,V3" in comments
    # each draw's own Stage III, named: the subset calibrates V3 against the other leads and continues them
    assert any(c.startswith("from I,II,V3: neighbour transfer from V1, V4, V5") for c in comments), comments
    assert "neighbour transfer not used: no usable recorded lead beside the inputs" in comments  # the monitor's
    from edge.synthesize import check_blend

    inputs = resolve_views(MONITOR)
    for subset, seconds, why in (("I,II,V3", 0.0, "give --calibrate SECONDS too"),
                                 (MONITOR, 5.0, "it names them all")):
        with pytest.raises(ValueError, match=why):
            check_blend(inputs, resolve_views(subset), seconds)
    proc = panorama("synthesize", rec, "--inputs", MONITOR, "--views", "V6", "--blend-with", "I,II,V2", "--calibrate", "5",
               "--out", tmp_path / "no")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "--blend-with must name some but not all of --inputs" in proc.stderr and "V2 is not among them" in proc.stderr
    assert not (tmp_path / "no").exists()


def test_bad_leads_are_found_at_the_records_own_rate_and_left_out_by_name(panorama, data_dir, tmp_path):
    """A 1000 Hz record: an input clipped at a rail is refused (resampled to 500 Hz the rail is
    smeared and passed before), a noise-only supervising lead is left out of every Stage III
    step and named in the header, and --calibrate takes 0 or a finite second or more."""
    src = read_record(data_dir / "ptb_frank" / "ptb_tseal00", fs=None)
    assert src.fs == 1000
    sig = src.signals.copy()
    v1, v3 = src.leads.index("V1"), src.leads.index("V3")
    sig[v1] = np.random.default_rng(1).standard_normal(sig.shape[1]) * sig[v1].std()
    wfdb.wrsamp("noisy", fs=1000, units=["mV"] * len(src.leads), sig_name=src.leads, p_signal=sig.T,
                fmt=["16"] * len(src.leads), adc_gain=[1000.0] * len(src.leads), baseline=[0] * len(src.leads),
                write_dir=str(tmp_path))
    proc = panorama("synthesize", tmp_path / "noisy", "--inputs", "I,II,V3", "--views", "V2,V6", "--calibrate", "5",
                    "--transfer", "--adapt", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    comments = wfdb.rdheader(str(tmp_path / "out" / "noisy")).comments
    assert "left out of Stage III, unusable in the first 5 s: V1 noise-only" in comments, comments
    assert not any(c.startswith("neighbour offset V1") for c in comments)  # never continued or fitted
    clipped = src.signals.copy()
    top = np.percentile(clipped[v3], 90)
    clipped[v3] = np.minimum(clipped[v3], top)
    wfdb.wrsamp("clipped", fs=1000, units=["mV"] * len(src.leads), sig_name=src.leads, p_signal=clipped.T,
                fmt=["16"] * len(src.leads), adc_gain=[1000.0] * len(src.leads), baseline=[0] * len(src.leads),
                write_dir=str(tmp_path))
    proc = panorama("synthesize", tmp_path / "clipped", "--inputs", "I,II,V3", "--views", "V2", "--out", tmp_path / "c")
    assert proc.returncode != 0 and "V3 saturated; choose other --inputs" in proc.stderr, proc.stderr
    for bad in ("inf", "nan", "-5", "0.001"):
        proc = panorama("synthesize", tmp_path / "noisy", "--views", "V2", "--calibrate", bad, "--out", tmp_path / "n")
        assert proc.returncode == 2 and "calibration takes 0 (none) or at least 1 s" in proc.stderr, (bad, proc.stderr)


def _write_like(src, name, sig, where, leads=None):
    leads = leads or src.leads
    wfdb.wrsamp(name, fs=src.fs, units=["mV"] * len(leads), sig_name=leads, p_signal=np.asarray(sig).T,
                fmt=["16"] * len(leads), adc_gain=[1000.0] * len(leads), baseline=[0] * len(leads),
                write_dir=str(where))
    return where / name


def test_an_input_off_for_part_of_the_record_is_not_drawn_from_there(panorama, data_dir, tmp_path):
    """V3 off (flat) from 5 s on: the views there are I and II's alone, the seconds before are
    the whole draw, and the header says so; every input off for 2 s leaves those seconds
    missing in the record, not a made-up line; a 0.2 s gap is bridged, a 1.2 s one is a lead off."""
    src = read_record(data_dir / "ludb" / "ludb001", fs=None)
    v3, i1 = src.leads.index("V3"), src.leads.index("I")
    off = src.signals.copy()
    off[v3, 2500:] = 0.0
    _write_like(src, "v3off", off, tmp_path)
    args = ["--views", "V7,V9,V4R", "--out"]
    for rec, inputs, out in ((data_dir / "ludb" / "ludb001", "I,II,V3", "whole"), (data_dir / "ludb" / "ludb001",
                                                                                   "I,II", "limbs"),
                             (tmp_path / "v3off", "I,II,V3", "off")):
        proc = panorama("synthesize", rec, "--inputs", inputs, *args, tmp_path / out)
        assert proc.returncode == 0, proc.stderr
    assert "v3off: V3 flat over 5-10 s; the views there are drawn from the other inputs" in proc.stderr
    head = wfdb.rdheader(str(tmp_path / "off" / "v3off")).comments
    assert "input off: V3 flat over 5-10 s" in head and "views over 4-10 s drawn from I,II alone" in head, head
    # what the draw from fewer inputs did is said too (with --wander: not applied there, no chest input)
    proc = panorama("synthesize", tmp_path / "v3off", *args, tmp_path / "offw", "--wander")
    assert proc.returncode == 0, proc.stderr
    head = wfdb.rdheader(str(tmp_path / "offw" / "v3off")).comments
    assert "drawn from I,II alone: wander: not applied (no chest view asked for, or no chest lead among the " \
        "inputs)" in head, head
    whole, limbs, got = (wfdb.rdrecord(str(tmp_path / d / n)).p_signal
                         for d, n in (("whole", "ludb001"), ("limbs", "ludb001"), ("off", "v3off")))
    assert np.abs(got[2000:] - limbs[2000:]).max() < 1e-3  # I and II alone, from the second before on
    assert np.abs(got[:1900] - whole[:1900]).max() < 1e-3  # untouched before it
    # every input off for 2 s: missing there, read back as such
    dead = src.signals.copy()
    dead[:, 2000:3000] = 0.0
    _write_like(src, "dead", dead, tmp_path)
    proc = panorama("synthesize", tmp_path / "dead", *args, tmp_path / "dead_out")
    assert proc.returncode == 0, proc.stderr
    back = wfdb.rdrecord(str(tmp_path / "dead_out" / "dead")).p_signal
    assert np.isnan(back[2000:3000]).all() and np.isfinite(back[:2000]).all() and np.isfinite(back[3000:]).all()
    assert "views over 4-6 s left missing: no input usable there" in wfdb.rdheader(str(tmp_path / "dead_out" /
                                                                                        "dead")).comments
    # gaps: 0.2 s in V3 bridged, 1.2 s in I a lead off
    gaps = src.signals.copy()
    gaps[v3, 1000:1100] = np.nan
    gaps[i1, 3000:3600] = np.nan
    _write_like(src, "gaps", gaps, tmp_path)
    proc = panorama("synthesize", tmp_path / "gaps", *args, tmp_path / "gaps_out")
    assert proc.returncode == 0, proc.stderr
    head = wfdb.rdheader(str(tmp_path / "gaps_out" / "gaps")).comments
    assert "input off: I missing over 6-8 s" in head and "views over 5-9 s drawn from II,V3 alone" in head, head
    assert "1 gap(s) of at most 0.5 s bridged by a straight line" in head


def test_blend_keeps_the_whole_draw_where_its_subset_is_off(panorama, data_dir, tmp_path):
    """I, II and V3 all off 6-8 s: the subset draw has nothing there, the draw from every
    input stands alone, and the header says so rather than 'missing'."""
    from training.tune_blend import MONITOR

    src = read_record(data_dir / "ludb" / "ludb001", fs=None)
    sig = src.signals.copy()
    for lead in ("I", "II", "V3"):
        sig[src.leads.index(lead), 3000:4000] = 0.0
    _write_like(src, "blendoff", sig, tmp_path)
    proc = panorama("synthesize", tmp_path / "blendoff", "--inputs", MONITOR, "--views", "V2,V6", "--calibrate", "5",
                    "--blend-with", "I,II,V3", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    back = wfdb.rdrecord(str(tmp_path / "out" / "blendoff")).p_signal
    assert np.isfinite(back).all()
    head = wfdb.rdheader(str(tmp_path / "out" / "blendoff")).comments
    assert not any("left missing" in c for c in head), head
    assert any(c.startswith("from I,II,V3: views over 6-8 s: the draw from I,II,III,") and c.endswith(
        "alone (no input of I,II,V3 usable there)") for c in head), head


def test_records_of_one_name_are_not_written_over_each_other(panorama, data_dir, tmp_path):
    for folder, rec in (("p1", "ludb001"), ("p2", "ludb002")):
        src = read_record(data_dir / "ludb" / rec, fs=None)
        (tmp_path / folder).mkdir()
        _write_like(src, "ecg", src.signals, tmp_path / folder)
    proc = panorama("synthesize", tmp_path, "--views", "V7", "--out", tmp_path / "out")
    assert proc.returncode == 1 and "skipped 2 records named ecg" in proc.stderr, proc.stderr
    assert "synthesize them into different --out folders" in proc.stderr
    assert not (tmp_path / "out" / "ecg.hea").exists()
    proc = panorama("synthesize", tmp_path / "p1" / "ecg", "--views", "V7", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    head = wfdb.rdheader(str(tmp_path / "out" / "ecg")).comments
    assert f"synthesised by panorama from I,II,V3 of {(tmp_path / 'p1' / 'ecg').resolve()}" in head, head
    assert "views at table angles (theta, phi deg): V7 (96, 120)" in head


def test_reversed_arm_electrodes_are_said_without_calibration_from_every_lead(panorama, data_dir, tmp_path):
    """The default inputs (I, II, V3) cannot show an LA/RA reversal, the record's other leads can."""
    src = read_record(data_dir / "ludb" / "ludb001", fs=None)
    sig = src.signals.copy()
    at = {n: src.leads.index(n) for n in ("I", "II", "III", "aVR", "aVL")}
    sig[at["I"]], sig[at["II"]], sig[at["III"]] = -src.lead("I"), src.lead("III"), src.lead("II")
    sig[at["aVR"]], sig[at["aVL"]] = src.lead("aVL"), src.lead("aVR")
    _write_like(src, "lara", sig, tmp_path)
    proc = panorama("synthesize", tmp_path / "lara", "--views", "V7", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "LA/RA reversed" in proc.stderr, proc.stderr
    head = wfdb.rdheader(str(tmp_path / "out" / "lara")).comments
    assert any(c.startswith("warning: LA/RA reversed") for c in head), head


def test_wander_with_no_chest_input_changes_nothing_and_says_so(panorama, data_dir, tmp_path):
    rec = data_dir / "ludb" / "ludb001"
    common = ["--inputs", "II", "--views", "V7,V4R", "--calibrate", "5", "--transfer"]
    for tag, extra in (("plain", []), ("wander", ["--wander"])):
        proc = panorama("synthesize", rec, *common, *extra, "--out", tmp_path / tag)
        assert proc.returncode == 0, proc.stderr
    plain, wander = (wfdb.rdrecord(str(tmp_path / t / "ludb001")).p_signal for t in ("plain", "wander"))
    assert np.array_equal(plain, wander)
    head = wfdb.rdheader(str(tmp_path / "wander" / "ludb001")).comments
    assert "wander: not applied (no chest view asked for, or no chest lead among the inputs)" in head, head


def test_an_input_off_across_second_boundaries_is_found(data_dir):
    """Off 1.3 s from 5.3 s fills no whole second, yet is found (a value held 0.75 s or more,
    which no real record here does); under that, within live seconds, it is not (said in the docs)."""
    from edge.lead_off import fill_gaps, leads_off
    from panorama.records import MODEL_FS, Record, resample

    rec = read_record(data_dir / "ludb" / "ludb001", fs=None)
    names = ["I", "II", "V3"]
    for (a, b), want in (((5.3, 6.6), ["V3 flat over 5-7 s"]), ((5.05, 6.95), ["V3 flat over 5-7 s"]),
                         ((5.0, 6.0), ["V3 flat over 5-6 s"]), ((5.3, 5.9), [])):
        x = np.stack([rec.lead(n) for n in names])
        x[2, int(a * rec.fs):int(b * rec.fs)] = 0.0
        filled, gaps, _ = fill_gaps(x, rec.fs)
        lo = leads_off(resample(Record("x", filled, names, rec.fs), MODEL_FS).signals, filled, gaps, rec.fs)
        assert lo.spans(names) == want, (a, b, lo.spans(names))


def test_a_lead_the_inputs_do_not_need_cannot_refuse_the_record(panorama, data_dir, tmp_path):
    src = read_record(data_dir / "ludb" / "ludb001", fs=None)
    base = _write_like(src, "oddunits", src.signals, tmp_path)
    hea = base.with_suffix(".hea")
    lines = hea.read_text().splitlines()
    v1 = 1 + src.leads.index("V1")
    lines[v1] = lines[v1].replace("/mV", "/NU")  # a lead in units nobody can convert
    hea.write_text("\n".join(lines) + "\n")
    proc = panorama("synthesize", base, "--views", "V7", "--calibrate", "5", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "the leads besides the inputs are not used: lead V1 has unknown units 'NU'" in proc.stderr
    head = wfdb.rdheader(str(tmp_path / "out" / "oddunits")).comments
    assert any(c.startswith("the record's other leads not used (lead V1 has unknown units 'NU'") for c in head), head
    proc = panorama("synthesize", base, "--inputs", "I,II,V1", "--views", "V7", "--out", tmp_path / "out2")
    assert proc.returncode == 1 and "lead V1 has unknown units 'NU'" in proc.stderr  # an input it is: refused
