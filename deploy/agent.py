"""``panorama fleet agent``: the device side of fleet device-calibration updates.

One process beside the daemon. It listens for the signed manifest of its group, and for each
new one: verify signature → check version, expiry and target → fetch the artifact →
check size and sha256 → dry-run (load it, draw the golden views) → install into the store and
swap ``current`` → health gate: the daemon (watching ``model.path``) must report the new
model's hash within ``adopt_timeout_s`` and then stay online, with no inference failure, for
``healthy_s``; otherwise ``current`` goes back to the previous version. Every step is
acknowledged on the device's retained state topic::

    {prefix}/{group}/manifest          operator → devices   signed envelope (deploy/topics.py)
    {prefix}/artifacts/{sha256}/{n}/{i}  operator → devices the checkpoint's bytes, in chunks whose hashes
                                                            the manifest signs (deploy/download.py)
    {prefix}/devices/{device}/state    device → operator    READY, QUEUED, IN_PROGRESS, SUCCEEDED, FAILED
                                                            or REJECTED, with version, hash, reason and
                                                            the last verdict

Threads: paho's network thread only files messages (manifests into a bounded queue, the
daemon's health and status into the HealthGate of deploy/gate.py, an awaited artifact's
messages into its Download); one worker thread does everything else, one update at a time;
edge.mqtt.Publisher publishes.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque

from edge import mqtt as mq
from edge.protocol import CONTENT_TYPE_JSON
from edge.sdnotify import notify
from panorama import checkpoint as ckpt
from panorama.errors import CheckpointError, UpdateError

from . import manifest as mf
from .agent_config import AgentConfig, check_agent_config
from .download import Download
from .gate import HealthGate, Stopped
from .store import ModelStore
from .topics import FleetTopics

MAX_MANIFEST_BYTES = 1 << 20  # a manifest with the hashes of 4,096 chunks is about 290 kB
RESUBSCRIBE_S = 5.0  # a part asked for and not come by then is asked for again (then after 10 s, 20 s, ...)
FILTERS_PER_PACKET = 8  # topic filters in one SUBSCRIBE: AWS IoT Core takes no more

log = logging.getLogger("panorama.fleet")
STATES = ("READY", "QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED")
FINAL = ("SUCCEEDED", "FAILED")  # verdicts the store's history keeps (a refusal is said, not kept)


class Agent:
    def __init__(self, cfg: AgentConfig):
        check_agent_config(cfg)
        self.cfg = cfg
        self.broker = cfg.endpoint()
        self.topics = FleetTopics(cfg.prefix)
        self.store = ModelStore(cfg.store)
        self.store.lock()  # one agent per store
        try:
            self.store.state()  # a damaged state.json stops the agent here, not its worker later
            self.store.sweep()
            if said := self.store.reconcile():  # a power cut between a swap of current and its state
                log.warning("%s", said)
            if cfg.factory_model is None:
                from panorama.synth import default_checkpoint
                factory = default_checkpoint()
            else:
                factory = cfg.factory_model
            self.store.ensure_factory(factory)
        except BaseException:
            self.store.unlock()
            raise
        self.gate = HealthGate(cfg)  # the daemon's health and status, and the verdict on an update (deploy/gate.py)
        self.health_topic = self.gate.health_topic
        self.manifest_topic = self.topics.manifest(cfg.group)
        self.manifests: queue.Queue = queue.Queue(maxsize=16)
        self.download: Download | None = None  # the artifact being fetched
        self.stopping = threading.Event()
        self.results: deque[dict] = deque(maxlen=256)  # the latest acks sent, for the log and the tests
        self.client = mq.make_client(mq.client_id("fleet"), cfg.protocol)
        self.publisher = mq.Publisher(self.client, maxsize=256, protocol=cfg.protocol)
        self.worker = threading.Thread(target=self._work, name="fleet-worker", daemon=True)

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> "Agent":
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.publisher.start()
        mq.connect(self.client, self.broker, max_packet=self.cfg.max_artifact_bytes + (64 << 10))
        log.info("gating updates on %s", f"the health of daemon {self.cfg.daemon_id!r} ({self.health_topic})"
                 if self.health_topic else "nothing (no daemon_id: an update is installed, not gated)")
        # so an operator's rollout knows this device before its first update; its last verdict rides along
        self._ack(None, "READY", "running")
        self.worker.start()
        # under systemd (Type=notify) the daemon's unit, After= this one, starts once the store holds a model
        notify("READY=1", f"STATUS=store {self.cfg.store}, version {self.store.current_version()}")
        return self

    def stop(self) -> None:
        notify("STOPPING=1")
        self.stopping.set()
        self.worker.join(timeout=10)
        self.publisher.stop(timeout=5)
        self.client.loop_stop()
        self.client.disconnect()
        self.store.unlock()

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:  # said by the broker's watch (edge.endpoint)
            return
        subs = [(self.manifest_topic, 1)]
        client.subscribe(subs + self.gate.topics())
        download = self.download
        if download:  # a clean session forgets subscriptions: ask again for what has not come
            self._subscribe(download.asked_topics())

    def _on_message(self, client, userdata, msg):
        download = self.download
        if self.gate.offer(msg):
            pass  # the daemon's health or status
        elif download is not None and download.offer(msg.topic, msg.payload, msg.retain):
            pass  # checked against its signed size and hash there; a wrong one is not held
        elif msg.topic != self.manifest_topic:
            return  # an artifact no longer awaited (a late or repeated copy): not a manifest
        elif len(msg.payload) > MAX_MANIFEST_BYTES:
            log.warning("a %d-byte message on the manifest topic ignored: a manifest is at most %d bytes",
                        len(msg.payload), MAX_MANIFEST_BYTES)
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
        except UpdateError as exc:  # what it claims to be, unverified, so an operator can tell which
            return self._ack(None, "REJECTED", str(exc), claimed=_claimed(envelope))
        version = m.get("version")
        state = self.store.state()
        newest = int(state["newest_seen"])
        done = [h["result"] for h in state["history"] if h.get("version") == version]
        if version == state.get("installed") or (done and version == newest and done[-1] != "QUEUED"):
            # the retained manifest again, after a restart or reconnect, or a rollout run again:
            # answered before, and answered again so the answer is the retained state
            verdict = [h for h in state["history"] if h.get("version") == version and h["result"] in FINAL]
            log.info("version %s was handled before (%s)", version, verdict[-1]["result"] if verdict else "installed")
            if verdict:
                self._ack(m, verdict[-1]["result"], verdict[-1].get("reason", ""))
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
        self.store.record(version, "QUEUED", seen=version)  # never tried again, but for a fetch a stop cut short
        self._ack(m, "QUEUED", "")
        download = Download(self.topics, m["artifact"])
        self._ack(m, "IN_PROGRESS", f"fetching the artifact ({download.describe()})")
        staged = self.store.staging / f"{m['artifact']['sha256']}.safetensors"
        try:
            self.store.stage(self._fetch(download), staged.name)
            mf.check_artifact(m, staged)
            err = mf.dry_run(m, staged)
            self._ack(m, "IN_PROGRESS", f"dry-run passed ({err:.2f} µV from the golden views); installing")
            retired = self.store.install(version, staged, m)
            self._forget_cached(retired)
        except Stopped:  # left QUEUED: the next start fetches it again
            return "INTERRUPTED"
        except (UpdateError, OSError) as exc:
            self.store.record(version, "FAILED", str(exc))
            return self._ack(m, "FAILED", str(exc))
        finally:
            staged.unlink(missing_ok=True)
        log.info("version %s installed; %s", version, "gating on the daemon's health" if self.health_topic
                 else "no daemon to gate on")
        return self._conclude(m, "the daemon runs it")

    def _conclude(self, m: dict, success: str) -> str:
        """The health gate of an installed update, then its verdict: kept, or rolled back."""
        try:
            problem = self._gate(m) if self.health_topic else None
        except Stopped:  # left unconfirmed: the next start gates it again (_finish_interrupted)
            log.warning("stopped during the health gate of version %s; it is gated again at the next start",
                        m["version"])
            return "INTERRUPTED"
        except Exception as exc:  # whatever went wrong, the new model was not seen to run well
            log.exception("health gate of version %s failed", m["version"])
            problem = f"health gate error: {type(exc).__name__}: {exc}"
        if problem:
            try:
                prev = self.store.rollback(problem)
            except (UpdateError, OSError) as exc:
                why = f"{problem}; and the rollback failed: {exc}"
                try:
                    self.store.record(m["version"], "FAILED", why)
                except (UpdateError, OSError):
                    log.exception("cannot record version %s as FAILED", m["version"])
                self._ack(m, "FAILED", why)
                raise
            return self._ack(m, "FAILED", f"rolled back to version {prev}: {problem}")  # recorded by rollback
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

    def _forget_cached(self, retired: list[str]) -> None:
        """The daemon's cached ONNX exports and TensorRT engines of models no version holds any
        more; a failure to remove them is logged, never the update's."""
        if not retired:
            return
        from export.cache import cache_root, forget_models

        try:
            removed = forget_models(retired, self.cfg.cache_dir)
        except OSError as exc:
            log.warning("cannot clear the cache of retired models in %s: %s", self.cfg.cache_dir or "the cache", exc)
            return
        if removed:
            log.info("removed %d cached file(s) of %d retired model(s): %s", len(removed), len(retired),
                     ", ".join(p.name for p in removed))
        else:
            log.info("no cached export of the %d retired model(s) in %s (is cache_dir the daemon's PANORAMA_CACHE?)",
                     len(retired), self.cfg.cache_dir or cache_root())

    def _fetch(self, download: Download) -> bytes:
        """The artifact's bytes from its retained messages, asked for a window at a time (the
        broker sends what it retains on each subscribe); the download is dropped after, so
        what arrives later is not held. Parts asked for and not come are asked for again after
        ``RESUBSCRIBE_S``, then twice as long each time (a slow link is still delivering them).
        Fails after ``artifact_timeout_s`` with no new part."""
        self.download = download
        asked_again, wait_s = time.monotonic(), RESUBSCRIBE_S
        try:
            while True:
                subscribe, done = download.next_topics()
                self._unsubscribe(done)
                self._subscribe(subscribe)
                if download.finished.wait(0.2):
                    return download.result()
                if self.stopping.is_set():
                    raise Stopped
                now = time.monotonic()
                if now - download.progress_at > self.cfg.artifact_timeout_s:
                    raise UpdateError(f"{download.missing()}: nothing new for {self.cfg.artifact_timeout_s:g} s")
                if download.progress_at > asked_again:
                    asked_again, wait_s = download.progress_at, RESUBSCRIBE_S  # progress: back to the first wait
                elif now - asked_again > wait_s:  # dropped on the way, or a slow link: again, waiting longer
                    asked_again, wait_s = now, min(2 * wait_s, 60.0)
                    again = download.asked_topics()
                    if again:
                        log.info("%d part(s) of the artifact asked for did not come: asking again", len(again))
                        self._subscribe(again)
        finally:
            self.download = None
            self._unsubscribe(download.release())  # what came since the window last moved, and what never came

    def _subscribe(self, topics: list[str]) -> None:
        for i in range(0, len(topics), FILTERS_PER_PACKET):
            self.client.subscribe([(t, 1) for t in topics[i: i + FILTERS_PER_PACKET]])

    def _unsubscribe(self, topics: list[str]) -> None:
        for i in range(0, len(topics), FILTERS_PER_PACKET):
            self.client.unsubscribe(topics[i: i + FILTERS_PER_PACKET])

    def _gate(self, m: dict) -> str | None:
        """None when the daemon adopts the new model and stays healthy; else what went wrong."""
        installed = str((self.store.versions / str(m["version"]) / mf.ARTIFACT_NAME).resolve())
        return self.gate.check(m["artifact"]["model_sha256"], installed, self.stopping)

    def _ack(self, m: dict | None, state: str, reason: str, claimed: dict | None = None) -> str:
        doc = {"device": self.cfg.device_id, "group": self.cfg.group, "device_model": self.cfg.device_model,
               "state": state, "reason": reason,
               "version": m.get("version") if m else None,
               "sha256": (m.get("artifact") or {}).get("sha256") if m else None,
               "installed": self.store.current_version(), "model": self._installed_model(),
               "last": self._last_verdict(),
               "t": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if claimed:
            doc["claimed"] = claimed
        which = (f"update {doc['version']}" if doc["version"] is not None
                 else f"a manifest claiming version {claimed.get('version')}" if claimed
                 else "an unreadable manifest" if state == "REJECTED" else "agent")
        (log.warning if state in ("FAILED", "REJECTED") else log.info)(
            "%s: %s%s", which, state, f" ({reason})" if reason else "")
        self.results.append(doc)
        self.publisher.put(self.topics.state(self.cfg.device_id), json.dumps(doc).encode(), qos=1, retain=True,
                           content_type=CONTENT_TYPE_JSON)
        return state

    def _installed_model(self) -> dict | None:
        """What the installed model is: its stage and the recording device it was calibrated
        for (a Stage II model's ``device_id``; "" for none), from its checkpoint's header."""
        try:
            meta = ckpt.read_header(self.store.model_path)["meta"]
        except CheckpointError:
            return None
        return {"stage": meta.get("stage"), "calibrated_for": str(meta.get("device_id") or "")}

    def _last_verdict(self) -> dict | None:
        """The last SUCCEEDED or FAILED, carried in every state: a READY or a REJECTED that
        replaces the retained state must not hide a rollout's answer."""
        try:
            done = [h for h in self.store.state()["history"] if h["result"] in FINAL]
        except UpdateError:
            return None
        return {k: done[-1].get(k) for k in ("version", "result", "reason")} if done else None


def _claimed(envelope: bytes) -> dict:
    try:
        m = json.loads(envelope)["manifest"]
        return {"version": m.get("version"), "sha256": (m.get("artifact") or {}).get("sha256")}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return {}

