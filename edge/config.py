"""The daemon's configuration: a YAML file validated before anything starts.

Every field has a default, so an empty file is a working configuration (the shipped model
on the CPU, Mosquitto on loopback). Unknown keys are errors: a misspelt setting must not be
silently ignored on a medical device.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from panorama.devices import check_device_name
from panorama.errors import BackendError, ConfigError, UpdateError
from panorama.geometry import resolve_views

from . import mqtt as mq

M = TypeVar("M", bound=BaseModel)
DEFAULT_VIEWS = ["V7", "V8", "V9", "V3R", "V4R", "V5R", "V6R", "V1ICS2"]


def host_id() -> str:
    """This host's short name: the default id of a daemon, and of a fleet device."""
    return socket.gethostname().split(".")[0][:48] or "edge"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerSettings(_Strict):
    """Where the broker is and how to reach it: the daemon's ``mqtt`` section and the fleet
    agent's top level share these keys."""

    broker: str = Field("mqtt://127.0.0.1:1883", description="mqtt://HOST[:PORT], or mqtts://HOST[:PORT] for TLS")
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT protocol version; the embedded amqtt broker speaks 3.1.1 only")
    ca_file: Path | None = Field(None, description="mqtts: the CA the broker's certificate chains to "
                                 "(default: the system's trust store)")
    cert_file: Path | None = Field(None, description="mqtts: this device's certificate, where the broker asks")
    key_file: Path | None = Field(None, description="mqtts: its private key (unencrypted PEM, mode 0600)")
    username: str | None = None
    password_file: Path | None = Field(None, description="the MQTT password is this file's first line "
                                       "(read at each connect; never written in a config)")

    _endpoint: mq.Broker | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _reachable(self):
        # a bad URL, a missing or unreadable file, a wrong pairing: said now; the files read once
        self._endpoint = mq.Broker(self.broker, self.ca_file, self.cert_file, self.key_file, self.username,
                                   self.password_file)
        return self

    def endpoint(self) -> mq.Broker:
        """The broker with its TLS and credentials, for ``edge.mqtt.connect`` (made when the
        settings were validated)."""
        return self._endpoint


class MqttConfig(BrokerSettings):
    prefix: str = "ecg/v1"
    daemon_id: str = Field(default_factory=host_id)
    virtual_format: Literal["float32", "int16", "json"] = "float32"
    expiry_s: int = Field(2, ge=0, le=3600, description="MQTT v5 message expiry on waveforms (0: none)")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        from .topics import Topics

        Topics(v)  # what the daemon would refuse after loading its model: said now
        return v

    @field_validator("daemon_id")
    @classmethod
    def _daemon_id(cls, v: str) -> str:
        from .topics import check_id

        return check_id("daemon", v)


class ModelConfig(_Strict):
    path: Path | None = Field(None, description="checkpoint; default: the shipped pretrained one")
    backend: Literal["torch", "onnxruntime", "tensorrt"] = Field(
        "onnxruntime", description="onnxruntime: about 2x faster than torch on a CPU; tensorrt on a Jetson")
    device: str = Field("cpu", description="cpu, cuda or cuda:N (tensorrt: cuda)")
    threads: int = Field(2, ge=1, le=64, description="CPU threads for torch (inference and calibration)")
    reload_check_s: float = Field(5.0, ge=0, le=3600, description="look this often for a new checkpoint at path "
                                  "(a fleet update swapping the store's current link) and load it; 0: never")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device_name(v)


class StreamConfig(_Strict):
    views: list[str] = Field(default_factory=lambda: list(DEFAULT_VIEWS),
                             description="views for patients that have not asked for their own")
    context: int = Field(256, ge=0, le=4096, description="samples kept before each emitted part")
    lookahead: int = Field(192, ge=0, le=4096, description="samples waited for after it (output delay)")
    hop: int = Field(128, ge=8, le=4096, description="most output samples per window")
    max_backlog_s: float = Field(2.0, gt=0, le=600, description="output due longer than this is skipped "
                                 "(counted), not delivered late")
    max_batch: int = Field(32, ge=1, le=256)
    batch_wait_ms: float = Field(20.0, ge=0, le=1000, description="wait this long after a chunk for others "
                                 "to batch with (latency traded for throughput)")
    max_patients: int = Field(64, ge=1, le=1024)
    max_patients_per_monitor: int = Field(16, ge=1, le=1024, description="streams one monitor id may hold "
                                          "(a sender flooding patient ids cannot take every slot)")
    idle_timeout_s: float = Field(10.0, gt=0, le=3600, description="a stream silent this long is flushed and closed")
    max_views: int = Field(16, ge=1, le=64)

    @field_validator("views")
    @classmethod
    def _views(cls, v: list[str]) -> list[str]:
        resolve_views(v)  # a clear error for an unknown name
        return v

    @field_validator("context", "lookahead", "hop")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"{v} is not a multiple of 8 (the encoder's stride)")
        return v


class CalibrationConfig(_Strict):
    seconds: float = Field(5.0, ge=0, le=60, description="0 turns on-the-fly calibration off; else at least 1")
    device: str = Field("cpu", description="the torch device calibration runs on: cpu, cuda or cuda:N")
    workers: int = Field(1, ge=1, le=8)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device_name(v)

    @field_validator("seconds")
    @classmethod
    def _enough(cls, v: float) -> float:
        from panorama.calibrate import MIN_SECONDS, check_seconds

        try:  # what calibrate() itself refuses: say so now, not at each patient
            return check_seconds(v)
        except ValueError:  # within the field's bounds, only a fraction of a second is refused
            raise ValueError(f"{v:g} s is too short to fit: 0 (off) or at least {MIN_SECONDS:g} s") from None


class LimitsConfig(_Strict):
    max_bytes: int = Field(262_144, ge=1024)
    max_leads: int = Field(32, ge=1, le=256)
    max_samples: int = Field(8192, ge=8)


class QueueConfig(_Strict):
    ingest: int = Field(4096, ge=16)
    publish: int = Field(4096, ge=16)


class HealthConfig(_Strict):
    interval_s: float = Field(5.0, gt=0, le=600, description="health report period (a fleet update's gate "
                              "waits health_timeout_s for one)")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus endpoint on this port (0: off)")
    metrics_host: str = "127.0.0.1"


class EdgeConfig(_Strict):
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    queues: QueueConfig = Field(default_factory=QueueConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)


def check_devices(cfg: EdgeConfig) -> None:
    """What a file cannot tell: that this machine has the devices the config names. A
    ConfigError naming each key, before any model loads (``serve`` and ``--validate-config``)."""
    from panorama.devices import check_torch_device

    from .backends import check_device

    problems = []
    try:
        check_device(cfg.model.backend, cfg.model.device)
    except (ValueError, BackendError) as exc:
        problems.append(f"model.device (backend {cfg.model.backend}): {exc}")
    try:
        check_torch_device(cfg.calibration.device)
    except ValueError as exc:
        problems.append(f"calibration.device: {exc}")
    if problems:
        raise ConfigError("; ".join(problems))


def load_config(path: str | Path | None) -> EdgeConfig:
    """Read and validate ``path`` (None: all defaults); a ConfigError names every problem."""
    return EdgeConfig() if path is None else read_config(path, EdgeConfig)


def with_overrides(cfg: M, section: str | None, values: dict, origin: str = "command line") -> M:
    """``cfg`` with ``values`` replacing keys of ``section`` (None: the top level), validated
    again; one ConfigError naming every problem."""
    if not values:
        return cfg
    raw = cfg.model_dump()
    if section is None:
        raw.update(values)
    else:
        raw[section] = {**raw[section], **values}
    try:
        return type(cfg).model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {_problems(exc)}") from exc


def _problems(exc: ValidationError) -> str:
    def msg(e) -> str:  # our own checks' words, without pydantic's "Value error, " before them
        return e["msg"].removeprefix("Value error, ") if e["type"] == "value_error" else e["msg"]

    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {msg(e)}" for e in exc.errors())


def read_config(path: str | Path, model: type[M], check: Callable[[M], None] | None = None) -> M:
    """A YAML file validated as ``model`` and then by ``check`` (ValueError or UpdateError for
    what pydantic cannot see); one ConfigError naming the file and every problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        cfg = model.model_validate(raw)
        if check is not None:
            check(cfg)
        return cfg
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_problems(exc)}") from exc
    except (ValueError, UpdateError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
