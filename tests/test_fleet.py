"""Fleet device-calibration updates without a broker: signed manifests and the golden
dry-run, the device's store, the daemon's model slot, the agent's refusals and config
(tests/test_fleet_mqtt.py: the agent, rollouts and the operator's commands through Mosquitto)."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from fleet_support import STAGE1, STAGE2, agent_config

from deploy import manifest as mf
from deploy.agent import Agent
from deploy.agent_config import load_agent_config
from deploy.store import ModelStore
from deploy.topics import FleetTopics
from edge.config import ModelConfig
from edge.model_slot import ModelSlot
from panorama import checkpoint
from panorama.errors import ConfigError, UpdateError


@pytest.fixture(scope="module")
def stage2_manifest() -> dict:
    return mf.build(STAGE2, 3, ["ward3"], ["monitor-x"])


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


def test_pack_says_which_recording_device_the_model_was_calibrated_for(keys, tmp_path, panorama):
    private, _ = keys
    r = panorama("fleet", "pack", STAGE2, "--key", private, "--version", "7", "--group", "ward3",
                 "--device-model", "monitor-x", "--out", tmp_path / "pkg")
    assert r.returncode == 0, r.stderr
    assert "version 7 for groups ward3 (monitor-x), stage 2 calibrated for recording device ludb, validation 29.10 dB," \
        in r.stdout
    art = json.loads((tmp_path / "pkg" / "manifest.json").read_text())["manifest"]["artifact"]
    assert art["calibrated_for"] == "ludb" and round(art["validation_psnr_db"], 2) == 29.10  # signed with the rest


def test_a_trust_file_of_two_keys_lets_the_signing_key_be_rotated(keys, stage2_manifest, tmp_path, panorama):
    old_private, old_public = keys
    r = panorama("fleet", "keygen", "--out", tmp_path / "new")
    assert r.returncode == 0, r.stderr
    new_private, new_public = tmp_path / "new" / "fleet.key", tmp_path / "new" / "fleet.pub"
    (new_id,) = mf.trusted_keys(new_public)
    assert f"key id {new_id}" in r.stdout
    both = tmp_path / "trust.pub"  # what devices hold while updates move to the new key
    both.write_bytes(old_public.read_bytes() + new_public.read_bytes())
    assert len(mf.trusted_keys(both)) == 2
    for private in (old_private, new_private):
        assert mf.verify(mf.sign(stage2_manifest, private), both) == stage2_manifest
    doc = json.loads(mf.sign(stage2_manifest, new_private))
    doc["key_id"] = "0" * 16  # the key id is a hint, not signed: every trusted key is tried
    assert mf.verify(json.dumps(doc).encode(), both) == stage2_manifest
    (old_id,) = mf.trusted_keys(old_public)
    with pytest.raises(UpdateError, match=f"the trusted key {new_id} \\(signed by key '{old_id}'"):
        mf.verify(mf.sign(stage2_manifest, old_private), new_public)  # the old key retired
    third, _ = mf.generate_keys(tmp_path / "third")
    with pytest.raises(UpdateError, match=f"trusted keys ({old_id}, {new_id}|{new_id}, {old_id})"):
        mf.verify(mf.sign(stage2_manifest, third), both)
    cut = new_public.read_bytes().replace(b"-----END PUBLIC KEY-----", b"----END PUBLIC KEY----")
    for bad, why in ((b"", "no PEM public key"), (old_private.read_bytes(), "holds a private key"),
                     (old_public.read_bytes() + new_private.read_bytes(), "holds a private key"),
                     (old_public.read_bytes() + cut, "something besides whole PEM public keys"),
                     (old_public.read_bytes() + b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
                      "public key 2 is not a PEM public key")):
        (tmp_path / "bad.pub").write_bytes(bad)
        with pytest.raises(UpdateError, match=why):
            mf.trusted_keys(tmp_path / "bad.pub")


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


def test_the_artifact_travels_in_signed_chunks_and_a_device_takes_only_matching_ones(stage2_manifest):
    from deploy.download import Download

    art, data = stage2_manifest["artifact"], STAGE2.read_bytes()
    assert stage2_manifest["schema"] == mf.SCHEMA_CHUNKED  # an agent reading only /1 refuses it, nothing used up
    plan = mf.chunk_plan(art)  # 64 KiB chunks by default: under AWS IoT Core's 128 KB a message
    assert len(plan) == -(-len(data) // (64 << 10)) > 1 and sum(n for _, n in plan) == len(data)
    pieces = mf.split(art, data)
    assert b"".join(pieces) == data and max(map(len, pieces)) == 64 << 10
    with pytest.raises(UpdateError, match="chunk 2 of the artifact differs"):
        mf.split(art, data[:2 << 16] + b"x" + data[(2 << 16) + 1:])  # a package whose file is not what was signed
    topics = FleetTopics("f")
    chunk = [topics.artifact_chunk(art["sha256"], 65536, i) for i in range(len(pieces))]
    assert chunk[1] == f"f/artifacts/{art['sha256']}/65536/1"  # the same file cut another way: other topics
    d = Download(topics, art)
    assert "of at most 64 KiB" in d.describe()
    assert d.next_topics(window=4) == (chunk[:4], [])  # asked for a window at a time
    assert d.next_topics(window=4) == ([], [])
    assert not d.offer(f"f/artifacts/{'ab' * 32}/65536/0", pieces[0])  # another artifact's: not ours
    for i in (1, 0):
        assert d.offer(chunk[i], pieces[i])
    assert d.next_topics(window=4) == (chunk[4:6], chunk[:2])  # the window moves on past what came
    assert d.asked_topics() == chunk[2:6]  # asked again after a reconnect or a stall
    for i in reversed(range(len(pieces))):  # any order, repeats welcome
        assert d.offer(chunk[i], pieces[i])
        assert d.finished.is_set() == (i <= 2)
    assert d.result() == data and d.parts == [None] * len(pieces)  # the bytes given up, not held by the agent
    d = Download(topics, art)
    d.offer(chunk[0], pieces[0])
    assert "5 of 6 chunks missing" in d.missing() and "(1, 2, 3, 4, 5)" in d.missing()
    d.offer(chunk[1], pieces[2], retained=False)  # a stray live copy: dropped, the download waits on
    assert not d.finished.is_set() and "(copies dropped: chunk 1 of 6 on" in d.missing()
    d.offer(chunk[1], pieces[2])  # a damaged retained copy (the broker holds it) ends it, naming the chunk
    with pytest.raises(UpdateError, match="chunk 1 of 6 on .*/1 differs from the sha256 its manifest signed"):
        d.result()
    d = Download(topics, art)
    d.offer(chunk[5], pieces[5] + b"more")
    with pytest.raises(UpdateError, match=f"chunk 5 of 6 .* is {len(pieces[5]) + 4} bytes, the manifest says"):
        d.result()
    whole = mf.build(STAGE2, 3, ["ward3"], ["monitor-x"], chunk_bytes=0)  # the whole file in one message
    assert whole["schema"] == mf.SCHEMA and "chunks" not in whole["artifact"]
    assert mf.split(whole["artifact"], data) == [data]
    d = Download(topics, whole["artifact"])
    assert d.next_topics() == ([topics.artifact(art["sha256"])], []) and d.describe() == "one message"
    d.offer(topics.artifact(art["sha256"]), data[:-1])
    with pytest.raises(UpdateError, match="the artifact on .* is .* bytes, the manifest says"):
        d.result()
    d = Download(topics, whole["artifact"])
    d.offer(topics.artifact(art["sha256"]), data[:-1] + b"x")  # the right size: its hash is checked as it comes
    with pytest.raises(UpdateError, match="the artifact on .* differs from the sha256 its manifest signed"):
        d.result()
    for bad in ({"chunk_bytes": 1024}, {"chunks": art["chunks"][:-1]}, {"chunks": ["x" * 64] * len(plan)},
                {"chunks": None}):
        garbled = json.loads(json.dumps(stage2_manifest))
        garbled["artifact"].update(bad)
        with pytest.raises(UpdateError, match="chunks do not add up"):
            mf.check_applicable(garbled, "ward3", "monitor-x", newest_seen=2)
    mixed = json.loads(json.dumps(stage2_manifest))
    mixed["schema"] = mf.SCHEMA  # chunks under the schema an old agent reads: it would wait for the whole file
    with pytest.raises(UpdateError, match="does not match how its artifact travels"):
        mf.check_applicable(mixed, "ward3", "monitor-x", newest_seen=2)
    with pytest.raises(ValueError, match="at least 16 KiB"):
        mf.build(STAGE2, 3, ["ward3"], ["monitor-x"], chunk_bytes=4096)


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


def test_a_model_an_update_retires_leaves_the_daemons_cache_and_kept_ones_stay(tmp_path, keys, stage2_manifest,
                                                                                monkeypatch):
    """Each update's model gets its own ONNX export (and engine on a Jetson); once no version
    on disk holds a model, the agent removes those from the daemon's cache."""
    import torch

    from export.cache import EngineCache, EngineKey, forget_models
    from export.onnx import cached_onnx
    from panorama.files import file_sha256

    cache = tmp_path / "cache"
    model, _ = checkpoint.load(STAGE2)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for path in (a, b):
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)  # another model: another content hash
        checkpoint.save(model, path)
    with monkeypatch.context() as env:
        env.setenv("PANORAMA_CACHE", str(cache))
        exports = {p: cached_onnx(p) for p in (a, b)}  # what the daemon made when it ran each
    engines = EngineCache(cache / "engines")
    for p, onnx in exports.items():
        engines.store(EngineKey("10.3.0", "Orin", "8.7", 16, "fp16", "test", file_sha256(onnx)), p.name.encode(), 1.0)

    store = ModelStore(tmp_path / "store")
    store.ensure_factory(STAGE1)
    manifest = lambda v: {**stage2_manifest, "version": v}  # noqa: E731
    assert store.install(1, a, manifest(1)) == [] and store.install(2, b, manifest(2)) == []
    retired = store.install(3, STAGE2, manifest(3))  # version 1 goes: only it held a
    assert retired == [checkpoint.read_header(a)["sha256"]]
    _, public = keys
    Agent(agent_config(tmp_path, public, "t", cache_dir=cache))._forget_cached(retired)
    assert not exports[a].exists() and exports[b].exists()
    left = sorted(p.name for p in (cache / "engines").iterdir() if p.suffix in (".engine", ".json"))
    assert len(left) == 2 and (cache / "engines" / left[0]).read_bytes() == b"b.safetensors"
    assert store.install(4, b, manifest(4)) == []  # version 2 goes, but version 4 holds b still
    assert exports[b].exists()
    unreadable = tmp_path / "not-a-cache"
    (unreadable / "onnx").parent.mkdir()
    (unreadable / "onnx").write_text("a file where the exports' folder should be")
    with pytest.raises(OSError):  # said, not taken for an empty cache
        forget_models([checkpoint.read_header(b)["sha256"]], unreadable)


_POWER_CUT = """
import os, sys
from deploy.store import ModelStore
store, op, cut = ModelStore(sys.argv[1]), sys.argv[2], sys.argv[3]
saves, save = [0], ModelStore._save
def cut_power(self, doc):  # the cut'th state.json write never happens, nor anything after it
    saves[0] += 1
    if str(saves[0]) == cut:
        os._exit(9)
    save(self, doc)
def cut_at_swap(self, version):
    os._exit(9)
ModelStore._save = cut_power
if cut == "swap":  # the link is never swapped
    ModelStore._point = cut_at_swap
store.record(2, "QUEUED", seen=2) if op == "install" else None
store.install(2, sys.argv[4], {"version": 2}) if op == "install" else store.rollback("it crashed")
"""


@pytest.mark.parametrize("op, cut, current, installed, previous, last", [
    ("install", "3", 2, 2, 1, (2, "QUEUED")),  # cut after the swap: installed, and left for the agent to gate
    ("install", "swap", 1, 1, 0, (2, "QUEUED")),  # cut at it: version 1 stays
    ("rollback", "2", 0, 0, None, (1, "FAILED")),  # cut after the swap back: the rollback is finished
])
def test_a_power_cut_around_the_swap_is_finished_at_the_next_start(tmp_path, op, cut, current, installed, previous,
                                                                    last):
    """A process killed between swapping ``current`` and writing state.json (os._exit: no handler
    runs): the next start's ``reconcile`` makes the state what the link says, so the agent gates
    an install it reached and records a rollback it reached as the failure it was."""
    import subprocess
    import sys

    store = ModelStore(tmp_path / "store")
    store.ensure_factory(STAGE1)
    store.install(1, STAGE2, {"version": 1})
    run = subprocess.run([sys.executable, "-c", _POWER_CUT, str(store.root), op, cut, str(STAGE2)],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert run.returncode == 9, run.stderr
    said = store.reconcile()
    assert said and ("did not finish" in said) == (cut == "swap"), said
    doc = store.state()
    assert os.readlink(store.current) == f"versions/{current}" and "pending" not in doc
    assert (doc["installed"], doc["previous"]) == (installed, previous)
    assert (doc["history"][-1]["version"], doc["history"][-1]["result"]) == last
    if op == "rollback":
        assert doc["history"][-1]["reason"] == "rolled back to version 0: it crashed (finished after a restart)"
    assert store.reconcile() == ""  # done once


def test_a_state_that_cannot_be_written_neither_stops_a_rollback_nor_leaves_a_swap_on_record(tmp_path, monkeypatch):
    """state.json failing (a full disk): an install whose last write fails is undone with no
    record of its swap left behind; a rollback swaps all the same, and the next start finishes
    its record (the version rolled away from FAILED)."""
    store = ModelStore(tmp_path / "store")
    store.ensure_factory(STAGE1)
    store.install(1, STAGE2, {"version": 1})
    save, calls = ModelStore._save, []

    def failing(fail_at):
        def _save(self, doc):
            calls.append(1)
            if len(calls) in fail_at:
                raise OSError(28, "No space left on device")
            save(self, doc)
        return _save

    monkeypatch.setattr(ModelStore, "_save", failing({2}))  # the write after the swap
    with pytest.raises(OSError, match="cannot record version 2 .*version 1 stays current"):
        store.install(2, STAGE2, {"version": 2})
    monkeypatch.setattr(ModelStore, "_save", save)
    assert os.readlink(store.current) == "versions/1" and "pending" not in store.state()
    assert store.reconcile() == ""
    store.record(2, "QUEUED", seen=2)
    store.install(2, STAGE2, {"version": 2})
    calls.clear()
    monkeypatch.setattr(ModelStore, "_save", failing({1, 2}))  # no write at all
    assert store.rollback("it crashed") == 1 and os.readlink(store.current) == "versions/1"
    monkeypatch.setattr(ModelStore, "_save", save)
    assert store.state()["installed"] == 2  # as far as state.json knows
    assert store.reconcile() == "the rollback from version 2 to 1 is finished"
    doc = store.state()
    assert (doc["installed"], doc["previous"]) == (1, None)
    assert doc["history"][-1] == {**doc["history"][-1], "version": 2, "result": "FAILED"}
    store.install(3, STAGE2, {"version": 3})
    assert store.rollback("it crashed too") == 1  # a rollback records its verdict in its own write
    assert store.state()["history"][-1]["reason"] == "rolled back to version 1: it crashed too"


def test_a_disk_that_fills_after_the_swap_leaves_the_previous_model_current(tmp_path, stage2_manifest):
    """A real full disk (a 4 MB tmpfs, filled so the new version fits and state.json does not):
    current goes back to the previous version, the new one is removed, and the verdict can be
    written."""
    import math
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        store = ModelStore(mnt / "store")
        store.ensure_factory(STAGE1)
        store.install(1, STAGE2, {**stage2_manifest, "version": 1})
        pages = lambda n: math.ceil(n / 4096) * 4096  # noqa: E731
        need = pages(STAGE2.stat().st_size) + pages(len(json.dumps({**stage2_manifest, "version": 2}, indent=1)))
        fs = os.statvfs(mnt)
        (mnt / "filler").write_bytes(bytes(fs.f_bavail * fs.f_frsize - need))
        with pytest.raises(OSError, match="cannot record version 2 .*No space left.*version 1 stays current"):
            store.install(2, STAGE2, {**stage2_manifest, "version": 2})
        assert os.readlink(store.current) == "versions/1" and store.state()["installed"] == 1
        assert sorted(p.name for p in store.versions.iterdir()) == ["0", "1"]
        store.record(2, "FAILED", "disk full")  # the room the new version took is the verdict's
        assert store.state()["history"][-1]["result"] == "FAILED"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


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


# ----------------------------------------------------------------------------- the agent, without a broker

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


def test_fleet_topics_refuse_what_would_collide():
    t = FleetTopics("panorama/fleet")
    assert t.manifest("ward3") == "panorama/fleet/ward3/manifest"
    for bad in ("devices", "artifacts", "a/b", "+"):
        with pytest.raises(ValueError):
            t.manifest(bad)
    with pytest.raises(ValueError, match="sha256"):
        t.artifact("abc")


def test_fleet_status_shows_what_a_device_wrote_without_its_control_characters(capsys):
    """A device's state is written by the device: a carriage return or an escape sequence in it
    must not redraw another row of the operator's table."""
    from deploy.cli import _print_states

    _print_states({"bed9": {"state": "FAILED", "version": 8, "reason": "x\r\x1b[2Kbed9  SUCCEEDED 8",
                            "model": {"stage": 2, "calibrated_for": "lu\x1bdb"}}})
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out
    assert "x\\r\\x1b[2Kbed9  SUCCEEDED 8" in out and "stage 2 · lu\\x1bdb" in out and "FAILED" in out


def test_publishing_a_version_devices_have_passed_is_warned_about(caplog):
    """A device refuses a version not newer than the newest it saw: the operator hears which
    devices would before anything goes out (their retained states: installed, handled, last)."""
    import logging

    from deploy.rollout import warn_stale

    states = {"w1": {"group": "ward", "installed": 8, "version": None},
              "w2": {"group": "ward", "installed": 3, "version": 4, "last": {"version": 9, "result": "FAILED"}},
              "w3": {"group": "ward", "installed": 5, "version": 5},
              "w4": {"group": "ward", "installed": 3, "version": 9, "state": "REJECTED"},  # a refusal: 9 not taken
              "w5": {"group": "ward", "installed": 3, "last": "written by anyone"},
              "i1": {"group": "icu", "installed": 12}}
    with caplog.at_level(logging.WARNING, logger="panorama.fleet"):
        assert warn_stale(states, 5, ["ward"]) == ["w1", "w2"]  # w3 holds 5: it answers again, never refuses
        assert warn_stale(states, 10, ["ward"]) == []
    assert "2 device(s) of ward already hold or handled a version newer than 5 and will refuse it: w1, w2" \
        in caplog.text


def test_a_daemon_started_after_the_agent_is_not_taken_for_offline_by_its_last_will(keys, tmp_path):
    """The broker still holds a daemon's last will (offline, retained) when it starts again
    after the agent; it reports its health, with the new model, before it says online. The
    gate passes; an offline that comes after its reports fails it."""
    import threading
    import time

    from paho.mqtt.client import MQTTMessage

    from deploy.gate import HealthGate

    def msg(topic, payload, retain=False):
        m = MQTTMessage(topic=topic.encode())
        m.payload, m.retain = payload, retain
        return m

    _, public = keys
    gate = HealthGate(agent_config(tmp_path, public, "t", adopt_timeout_s=5.0, health_timeout_s=2.0, healthy_s=0.6))
    report = json.dumps({"model": {"sha256": "new", "inference_failures": 0}}).encode()
    assert gate.offer(msg(gate.status_topic, b"offline", retain=True))  # the will of its last run
    stop = threading.Event()

    def daemon(online: bool):
        for i in range(8):
            time.sleep(0.1)
            gate.offer(msg(gate.health_topic, report))
            if i == 2:
                gate.offer(msg(gate.status_topic, b"online" if online else b"offline"))
                if not online:  # stopped: it reports no more
                    return

    for online, verdict in ((True, None), (False, "the daemon went offline")):
        t = threading.Thread(target=daemon, args=(online,))
        t.start()
        assert gate.check("new", "/store/versions/1/model.safetensors", stop) == verdict
        t.join()
