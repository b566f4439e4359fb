"""Fleet device-calibration updates through a real Mosquitto broker: the agent beside a
running daemon, its health gate and rollback, restarts, rollouts in waves, the publish
read-back and the operator's commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, free_port, listening, wait
from fleet_support import STAGE1, STAGE2, agent_config, pack

from deploy import manifest as mf
from deploy.agent import Agent
from deploy.store import ModelStore
from panorama import checkpoint
from panorama.errors import UpdateError


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
        assert wait(lambda: agent.gate.health is not None, 90), "the daemon never reported its health"
        stage1 = checkpoint.read_header(STAGE1)["sha256"]
        assert agent.gate.health[1]["model"]["sha256"] == stage1
        # an update: published by the operator's command, installed, adopted by the running daemon
        r = panorama("fleet", "publish", pack(tmp_path, private, STAGE2, 3), "--prefix", f"{prefix}/fleet",
                     "--broker", mosquitto)
        assert r.returncode == 0, r.stderr
        assert wait(lambda: agent.results and agent.results[-1]["state"] in ("SUCCEEDED", "FAILED"), 90)
        assert [r["state"] for r in agent.results] == ["READY", "QUEUED", "IN_PROGRESS", "IN_PROGRESS", "SUCCEEDED"]
        assert agent.gate.health[1]["model"]["sha256"] == checkpoint.read_header(STAGE2)["sha256"]
        assert os.readlink(agent.store.current) == "versions/3"
        # the operator sees it too
        r = panorama("fleet", "status", "--prefix", f"{prefix}/fleet", "--broker", mosquitto, "--wait", "1")
        assert "bed7" in r.stdout and "SUCCEEDED" in r.stdout
        row = next(line for line in r.stdout.splitlines() if line.startswith("bed7"))
        calibrated_for = checkpoint.read_header(STAGE2)["meta"]["device_id"]
        assert f"stage 2 · {calibrated_for}" in row, r.stdout  # the model installed, and for which device
        assert agent.results[0]["model"] == {"stage": 1, "calibrated_for": ""}  # the factory model at READY
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


def test_a_gate_on_a_daemon_that_never_reported_names_the_id_it_waited_for(mosquitto, keys, tmp_path, caplog):
    import logging
    import uuid

    _, public = keys
    cfg = agent_config(tmp_path, public, f"test/{uuid.uuid4().hex[:8]}", daemon_id="bed-edge-4",
                       health_timeout_s=0.5, adopt_timeout_s=30.0)
    store = ModelStore(cfg.store)
    store.ensure_factory(STAGE1)
    store.record(3, "QUEUED", seen=3)
    store.install(3, STAGE2, mf.build(STAGE2, 3, ["ward3"], ["monitor-x"]))
    with caplog.at_level(logging.INFO, logger="panorama.fleet"):
        agent = Agent(cfg).start()  # the daemon is bed-edge-04: nothing ever comes on bed-edge-4's topic
        try:
            assert wait(lambda: agent.results[-1]["state"] != "READY", 20)
        finally:
            agent.stop()
    why = agent.results[-1]["reason"]
    assert f"(none ever came on {cfg.daemon_prefix}/_daemon/bed-edge-4/health: is daemon_id 'bed-edge-4' the " \
           "daemon's mqtt.daemon_id, and daemon_prefix its mqtt.prefix?)" in why, why
    assert f"gating updates on the health of daemon 'bed-edge-4' ({cfg.daemon_prefix}/_daemon/bed-edge-4/health)" \
        in caplog.text


def test_under_systemd_the_agent_is_ready_once_its_store_holds_a_model(mosquitto, keys, tmp_path, monkeypatch):
    import socket
    import tempfile
    import uuid

    folder = tempfile.mkdtemp(prefix="sd")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # what systemd hands a Type=notify service
    sock.bind(f"{folder}/notify")
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", f"{folder}/notify")
    agent = Agent(agent_config(tmp_path, keys[1], f"test/{uuid.uuid4().hex[:8]}", daemon_id=None)).start()
    try:
        ready = sock.recv(4096).decode()
        assert ready.startswith("READY=1\nSTATUS=store ") and ready.endswith("version 0")
        assert agent.store.model_path.read_bytes() == STAGE1.read_bytes()  # what the daemon, started next, loads
    finally:
        agent.stop()
    assert sock.recv(4096).decode() == "STOPPING=1"
    sock.close()


def test_rollout_goes_wave_by_wave_and_stops_before_the_next_when_one_fails(mosquitto, keys, tmp_path, caplog):
    import logging
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
        with caplog.at_level(logging.INFO, logger="panorama.fleet"):
            waves = rollout(fleet, pack(tmp_path, private, STAGE2, 3, groups=both), [["canary"], ["ward"]],
                            timeout_s=60)
        assert [w.stopped for w in waves] == ["", ""] and [w.count("SUCCEEDED") for w in waves] == [1, 2]
        said = [r.getMessage() for r in caplog.records if r.name == "panorama.fleet"]
        for name in ("c1", "w1", "w2"):  # each device's progress is said as it comes, not only the verdict
            assert f"  {name}: SUCCEEDED version 3 (installed (no daemon to gate on))" in said, said
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


def test_a_broker_that_caps_messages_gets_the_model_in_chunks_and_publish_reads_back(keys, tmp_path):
    import shutil as sh

    from deploy.rollout import Fleet, read_package

    if sh.which("mosquitto") is None:
        pytest.skip("no mosquitto binary to start a broker with a small message size limit")
    port = free_port()
    conf = tmp_path / "small.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmessage_size_limit 100000\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"mqtt://127.0.0.1:{port}"
    try:
        assert wait(lambda: listening("127.0.0.1", port), 10)
        private, public = keys
        # the model as one 346 kB message: acknowledged, yet dropped, so its manifest never goes out
        envelope, manifest, data = read_package(pack(tmp_path, private, STAGE2, 3, chunk_bytes=0), public)
        fleet = Fleet(url, "small/fleet", protocol="3.1.1")
        got = []
        try:
            with pytest.raises(UpdateError, match="does not hold it"):
                fleet.publish_update(envelope, manifest, data, ["ward3"])
            fleet.publish(fleet.topics.manifest("ward4"), b"{}")  # what fits is held and read back
            fleet.client.on_message = lambda c, u, m: got.append(m.topic)
            fleet.client.subscribe("small/fleet/+/manifest", qos=1)
            time.sleep(1.0)
        finally:
            fleet.close()
        assert got == ["small/fleet/ward4/manifest"], "the manifest of the dropped model was never published"
        # in 64 KiB chunks (pack's default) the same broker carries it, and a device behind it installs it
        cfg = agent_config(tmp_path, public, "small", daemon_id=None, broker=url, protocol="3.1.1")
        agent = Agent(cfg).start()
        fleet = Fleet(url, "small/fleet", protocol="3.1.1")
        try:
            envelope, manifest, data = read_package(pack(tmp_path, private, STAGE2, 4), public)
            assert len(manifest["artifact"]["chunks"]) == 6
            fleet.publish_update(envelope, manifest, data, ["ward3"])
            assert wait(lambda: agent.results[-1]["state"] in ("SUCCEEDED", "FAILED", "REJECTED"), 30)
        finally:
            fleet.close()
            agent.stop()
        assert [r["state"] for r in agent.results] == ["READY", "QUEUED", "IN_PROGRESS", "IN_PROGRESS", "SUCCEEDED"]
        assert "6 chunks of at most 64 KiB" in agent.results[2]["reason"]
        assert os.readlink(agent.store.current) == "versions/4"
        assert agent.store.model_path.read_bytes() == STAGE2.read_bytes()
    finally:
        broker.terminate()
        broker.wait(10)


def test_a_broker_that_queues_few_messages_still_delivers_every_chunk_and_a_damaged_one_fails_at_once(
        keys, tmp_path, monkeypatch, caplog):
    import logging
    import shutil as sh

    import deploy.agent
    from deploy.rollout import Fleet, read_package

    if sh.which("mosquitto") is None:
        pytest.skip("no mosquitto binary to start a broker that queues few messages")
    port = free_port()
    conf = tmp_path / "few.conf"  # a subscription's retained burst beyond 4 queued + 2 in flight is dropped
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 4\n"
                    "max_inflight_messages 2\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"mqtt://127.0.0.1:{port}"
    monkeypatch.setattr(deploy.agent, "RESUBSCRIBE_S", 1.0)  # ask again for what did not come after 1 s, not 5
    try:
        assert wait(lambda: listening("127.0.0.1", port), 10)
        private, public = keys
        cfg = agent_config(tmp_path, public, "few", daemon_id=None, broker=url, artifact_timeout_s=20.0)
        agent = Agent(cfg).start()
        fleet = Fleet(url, "few/fleet")
        try:
            # version 3: chunk 7 replaced on the broker by other bytes: refused as it comes, not after a timeout
            envelope, manifest, data = read_package(pack(tmp_path, private, STAGE2, 3, chunk_bytes=16 << 10), public)
            art = manifest["artifact"]
            assert len(art["chunks"]) == 22
            fleet.publish_update(envelope, manifest, data, [])  # the chunks, no manifest yet
            fleet.publish(fleet.topics.artifact_chunk(art["sha256"], 16 << 10, 7), b"x" * (16 << 10))
            t0 = time.monotonic()
            fleet.publish(fleet.topics.manifest("ward3"), envelope)
            assert wait(lambda: agent.results[-1]["state"] in ("SUCCEEDED", "FAILED", "REJECTED"), 30)
            assert agent.results[-1]["state"] == "FAILED" and time.monotonic() - t0 < 15
            assert "chunk 7 of 22 on few/fleet/artifacts/" in agent.results[-1]["reason"]
            assert "differs from the sha256 its manifest signed" in agent.results[-1]["reason"]
            # version 4, whole: 22 chunks, a burst the broker cannot queue; what it drops is asked for again
            envelope, manifest, data = read_package(pack(tmp_path, private, STAGE2, 4, chunk_bytes=16 << 10), public)
            caplog.set_level(logging.INFO, logger="panorama.fleet")
            fleet.publish_update(envelope, manifest, data, ["ward3"])
            assert wait(lambda: agent.results[-1]["version"] == 4 and agent.results[-1]["state"] in
                        ("SUCCEEDED", "FAILED", "REJECTED"), 60)
        finally:
            fleet.forget(fleet.topics.artifact_all(art["sha256"]))
            fleet.close()
            agent.stop()
        assert agent.results[-1]["state"] == "SUCCEEDED", agent.results[-1]
        assert agent.store.model_path.read_bytes() == STAGE2.read_bytes()
        assert "did not come: asking again" in caplog.text  # the broker did drop some, and they came after all
    finally:
        broker.terminate()
        broker.wait(10)


def test_forget_clears_a_retired_device_and_an_old_model_file(mosquitto, panorama):
    import uuid

    from deploy.rollout import Fleet

    prefix = f"test/{uuid.uuid4().hex[:8]}/fleet"
    fleet = Fleet(mosquitto, prefix)
    sha, chunked, never = "cd" * 32, "ef" * 32, "01" * 32
    try:
        fleet.publish(fleet.topics.state("old-bed"), json.dumps({"device": "old-bed", "state": "READY"}).encode())
        fleet.publish(fleet.topics.artifact(sha), b"an old model")  # in one message
        for i in range(2):  # and one in chunks
            fleet.publish(fleet.topics.artifact_chunk(chunked, 16384, i), b"a chunk of another")
        # a state filed under another device's topic is not that device's answer (a forged verdict)
        fleet.publish(fleet.topics.state("impostor"), json.dumps({"device": "bed7", "state": "SUCCEEDED"}).encode())
        # a group's retained manifest still names the one-message model file
        fleet.publish(fleet.topics.manifest("ward"), json.dumps({"manifest": {"version": 7, "artifact": {
            "sha256": sha}}}).encode())
        assert wait(lambda: "old-bed" in fleet.snapshot(), 5)
        time.sleep(0.5)
        assert set(fleet.snapshot()) == {"old-bed"}
        fleet.clear(fleet.topics.state("impostor"))
    finally:
        fleet.close()
    forget = ("fleet", "forget", "--device", "old-bed", "--device", "never-seen", "--artifact", sha, "--artifact",
              chunked, "--artifact", never, "--prefix", prefix, "--broker", mosquitto)
    r = panorama(*forget)  # devices coming back to ward would fail version 7 for want of its file: refused
    assert r.returncode == 2 and "a retained manifest still names that model file: group ward (version 7" in r.stderr
    assert "Withdraw the manifest too (--manifest GROUP)" in r.stderr, r.stderr
    r = panorama(*forget, "--manifest", "ward", "--manifest", "icu")
    assert r.returncode == 0 and "cleared 5 retained message(s)" in r.stdout, r.stderr
    assert "the broker holds no manifest of group 'icu' that this client may read" in r.stdout
    assert "the broker holds no state of device 'never-seen' that this client may read" in r.stdout
    assert "the broker holds no message of artifact 0101010101010101…" in r.stdout
    r = panorama("fleet", "status", "--prefix", prefix, "--broker", mosquitto, "--wait", "1")
    assert "no device has reported" in r.stdout
    fresh = Fleet(mosquitto, prefix)
    got = []
    try:
        fresh.client.on_message = lambda c, u, m: got.append(m.topic)
        for a in (sha, chunked):
            fresh.client.subscribe(fresh.topics.artifact_all(a), qos=1)
        time.sleep(1.0)
    finally:
        fresh.close()
    assert got == [], "the old model files are no longer retained"
    r = panorama("fleet", "forget", "--prefix", prefix, "--broker", mosquitto)
    assert r.returncode == 2 and "name a --device, a --manifest or an --artifact" in r.stderr
