"""Training plumbing: the split, the config, and a short real run end to end."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from panorama import checkpoint
from panorama.errors import ConfigError
from training import splits
from training.config import TrainConfig, load_config
from training.data import load_real


def test_split_is_by_record_and_disjoint(data_dir):
    paths = sorted(p.with_suffix("") for p in data_dir.rglob("*.hea"))
    train, val = set(splits.select(paths, "train")), set(splits.select(paths, "val"))
    assert not train & val and len(train) + len(val) == len(paths)
    assert all(splits.split_of(p) == "val" for p in paths if p.parent.name == "ptb_frank")
    assert splits.split_of("a/ludb001.hea") == splits.split_of("a/ludb001")  # suffix never matters
    # what training loads is exactly the train split, without hidden leads
    loaded = load_real(data_dir / "sph", "train", ["V2", "V6"])
    assert {e.name for e in loaded} == {p.name for p in train if p.parent.name == "sph"}
    assert all("V2" not in e.names and "V6" not in e.names for e in loaded)


def test_config_errors_are_reported_together_with_locations(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: 3\noptim: {lr: -1, batch: 0}\nbogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "stage" in msg and "optim.lr" in msg and "optim.batch" in msg and "bogus" in msg


def test_config_refuses_to_supervise_the_validation_views():
    with pytest.raises(ValueError, match="must be in data.hidden"):
        TrainConfig.model_validate({"data": {"real": None, "hidden": ["V2"], "sim_patients": 1}})
    cfg = TrainConfig.model_validate({"data": {"real": None, "hidden": ["v2", "lead_V6"], "sim_patients": 1}})
    assert cfg.data.hidden == ["V2", "V6"]  # normalised, so the names match the records'


def test_shipped_configs_validate(panorama, data_dir):  # the configs name ../shared/data/ecg
    for name in ("stage1.yaml", "stage1_v2_finetune.yaml", "stage2_ludb.yaml"):
        proc = panorama("train", "--config", Path("training/configs") / name, "--validate-config")
        assert proc.returncode == 0, proc.stderr
        assert "valid" in proc.stdout


def test_the_configs_find_the_records_from_any_folder(data_dir, tmp_path, monkeypatch):
    from conftest import REPO

    from training.config import load_config

    monkeypatch.chdir(tmp_path)  # not the repo: ../shared/data/ecg is not there
    monkeypatch.setenv("PANORAMA_DATA", str(data_dir))
    assert load_config(REPO / "training" / "configs" / "stage1.yaml").data.real == data_dir
    with pytest.raises(ValueError, match=r"data.real ../shared/data/ecg is not a folder \(it does not exist"):
        TrainConfig.model_validate({"data": {"real": "../shared/data/ecg"}})  # a path is the user's own, as given
    monkeypatch.setenv("PANORAMA_DATA", str(tmp_path))  # a typo'd folder: said, never another folder in its place
    with pytest.raises(ConfigError, match=f"PANORAMA_DATA is {tmp_path}, which holds no WFDB records"):
        load_config(REPO / "training" / "configs" / "stage1.yaml")


def test_a_short_run_trains_validates_and_resumes(data_dir, tmp_path):
    from training.train import run

    cfg = TrainConfig.model_validate({
        "out": str(tmp_path / "run"), "seed": 3,
        "data": {"real": str(data_dir), "sources": ["LUDB"], "sim_patients": 8, "crop_samples": 512},
        "model": {"channels": 16, "embed_dim": 16, "heads": 2, "blocks": 1, "encoder_blocks": 2},
        "optim": {"steps": 6, "batch": 4, "warmup": 2}, "val": {"every": 3}})
    final = run(cfg)
    _, meta = checkpoint.load(final)
    assert meta["stage"] == 1 and meta["training_data"]["hidden_leads"] == ["V2", "V6"]
    assert "val" in meta and meta["val"]["overall"]["records"] >= 1
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2  # validated at steps 3 and 6
    more = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"steps": 9})})
    best = (tmp_path / "run" / "best.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run .*--resume continues it"):
        run(more)  # a fresh run into the folder would write over the run's best checkpoint and log
    other = more.model_copy(update={"model": more.model.model_copy(update={"channels": 8})})
    with pytest.raises(ConfigError, match="has another model \\(channels 16 in the run, 8 in the config\\)"):
        run(other, resume=True)
    assert (tmp_path / "run" / "best.safetensors").read_bytes() == best
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["channels"] == 16  # not rewritten
    run(more, resume=True)
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 3
    state = tmp_path / "run" / "train_state.safetensors"
    state.write_bytes(b"\x00" * 4000)
    with pytest.raises(ConfigError, match="train_state.safetensors is not a readable training state"):
        run(more, resume=True)
    with pytest.raises(ConfigError, match="no run to resume in"):
        run(more.model_copy(update={"out": tmp_path / "none"}), resume=True)
    assert not (tmp_path / "none").exists()  # refused before anything is written


def test_a_fine_tune_no_better_than_its_start_is_said_and_not_shipped(data_dir, tmp_path, panorama):
    from training.train import run

    tiny = {"model": {"channels": 16, "embed_dim": 16, "heads": 2, "blocks": 1, "encoder_blocks": 2},
            "val": {"every": 2}}
    start = run(TrainConfig.model_validate({
        "out": str(tmp_path / "start"), "seed": 3, "optim": {"steps": 4, "batch": 4, "warmup": 1},
        "data": {"real": str(data_dir), "sources": ["LUDB"], "sim_patients": 4, "crop_samples": 512}, **tiny}))
    cfg = tmp_path / "stage2.yaml"  # a learning rate that wrecks the model in two steps
    cfg.write_text(yaml.safe_dump({
        "stage": 2, "init": str(start), "device_id": "ludb", "out": str(tmp_path / "run"), "seed": 3,
        "optim": {"steps": 2, "batch": 4, "warmup": 1, "lr": 1.0, "weight_decay": 0.0},
        "data": {"real": str(data_dir), "sources": ["LUDB"], "sim_patients": 4, "crop_samples": 512}, **tiny}))
    shipped = tmp_path / "shipped.safetensors"
    proc = panorama("train", "--config", cfg, "--ship", shipped)
    assert proc.returncode != 0 and not shipped.exists(), proc.stderr
    assert re.search(r"starting model .*start/best.safetensors: -?[\d.]+ dB on the \d+ validation records", proc.stderr)
    assert "no step beat the starting model" in proc.stderr
    assert re.search(r"--ship: .*run/best.safetensors scores -?[\d.]+ dB on validation, no better than the model "
                     r"it started from \(.*start/best.safetensors: -?[\d.]+ dB on the same \d+ records\)", proc.stderr)
    meta = checkpoint.read_header(tmp_path / "run" / "best.safetensors")["meta"]
    assert meta["init_val"]["psnr_db"] >= meta["val"]["overall"]["psnr_db"]


def test_a_device_recording_five_leads_validates_on_its_own_leads(device_folder, tmp_path, caplog, panorama):
    """A bedside monitor with five leads (I, II, V1, V3, V5): Stage I and II choose their
    checkpoints on its own task (I, II, V1, V3 -> V5), scaled by the standard leads it holds;
    the protocol's task (it needs all 12) says how to get there."""
    import logging

    import wfdb

    from training.train import run

    folder, names = device_folder
    five = tmp_path / "five"
    five.mkdir()
    keep = ["I", "II", "V1", "V3", "V5"]
    for name in names:  # and a right-sided lead, not one of the 12, recorded first
        rec = wfdb.rdrecord(str(folder / name))
        sig = np.concatenate([-3 * rec.p_signal[:, [rec.sig_name.index("V4")]],
                              rec.p_signal[:, [rec.sig_name.index(n) for n in keep]]], axis=1)
        wfdb.wrsamp(name, fs=rec.fs, units=["mV"] * 6, sig_name=["V4R", *keep], p_signal=sig, fmt=["16"] * 6,
                    adc_gain=[1000.0] * 6, baseline=[0] * 6, write_dir=str(five), comments=["source: acme 5-lead"])
    cfg = {"out": str(tmp_path / "run"), "seed": 3, "optim": {"steps": 2, "batch": 4, "warmup": 1},
           "model": {"channels": 16, "embed_dim": 16, "heads": 2, "blocks": 1, "encoder_blocks": 2},
           "data": {"real": str(five), "val_records": names[:2], "sim_patients": 4, "crop_samples": 512,
                    "hidden": ["V5"]},
           "val": {"every": 2, "inputs": "I,II,V1,V3", "views": "V5"}}
    from training.evaluate import Task, evaluate, load_cases
    from panorama.geometry import resolve_views
    from panorama.metrics import score_record

    task = Task(resolve_views("I,II,V1,V3"), resolve_views("V5,V4R"))
    cases, _ = load_cases(sorted(five.glob("*.hea")), task, progress=False, all_standard=False)
    assert len(cases) == 4 and cases[0].record.leads == [*keep, "V4R"] and cases[0].scale_n == 5
    got = evaluate(cases[:1], task, "dipole", progress=False).scores[names[0]]
    x, y = (cases[0].record.signals[list(i)] for i in ((0, 1, 2, 3), (4, 5)))
    from panorama.baselines import DipoleMethod

    p = DipoleMethod().predict(x, task.inputs, task.views)
    sl = task.scored_slice
    assert got.psnr_db == pytest.approx(score_record(y[:, sl], p[:, sl], cases[0].record.signals[:5, sl],
                                                     ["V5", "V4R"]).psnr_db)  # scaled by the 5, not V4R
    with caplog.at_level(logging.INFO, logger="training.train"):
        best = run(TrainConfig.model_validate(cfg))
    assert "validation records (I,II,V1,V3 -> V5): 2" in caplog.text
    assert np.isfinite(checkpoint.read_header(best)["meta"]["val"]["overall"]["psnr_db"])
    protocol = {**cfg, "out": str(tmp_path / "run2"), "val": {"every": 2},
                "data": {**cfg["data"], "hidden": ["V2", "V6"]}}
    with pytest.raises(ConfigError, match=r"and 0 of those hold the 12 standard leads over at least 10 s, none flat; "
                       r".*or name other ones in data.val_records. A device that records fewer than the 12 leads "
                       r"validates on its own: set val.inputs and val.views to leads it records"):
        run(TrainConfig.model_validate(protocol))
    task = ("--inputs", "I,II,V1,V3", "--views", "V5", "--method", "dipole,model", "--model", best)
    proc = panorama("eval", "--data", five, *task)
    assert proc.returncode != 0 and "lacks III,aVR,aVL,aVF,V2" in proc.stderr and "--any-leads" in proc.stderr
    proc = panorama("eval", "--data", five, *task, "--any-leads")
    assert proc.returncode == 0 and "4 records in" in proc.stdout and "model" in proc.stdout, proc.stderr


def test_device_records_a_bad_header_is_skipped_unknown_labels_said_and_sources_explained(data_dir, tmp_path,
                                                                                            caplog):
    import logging
    import shutil

    folder = tmp_path / "mydevice"
    folder.mkdir()
    picked = [p for p in sorted((data_dir / "ludb").glob("*.hea")) if splits.split_of(p) == "train"][:2]
    for p in picked:
        shutil.copy(p, folder)
        shutil.copy(p.with_suffix(".dat"), folder)
    head = (folder / picked[1].name).read_text().replace(" v6\n", " chan12\n").replace(" V6\n", " chan12\n")
    (folder / picked[1].name).write_text(head)  # V6 under a name no one knows
    bad = next(f"bad{i}" for i in range(100) if splits.split_of(f"bad{i}") == "train")
    (folder / f"{bad}.hea").write_text("this is no header\n")
    with caplog.at_level(logging.WARNING, logger="training.data"):
        got = load_real(folder, "train", ["V2", "V6"])
    assert sorted(e.name for e in got) == sorted(p.stem for p in picked)  # the bad one skipped, not fatal
    assert f"skipping {folder / bad}: unreadable WFDB header" in caplog.text
    assert "1 of the 3 train records" in caplog.text and "'chan12' (1 record)" in caplog.text
    with pytest.raises(ConfigError, match=r"data.sources \['acme'\] matches none of the 2 train records in .*mydevice: "
                       r"a record's source is its header's '# source:' comment, and these hold LUDB \(ODC-By 1.0\) \(2\); .*"
                       r"sources: \[\] to use every record"):
        load_real(folder, "train", ["V2", "V6"], ["acme"])


def test_validation_records_can_be_named(device_folder):
    folder, names = device_folder
    cfg = TrainConfig.model_validate({"data": {"real": str(folder), "val_records": names[:2]}})
    assert splits.select(sorted(folder.glob("*.hea")), "val", cfg.data.val_records) == \
        sorted(folder / f"{n}.hea" for n in names[:2])
    assert sorted(e.name for e in load_real(folder, "train", ["V2", "V6"], None, cfg.data.val_records)) == names[2:]
    with pytest.raises(ValueError, match="data.val_records: no record ludb999 in"):
        TrainConfig.model_validate({"data": {"real": str(folder), "val_records": ["ludb999"]}})
    with pytest.raises(ValueError, match="names every record of data.real: none would train"):
        TrainConfig.model_validate({"data": {"real": str(folder), "val_records": names}})


def test_train_command_overrides_device_and_minutes(panorama, data_dir):
    proc = panorama("train", "--config", "training/configs/stage1.yaml", "--validate-config",
               "--device", "cuda", "--minutes", "7")
    assert proc.returncode == 0, proc.stderr
    assert "12000 steps within 7 min on cuda" in proc.stdout
    proc = panorama("train", "--config", "training/configs/stage1.yaml", "--validate-config", "--device", "tpu")
    assert proc.returncode != 0 and "use cpu, cuda or cuda:N" in proc.stderr


def test_train_command_checks_its_init_checkpoint_and_its_config_file(panorama, tmp_path):
    junk = tmp_path / "init.safetensors"
    junk.write_bytes(b"\x80\x04 a pickle, not a checkpoint" * 50)
    cfg = tmp_path / "s2.yaml"
    cfg.write_text(f"stage: 2\ninit: {junk}\ndevice_id: ludb\nout: {tmp_path / 'run'}\ndata:\n  sim_patients: 4\n")
    for extra in (["--validate-config"], []):  # said at once, before any data is read
        proc = panorama("train", "--config", cfg, *extra)
        assert proc.returncode != 0 and "init.safetensors: not a readable safetensors checkpoint" in proc.stderr
    assert not (tmp_path / "run").exists()
    binary = tmp_path / "random.yaml"
    binary.write_bytes(bytes(range(256)))
    proc = panorama("train", "--config", binary, "--validate-config")
    assert proc.returncode != 0 and "random.yaml: not a YAML text file" in proc.stderr
    proc = panorama("train", "--config", "training/configs/stage1.yaml", "--validate-config", "--minutes", "inf")
    assert proc.returncode != 0 and "optim.minutes" in proc.stderr


def test_config_names_the_training_device_and_the_budget_needs_a_warm_up():
    assert TrainConfig.model_validate({"data": {"sim_patients": 4}, "device": "cuda:1"}).device == "cuda:1"
    with pytest.raises(ValueError, match="use cpu, cuda or cuda:N"):
        TrainConfig.model_validate({"data": {"sim_patients": 4}, "device": "gpu"})
    with pytest.raises(ValueError, match="warmup >= 100"):
        TrainConfig.model_validate({"data": {"sim_patients": 4}, "optim": {"minutes": 5, "warmup": 50}})


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_training_on_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    from training.train import run

    cfg = TrainConfig.model_validate({"out": str(tmp_path / "run"), "device": "cuda", "data": {"sim_patients": 4}})
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        run(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_the_budget_fits_steps_and_validations_into_the_minutes_left():
    from training.train import fit_steps

    cfg = TrainConfig.model_validate({"data": {"sim_patients": 4}, "val": {"every": 1000},
                                      "optim": {"steps": 200_000, "minutes": 10}})
    # 600 s: 60 spent, 3 % spare and the final validation (2 s) off the rest, then 0.1 s a step
    # plus 2 s every 1000 steps
    assert fit_steps(cfg, 100, 60.0, 0.1, 2.0) == 100 + int((0.97 * 600 - 60 - 2) / (0.1 + 0.002))
    assert fit_steps(cfg, 100, 60.0, 1e-6, 0.0) == 200_000  # never more than the config's steps
    assert fit_steps(cfg, 100, 700.0, 0.1, 2.0) == 101  # out of time: stop at the next step


def test_a_run_within_minutes_fixes_its_step_count_during_warm_up(tmp_path):
    from training.train import PROBE_TO, run

    cfg = TrainConfig.model_validate({
        "out": str(tmp_path / "run"), "seed": 1, "threads": 1,
        "data": {"sim_patients": 6, "crop_samples": 256},
        "model": {"channels": 8, "embed_dim": 8, "heads": 2, "blocks": 1, "encoder_blocks": 2},
        "optim": {"steps": 1_000_000, "batch": 2, "warmup": 100, "minutes": 0.1}, "val": {"every": 50}})
    run(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    budget = [r for r in log if "budget_min" in r]
    assert len(budget) == 1 and budget[0]["step"] == PROBE_TO
    steps = budget[0]["steps"]
    assert PROBE_TO < steps < 1_000_000
    assert log[-1]["step"] == steps  # the run ended at the step count it chose
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optim"]["steps"] == steps  # so the folder's config reproduces the run
    assert cfg.optim.steps == 1_000_000  # the caller's config is left as given
    run(cfg, resume=True)  # resuming keeps the step count the budget chose: nothing more to do
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == len(log)


def test_simulated_patients_made_in_processes_equal_those_made_in_one(monkeypatch):
    from training import train

    cfg = TrainConfig.model_validate({"threads": 2, "data": {"sim_patients": 3, "sim_random_views": 2}})
    monkeypatch.setattr(train, "POOL_MIN", 2)
    pooled = train.simulate_pool(cfg)
    monkeypatch.setattr(train, "POOL_MIN", 10_000)
    serial = train.simulate_pool(cfg)
    assert [p.name for p in pooled] == [p.name for p in serial]
    for a, b in zip(pooled, serial):
        np.testing.assert_array_equal(a.signals, b.signals)
        np.testing.assert_array_equal(a.true_angles, b.true_angles)


def test_log_rmse_loss_is_the_metrics_psnr_up_to_constants():
    import torch

    from training.data import LOSSES, masked_log_rmse

    assert set(LOSSES) == {"l1", "log_rmse"}
    y = torch.zeros(1, 3, 400)
    err = torch.randn(1, 3, 400) * 0.1
    mask = torch.tensor([[True, True, False]])
    base = masked_log_rmse(y + err, y, mask, floor_mv=0.0)
    centred = err - err.median(-1, keepdim=True).values
    expect = torch.log(centred[0, :2].square().mean(-1).sqrt()).mean()
    assert torch.isclose(base, expect, atol=1e-6)  # the third view is masked out
    assert torch.isclose(masked_log_rmse(y + err + 0.7, y, mask, floor_mv=0.0), base, atol=1e-6)  # DC is free
    # a record at 4x the amplitude only adds log 4: its views weigh as much as before
    assert torch.isclose(masked_log_rmse(4 * (y + err), 4 * y, mask, floor_mv=0.0), base + np.log(4), atol=1e-5)
