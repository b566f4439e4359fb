"""Fleet device-calibration updates: signed manifests, the device's store, the agent and
the daemon's model reload, through a real Mosquitto broker and real checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from deploy import manifest as mf
from deploy.agent import Agent
from deploy.agent_config import AgentConfig, load_agent_config
from deploy.store import ModelStore
from deploy.topics import FleetTopics
from edge.config import ModelConfig
from edge.model_slot import ModelSlot
from panorama import checkpoint
from panorama.errors import ConfigError, UpdateError

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "panorama" / "weights"
STAGE1, STAGE2 = WEIGHTS / "nefnet_v2_stage1.safetensors", WEIGHTS / "nefnet_v2_stage2.safetensors"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return mf.generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def stage2_manifest() -> dict:
    return mf.build(STAGE2, 3, ["ward3"], ["monitor-x"])


def pack(tmp: Path, key: Path, model: Path, version: int, **kw) -> Path:
    out = tmp / f"pkg{version}"
    out.mkdir()
    m = mf.build(model, version, kw.pop("groups", ["ward3"]), kw.pop("device_models", ["monitor-x"]), **kw)
    (out / "manifest.json").write_bytes(mf.sign(m, key))
    (out / mf.ARTIFACT_NAME).write_bytes(Path(model).read_bytes())
    return out


# ----------------------------------------------------------------------------- manifests

def test_signature_verifies_and_any_change_or_other_key_is_refused(keys, stage2_manifest, tmp_path):
    private, public = keys
    envelope = mf.sign(stage2_manifest, private)
    assert mf.verify(envelope, public) == stage2_manifest
    doc = json.loads(envelope)
    doc["manifest"]["version"] = 99  # a replay dressed as new
    with pytest.raises(UpdateError, match="signature does not verify"):
        mf.verify(json.dumps(doc).encode(), public)
    doc = json.loads(envelope)
    doc["manifest"]["artifact"]["sha256"] = "0" * 64  # another file under the signed manifest
    with pytest.raises(UpdateError, match="signature does not verify"):
        mf.verify(json.dumps(doc).encode(), public)
    other_private, _ = mf.generate_keys(tmp_path / "other")
    with pytest.raises(UpdateError, match="signature does not verify"):
        mf.verify(mf.sign(stage2_manifest, other_private), public)
    for junk in (b"", b"{}", b"not json", b'{"manifest": [], "signature": "AA=="}'):
        with pytest.raises(UpdateError, match="not a signed manifest"):
            mf.verify(junk, public)
    with pytest.raises(UpdateError, match="exists"):  # keygen never overwrites a key devices trust
        mf.generate_keys(private.parent)
    assert oct(private.stat().st_mode & 0o777) == "0o600"


def test_only_a_newer_unexpired_manifest_for_this_device_applies(stage2_manifest):
    m = stage2_manifest
    mf.check_applicable(m, "ward3", "monitor-x", newest_seen=2)
    cases = {"not newer": dict(newest_seen=3), "expired": dict(now=datetime.now(timezone.utc) + timedelta(days=31)),
             "groups": dict(group="ward4"), "device models": dict(device_model="monitor-y")}
    for why, kw in cases.items():
        args = {"group": "ward3", "device_model": "monitor-x", "newest_seen": 2, **kw}
        with pytest.raises(UpdateError, match=why):
            mf.check_applicable(m, **args)
    with pytest.raises(ValueError, match="version"):
        mf.build(STAGE2, 0, ["ward3"], ["monitor-x"])
    with pytest.raises(ValueError, match="device model"):
        mf.build(STAGE2, 4, ["ward3"], [])


def test_dry_run_refuses_another_file_another_model_and_other_views(stage2_manifest, tmp_path):
    good = tmp_path / "good.safetensors"
    good.write_bytes(STAGE2.read_bytes())
    mf.check_artifact(stage2_manifest, good)
    assert mf.dry_run(stage2_manifest, good) < 0.1  # µV: the rounding of the stored values
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(STAGE2.read_bytes()[:-100])
    with pytest.raises(UpdateError, match="bytes, the manifest says"):
        mf.check_artifact(stage2_manifest, truncated)
    with pytest.raises(UpdateError, match="content hash is not the one"):
        mf.dry_run(stage2_manifest, STAGE1)  # a good checkpoint, but not the one signed
    shifted = json.loads(json.dumps(stage2_manifest))
    shifted["golden"]["output_tenth_uv"][1][5] += 200  # 20 µV off in one value of V7
    with pytest.raises(UpdateError, match="20.0 µV away"):
        mf.dry_run(shifted, good)


# ----------------------------------------------------------------------------- the store

def test_store_swaps_current_whole_keeps_previous_and_prunes(tmp_path, stage2_manifest):
    store = ModelStore(tmp_path / "store")
    store.ensure_factory(STAGE1)
    assert os.readlink(store.current) == "versions/0"
    assert checkpoint.read_header(store.model_path)["sha256"] == checkpoint.read_header(STAGE1)["sha256"]
    for v in (1, 2, 3, 4):
        store.install(v, STAGE2, {**stage2_manifest, "version": v})
        assert os.readlink(store.current) == f"versions/{v}"
    assert sorted(p.name for p in store.versions.iterdir()) == ["0", "3", "4"]  # factory, previous, current
    assert store.rollback() == 3 and os.readlink(store.current) == "versions/3"
    assert store.state()["installed"] == 3
    store.install(5, STAGE2, {**stage2_manifest, "version": 5})
    assert sorted(p.name for p in store.versions.iterdir()) == ["0", "3", "5"]  # what current left stays
    store.state_path.write_text("{ half a file")
    with pytest.raises(UpdateError, match="unreadable.*moved aside"):
        store.state()
    store.state_path.unlink()  # moved aside: rebuilt from the disk, the newest version seen included
    rebuilt = store.state()  # the installed version's gate is not known: QUEUED, so the agent gates it again
    assert (rebuilt["installed"], rebuilt["previous"], rebuilt["newest_seen"]) == (5, None, 5)
    assert [(h["version"], h["result"]) for h in rebuilt["history"]] == [(5, "QUEUED")]
    for bad in ('{"newest_seen": 4, "history": [5]}', '{"newest_seen": 1e400, "history": []}'):
        store.state_path.write_text(bad)  # parses, but is not a state
        with pytest.raises(UpdateError, match="unreadable"):
            store.state()
    store.state_path.unlink()
    assert store.rollback() == 0 and os.readlink(store.current) == "versions/0"  # no previous: the factory model
    with pytest.raises(UpdateError, match="no previous version and no factory model"):
        store.rollback()
    store.lock()
    with pytest.raises(UpdateError, match="another agent uses the store"):
        ModelStore(store.root).lock()
    store.unlock()
    ModelStore(store.root).lock()


# ----------------------------------------------------------------------------- the daemon's model slot

def test_model_slot_reloads_a_new_file_and_keeps_the_old_model_when_one_fails(tmp_path):
    link = tmp_path / "current.safetensors"
    os.symlink(STAGE1, link)
    slot = ModelSlot(ModelConfig(path=link, backend="torch"), "cpu")
    first = slot.meta["sha256"]
    assert slot.reload_if_changed() is None
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(STAGE2.read_bytes()[:1000])
    tmp = tmp_path / "tmp-link"
    os.symlink(bad, tmp)
    os.replace(tmp, link)
    assert slot.reload_if_changed() == "failed"
    info = slot.info()
    assert info["sha256"] == first and info["failed_file"] == str(bad) and "CheckpointError" in info["reload_error"]
    assert slot.reload_if_changed() is None  # the same bad file is not tried again
    os.symlink(STAGE1, tmp)
    os.replace(tmp, link)  # back to the file it runs (a fleet rollback): no failure left to report
    assert slot.reload_if_changed() is None and slot.info()["reload_error"] is None
    os.symlink(STAGE2, tmp)
    os.replace(tmp, link)
    assert slot.reload_if_changed() == "reloaded"
    assert slot.meta["sha256"] == checkpoint.read_header(STAGE2)["sha256"] != first
    assert slot.info()["reload_error"] is None and slot.info()["reloads"] == 1


# ----------------------------------------------------------------------------- the agent

def agent_config(tmp_path, public: Path, prefix: str, **kw) -> AgentConfig:
    kw = {"daemon_id": "bed7", "group": "ward3", "device_id": "bed7", "store": tmp_path / "store", **kw}
    return AgentConfig(device_model="monitor-x", public_key=public, factory_model=STAGE1, prefix=f"{prefix}/fleet",
                       daemon_prefix=f"{prefix}/ecg", **kw)


def test_agent_refuses_without_touching_the_store(keys, tmp_path):
    private, public = keys
    agent = Agent(agent_config(tmp_path, public, "x", daemon_id=None))  # never connected: refusals need no broker
    old = mf.build(STAGE2, 1, ["ward3"], ["monitor-x"])
    agent.store.record(2, "SUCCEEDED", seen=2)
    expired = mf.build(STAGE2, 5, ["ward3"], ["monitor-x"], now=datetime.now(timezone.utc) - timedelta(days=40))
    other = mf.build(STAGE2, 6, ["ward3"], ["monitor-y"])
    assert agent.handle(mf.sign(old, private)) == "REJECTED"
    assert agent.handle(mf.sign(expired, private)) == "REJECTED"
    assert agent.handle(mf.sign(other, private)) == "REJECTED"
    bad_sig = json.loads(mf.sign(other, private))
    bad_sig["manifest"]["target"]["device_models"] = ["monitor-x"]
    assert agent.handle(json.dumps(bad_sig).encode()) == "REJECTED"
    reasons = [r["reason"] for r in agent.results]
    assert "not newer than 2" in reasons[0] and "expired" in reasons[1]
    assert "device models" in reasons[2] and "signature" in reasons[3]
    assert os.readlink(agent.store.current) == "versions/0" and agent.store.state()["newest_seen"] == 2
    agent.store.unlock()
    agent.store.state_path.write_text('{"installed": 17, "newest_seen": ')
    with pytest.raises(UpdateError, match="unreadable"):  # said at start, not by a worker thread dying later
        Agent(agent_config(tmp_path, public, "x", daemon_id=None))


def test_agent_config_is_checked_before_anything_starts(tmp_path, keys):
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"group": "artifacts", "device_model": "m", "public_key": str(keys[1]),
                                    "store": str(tmp_path / "s")}))
    with pytest.raises(ConfigError, match="group may not be named"):
        load_agent_config(path)
    path.write_text(yaml.safe_dump({"group": "g", "device_model": "m", "store": str(tmp_path / "s"), "extra": 1}))
    with pytest.raises(ConfigError, match="public_key.*extra|extra.*public_key"):
        load_agent_config(path)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_update_installs_the_daemon_adopts_it_and_a_failed_gate_rolls_back(mosquitto, keys, tmp_path, panorama):
    import uuid

    private, public = keys
    prefix = f"test/{uuid.uuid4().hex[:8]}"
    agent = Agent(agent_config(tmp_path, public, prefix, healthy_s=2.0, adopt_timeout_s=60.0)).start()
    edge = tmp_path / "edge.yaml"
    edge.write_text(yaml.safe_dump({
        "mqtt": {"broker": mosquitto, "prefix": f"{prefix}/ecg", "daemon_id": "bed7"},
        "model": {"path": str(agent.store.model_path), "reload_check_s": 0.3},
        "health": {"interval_s": 0.5}}))
    daemon = subprocess.Popen([sys.executable, "-m", "panorama_cli", "serve", "--config", str(edge)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait(lambda: agent.health is not None, 90), "the daemon never reported its health"
        stage1 = checkpoint.read_header(STAGE1)["sha256"]
        assert agent.health[1]["model"]["sha256"] == stage1
        # an update: published by the operator's command, installed, adopted by the running daemon
        r = panorama("fleet", "publish", pack(tmp_path, private, STAGE2, 3), "--prefix", f"{prefix}/fleet",
                     "--broker", mosquitto)
        assert r.returncode == 0, r.stderr
        assert wait(lambda: agent.results and agent.results[-1]["state"] in ("SUCCEEDED", "FAILED"), 90)
        assert [r["state"] for r in agent.results] == ["READY", "QUEUED", "IN_PROGRESS", "IN_PROGRESS", "SUCCEEDED"]
        assert agent.health[1]["model"]["sha256"] == checkpoint.read_header(STAGE2)["sha256"]
        assert os.readlink(agent.store.current) == "versions/3"
        # the operator sees it too
        r = panorama("fleet", "status", "--prefix", f"{prefix}/fleet", "--broker", mosquitto, "--wait", "1")
        assert "bed7" in r.stdout and "SUCCEEDED" in r.stdout
        # the daemon dies; the next update cannot pass its health gate and is rolled back
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        agent.cfg.health_timeout_s = 2.0  # not the 60 s adoption timeout: a daemon that is gone fails it sooner
        n = len(agent.results)
        r = panorama("fleet", "publish", pack(tmp_path, private, STAGE1, 4, notes="back to stage 1"),
                     "--prefix", f"{prefix}/fleet", "--broker", mosquitto)
        assert r.returncode == 0, r.stderr
        assert wait(lambda: len(agent.results) > n and agent.results[-1]["state"] in ("SUCCEEDED", "FAILED"), 60)
        last = agent.results[-1]
        assert last["state"] == "FAILED" and "rolled back to version 3" in last["reason"], last
        assert "no health report from the daemon for 2 s (it is offline)" in last["reason"]
        assert os.readlink(agent.store.current) == "versions/3" and agent.store.state()["newest_seen"] == 4
    finally:
        if daemon.poll() is None:
            daemon.kill()
        agent.stop()
    # a restarted agent gets the retained manifest of version 4 again: not retried, its verdict said again
    again = Agent(agent_config(tmp_path, public, prefix)).start()
    try:
        assert wait(lambda: len(again.results) == 2, 10)
        time.sleep(0.5)
        assert [r["state"] for r in again.results] == ["READY", "FAILED"]
        assert os.readlink(again.store.current) == "versions/3"
        assert again.results[0]["last"]["version"] == 4 and again.results[0]["last"]["result"] == "FAILED"
        assert "rolled back to version 3" in again.results[1]["reason"]
    finally:
        again.stop()
    states = [h["result"] for h in json.loads((tmp_path / "store" / "state.json").read_text())["history"]]
    assert states == ["QUEUED", "SUCCEEDED", "QUEUED", "FAILED"]


def test_fleet_topics_refuse_what_would_collide():
    t = FleetTopics("panorama/fleet")
    assert t.manifest("ward3") == "panorama/fleet/ward3/manifest"
    for bad in ("devices", "artifacts", "a/b", "+"):
        with pytest.raises(ValueError):
            t.manifest(bad)
    with pytest.raises(ValueError, match="sha256"):
        t.artifact("abc")


def test_an_update_a_restart_left_ungated_is_gated_at_the_next_start(mosquitto, keys, tmp_path):
    import uuid

    _, public = keys
    cfg = agent_config(tmp_path, public, f"test/{uuid.uuid4().hex[:8]}", adopt_timeout_s=1.0)
    store = ModelStore(cfg.store)
    store.ensure_factory(STAGE1)
    store.record(3, "QUEUED", seen=3)  # what a run cut off between install and verdict leaves behind
    store.install(3, STAGE2, mf.build(STAGE2, 3, ["ward3"], ["monitor-x"]))
    agent = Agent(cfg).start()  # no daemon runs: it never adopts version 3
    try:
        assert wait(lambda: agent.results[-1]["state"] != "READY", 20)
    finally:
        agent.stop()
    last = agent.results[-1]
    assert last["state"] == "FAILED" and "rolled back to version 0" in last["reason"]
    assert "did not report the new model" in last["reason"] and os.readlink(store.current) == "versions/0"


def test_rollout_goes_wave_by_wave_and_stops_before_the_next_when_one_fails(mosquitto, keys, tmp_path):
    import uuid

    from deploy.rollout import Fleet, rollout

    private, public = keys
    prefix = f"test/{uuid.uuid4().hex[:8]}"

    def device(name, group, **kw):  # no daemon to gate on unless said: they install at once
        kw = {"daemon_id": None, **kw}
        return Agent(agent_config(tmp_path, public, prefix, group=group, device_id=name, store=tmp_path / name,
                                  **kw)).start()

    devices = [device("c1", "canary"), device("w1", "ward"), device("w2", "ward")]
    fleet = Fleet(mosquitto, f"{prefix}/fleet")
    try:
        assert wait(lambda: len(fleet.snapshot()) == 3, 10), "every agent announces itself (READY)"
        both = ["canary", "ward"]
        waves = rollout(fleet, pack(tmp_path, private, STAGE2, 3, groups=both), [["canary"], ["ward"]], timeout_s=60)
        assert [w.stopped for w in waves] == ["", ""] and [w.count("SUCCEEDED") for w in waves] == [1, 2]
        assert all(os.readlink(d.store.current) == "versions/3" for d in devices)
        # run again after a device restarted (its READY replaced its verdict) and beside a device
        # that trusts another key: every answer is counted, none waited for
        devices[1].stop()
        devices[1] = device("w1", "ward")
        _, foreign = mf.generate_keys(tmp_path / "foreign")
        x1 = Agent(agent_config(tmp_path, foreign, prefix, group="canary", device_id="x1", store=tmp_path / "x1",
                                daemon_id=None)).start()
        devices.append(x1)
        assert wait(lambda: "x1" in fleet.snapshot(), 10)
        t0 = time.monotonic()
        waves = rollout(fleet, tmp_path / "pkg3", [["canary"], ["ward"]], timeout_s=20)
        assert time.monotonic() - t0 < 15 and [w.stopped for w in waves] == ["", ""]
        assert {d: v["state"] for d, v in waves[0].verdicts.items()} == {"c1": "SUCCEEDED", "x1": "REJECTED"}
        assert "signature" in waves[0].verdicts["x1"]["reason"] and waves[1].count("SUCCEEDED") == 2
        # a canary whose daemon never adopts the update fails it: the ward never sees version 4
        devices.append(device("c2", "canary", daemon_id="nobody", adopt_timeout_s=1.0))
        assert wait(lambda: "c2" in fleet.snapshot(), 10)
        waves = rollout(fleet, pack(tmp_path, private, STAGE1, 4, groups=both), [["canary"], ["ward"]], timeout_s=60)
        assert len(waves) == 1 and "1 device(s) failed" in waves[0].stopped
        assert waves[0].verdicts["c2"]["state"] == "FAILED" and waves[0].verdicts["c1"]["state"] == "SUCCEEDED"
        time.sleep(1.0)
        assert [os.readlink(d.store.current) for d in devices] == ["versions/4", "versions/3", "versions/3",
                                                                   "versions/0", "versions/0"]
        with pytest.raises(UpdateError, match="not among the update's"):
            rollout(fleet, tmp_path / "pkg4", [["icu"]])
    finally:
        fleet.close()
        for d in devices:
            d.stop()


def test_a_fetch_a_restart_cut_short_is_tried_again_and_stray_messages_are_not_manifests(mosquitto, keys, tmp_path):
    import uuid

    from deploy.rollout import Fleet, read_package

    private, public = keys
    prefix = f"test/{uuid.uuid4().hex[:8]}"
    cfg = agent_config(tmp_path, public, prefix, daemon_id=None)
    store = ModelStore(cfg.store)
    store.ensure_factory(STAGE1)
    store.record(3, "QUEUED", seen=3)  # a run stopped while it fetched version 3: nothing installed
    (store.staging).mkdir()
    (store.staging / "half.safetensors").write_bytes(b"x" * 100)  # and left a download behind
    agent = Agent(cfg).start()
    fleet = Fleet(mosquitto, f"{prefix}/fleet")
    try:
        assert not (store.staging / "half.safetensors").exists()
        fleet.publish(fleet.topics.artifact("ab" * 32), b"not a manifest")  # retained, never awaited
        envelope, manifest, data = read_package(pack(tmp_path, private, STAGE2, 3), public)
        fleet.publish_update(envelope, manifest, data, ["ward3"])
        assert wait(lambda: agent.results[-1]["state"] in ("SUCCEEDED", "FAILED", "REJECTED"), 30)
        fleet.publish(fleet.topics.artifact("ab" * 32), b"again")
        time.sleep(0.5)
    finally:
        fleet.clear(fleet.topics.artifact("ab" * 32))
        fleet.close()
        agent.stop()
    assert [r["state"] for r in agent.results] == ["READY", "QUEUED", "IN_PROGRESS", "IN_PROGRESS", "SUCCEEDED"]
    assert os.readlink(store.current) == "versions/3" and list(store.staging.iterdir()) == []


def test_publish_reads_back_and_never_announces_what_the_broker_dropped(keys, tmp_path):
    import shutil as sh

    from deploy.rollout import Fleet, read_package

    if sh.which("mosquitto") is None:
        pytest.skip("no mosquitto binary to start a broker with a small message size limit")
    port = _free_port()
    conf = tmp_path / "small.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmessage_size_limit 100000\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from conftest import listening

        assert wait(lambda: listening("127.0.0.1", port), 10)
        private, public = keys
        envelope, manifest, data = read_package(pack(tmp_path, private, STAGE2, 3), public)
        fleet = Fleet(f"mqtt://127.0.0.1:{port}", "small/fleet", protocol="3.1.1")  # acknowledged, yet dropped
        try:
            with pytest.raises(UpdateError, match="does not hold it"):
                fleet.publish_update(envelope, manifest, data, ["ward3"])
            fleet.publish(fleet.topics.manifest("ward4"), b"{}")  # what fits is held and read back
            got = []
            fleet.client.on_message = lambda c, u, m: got.append(m.topic)
            fleet.client.subscribe("small/fleet/+/manifest", qos=1)
            time.sleep(1.0)
        finally:
            fleet.close()
        assert got == ["small/fleet/ward4/manifest"], "the manifest of the dropped model was never published"
    finally:
        broker.terminate()
        broker.wait(10)


def test_forget_clears_a_retired_device_and_an_old_model_file(mosquitto, panorama):
    import uuid

    from deploy.rollout import Fleet

    prefix = f"test/{uuid.uuid4().hex[:8]}/fleet"
    fleet = Fleet(mosquitto, prefix)
    sha = "cd" * 32
    try:
        fleet.publish(fleet.topics.state("old-bed"), json.dumps({"device": "old-bed", "state": "READY"}).encode())
        fleet.publish(fleet.topics.artifact(sha), b"an old model")
        assert wait(lambda: "old-bed" in fleet.snapshot(), 5)
    finally:
        fleet.close()
    r = panorama("fleet", "forget", "--device", "old-bed", "--artifact", sha, "--prefix", prefix, "--broker", mosquitto)
    assert r.returncode == 0 and "cleared 2 retained message(s)" in r.stdout, r.stderr
    r = panorama("fleet", "status", "--prefix", prefix, "--broker", mosquitto, "--wait", "1")
    assert "no device has reported" in r.stdout
    fresh = Fleet(mosquitto, prefix)
    got = []
    try:
        fresh.client.on_message = lambda c, u, m: got.append(m.topic)
        fresh.client.subscribe(fresh.topics.artifact(sha), qos=1)
        time.sleep(1.0)
    finally:
        fresh.close()
    assert got == [], "the old model file is no longer retained"
    r = panorama("fleet", "forget", "--prefix", prefix, "--broker", mosquitto)
    assert r.returncode == 2 and "name a --device or an --artifact" in r.stderr
