"""The streaming daemon that ``panorama serve`` runs (``edge/serve.py``, the command).

Threads, each with one job, joined by bounded queues (nothing grows without limit):

    paho network thread ──on_message──▶ ingest queue (bounded; full → counted drop)
    ingest thread: topic → decode → validate → the patient's stream (placed by time)
    calibration pool (edge.fitting): each patient's first seconds → angle offsets (off the hot path)
    inference thread: every stream's due windows, batched across patients → backend
        (edge.emit.Emitter: the backend, then virtual chunks, each stream with its own seq)
    publisher thread (edge.mqtt.Publisher): the only one that publishes
    health thread: periodic health JSON, Prometheus gauges

Stream status, calibration verdicts and refusals are published (and counted) through
``edge/reporting.py``.

A patient's stream goes waiting → calibrating → streaming (→ ended when it falls silent).
Bad input (a malformed payload, a wrong version, NaN, unknown leads, an absurd rate or
size) is refused with a reason on the errors topic and in the log, counted, and touches
nothing else: every stream is its own object and every message its own try.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter

import torch

from panorama.geometry import resolve_view
from panorama.records import MODEL_FS

from . import mqtt as mq
from .emit import Emitter
from .fitting import Fitter
from .model_slot import ModelSlot
from .config import EdgeConfig, check_devices
from .sdnotify import Watchdog, notify, watchdog_period
from .protocol import CONTENT_TYPE_JSON, Limits, ProtocolError, decode_any
from .intake import ViewRequests, raw_leads
from .topics import Topics, parse_views_request
from .twins import Twins
from .reporting import Reporter
from .stream import PatientStream, StreamParams

log = logging.getLogger("panorama.serve")


class Daemon:
    """One broker connection, every patient's stream; ``start()``, then ``stop()`` drains."""

    def __init__(self, cfg: EdgeConfig):
        check_devices(cfg)  # this machine has what the config names, before anything loads
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.prefix)
        self.id = cfg.mqtt.daemon_id
        self.limits = Limits(max_bytes=cfg.limits.max_bytes, max_leads=cfg.limits.max_leads,
                             max_samples=cfg.limits.max_samples)
        self.params = StreamParams(context=cfg.stream.context, lookahead=cfg.stream.lookahead,
                                   hop=cfg.stream.hop, calibrate_s=cfg.calibration.seconds,
                                   max_backlog=int(cfg.stream.max_backlog_s * MODEL_FS))
        torch.set_num_threads(cfg.model.threads)
        self.slot = ModelSlot(cfg.model, cfg.calibration.device)  # swapped whole when model.path changes
        self.default_views = [resolve_view(v) for v in cfg.stream.views]
        self.streams: dict[tuple[str, str], PatientStream] = {}
        self.requested = ViewRequests(cfg.stream.max_views, cfg.stream.max_patients, self.default_views)
        self.last_seen: dict[tuple[str, str], float] = {}
        self.link_back = 0.0  # when the broker connection last came up (monotonic): silence before it is ours
        self._gaps_said: dict[tuple[str, str], int] = {}  # gap samples each stream had at its last stale check
        self.lock = threading.Lock()
        self.ingest_q: queue.Queue = queue.Queue(maxsize=cfg.queues.ingest)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.outcomes: Counter = Counter()
        self.dropped_ingest = 0
        self.chunks_in = 0
        self.started = time.time()  # when, for people and for twins; uptime counts on the monotonic clock
        self.started_mono = time.monotonic()
        self.twins = Twins(self.id, self.started, self._answer_twin)  # another daemon with this id
        self.draining = threading.Event()  # stop() has begun: no stream is taken again, even on a reconnect
        self.client = mq.make_client(mq.client_id("serve"), cfg.mqtt.protocol)
        self.publisher = mq.Publisher(self.client, maxsize=cfg.queues.publish, protocol=cfg.mqtt.protocol,
                                      beat=lambda: self._beat("publisher"))
        self.report = Reporter(self.publisher, self.topics, self.id)
        self.fitter = Fitter(self.slot, cfg.calibration.device, cfg.calibration.seconds, cfg.calibration.workers,
                             self.report, self.streams, self.lock, self.wake)
        self.emit = Emitter(self.slot, self.publisher, self.topics, self.report, self.params.fs,
                            cfg.mqtt.virtual_format, cfg.mqtt.expiry_s or None, cfg.stream.max_batch,
                            beat=lambda: self._beat("inference"))
        self.threads: list[threading.Thread] = []
        self.metrics = None
        self.watchdog: Watchdog | None = None  # under systemd with WatchdogSec

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> "Daemon":
        if self.cfg.health.metrics_port:  # first: a port in use stops the start before anything runs
            from .metrics import Metrics
            self.metrics = Metrics(self, self.cfg.health.metrics_host, self.cfg.health.metrics_port)
        status = self.topics.daemon_status(self.id)
        self.client.will_set(status, b"offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.publisher.start()
        self.fitter.warm_up()  # first in the pool: a patient needs its first seconds of data first anyway
        self.broker = self.cfg.mqtt.endpoint()
        try:
            # a chunk a little over the limit is still read, to be refused with a reason; a huge one never is
            mq.connect(self.client, self.broker, max_packet=2 * self.limits.max_bytes + (64 << 10))
        except BaseException:  # nothing left running or bound: a retry in this process starts clean
            self.publisher.stop(timeout=1)
            self.fitter.shutdown(wait=False)
            if self.metrics:
                self.metrics.close()
                self.metrics = None
            raise
        loops = [("ingest", self._ingest_loop), ("inference", self._inference_loop), ("health", self._health_loop)]
        if self.cfg.model.path and self.cfg.model.reload_check_s > 0:
            loops.append(("model", self._watch_model))
        for name, target in loops:
            t = threading.Thread(target=target, name=f"serve-{name}", daemon=True)
            t.start()
            self.threads.append(t)
        self.twins.settle()  # serving, or yielded: what start() promises (a monitor started next is heard)
        period = watchdog_period()
        if period:
            self.watchdog = Watchdog(period, ["ingest", "inference", "publisher"], self.stopping, self._status_line,
                                     checks={"paho's MQTT network thread": lambda: mq.network_running(self.client)}
                                     ).start()
        if self.twins.cleared.is_set():  # one that yields, or that the broker refuses the streams, is never ready
            notify("READY=1", f"STATUS=serving {self.broker} as {self.id}")
        return self

    def _status_line(self) -> str:
        """For systemctl status; never waits on a lock a stuck loop may hold."""
        if not self.lock.acquire(timeout=0.1):
            return "busy"
        try:
            states = Counter(st.state for st in self.streams.values())
        finally:
            self.lock.release()
        lat = self.emit.latency_ms.percentiles()
        return (", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no patient") + \
            (f"; latency p50 {lat['p50']:.0f} ms" if lat.get("n") else "")

    def _beat(self, loop: str) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(loop)

    def stop(self) -> None:
        """Drain: stop taking input, synthesise what every stream still holds, publish it,
        say offline, disconnect. A daemon that yielded to an earlier one with its id
        (``edge.twins``) says nothing on the topics they share: the streams are the other's."""
        log.info("draining")
        self.draining.set()
        self.twins.cancel()
        notify("STOPPING=1", "STATUS=draining")
        try:
            self.client.unsubscribe([self.topics.pattern("raw"), self.topics.pattern("views")])
        except Exception:  # already disconnected: nothing more will arrive anyway
            pass
        deadline = time.monotonic() + 5
        while not self.ingest_q.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.stopping.set()
        self.wake.set()
        for t in self.threads:
            t.join(timeout=10)
        self.fitter.shutdown()  # fits under way finish; queued ones do not
        with self.lock:
            unfit = [k for k, st in self.streams.items() if st.state != "streaming"]
        if unfit:
            log.warning("%d stream(s) ended before their calibration finished; their output is lost: %s",
                        len(unfit), ", ".join("/".join(k) for k in unfit))
        quiet = self.twins.yielded.is_set()
        with self.lock:
            keys = [] if quiet else list(self.streams)
        for key in keys:
            self._close(key, "daemon stopped")
        if not quiet:
            self.publisher.put(self.topics.daemon_status(self.id), b"offline", qos=1, retain=True)
        self.publisher.stop(timeout=10)
        if self.metrics:
            self.metrics.close()
        self.client.loop_stop()  # network thread first: paho 2.2 logs a spurious error otherwise
        self.client.disconnect()
        log.info("stopped: %d chunks in, %d virtual chunks out, %d rejected", self.chunks_in,
                 self.emit.chunks_out, sum(self.report.rejected.values()))

    # ---- MQTT callbacks (network thread: enqueue only) ----------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:  # said by the broker's watch (edge.endpoint)
            return
        self.link_back = time.monotonic()
        client.subscribe([(self.topics.health(self.id), 0)])
        self._say_health()  # at once: a daemon already serving with this id hears of this one now
        self.twins.connected(self._take_streams)

    def _take_streams(self) -> None:
        if not (self.twins.yielded.is_set() or self.draining.is_set()):
            self.client.subscribe([(self.topics.pattern("raw"), 0), (self.topics.pattern("views"), 1)])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None):
        if len(reason_codes) == 2 and self.twins.subscribed(  # the streams' (raw and views), not health's
                reason_codes, f"{self.topics.pattern('raw')} and {self.topics.pattern('views')}"):
            self._say_online()  # every (re)connect, once subscribed: the broker published our will if the link dropped

    def _say_online(self) -> None:
        self.publisher.put(self.topics.daemon_status(self.id), b"online", qos=1, retain=True)

    def _answer_twin(self) -> bool:
        """A newcomer with this id: tell it now (it yields), and say online again for the shared
        topic; whether the report went into the publisher's queue."""
        sent = self._say_health()
        if self.twins.cleared.is_set():
            self._say_online()
        return sent

    def _on_message(self, client, userdata, msg):
        if msg.topic == self.topics.health(self.id):
            self.twins.heard(msg.payload, msg.retain)
            return
        if self.twins.yielded.is_set():  # the streams are the other daemon's
            return
        try:
            self.ingest_q.put_nowait((msg.topic, msg.payload, time.time_ns()))
        except queue.Full:
            self.dropped_ingest += 1

    # ---- ingest -------------------------------------------------------------------------
    def _ingest_loop(self) -> None:
        while not self.stopping.is_set():
            self._beat("ingest")
            try:
                topic, payload, recv_ns = self.ingest_q.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self._handle(topic, payload)
            except ProtocolError as exc:
                self.report.reject(topic, exc.code, str(exc))
            except Exception as exc:  # never let one message take the daemon down
                log.exception("unexpected error on %s", topic)
                self.report.reject(topic, "internal", f"{type(exc).__name__}: {exc}")

    def _handle(self, topic: str, payload: bytes) -> None:
        monitor, patient, kind = self.topics.parse(topic)
        key = (monitor, patient)
        if kind == "views":
            names = parse_views_request(payload, self.limits)
            with self.lock:
                views = self.requested.ask(key, names, self.streams)
                st = self.streams.get(key)
                if st is not None and [v.name for v in st.views] != [v.name for v in views]:
                    st.views = views
                    self.report.status(st, "views changed")  # a dashboard reading the retained status sees them
            return
        if kind != "raw":
            return
        chunk = decode_any(payload, self.limits)
        data, names = raw_leads(chunk, lambda label: self.report.unknown_lead(key, label, topic))
        with self.lock:
            st = self.streams.get(key)
            if st is None:
                if why := self._no_room(monitor):
                    self.report.refused(key, why, first=chunk.seq == 0)  # on its status topic: its monitor hears it
                    raise ProtocolError("capacity", why)
                st = self.streams[key] = PatientStream(key, self.params, self.requested.views(key))
                self.report.status(st)
            if len(set(st.leads) | set(names)) > self.limits.max_leads:
                raise ProtocolError("too_large", f"this stream would have more than {self.limits.max_leads} "
                                    "different leads; the new ones are refused")
            before = st.state
            outcome = st.ingest(chunk.seq, chunk.t0_ns, names, data, chunk.sent_ns)
            self.outcomes[outcome] += 1
            self.chunks_in += 1
            if outcome not in ("late", "duplicate"):  # a stream fed only stale chunks still goes idle
                self.last_seen[key] = time.monotonic()
            self.fitter.submit_if_due(st)
            if outcome == "reset":  # its sender restarted (or its clock jumped): said, so the sender hears it
                self.report.status(st, "the stream started again: its sender restarted or its clock jumped")
            elif st.state != before:
                self.report.status(st)
        self.wake.set()

    def _no_room(self, monitor: str) -> str:
        """Why a new stream from ``monitor`` is refused, or "" when there is room (under the lock)."""
        if len(self.streams) >= self.cfg.stream.max_patients:
            return f"this daemon serves at most {self.cfg.stream.max_patients} patients; stream refused"
        per_monitor = self.cfg.stream.max_patients_per_monitor
        if sum(k[0] == monitor for k in self.streams) >= per_monitor:
            return f"monitor {monitor!r} already streams {per_monitor} patients, the most one monitor may; stream refused"
        return ""

    # ---- inference ----------------------------------------------------------------------
    def _inference_loop(self) -> None:
        wait = self.cfg.stream.batch_wait_ms / 1000
        while not self.stopping.is_set():
            self._beat("inference")
            if self.wake.wait(0.1) and wait:
                time.sleep(wait)  # monitors tick together: gather their chunks into one batch
            self.wake.clear()
            self._expire_idle()
            with self.lock:
                windows, stale = [], []
                for st in self.streams.values():
                    before, signal_before = st.counts.skipped, st.signal
                    windows += st.due()
                    self.report.dc_offsets(st)
                    if st.counts.skipped > before:
                        lost = st.counts.gap_samples > self._gaps_said.get(st.key, 0)
                        stale.append((st.key, st.counts.skipped - before, st.ahead_s(), lost))
                    self._gaps_said[st.key] = st.counts.gap_samples
                    if (st.signal == "missing") != (signal_before == "missing"):  # every lead lost, or one back
                        self.report.signal(st)
            for key, n, ahead, lost in stale:
                self.report.stale(key, n, self.params.fs, ahead, lost, self.cfg.stream.max_backlog_s)
            if windows:
                try:
                    self.emit.synthesise(windows)
                except Exception:  # never let one batch end every patient's output
                    log.exception("publishing %d windows failed", len(windows))

    def _expire_idle(self) -> None:
        """Close the streams silent for ``idle_timeout_s``; while this daemon's own broker link
        is down (and until it has been back that long) the silence is the link's, not the
        patients': a broker outage must not end every stream and start its calibration again."""
        now = time.monotonic()
        if not self.client.is_connected():
            return
        with self.lock:  # a stream still calibrating is closed once its offsets are in
            idle = [k for k, t in self.last_seen.items()
                    if now - max(t, self.link_back) > self.cfg.stream.idle_timeout_s
                    and self.streams[k].state != "calibrating"]
        for key in idle:
            self._close(key, f"silent for {self.cfg.stream.idle_timeout_s:g} s")

    def _close(self, key, why: str) -> None:
        """Flush what a stream still holds (its last lookahead too), then forget it."""
        with self.lock:
            st = self.streams.pop(key, None)  # a chunk arriving from now on starts a new stream
            self.last_seen.pop(key, None)
            self._gaps_said.pop(key, None)
            if st is None:
                return
            windows = st.due(final=True)
            st.state = "ended"
            self.report.status(st, why)
        if windows:
            self.emit.synthesise(windows)  # published with the stream's own time base and seq
        with self.lock:
            if key not in self.streams:
                self.emit.forget(key)
                self.report.forget(key)
        log.info("%s/%s ended (%s): %s", *key, why, vars(st.counts))

    # ---- health ----------------------------------------------------------------------
    def health(self) -> dict:
        with self.lock:
            states = Counter(st.state for st in self.streams.values())
            counts = Counter()
            for st in self.streams.values():
                counts.update({k: v for k, v in vars(st.counts).items()})
        return {"daemon": self.id, **self.twins.card(), "uptime_s": round(time.monotonic() - self.started_mono, 1),
                "patients": dict(states), "chunks_in": self.chunks_in, "chunks_out": self.emit.chunks_out,
                "latency_ms": self.emit.latency_ms.percentiles(),
                "inference_ms": self.emit.inference_ms.percentiles(),
                "queues": {"ingest": self.ingest_q.qsize(), "publish": self.publisher.queued},
                "drops": {"ingest": self.dropped_ingest, "publish": self.publisher.dropped,
                          "publish_refused": self.publisher.failed, "errors_unsent": self.report.unsent},
                "rejected": dict(self.report.rejected), "stream_counts": dict(counts),
                "backend": self.slot.backend.name, "model": self.slot.info()}

    def _health_loop(self) -> None:
        while not self.stopping.wait(self.cfg.health.interval_s):
            self._say_health()

    def _say_health(self) -> bool:
        try:
            return bool(self.publisher.put(self.topics.health(self.id), json.dumps(self.health()).encode(), qos=0,
                                           content_type=CONTENT_TYPE_JSON))
        except Exception:
            log.exception("health report failed")
            return False

    def _watch_model(self) -> None:
        """A new checkpoint at model.path (a fleet update) is loaded here, off the hot path."""
        while not self.stopping.wait(self.cfg.model.reload_check_s):
            try:
                outcome = self.slot.reload_if_changed()
            except Exception:
                log.exception("model reload check failed")
                continue
            if outcome == "failed":
                self.report.error((self.id, "model"), "model_reload", self.slot.reload_error, once=True,
                                  limit=("model_reload", self.slot.failed))
            if outcome:
                self._say_health()  # a fleet agent's health gate waits for this

