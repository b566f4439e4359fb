"""``panorama fleet agent``: the device side of fleet device-calibration updates.

One process beside the daemon. It listens for the signed manifest of its group, and for each
new one: verify signature → check version, expiry and target → fetch the artifact →
check size and sha256 → dry-run (load it, draw the golden views) → install into the store and
swap ``current`` → health gate: the daemon (watching ``model.path``) must report the new
model's hash within ``adopt_timeout_s`` and then stay online, with no inference failure, for
``healthy_s``; otherwise ``current`` goes back to the previous version. Every step is
acknowledged on the device's retained state topic::

    {prefix}/{group}/manifest          operator → devices   signed envelope (deploy/topics.py)
    {prefix}/artifacts/{sha256}        operator → devices   the checkpoint's bytes
    {prefix}/devices/{device}/state    device → operator    QUEUED, IN_PROGRESS, SUCCEEDED, FAILED or
                                                            REJECTED, with version, hash and reason

Threads: paho's network thread only files messages (manifests into a bounded queue, the
daemon's health and status into two fields, an awaited artifact into its slot); one worker
thread does everything else, one update at a time; edge.mqtt.Publisher publishes.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from edge import mqtt as mq
from edge.config import _Strict
from edge.protocol import CONTENT_TYPE_JSON
from edge.topics import Topics
from panorama.errors import ConfigError, UpdateError

from . import manifest as mf
from .store import ModelStore
from .topics import FleetTopics

MAX_MANIFEST_BYTES = 1 << 20

log = logging.getLogger("panorama.fleet")
STATES = ("READY", "QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED")


class _Stopped(Exception):
    """The agent is stopping in the middle of a health gate."""


class AgentConfig(_Strict):
    broker: str = "mqtt://127.0.0.1:1883"
    protocol: Literal["5", "3.1.1"] = "5"
    prefix: str = Field("panorama/fleet", description="root of the fleet topics")
    group: str = Field(description="the rollout group this device belongs to (its manifest topic)")
    device_id: str = Field(default_factory=lambda: socket.gethostname().split(".")[0][:48] or "edge")
    device_model: str = Field(description="this device's model; a manifest must name it in target.device_models")
    public_key: Path = Field(description="the fleet operator's Ed25519 public key (fleet.pub), outside the store")
    store: Path = Field(description="the model store; the daemon's model.path is STORE/current/model.safetensors")
    factory_model: Path | None = Field(None, description="version 0 of an empty store (default: the shipped model)")
    daemon_prefix: str = Field("ecg/v1", description="the daemon's mqtt.prefix")
    daemon_id: str | None = Field(default_factory=lambda: socket.gethostname().split(".")[0][:48] or "edge",
                                  description="the daemon whose health gates an update; null: no gate")
    adopt_timeout_s: float = Field(900.0, gt=0, description="the daemon must run the new model within this "
                                   "(a TensorRT engine build on a Jetson takes minutes)")
    healthy_s: float = Field(60.0, ge=0, description="then stay healthy this long, or the update is rolled back")
    health_timeout_s: float = Field(30.0, gt=0, description="no daemon health report for this long is a failure")
    artifact_timeout_s: float = Field(120.0, gt=0)
    max_artifact_bytes: int = Field(64 << 20, ge=1024)


def check_agent_config(cfg: AgentConfig) -> None:
    """What pydantic cannot see: topics, the store's folder, the factory model, the key.
    ValueError or UpdateError naming the setting, before anything is created."""
    FleetTopics(cfg.prefix).manifest(cfg.group)
    FleetTopics(cfg.prefix).state(cfg.device_id)
    mq.parse_broker_url(cfg.broker)
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
    mf._load_key(cfg.public_key, private=False)  # a missing or wrong key: said now, not at the first update


def load_agent_config(path: Path) -> AgentConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    try:
        cfg = AgentConfig.model_validate(raw if raw is not None else {})
        check_agent_config(cfg)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from exc
    except (ValueError, UpdateError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return cfg


class Agent:
    def __init__(self, cfg: AgentConfig):
        check_agent_config(cfg)
        self.cfg = cfg
        self.topics = FleetTopics(cfg.prefix)
        self.store = ModelStore(cfg.store)
        self.store.lock()  # one agent per store
        try:
            self.store.state()  # a damaged state.json stops the agent here, not its worker later
            self.store.sweep()
            if cfg.factory_model is None:
                from panorama.synth import default_checkpoint
                factory = default_checkpoint()
            else:
                factory = cfg.factory_model
            self.store.ensure_factory(factory)
        except BaseException:
            self.store.unlock()
            raise
        daemon = Topics(cfg.daemon_prefix)
        self.health_topic = daemon.health(cfg.daemon_id) if cfg.daemon_id else None
        self.status_topic = daemon.daemon_status(cfg.daemon_id) if cfg.daemon_id else None
        self.manifest_topic = self.topics.manifest(cfg.group)
        self.manifests: queue.Queue = queue.Queue(maxsize=16)
        self.health: tuple[float, dict] | None = None  # (monotonic time, last health report)
        self.daemon_status = b""
        self.artifact_topic: str | None = None
        self.artifact: bytes | None = None
        self.got_artifact = threading.Event()
        self.stopping = threading.Event()
        self.results: list[dict] = []  # every ack sent, for the log and the tests
        self.client = mq.make_client(mq.client_id("fleet"), cfg.protocol)
        self.publisher = mq.Publisher(self.client, maxsize=256, protocol=cfg.protocol)
        self.worker = threading.Thread(target=self._work, name="fleet-worker", daemon=True)

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> "Agent":
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.publisher.start()
        mq.connect(self.client, self.cfg.broker)
        last = (self.store.state()["history"] or [{}])[-1]
        # so an operator's rollout knows this device before its first update; the last verdict stays in the reason
        self._ack(None, "READY", f"last: version {last['version']} {last['result']}"
                  + (f" ({last['reason']})" if last.get("reason") else "") if last else "no update yet")
        self.worker.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.worker.join(timeout=10)
        self.publisher.stop(timeout=5)
        self.client.loop_stop()
        self.client.disconnect()
        self.store.unlock()

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            return
        subs = [(self.manifest_topic, 1)]
        if self.health_topic:
            subs += [(self.health_topic, 0), (self.status_topic, 1)]
        if self.artifact_topic:
            subs.append((self.artifact_topic, 1))
        client.subscribe(subs)

    def _on_message(self, client, userdata, msg):
        if msg.topic == self.health_topic:
            try:
                self.health = (time.monotonic(), json.loads(msg.payload))
            except ValueError:
                log.warning("unreadable daemon health report ignored")
        elif msg.topic == self.status_topic:
            self.daemon_status = bytes(msg.payload)
        elif msg.topic == self.artifact_topic:
            self.artifact = bytes(msg.payload)
            self.got_artifact.set()
        elif msg.topic != self.manifest_topic:
            return  # an artifact no longer awaited (a late or repeated copy): not a manifest
        elif len(msg.payload) > MAX_MANIFEST_BYTES:
            log.warning("a %d-byte message on the manifest topic ignored: a manifest is a few kB", len(msg.payload))
        else:
            try:
                self.manifests.put_nowait(bytes(msg.payload))
            except queue.Full:
                log.warning("manifest queue full: a manifest was dropped (the retained one comes back on reconnect)")

    # ---- one update -------------------------------------------------------------------
    def _work(self) -> None:
        try:
            self._finish_interrupted()
        except Exception:
            log.exception("could not finish the update a previous run left unconfirmed")
        while not self.stopping.is_set():
            try:
                envelope = self.manifests.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.handle(envelope)
            except Exception as exc:  # the agent outlives any one update
                log.exception("update handling failed")
                self._ack(None, "FAILED", f"internal error: {type(exc).__name__}: {exc}")

    def handle(self, envelope: bytes) -> str:
        """Carry one manifest through; returns the final state (or 'IGNORED')."""
        if not envelope:
            return "IGNORED"  # a cleared retained manifest
        try:
            m = mf.verify(envelope, self.cfg.public_key)
        except UpdateError as exc:
            return self._ack(None, "REJECTED", str(exc))
        version = m.get("version")
        state = self.store.state()
        newest = int(state["newest_seen"])
        done = [h["result"] for h in state["history"] if h.get("version") == version]
        if version == state.get("installed") or (done and version == newest and done[-1] != "QUEUED"):
            # the retained manifest again, after a restart or reconnect: answered before
            log.info("version %s was handled before (%s)", version, done[-1] if done else "installed")
            return "IGNORED"
        if done and version == newest:  # QUEUED, never installed: a run stopped while fetching it; again
            log.warning("version %s was interrupted before it was installed: trying again", version)
            newest -= 1
        try:
            mf.check_applicable(m, self.cfg.group, self.cfg.device_model, newest)
            size = int(m["artifact"]["size"])
            if size > self.cfg.max_artifact_bytes:
                raise UpdateError(f"artifact of {size} bytes exceeds max_artifact_bytes {self.cfg.max_artifact_bytes}")
        except UpdateError as exc:
            return self._ack(m, "REJECTED", str(exc))
        self.store.record(version, "QUEUED", seen=version)  # from now on this version is never tried again
        self._ack(m, "QUEUED", "")
        self._ack(m, "IN_PROGRESS", "fetching the artifact")
        staged = self.store.staging / f"{m['artifact']['sha256']}.safetensors"
        try:
            self.store.stage(self._fetch(m["artifact"]["sha256"]), staged.name)
            mf.check_artifact(m, staged)
            err = mf.dry_run(m, staged)
            self._ack(m, "IN_PROGRESS", f"dry-run passed ({err:.2f} µV from the golden views); installing")
            self.store.install(version, staged, m)
        except _Stopped:  # left QUEUED: the next start fetches it again
            return "INTERRUPTED"
        except (UpdateError, OSError) as exc:
            self.store.record(version, "FAILED", str(exc))
            return self._ack(m, "FAILED", str(exc))
        finally:
            self.artifact = None  # the bytes are on disk or refused: do not hold them
            staged.unlink(missing_ok=True)
        log.info("version %s installed; %s", version, "gating on the daemon's health" if self.health_topic
                 else "no daemon to gate on")
        return self._conclude(m, "the daemon runs it")

    def _conclude(self, m: dict, success: str) -> str:
        """The health gate of an installed update, then its verdict: kept, or rolled back."""
        try:
            problem = self._gate(m) if self.health_topic else None
        except _Stopped:  # left unconfirmed: the next start gates it again (_finish_interrupted)
            log.warning("stopped during the health gate of version %s; it is gated again at the next start",
                        m["version"])
            return "INTERRUPTED"
        if problem:
            prev = self.store.rollback()
            why = f"rolled back to version {prev}: {problem}"
            self.store.record(m["version"], "FAILED", why)
            return self._ack(m, "FAILED", why)
        self.store.record(m["version"], "SUCCEEDED")
        return self._ack(m, "SUCCEEDED", success if self.health_topic else "installed (no daemon to gate on)")

    def _finish_interrupted(self) -> None:
        """An update installed by a run that stopped before its health gate ended (a power
        cut, a restart) is gated now, and rolled back if the daemon does not run it well."""
        state = self.store.state()
        v = state.get("installed")
        ends = [h["result"] for h in state["history"] if h.get("version") == v]
        if not v or not ends or ends[-1] != "QUEUED":
            return
        m = json.loads((self.store.versions / str(v) / "manifest.json").read_text())
        log.warning("version %s was installed but its health gate never ended: gating it now", v)
        self._conclude(m, "the daemon runs it (gated after a restart)")

    def _fetch(self, sha256: str) -> bytes:
        topic = self.topics.artifact(sha256)
        self.artifact, self.artifact_topic = None, topic
        self.got_artifact.clear()
        self.client.subscribe(topic, qos=1)
        deadline = time.monotonic() + self.cfg.artifact_timeout_s
        try:
            while not self.got_artifact.wait(0.2):
                if self.stopping.is_set():
                    raise _Stopped
                if time.monotonic() > deadline:
                    raise UpdateError(f"no artifact on {topic} within {self.cfg.artifact_timeout_s:g} s")
            return self.artifact
        finally:
            self.artifact_topic = None
            self.client.unsubscribe(topic)

    def _gate(self, m: dict) -> str | None:
        """None when the daemon adopts the new model and stays healthy; else what went wrong."""
        want = m["artifact"]["model_sha256"]
        installed = str((self.store.versions / str(m["version"]) / mf.ARTIFACT_NAME).resolve())
        start = time.monotonic()
        deadline = start + self.cfg.adopt_timeout_s
        while True:  # adoption
            if self.stopping.is_set():
                raise _Stopped
            heard = max(start, self.health[0]) if self.health else start
            if time.monotonic() - heard > self.cfg.health_timeout_s:  # down, or crash-looping on the new model
                return (f"no health report from the daemon for {self.cfg.health_timeout_s:g} s"
                        + (" (it is offline)" if self.daemon_status == b"offline" else ""))
            model = (self.health[1].get("model") or {}) if self.health else {}
            if model.get("sha256") == want:
                break
            if model.get("reload_error") and model.get("failed_file") == installed:
                return f"the daemon could not load it: {model['reload_error']}"
            if time.monotonic() > deadline:
                return f"the daemon did not report the new model within {self.cfg.adopt_timeout_s:g} s"
            time.sleep(0.2)
        failures = int(model.get("inference_failures", 0))
        end = time.monotonic() + self.cfg.healthy_s
        while time.monotonic() < end:  # then health
            if self.stopping.is_set():
                raise _Stopped
            seen, doc = self.health
            model = doc.get("model") or {}
            if self.daemon_status == b"offline":
                return "the daemon went offline"
            if time.monotonic() - seen > self.cfg.health_timeout_s:
                return f"no health report from the daemon for {self.cfg.health_timeout_s:g} s"
            if model.get("sha256") != want:
                return "the daemon stopped running the new model"
            if int(model.get("inference_failures", 0)) > failures:
                return f"inference failed {int(model['inference_failures']) - failures} time(s) on the new model"
            time.sleep(0.2)
        return None

    def _ack(self, m: dict | None, state: str, reason: str) -> str:
        doc = {"device": self.cfg.device_id, "group": self.cfg.group, "device_model": self.cfg.device_model,
               "state": state, "reason": reason,
               "version": m.get("version") if m else None,
               "sha256": (m.get("artifact") or {}).get("sha256") if m else None,
               "installed": self.store.current_version(), "t": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (log.warning if state in ("FAILED", "REJECTED") else log.info)(
            "update %s: %s%s", doc["version"], state, f" ({reason})" if reason else "")
        self.results.append(doc)
        self.publisher.put(self.topics.state(self.cfg.device_id), json.dumps(doc).encode(), qos=1, retain=True,
                           content_type=CONTENT_TYPE_JSON)
        return state
