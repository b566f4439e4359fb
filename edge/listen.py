"""``panorama listen``: subscribe to ECG chunks, reassemble each stream, write WFDB + PNG + summary.

Reassembly (``edge/reassembly.py``) is keyed by (monitor, patient), the last levels but one
of the topic, and places chunks by time; samples no chunk covered are NaN, written as WFDB
missing values, and each segment is a record (``<monitor>_<patient>``, then ``_2``, ``_3`` ...).
Latency is receive time − ``sent_ns``. Malformed payloads are counted and logged, never fatal.

In-process use::

    with Listener("mqtt://127.0.0.1:1883", topic="ecg/v1/bed/+/raw") as lis:
        lis.wait(chunks=40, timeout=10)
    signals = lis.streams[("bed", "p1")].signals
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from panorama.argtypes import positive
from panorama.records import write_record

from . import ecgpaper
from .mqtt import Broker, add_security_args, as_broker, security_from_args
from .reassembly import Assembled, Stream
from .topics import Topics, check_filter

log = logging.getLogger(__name__)

KINDS = ("raw", "virtual")  # topic kinds that carry chunks; anything else is ignored
_LOG_FIRST = 5  # malformed payloads logged per stream at WARNING; the rest at DEBUG


class Listener:
    """Subscribe to chunk topics and reassemble every stream; ``stop`` writes to ``out`` if given."""

    def __init__(self, url: "str | Broker", protocol: str = "5", topic: str = "ecg/v1/+/+/virtual",
                 out: str | Path | None = None, limits=None, client_id: str | None = None):
        self.broker, self.protocol, self.topic = as_broker(url), protocol, check_filter(topic)
        self.out = Path(out) if out is not None else None
        if self.out is not None:  # found out now, not after capturing for the whole duration
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OSError(f"cannot write to {self.out}: {exc.strerror or exc}") from None
            if not os.access(self.out, os.W_OK | os.X_OK):
                raise OSError(f"cannot write to {self.out}: permission denied")
        self.limits = limits
        self.client_id = client_id
        self.messages = self.malformed = self.ignored = self.errors = 0
        self.started_ns = 0
        self._streams: dict[tuple[str, str], Stream] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._chunks = 0
        self._client = None

    # --- lifecycle ---
    def start(self, timeout: float = 10.0) -> "Listener":
        """Connect and subscribe; returns once the broker has acknowledged the subscription."""
        from .mqtt import client_id, connect, make_client

        client = make_client(self.client_id or client_id("listen"), self.protocol)
        client.on_message = self._on_message
        client.on_subscribe = lambda *a, **k: self._subscribed.set()
        client.on_connect = self._on_connect
        self.started_ns = time.time_ns()
        connect(client, self.broker, timeout=timeout)
        self._client = client
        if not self._subscribed.wait(timeout):
            self.stop(write=False)
            raise ConnectionError(f"{self.broker} did not acknowledge the subscription to {self.topic} in {timeout:g} s")
        return self

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if not reason_code.is_failure:  # (re)subscribe on every connect
            client.subscribe(self.topic, qos=1)

    def stop(self, write: bool = True) -> dict | None:
        """Disconnect; with an ``out`` folder (and ``write``), write everything; returns the summary."""
        if self._client is not None:
            # network thread first: paho 2.2 logs a spurious error when it outlives a disconnect
            self._client.loop_stop()
            self._client.disconnect()
            self._client = None
        return self.write(self.out) if write and self.out is not None else None

    def __enter__(self) -> "Listener":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait(self, chunks: int | None = None, timeout: float | None = None,
             stop_event: threading.Event | None = None) -> bool:
        """Block until ``chunks`` chunks were placed in all (True), or ``timeout`` or ``stop_event``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stop_event = stop_event or threading.Event()
        while not stop_event.is_set():
            if chunks is not None and self._chunks >= chunks:
                return True
            left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if left <= 0:
                break
            stop_event.wait(left)
        return chunks is not None and self._chunks >= chunks

    # --- receiving (paho's network thread: no publishing, no blocking) ---
    def _on_message(self, client, userdata, msg) -> None:
        recv_ns = time.time_ns()
        try:
            self._handle(msg.topic, msg.payload, recv_ns)
        except Exception:  # a bug here must not kill paho's network thread and end the listening
            self.errors += 1
            log.exception("failed to handle a message on %s", msg.topic)

    def _handle(self, topic: str, payload: bytes, recv_ns: int) -> None:
        from .protocol import Limits, ProtocolError, decode_any

        levels = topic.split("/")
        self.messages += 1
        if len(levels) < 3 or levels[-1] not in KINDS:
            self.ignored += 1
            return
        key = (levels[-3], levels[-2])
        try:
            chunk = decode_any(bytes(payload), self.limits or Limits())
        except ProtocolError as exc:
            with self._lock:
                self.malformed += 1
                stream = self._streams.setdefault(key, Stream(key))
                stream.stats.malformed += 1
                n = stream.stats.malformed
            (log.warning if n <= _LOG_FIRST else log.debug)(
                "malformed payload on %s (%d bytes): %s%s", topic, len(payload), exc,
                "; further ones logged at debug level" if n == _LOG_FIRST else "")
            return
        with self._lock:
            self._streams.setdefault(key, Stream(key)).add(chunk, recv_ns)
            self._chunks += 1

    # --- results ---
    @property
    def streams(self) -> dict[tuple[str, str], Assembled]:
        with self._lock:
            return {k: s.assembled() for k, s in self._streams.items() if s.segments}

    @property
    def stats(self) -> dict:
        with self._lock:
            per = {f"{k[0]}/{k[1]}": s.stats.summary() for k, s in self._streams.items()}
        return {"broker": str(self.broker), "topic": self.topic, "messages": self.messages, "malformed": self.malformed,
                "ignored": self.ignored, "errors": self.errors, "streams": per}

    def write(self, out: str | Path) -> dict:
        """One WFDB record and one PNG per segment, and ``summary.json``; returns the summary."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        summary = self.stats
        summary["started"] = dt.datetime.fromtimestamp(self.started_ns / 1e9, dt.timezone.utc).isoformat()
        for (monitor, patient), a in sorted(self.streams.items()):
            entry = summary["streams"][f"{monitor}/{patient}"]
            entry.update(views=a.views, fs=a.fs, records=[])
            for k, seg in enumerate(a.segments):
                if seg.signals.shape[1] == 0:
                    continue
                name = record_name(monitor, patient, k)
                masked = ([f"{a.stats.masked_samples} samples of this stream drawn with an input lead off "
                           "(quality masked)"] if a.stats.masked_samples else [])
                write_wfdb(out, name, seg.signals, seg.views, seg.fs, seg.t0_ns,
                           [f"panorama listen: {monitor}/{patient} from {self.topic} on {self.broker}", *masked])
                ecgpaper.render(seg.signals, seg.views, seg.fs, out / f"{name}.png", title=f"{monitor}/{patient}")
                entry["records"].append({"name": name, "views": seg.views, "samples": int(seg.signals.shape[1]),
                                         "missing_samples": int(np.isnan(seg.signals).any(axis=0).sum()),
                                         "t0_ns": seg.t0_ns})
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def record_name(monitor: str, patient: str, segment: int = 0) -> str:
    """WFDB record names allow no dots: ids' dots become dashes."""
    base = f"{monitor}_{patient}".replace(".", "-")
    return base if segment == 0 else f"{base}_{segment + 1}"


def write_wfdb(out_dir: Path, name: str, signals: np.ndarray, names: list[str], fs: float, t0_ns: int,
               comments: list[str]) -> Path:
    """A format-16 WFDB record of float mV signals, NaN written as WFDB missing values
    (``panorama.records.write_record``), starting at ``t0_ns`` (UTC, also in a comment)."""
    t0 = dt.datetime.fromtimestamp(t0_ns / 1e9, dt.timezone.utc)
    return write_record(out_dir, name, signals, names, fs, [*comments, f"t0_ns {t0_ns} (UTC)"], missing_ok=True,
                        start=t0)


# --- command line ------------------------------------------------------------------------------

def register(sub) -> None:
    p = sub.add_parser(
        "listen", help="subscribe to ECG chunks and write each stream as WFDB, PNG and a summary",
        description="Reassemble every (monitor, patient) stream on TOPIC, then write to --out one WFDB record "
        "<monitor>_<patient> (signal names = the view labels, mV), an ECG-paper PNG of its last 10 s and "
        "summary.json (chunks, gaps, duplicates, out of order, latency p50/p99). Stops after --duration "
        "seconds, --chunks chunks or Ctrl-C.")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883",
                   help="broker URL, mqtt:// or mqtts:// for TLS (default mqtt://127.0.0.1:1883)")
    p.add_argument("--protocol", default="5", choices=("5", "3.1.1"), help="MQTT version (default 5)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--topic", help="topic filter (default ecg/v1/+/+/virtual; e.g. ecg/v1/bed/+/raw for a monitor's "
                   "input)")
    g.add_argument("--prefix", help="the daemon's mqtt.prefix: listen to every virtual stream under it "
                   "(PREFIX/+/+/virtual)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--duration", type=positive, metavar="S", help="stop after S seconds")
    p.add_argument("--chunks", type=int, metavar="N", help="stop after N chunks")
    add_security_args(p)
    p.set_defaults(func=run)


def summary_line(key: str, st: dict) -> str:
    """One stream of ``summary.json`` as the line ``panorama listen`` prints: the counts, and
    what the records lack (samples with no view), what was drawn with an input lead off and
    the sender's restarts wherever there were any (warned about too, for samples missing)."""
    lat = st["latency_ms"]
    lat_s = f", latency p50 {lat['p50']:.1f} ms p99 {lat['p99']:.1f} ms" if lat["n"] else ""
    records = st.get("records", [])
    recs = ", ".join(r["name"] for r in records)
    written = sum(r["samples"] for r in records)
    blank = sum(r["missing_samples"] for r in records)  # no view there: never came, or came marked missing
    said = [f"{blank} of {written} samples missing"] if blank else []
    said += [f"{st['masked_samples']} drawn with an input lead off"] if st.get("masked_samples") else []
    said += [f"{st['restarts']} restart(s) of the sender"] if st["restarts"] else []
    if blank:
        log.warning("%s: %d of %d samples have no view (lost in transit, or no usable input lead there); they "
                    "are missing samples in %s", key, blank, written, recs)
    return (f"{key}: {st['chunks']} chunks, {st['gaps']} gaps, {st['duplicates']} duplicates, "
            f"{st['out_of_order']} out of order, {st['malformed']} malformed{lat_s}"
            + "".join(f", {s}" for s in said) + f" -> {recs or 'nothing written'}")


def run(args) -> int:
    broker = Broker(args.broker, **security_from_args(args))
    if args.topic is None:
        args.topic = f"{Topics(args.prefix or 'ecg/v1').prefix}/+/+/virtual"  # a bad prefix is said here
    if args.chunks is not None and args.chunks < 1:
        raise ValueError(f"--chunks must be at least 1, got {args.chunks}")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        listener = Listener(broker, args.protocol, args.topic, args.out).start()
        print(f"listening on {args.topic} at {args.broker}" + ("" if args.duration or args.chunks else "; Ctrl-C ends"),
              flush=True)
        listener.wait(chunks=args.chunks, timeout=args.duration, stop_event=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary = listener.stop()
    for key, st in summary["streams"].items():
        print(summary_line(key, st))
    print(f"wrote {args.out / 'summary.json'} ({summary['messages']} messages, {summary['malformed']} malformed)")
    if not summary["messages"]:
        log.warning("nothing came on %s: streams are PREFIX/MONITOR/PATIENT/virtual (or raw), PREFIX the daemon's "
                    "mqtt.prefix (ecg/v1 by default); --prefix builds the filter", args.topic)
    return 0
