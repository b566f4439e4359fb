"""``panorama monitor``: a bedside-monitor simulator that streams ECGs over MQTT.

Each WFDB record, or each simulated patient, is one patient stream on
``Topics.raw(monitor, patient)``: 500 Hz chunks of ``chunk_ms``, seq from 0, ``t0_ns`` = the
start wall clock + the sample offset (signal time), ``sent_ns`` = the wall clock at publish.
Pacing follows an absolute schedule (chunk i is due at start + (i + 1) × chunk / speed), so
it never drifts; all streams are interleaved in one process and handed to one publisher
thread. Int16 uses the record's ADC resolution as its scale when every published lead shares
it, which makes the replay lossless.

Library use (the demo and the benchmark run it in a thread; streams from ``edge/sources.py``)::

    from edge.monitor import run_monitor
    from edge.sources import MonitorStream, record_stream, sim_streams

    stop = threading.Event()
    stats = run_monitor([MonitorStream("bed", "p1", leads, signals)], "mqtt://127.0.0.1:1883",
                        stop_event=stop)
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from panorama.argtypes import positive
from panorama.errors import PanoramaError, RecordError
from panorama.geometry import resolve_views
from panorama.records import find_records

from .mqtt import Broker, add_security_args, security_from_args
from .sources import SIM_SECONDS, MonitorStream, record_stream, sim_streams

log = logging.getLogger(__name__)

FORMATS = ("int16", "float32", "json")
ANSWER_S = 10.0  # a daemon answers a new stream's first chunk within milliseconds; warn after this
END_ANSWER_S = 2.0  # a run that ends sooner waits this long after its first chunk before saying no daemon answered
FAST_BURST = 16  # with fast=True: a short pause after this many chunks, so broker queues keep up
FAST_PAUSE_S = 0.002


@dataclass
class StreamStats:
    monitor_id: str
    patient_id: str
    n_leads: int
    fs: float
    scale_mv: float
    fmt: str = "int16"
    chunks: int = 0
    samples: int = 0  # per lead
    dropped: int = 0  # chunks the publisher's queue refused
    refused: str = ""  # why the broker refused the stream's first chunk (MQTT 5), which stops the stream
    unanswered: float = 0.0  # seconds after its first chunk by which no daemon had said a word of it (0: answered)
    daemon_refused: str = ""  # why the daemon refused the stream (it is full), while it does

    def line(self) -> str:
        return (f"{self.monitor_id}/{self.patient_id}: {self.chunks} chunks, {self.samples} samples "
                f"({self.samples / self.fs:.1f} s) of {self.n_leads} leads, "
                + (f"int16 at {self.scale_mv:g} mV" if self.fmt == "int16" else self.fmt)
                + (f", {self.dropped} dropped" if self.dropped else "")
                + (f"; REFUSED by the broker ({self.refused}): is the monitor id this client's user name "
                   "(its certificate's common name)?" if self.refused else "")
                + (f"; no daemon answered within {self.unanswered:g} s" if self.unanswered else "")
                + (f"; REFUSED by the daemon ({self.daemon_refused})" if self.daemon_refused else ""))


# --- streaming ---------------------------------------------------------------------------------

def run_monitor(streams: list[MonitorStream], url: "str | Broker", protocol: str = "5", chunk_ms: float = 250,
                speed: float = 1.0, fmt: str = "int16", views: list[str] | None = None,
                stop_event: threading.Event | None = None, *, fast: bool = False, loop: bool = False,
                duration_s: float | None = None, prefix: str = "ecg/v1",
                client_id: str | None = None, expiry_s: int | None = 2) -> list[StreamStats]:
    """Publish ``streams`` until they end (or ``duration_s`` of signal, or ``stop_event``).

    ``speed``: real time × speed; ``fast``: as fast as the broker takes it. ``loop``: start
    again at the end of a strip (seq and t0 go on). ``views``: publish the retained views
    request for every stream first (``[]``: withdraw the one held, so the daemon draws its
    defaults); without it, a request retained from an earlier run is said, since it still holds. ``expiry_s``: MQTT 5 message expiry of the raw chunks (as
    the wire protocol asks: a broker never hands on a waveform older than that); none when
    ``fast``, whose chunks are stamped ahead of the wall clock. Returns one ``StreamStats``
    per stream, in order.
    """
    from .mqtt import Publisher, client_id as new_client_id, connect, make_client
    from .protocol import CONTENT_TYPE_BINARY, CONTENT_TYPE_JSON, ProtocolError
    from .topics import Topics, parse_views_request

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if not speed > 0:
        raise ValueError(f"speed must be positive, got {speed}")
    if not chunk_ms > 0:
        raise ValueError(f"chunk_ms must be positive, got {chunk_ms}")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration must be positive seconds, got {duration_s}")
    if not streams:
        raise ValueError("no streams to publish")
    keys = [(s.monitor_id, s.patient_id) for s in streams]
    dupes = sorted({f"{m}/{p}" for m, p in keys if keys.count((m, p)) > 1})
    if dupes:
        raise ValueError(f"stream ids used more than once: {', '.join(dupes)}")
    view_names = None if views is None else [v.name for v in resolve_views(views)] if views else []
    topics = Topics(prefix)
    plans = [_Plan(s, topics.raw(s.monitor_id, s.patient_id), chunk_ms, loop, duration_s, fmt) for s in streams]
    stop = stop_event or threading.Event()
    content_type = CONTENT_TYPE_JSON if fmt == "json" else CONTENT_TYPE_BINARY

    client = make_client(client_id or new_client_id("monitor"), protocol)
    # a daemon answers each new stream on its status topic: silence says no daemon serves this prefix, or
    # (MQTT 3.1.1, where a broker drops a refused publish without a word) the broker refuses the chunks
    status = {topics.status(s.monitor_id, s.patient_id): p for s, p in zip(streams, plans)}
    answered: set[str] = set()
    watch = [(f"{topics.prefix}/{m}/+/{kind}", 1) for m in sorted({s.monitor_id for s in streams})
             for kind in ("status", "views")]
    held = {topics.views(s.monitor_id, s.patient_id): s for s in streams} if view_names is None else {}

    def on_message(c, userdata, msg):
        if not msg.retain and msg.topic in status:  # a retained one may be an earlier run's
            answered.add(msg.topic)
            _heard_status(status[msg.topic].stats, msg.payload)
        elif msg.retain and msg.payload and msg.topic in held:
            s = held.pop(msg.topic)
            try:
                asked = ",".join(parse_views_request(msg.payload))
            except ProtocolError as exc:
                asked = f"a request the daemon refuses ({exc})"
            log.warning("%s/%s: a views request retained from before still holds: the daemon draws %s "
                        "(--views NAMES asks for others, --views default withdraws it)", s.monitor_id,
                        s.patient_id, asked)

    def on_connect(c, userdata, flags, reason_code, properties=None):
        if not reason_code.is_failure:  # (re)subscribe on every connect
            c.subscribe(watch)

    client.on_message, client.on_connect = on_message, on_connect
    connect(client, url)
    publisher = Publisher(client, protocol=protocol, track_refusals=protocol == "5")
    publisher.start()
    try:
        if view_names is not None:  # [] withdraws: an empty retained message clears the one held
            request = json.dumps({"views": view_names}).encode() if view_names else b""
            for s in streams:
                publisher.put(topics.views(s.monitor_id, s.patient_id), request, qos=1, retain=True,
                              content_type=CONTENT_TYPE_JSON)
        start_ns, start = time.time_ns(), time.monotonic()
        period = chunk_ms / 1000.0 / speed
        i, since_pause = 0, 0
        while not stop.is_set():
            live = [p for p in plans if not p.done(i)]
            if not live:
                break
            if fast:
                since_pause += len(live)
                if since_pause >= FAST_BURST or publisher.queued > 256:
                    since_pause = 0
                    stop.wait(FAST_PAUSE_S)
                    while publisher.queued > 256 and not stop.is_set():
                        stop.wait(FAST_PAUSE_S)
            else:
                delay = start + (i + 1) * period - time.monotonic()  # absolute schedule: no drift
                if delay > 0 and stop.wait(delay):
                    break
            for p in live:
                chunk = p.chunk(i, start_ns)
                payload = _encode(chunk, fmt, p.stream.scale_mv)
                # MQTT 5: the first chunk at QoS 1, so a broker that refuses the stream (an ACL) says so
                qos = 1 if i == 0 and protocol == "5" else 0
                if publisher.put(p.topic, payload, qos=qos, content_type=content_type,
                                 expiry_s=None if fast else expiry_s):
                    p.stats.chunks += 1
                    p.stats.samples += chunk.n_samples
                else:
                    p.stats.dropped += 1
            if i == 0 and protocol == "5":
                _stop_refused(plans, publisher, stop)
            if i == 0:
                first_sent = time.monotonic()
            elif time.monotonic() - first_sent >= ANSWER_S:
                _say_unanswered(plans, status, answered, topics.prefix, ANSWER_S)
            i += 1
        if i and not stop.is_set():  # streams that ended before ANSWER_S: a daemon answers in milliseconds
            until = first_sent + min(ANSWER_S, END_ANSWER_S)
            while time.monotonic() < until and not set(status) <= answered and not stop.wait(0.02):
                pass
            _say_unanswered(plans, status, answered, topics.prefix,
                            round(max(time.monotonic() - first_sent, 0.1), 1), ended=True)
    finally:
        publisher.stop()
        # network thread first: paho 2.2 logs a spurious error when it outlives a disconnect
        client.loop_stop()
        client.disconnect()
    if publisher.failed:  # paho refused them: the connection was down (QoS 0 is not queued)
        log.warning("%d chunks were lost while the broker connection was down", publisher.failed)
    return [p.stats for p in plans]


def _heard_status(stats: StreamStats, payload: bytes) -> None:
    """A daemon's word on a stream: a full daemon refuses it (said once, and again when served)."""
    try:
        doc = json.loads(payload)
        state, why = doc.get("state"), str(doc.get("reason", ""))
    except (ValueError, AttributeError):  # not a daemon's status JSON: nothing to say
        return
    if state == "refused" and not stats.daemon_refused:
        stats.daemon_refused = why or "no reason given"
        log.warning("the daemon refused %s/%s: %s; its chunks go on, and it is served once the daemon has room",
                    stats.monitor_id, stats.patient_id, stats.daemon_refused)
    elif state != "refused" and stats.daemon_refused:
        stats.daemon_refused = ""
        log.info("the daemon now serves %s/%s", stats.monitor_id, stats.patient_id)


def _say_unanswered(plans: list["_Plan"], status: dict, answered: set[str], prefix: str, waited: float,
                    ended: bool = False) -> None:
    """Once, for each stream (still running, or at the end every one) that no daemon has
    answered within ``waited`` s of its first chunk: say what may be wrong."""
    for topic, p in status.items():
        if topic not in answered and not p.stats.unanswered and not p.stats.refused:
            p.stats.unanswered = waited
            when = f"by the end of its run, {waited:g} s after its first chunk" if ended else f"within {waited:g} s"
            log.warning("no daemon has answered %s/%s %s: is panorama serve running with prefix %s on this broker, "
                        "and does the broker take this monitor's chunks (over MQTT 3.1.1 a refused publish is "
                        "dropped without a word)?", p.stats.monitor_id, p.stats.patient_id, when, prefix)


def _stop_refused(plans: list["_Plan"], publisher, stop: threading.Event, timeout: float = 2.0) -> None:
    """After the first chunks (QoS 1): wait for the broker's PUBACKs and end each stream it
    refused, saying why; the others go on (one refused patient never stops another)."""
    deadline = time.monotonic() + timeout
    while (publisher.queued or publisher.awaiting) and time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.01)
    for p in plans:
        why = publisher.refused.get(p.topic)
        if why:
            p.stats.refused = why
            log.error("the broker refuses %s (%s): this stream stops; the broker takes a monitor's chunks "
                      "only under its own user name", p.topic, why)


class _Plan:
    """Where one stream is: which samples chunk i holds."""

    def __init__(self, stream: MonitorStream, topic: str, chunk_ms: float, loop: bool, duration_s: float | None,
                 fmt: str):
        from .protocol import Limits

        self.stream, self.topic, self.loop = stream, topic, loop
        self.n = max(1, int(round(chunk_ms * stream.fs / 1000.0)))
        if self.n > Limits().max_samples:
            raise ValueError(f"chunk of {chunk_ms} ms is {self.n} samples; the protocol allows "
                             f"{Limits().max_samples}: use a shorter --chunk-ms")
        length = stream.signals.shape[1]
        if duration_s is not None:
            total = int(round(duration_s * stream.fs))
            self.total = total if loop else min(total, length)
        else:
            self.total = None if loop else length
        self.stats = StreamStats(stream.monitor_id, stream.patient_id, len(stream.leads), stream.fs, stream.scale_mv,
                                 fmt)

    def done(self, i: int) -> bool:
        return bool(self.stats.refused) or (self.total is not None and i * self.n >= self.total)

    def chunk(self, i: int, start_ns: int):
        from .protocol import Chunk

        a = i * self.n
        b = a + self.n if self.total is None else min(a + self.n, self.total)
        sig = self.stream.signals
        data = np.take(sig, np.arange(a, b) % sig.shape[1], axis=1) if self.loop else sig[:, a:b]
        quality = None
        bad = ~np.isfinite(data)
        if bad.any():  # NaN in a record: send zeros, flagged, since the wire carries finite samples only
            quality = ["missing" if row.any() else "ok" for row in bad]
            data = np.where(bad, np.float32(0.0), data)
        t0_ns = start_ns + round(a * 1e9 / self.stream.fs)
        return Chunk(seq=i % 2**32, t0_ns=t0_ns, fs=float(self.stream.fs), leads=list(self.stream.leads),
                     data=np.ascontiguousarray(data, dtype=np.float32), quality=quality, sent_ns=time.time_ns())


def _encode(chunk, fmt: str, scale_mv: float) -> bytes:
    from .protocol import encode, to_json

    if fmt == "json":
        return to_json(chunk)
    return encode(chunk, sample_format=fmt, scale_mv=scale_mv if fmt == "int16" else None)


# --- command line ------------------------------------------------------------------------------

def register(sub) -> None:
    p = sub.add_parser(
        "monitor", help="stream WFDB records or simulated patients over MQTT, as a bedside monitor would",
        description="Publish each record (or simulated patient) as one patient stream of 500 Hz chunks on "
        "PREFIX/MONITOR/PATIENT/raw, in real time x --speed (or --fast). Prints one summary line per stream.")
    p.add_argument("records", nargs="*", type=Path, help="WFDB records (with or without .hea) or folders")
    p.add_argument("--sim", type=int, default=0, metavar="N", help="stream N simulated patients instead")
    p.add_argument("--seed", type=int, default=0, help="first simulated patient's seed (default 0)")
    p.add_argument("--device", default="diagnostic",
                   help="simulated recording device: ideal, diagnostic (default), monitor, holter, random")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883",
                   help="broker URL, mqtt:// or mqtts:// for TLS (default mqtt://127.0.0.1:1883)")
    p.add_argument("--protocol", default="5", choices=("5", "3.1.1"), help="MQTT version (default 5)")
    p.add_argument("--prefix", default="ecg/v1", help="topic prefix (default ecg/v1)")
    p.add_argument("--monitor-id", default="bed", help="monitor id in the topics (default bed)")
    p.add_argument("--patients", help="patient ids, comma-separated, one per record (default: record names, "
                   "or sim-000, sim-001, ...)")
    p.add_argument("--chunk-ms", type=positive, default=250.0, help="chunk length in ms (default 250)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=positive, default=1.0, help="real time x SPEED (default 1)")
    pace.add_argument("--fast", action="store_true", help="as fast as the broker takes it")
    p.add_argument("--leads", help="publish only these leads, comma-separated (default: every known lead; "
                   "for --sim any views, e.g. I,II,V3,V7)")
    p.add_argument("--views", help="first publish the retained views request, e.g. V7,V8,120:45 (it holds for later "
                   "runs too; 'default' withdraws it, so the daemon draws its own default views)")
    p.add_argument("--format", dest="fmt", default="int16", choices=FORMATS, help="sample format (default int16)")
    p.add_argument("--loop", action="store_true", help="start again at the end (seq and time go on)")
    p.add_argument("--duration", type=positive, metavar="S", help="stop after S seconds of signal per stream")
    add_security_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    broker = Broker(args.broker, **security_from_args(args))  # a bad URL or key file: said before reading
    if bool(args.records) == bool(args.sim):
        raise ValueError("give WFDB records or folders, or --sim N (one of the two)")
    if args.sim < 0:
        raise ValueError(f"--sim must be a positive number of patients, got {args.sim}")
    leads = [v.name for v in resolve_views(args.leads)] if args.leads else None
    views = None if args.views is None else [] if args.views.strip() == "default" else args.views.split(",")
    if views:
        resolve_views(views)  # fail before reading anything
    failed = 0
    if args.sim:
        seconds = args.duration if args.duration and not args.loop else SIM_SECONDS
        streams = sim_streams(args.sim, args.seed, args.monitor_id, seconds, leads, args.device)
    else:
        streams = []
        for arg in args.records:
            try:
                for path in find_records(arg):
                    try:
                        streams.append(record_stream(path, args.monitor_id, None, leads))
                    except (PanoramaError, ValueError) as exc:  # one bad record never stops the others
                        failed += 1
                        print(f"panorama monitor: skipped {path}: {exc}", file=sys.stderr)
            except PanoramaError as exc:
                failed += 1
                print(f"panorama monitor: skipped {arg}: {exc}", file=sys.stderr)
        if not streams:
            raise RecordError("no record could be read")
    if args.patients:
        ids = [p.strip() for p in args.patients.split(",")]
        if len(ids) != len(streams):
            raise ValueError(f"--patients names {len(ids)} ids for {len(streams)} streams")
        for s, pid in zip(streams, ids):
            s.patient_id = pid

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stats = run_monitor(streams, broker, args.protocol, args.chunk_ms, args.speed, args.fmt, views, stop,
                            fast=args.fast, loop=args.loop, duration_s=args.duration, prefix=args.prefix)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for st in stats:
        print(st.line())
    return 1 if failed or any(st.dropped or st.refused or st.daemon_refused or st.unanswered for st in stats) else 0
