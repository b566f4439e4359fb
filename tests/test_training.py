"""Training plumbing: the split, the config, and a short real run end to end."""

from pathlib import Path

import pytest

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


def test_shipped_configs_validate(cli, data_dir):  # the configs name ../shared/data/ecg
    for name in ("stage1.yaml", "stage2_ludb.yaml"):
        proc = cli("train", "--config", Path("training/configs") / name, "--validate-config")
        assert proc.returncode == 0, proc.stderr
        assert "valid" in proc.stdout


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
    run(more, resume=True)
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 3
