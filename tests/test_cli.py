"""The command line as a user meets it: real subprocesses, real records, clear errors (refusals
run ``main()`` in-process: the same parser and error handling, without a new interpreter)."""

import json
import re

import numpy as np
import pytest
import wfdb

from panorama.geometry import STANDARD_12


def _assert_clean_error(proc, match):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert match in proc.stderr, proc.stderr


def test_help_lists_every_command(cli):
    proc = cli("--help")
    assert proc.returncode == 0
    for cmd in ("demo", "eval", "simulate"):
        assert cmd in proc.stdout


def test_eval_says_when_it_scores_records_the_model_trained_on(cli, panorama, data_dir, tmp_path):
    from training import splits

    recs = sorted((data_dir / "ludb").glob("ludb00*.hea"))
    train = [p.with_suffix("") for p in recs if splits.split_of(p) == "train"][:2]
    val = [p.with_suffix("") for p in recs if splits.split_of(p) == "val"][:1]
    out = tmp_path / "model.json"
    proc = cli("eval", "--data", *train, *val, "--method", "model", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"2 of the 3 scored records were trained on \(by name: 2 in the training split of \S*"
                     r"nefnet_v2_stage1.safetensors\): their scores are not held out", proc.stderr), proc.stderr
    assert "score records neither model trained on (--split val holds out this model's own)" in proc.stderr
    res = json.loads(out.read_text())
    assert res["records"] == {"scored": [p.name for p in train + val], "not_scored": {}}
    assert res["checkpoint"]["file"].endswith("nefnet_v2_stage1.safetensors") and len(res["checkpoint"]["sha256"]) == 64
    # held out: nothing to say; and two checkpoints side by side, each row named by its file
    from panorama.synth import DEFAULT_CHECKPOINTS

    proc = panorama("eval", "--data", *val, "--method", "model", "--model", DEFAULT_CHECKPOINTS["pretrained"],
               "--model", DEFAULT_CHECKPOINTS["calibrated"], "--json", out)
    assert proc.returncode == 0 and "training split" not in proc.stderr, proc.stderr
    res = json.loads(out.read_text())
    assert set(res) == {"model [nefnet_v2_stage1]", "model [nefnet_v2_stage2]"}
    assert "model [nefnet_v2_stage2]" in proc.stdout
    assert res["model [nefnet_v2_stage2]"]["checkpoint"]["stage"] == 2
    assert res["model [nefnet_v2_stage1]"]["overall"]["psnr_db"] != res["model [nefnet_v2_stage2]"]["overall"]["psnr_db"]


def test_eval_split_follows_the_validation_records_a_model_named(panorama, device_folder, tmp_path):
    """A model trained with data.val_records: --split val scores those records of its folder,
    not the name hash's; --split train the rest; other folders keep the hash."""
    from panorama import checkpoint
    from panorama.synth import DEFAULT_CHECKPOINTS

    folder, names = device_folder
    model, meta = checkpoint.load(DEFAULT_CHECKPOINTS["pretrained"])
    ckpt = tmp_path / "mine.safetensors"
    checkpoint.save(model, ckpt, {**meta, "init": None, "training_data": {
        "real": str(folder), "split": "train", "sources": [], "val_records": [names[0], names[3]]}})
    out = tmp_path / "val.json"
    proc = panorama("eval", "--data", folder, "--split", "val", "--method", "dipole,model", "--model", ckpt, "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert "(split val, as the model's data.val_records names them in" in proc.stdout
    assert proc.stdout.startswith(f"2 of the 4 records in {folder}")  # the others are not in the split: said
    res = json.loads(out.read_text())
    assert res["model"]["records"]["scored"] == [names[0], names[3]]
    assert res["dipole"]["records"]["scored"] == [names[0], names[3]]  # every method on the same records
    assert "training split" not in proc.stderr
    proc = panorama("eval", "--data", folder, "--split", "train", "--method", "model", "--model", ckpt, "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["records"]["scored"] == names[1:3]
    assert "2 of the 2 scored records were trained on (by name: 2 in the training split of" in proc.stderr
    # a model fine-tuned from it: the records its start trained on are named as that one's
    tuned = tmp_path / "tuned.safetensors"
    checkpoint.save(model, tuned, {**meta, "init": str(ckpt), "training_data": None})
    proc = panorama("eval", "--data", folder, "--split", "train", "--method", "model", "--model", tuned)
    assert f"(by name: 2 in the training split of {ckpt}, which {tuned} was fine-tuned from)" in proc.stderr
    assert "(--split val holds out" not in proc.stderr
    # the shipped model named none: the hash splits the same folder, and puts none of these in validation
    from training import splits

    assert [n for n in names if splits.split_of(folder / n) == "val"] == []
    proc = panorama("eval", "--data", folder, "--method", "zero", "--json", out)  # r of a flat 0 mV: undefined
    assert proc.returncode == 0 and "NaN" not in out.read_text(), out.read_text()
    assert json.loads(out.read_text())["overall"]["r_median"] is None
    _assert_clean_error(panorama("eval", "--data", folder, "--split", "val", "--method", "model"), "no records in split 'val'")


def test_eval_reproduces_the_dipole_reference_figure(cli, data_dir, tmp_path):
    out = tmp_path / "dipole.json"
    proc = cli("eval", "--data", data_dir, "--method", "dipole", "--error-bands", "--json", out)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["overall"]["psnr_db"] == pytest.approx(28.0, abs=0.3)  # the data README's figure
    assert set(res["per_view"]) == {"V2", "V6"}
    assert res["overall"]["records"] > 250
    assert 0.8 < res["overall"]["r_median"] < 0.9
    # where the error lies: every band shares in it, and taking one away raises the PSNR
    assert "dipole: where the error lies" in proc.stdout and "  V2 (" in proc.stdout
    for view, b in res["error_bands"].items():
        assert b["bands"] == ["<0.5 Hz", "0.5-5 Hz", "5-15 Hz", "15-40 Hz", ">40 Hz"]
        assert sum(b["share"]) == pytest.approx(1.0, abs=1e-3) and min(b["share"]) > 0
        assert min(b["psnr_db_without"]) > res["per_view"][view]["psnr_db"]


def test_eval_kors_on_frank_records(cli, data_dir, tmp_path):
    out = tmp_path / "kors.json"
    proc = cli("eval", "--data", data_dir / "ptb_frank", "--inputs", ",".join(STANDARD_12),
               "--views", "VX,VY,VZ", "--method", "kors", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert "protocol whole" in proc.stdout
    assert json.loads(out.read_text())["overall"]["psnr_db"] > 33


def _record(tmp_path, names, seconds):
    t = np.arange(int(seconds * 500)) / 500
    sig = np.stack([np.sin(2 * np.pi * (k + 1) * t) for k in range(len(names))]).T
    wfdb.wrsamp("rec", fs=500, units=["mV"] * len(names), sig_name=names, p_signal=sig,
                fmt=["16"] * len(names), write_dir=str(tmp_path))
    return tmp_path / "rec"


def test_bad_input_is_one_clear_line(panorama, tmp_path):
    _assert_clean_error(panorama("eval", "--data", tmp_path / "missing"), "no WFDB record at")
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_clean_error(panorama("eval", "--data", empty), "no WFDB records (*.hea) found")
    _assert_clean_error(panorama("eval", "--data", empty, "--views", "V10"), "unknown view 'V10'")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    _record(unknown, ["foo", "bar"], 12)
    proc = panorama("eval", "--data", unknown)
    _assert_clean_error(proc, "no record could be scored")
    assert "no known lead names" in proc.stderr
    short = tmp_path / "short"
    short.mkdir()
    _record(short, list(STANDARD_12), 4)
    _assert_clean_error(panorama("eval", "--data", short), "shorter than 10 s")
    _assert_clean_error(panorama("eval", "--data", short, "--inputs", "I,V2", "--views", "V2"),
                        "a scored view must never be an input")
    whole = tmp_path / "whole"
    whole.mkdir()
    rec = _record(whole, list(STANDARD_12), 10)
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for args in (("synthesize", rec, "--views", "V7", "--out", afile), ("simulate", "--patients", "1", "--out", afile / "sub")):
        _assert_clean_error(panorama(*args), f"{afile} is a file, where a folder is wanted")
    dat = rec.with_suffix(".dat")
    dat.write_bytes(dat.read_bytes()[:24 * 1000])  # a copy cut short: 1000 of the 5000 samples
    proc = panorama("synthesize", rec, "--views", "V7", "--out", tmp_path / "out")
    assert proc.returncode != 0 and "rec.dat holds 1000 of the 5000 samples per lead its header says (2.0 of " \
        "10.0 s): truncated?" in proc.stderr, proc.stderr


def test_bad_numbers_are_refused_by_the_option_they_came_in(panorama, tmp_path):
    for argv, says in ((["simulate", "--seconds", "-3", "--out", tmp_path], "argument --seconds: must be a positive"),
                       (["monitor", "--sim", "1", "--duration", "-3"], "argument --duration: must be a positive"),
                       (["monitor", "--sim", "1", "--chunk-ms", "0"], "argument --chunk-ms: must be a positive"),
                       (["monitor", "--sim", "1", "--speed", "nan"], "argument --speed: must be a positive"),
                       (["listen", "--out", tmp_path, "--duration", "x"], "argument --duration: not a number: 'x'"),
                       (["simulate", "--rhythm", "foo", "--out", tmp_path], "argument --rhythm: invalid choice: 'foo'")):
        r = panorama(*argv)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_simulate_writes_records_that_eval_can_score(cli, panorama, tmp_path):
    proc = cli("simulate", "--patients", "2", "--views", "I,II,III,aVR,aVL,aVF,V1,V2,V3,V4,V5,V6,V7,120:45",
               "--seconds", "10", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    rec = wfdb.rdrecord(str(tmp_path / "sim0000"))
    assert rec.sig_name[-2:] == ["V7", "120:45"] and rec.fs == 500 and rec.sig_len == 5000
    assert any("rhythm" in c for c in rec.comments)
    out = tmp_path / "e.json"
    proc = panorama("eval", "--data", tmp_path, "--method", "dipole", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["overall"]["records"] == 2
    proc = cli("eval", "--data", tmp_path, "--method", "model", "--calibrate", "5", "--transfer", "--adapt", "--wander")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("model") and ":" not in line]
    assert [r[0] for r in rows] == ["model", "model+calib5s", "model+calib5s+transfer", "model+calib5s+adapt+transfer",
                                    "model+calib5s+adapt+transfer+wander"]
    assert all(r[-1] == "2" for r in rows)  # every record scored by every row
    said = {line.split(": ")[0]: line for line in proc.stdout.splitlines() if ": " in line}
    assert said["model+calib5s"].count("calibration ") >= 1  # each record's verdict, accepted or why not
    assert "transfer fitted (2 records)" in said["model+calib5s+transfer"]
    assert "adapted (2 records), transfer fitted (2 records)" in said["model+calib5s+adapt+transfer"]
    _assert_clean_error(panorama("eval", "--data", tmp_path, "--method", "model", "--transfer"),
                        "give --calibrate SECONDS too")
    _assert_clean_error(panorama("eval", "--data", tmp_path, "--method", "model", "--adapt"),
                        "--adapt fits on the calibration window")
    _assert_clean_error(panorama("eval", "--data", tmp_path, "--method", "dipole", "--wander"), "--wander needs --method model")


def test_demo_streams_through_the_embedded_broker(cli, tmp_path):
    """The main job end to end: embedded broker, daemon, monitor and listener in one process."""
    proc = cli("demo", "--patients", "2", "--seconds", "9", "--out", tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "embedded MQTT broker" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("patient-")]
    assert len(rows) == 2 and all("accepted" in r or "rejected" in r for r in rows)
    psnr = [float(r.split()[-4]) for r in rows]
    assert all(15 < p < 60 for p in psnr), rows  # scored against the simulator's truth
    for i in (1, 2):
        rec = wfdb.rdrecord(str(tmp_path / f"demo-bed_patient-{i}"))
        assert rec.sig_name == ["V7", "V8", "V9", "V3R", "V4R", "V5R", "120:45", "60:120"]
        assert rec.sig_len >= 1500  # 9 s streamed, the last 4 s after calibration
        png = tmp_path / f"demo-bed_patient-{i}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
