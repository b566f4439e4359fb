"""What the fleet tests share: the shipped checkpoints, a packed update, an agent's config
(their key pair is conftest's ``keys`` fixture)."""

from __future__ import annotations

from pathlib import Path

from deploy import manifest as mf
from deploy.agent_config import AgentConfig

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "panorama" / "weights"
STAGE1, STAGE2 = WEIGHTS / "nefnet_v2_stage1.safetensors", WEIGHTS / "nefnet_v2_stage2.safetensors"


def pack(tmp: Path, key: Path, model: Path, version: int, **kw) -> Path:
    out = tmp / f"pkg{version}"
    out.mkdir()
    m = mf.build(model, version, kw.pop("groups", ["ward3"]), kw.pop("device_models", ["monitor-x"]), **kw)
    (out / "manifest.json").write_bytes(mf.sign(m, key))
    (out / mf.ARTIFACT_NAME).write_bytes(Path(model).read_bytes())
    return out


def agent_config(tmp_path, public: Path, prefix: str, **kw) -> AgentConfig:
    kw = {"daemon_id": "bed7", "group": "ward3", "device_id": "bed7", "store": tmp_path / "store", **kw}
    return AgentConfig(device_model="monitor-x", public_key=public, factory_model=STAGE1, prefix=f"{prefix}/fleet",
                       daemon_prefix=f"{prefix}/ecg", **kw)
