"""The fleet agent's configuration (deploy/fleet.yaml): pydantic for the fields, then the
checks pydantic cannot make — topics, the store's folder, the factory model, the key —
all before anything is created."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from edge.config import BrokerSettings, host_id, read_config
from edge.topics import Topics

from . import manifest as mf
from .topics import FleetTopics


class AgentConfig(BrokerSettings):  # broker, protocol, TLS and credentials first
    prefix: str = Field("panorama/fleet", description="root of the fleet topics")
    group: str = Field(description="the rollout group this device belongs to (its manifest topic)")
    device_id: str = Field(default_factory=host_id)
    device_model: str = Field(description="this device's model; a manifest must name it in target.device_models")
    public_key: Path = Field(description="the fleet operator's Ed25519 public key (fleet.pub), outside the store")
    store: Path = Field(description="the model store; the daemon's model.path is STORE/current/model.safetensors")
    factory_model: Path | None = Field(None, description="version 0 of an empty store (default: the shipped model)")
    daemon_prefix: str = Field("ecg/v1", description="the daemon's mqtt.prefix")
    daemon_id: str | None = Field(default_factory=host_id,
                                  description="the daemon whose health gates an update; null: no gate")
    adopt_timeout_s: float = Field(900.0, gt=0, description="the daemon must run the new model within this "
                                   "(a TensorRT engine build on a Jetson takes minutes)")
    healthy_s: float = Field(60.0, ge=0, description="then stay healthy this long, or the update is rolled back")
    health_timeout_s: float = Field(30.0, gt=0, description="no daemon health report for this long is a failure")
    cache_dir: Path | None = Field(None, description="the daemon's PANORAMA_CACHE: the ONNX exports and "
                                   "TensorRT engines of models an update retires are removed from it "
                                   "(default: this process's PANORAMA_CACHE, or ~/.cache/panorama)")
    artifact_timeout_s: float = Field(120.0, gt=0)
    max_artifact_bytes: int = Field(64 << 20, ge=1024)


def check_agent_config(cfg: AgentConfig) -> None:
    """What pydantic cannot see: topics, the store's folder, the factory model, the key.
    ValueError or UpdateError naming the setting, before anything is created."""
    FleetTopics(cfg.prefix).manifest(cfg.group)
    FleetTopics(cfg.prefix).state(cfg.device_id)
    try:
        daemon = Topics(cfg.daemon_prefix)
        if cfg.daemon_id is not None:
            daemon.health(cfg.daemon_id)
    except ValueError as exc:
        raise ValueError(f"daemon_prefix/daemon_id: {exc}") from None
    if cfg.store.exists() and not cfg.store.is_dir():
        raise ValueError(f"store: {cfg.store} is a file, not a folder")
    if cfg.factory_model is not None and not (cfg.store / "current").exists():
        from panorama import checkpoint
        from panorama.errors import CheckpointError

        try:
            checkpoint.read_header(cfg.factory_model)
        except CheckpointError as exc:
            raise ValueError(f"factory_model: {exc}") from None
    mf.trusted_keys(cfg.public_key)  # a missing or wrong key: said now, not at the first update


def load_agent_config(path: Path) -> AgentConfig:
    return read_config(path, AgentConfig, check_agent_config)
