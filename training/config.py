"""The training configuration: YAML, validated in full before any work starts.

Relative paths are relative to the working directory (the repo root in the README);
``data.real: default`` is ``$PANORAMA_DATA``, else ``../shared/data/ecg`` beside the repo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from panorama.devices import check_device_name
from panorama.errors import ConfigError, RecordError
from panorama.geometry import resolve_views
from panorama.records import folder_problem, require_data_dir


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Strict):
    real: Path | None = Field(None, description="folder of real WFDB records; default: $PANORAMA_DATA, else "
                              "../shared/data/ecg beside the repo; null for simulator only")
    sources: list[str] = Field(default_factory=list,
                               description="keep only real records whose source (the header's '# source:' "
                               "comment) contains one of these (stage 2); [] keeps every record")
    val_records: list[str] = Field(default_factory=list,
                                   description="names of data.real's records that validate (and never train); "
                                   "[]: about 20 % by a hash of the name (training/splits.py)")
    hidden: list[str] = Field(["V2", "V6"], description="leads never supervised nor used as input")
    sim_patients: int = Field(1500, ge=0, le=100_000, description="simulated patients in the pool")
    sim_random_views: int = Field(12, ge=0, le=64, description="random-angle views per simulated patient")
    sim_weight: float = Field(0.5, ge=0, le=1, description="share of batches drawn from the simulator")
    sim_anatomy: Literal["v1", "v2"] = Field("v1", description="the simulator's ventricular sources "
                                             "(training/simulator/sources.py: v2 puts the RV and septum "
                                             "against the chest)")
    sim_true_angles: float = Field(0.0, ge=0, le=1, description="probability that a simulated patient's "
                                   "displaced electrodes are told their true angles rather than the table's")
    crop_samples: int = Field(1024, ge=256, le=10_000, description="training crop length at 500 Hz")
    max_inputs: int = Field(12, ge=2, le=24)
    max_queries: int = Field(4, ge=1, le=16)

    @field_validator("real", mode="before")
    @classmethod
    def _default_real(cls, v):
        if v != "default":
            return v
        try:
            return require_data_dir()
        except RecordError as exc:
            raise ValueError(f"default: {exc}") from None

    @model_validator(mode="after")
    def _check(self):
        self.hidden = [v.name for v in resolve_views(self.hidden)] if self.hidden else []
        if self.real is not None and (problem := folder_problem(self.real)):
            raise ValueError(f"data.real {self.real} {problem}" + ("" if self.real.exists() else
                             f" (it does not exist; relative paths are from {Path.cwd()})"))
        if self.val_records:
            if self.real is None:
                raise ValueError("data.val_records names records of data.real, which is null")
            have = {p.stem for p in self.real.rglob("*.hea")}
            missing = [n for n in self.val_records if n not in have]
            if missing:
                raise ValueError(f"data.val_records: no record {', '.join(missing)} in {self.real} (give names "
                                 "without .hea, as the files are named)")
            if not have - set(self.val_records):
                raise ValueError("data.val_records names every record of data.real: none would train")
        if self.real is None and self.sim_patients == 0:
            raise ValueError("no data: give data.real or data.sim_patients > 0")
        if self.real is None and self.sim_weight < 1:
            self.sim_weight = 1.0
        return self


class ModelSection(Strict):
    channels: int = Field(32, ge=8, le=256)
    embed_dim: int = Field(64, ge=8, le=512)
    heads: int = Field(4, ge=1, le=16)
    blocks: int = Field(3, ge=1, le=8)
    encoder_blocks: int = Field(4, ge=2, le=8)

    @model_validator(mode="after")
    def _check(self):
        if self.channels % self.heads or self.embed_dim % self.heads:
            raise ValueError("channels and embed_dim must be multiples of heads")
        return self


PROBE_STEPS = (20, 100)  # optim.minutes times the steps between these (the first warm up CUDA and caches)


class OptimConfig(Strict):
    loss: Literal["l1", "log_rmse"] = Field("l1", description="l1: mean absolute error; log_rmse: each "
                                            "view's log RMSE, the PSNR the metric averages (training/data.py)")
    lr: float = Field(2e-3, gt=0, le=1)
    weight_decay: float = Field(0.01, ge=0, le=1)
    batch: int = Field(32, ge=1, le=1024)
    steps: int = Field(20_000, ge=1, le=10_000_000)
    warmup: int = Field(500, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    minutes: float | None = Field(None, gt=0, allow_inf_nan=False,
                                  description="wall-clock budget: during warm-up the step count is cut to what "
                                  "fits at the measured speed, validation included (a lent GPU's time); the run "
                                  "then equals one configured with that many steps")

    @model_validator(mode="after")
    def _check(self):
        if self.minutes is not None and self.warmup < PROBE_STEPS[1]:
            raise ValueError(f"optim.minutes needs optim.warmup >= {PROBE_STEPS[1]}: the speed is measured "
                             "during warm-up")
        return self


class ValConfig(Strict):
    every: int = Field(500, ge=1, description="validate every N steps")
    inputs: str = "I,II,V3"
    views: str = "V2,V6"

    @model_validator(mode="after")
    def _check(self):
        resolve_views(self.inputs), resolve_views(self.views)
        return self


class TrainConfig(Strict):
    stage: Literal[1, 2] = Field(1, description="1: any-pairs pretraining; 2: device calibration")
    seed: int = Field(0, ge=0)
    out: Path = Field(Path("runs/stage1"), description="run folder: checkpoints and logs")
    init: Path | None = Field(None, description="checkpoint to start from (required for stage 2)")
    device_id: str | None = Field(None, description="the target device's name (stage 2)")
    threads: int = Field(2, ge=1, le=256, description="torch CPU threads (and simulator processes)")
    device: str = Field("cpu", description="torch device to train on: cpu, cuda or cuda:N")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    val: ValConfig = Field(default_factory=ValConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device_name(v)

    @model_validator(mode="after")
    def _check(self):
        if self.stage == 2 and (self.init is None or not self.device_id):
            raise ValueError("stage 2 needs init (the stage-1 checkpoint) and device_id")
        if self.init is not None and not self.init.is_file():
            raise ValueError(f"init checkpoint {self.init} does not exist")
        views = {v.name for v in resolve_views(self.val.views)}
        inputs = {v.name for v in resolve_views(self.val.inputs)}
        if views & inputs:
            raise ValueError(f"val.inputs and val.views overlap: {', '.join(sorted(views & inputs))}")
        if not views <= set(self.data.hidden):
            raise ValueError(f"validation views {', '.join(sorted(views - set(self.data.hidden)))} "
                             "must be in data.hidden, or training would supervise them")
        return self


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Parse and validate; every error is reported at once with its location in the YAML.
    ``overrides`` replace keys before validation, dotted for nested ones ("optim.minutes")."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}") from None
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise ConfigError(f"{path}: not a YAML text file: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for key, value in (overrides or {}).items():  # "optim.minutes" sets raw["optim"]["minutes"]
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: {part} must be a mapping to override {key}")
        node[leaf] = value
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{path}: {len(lines)} error(s):\n" + "\n".join(lines)) from None
