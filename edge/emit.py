"""The daemon's output side: due windows of every stream, batched through the backend, out
as virtual chunks on the publisher, each stream with its own ``seq``; the latency and
inference-time windows the health report summarises (``edge/daemon.py`` owns the rest).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Callable

from .batch import Output, run_windows
from .model_slot import ModelSlot
from .mqtt import Publisher
from .protocol import CONTENT_TYPE_BINARY, CONTENT_TYPE_JSON, Chunk, encode, to_json
from .reporting import LatencyWindow, Reporter
from .topics import Topics

log = logging.getLogger("panorama.serve")


class Emitter:
    """``synthesise(windows)`` from the inference thread (and a closing stream's flush): one
    backend for the whole turn, a failed batch said to each of its streams, one stream's bad
    output never stopping the others'. ``beat`` is called around each backend batch, so a
    long turn counts as progress to the watchdog."""

    def __init__(self, slot: ModelSlot, publisher: Publisher, topics: Topics, report: Reporter, fs: float,
                 virtual_format: str, expiry_s: int | None, max_batch: int, beat: Callable[[], None]):
        self.slot, self.publisher, self.topics, self.report = slot, publisher, topics, report
        self.fs, self.format, self.expiry_s, self.max_batch = fs, virtual_format, expiry_s, max_batch
        self.beat = beat
        self.seq: Counter = Counter()  # next virtual seq per stream
        self._lock = threading.Lock()
        self.chunks_out = 0
        self.latency_ms = LatencyWindow()  # origin publish → virtual chunk handed to the publisher
        self.inference_ms = LatencyWindow()  # per batched backend call
        self._silences: dict = {}  # each view set's response to a silent heart (edge.batch), for one backend
        self._silences_of = None

    def synthesise(self, windows) -> None:
        t0 = time.perf_counter()
        backend = self.slot.backend  # one model for the whole batch, even if a reload swaps it meanwhile
        try:
            def run(*args):  # a turn of many batches is progress, batch by batch, to the watchdog
                self.beat()
                y = backend.run(*args)
                self.beat()
                return y

            if self._silences_of is not backend:  # a swapped model answers silence otherwise
                self._silences, self._silences_of = {}, backend
            outputs = run_windows(run, windows, self.max_batch, self._silences)
        except Exception as exc:  # a backend failure loses these windows, not the daemon
            self.slot.failed_batch(backend)  # a fleet update's health gate watches this
            log.exception("inference failed for %d windows", len(windows))
            for key in {w.key for w in windows}:
                self.report.error(key, "inference", f"{type(exc).__name__}: {exc}")
            return
        self.inference_ms.add((time.perf_counter() - t0) * 1000)
        for out in outputs:
            try:
                self._publish(out)
            except Exception as exc:  # one stream's bad output must not stop the others'
                log.exception("publishing for %s/%s failed", *out.key)
                self.report.error(out.key, "internal", f"{type(exc).__name__}: {exc}")

    def forget(self, key) -> None:
        """A stream gone for good: its seq starts again at 0 if it comes back."""
        with self._lock:
            self.seq.pop(key, None)

    def _publish(self, out: Output) -> None:
        with self._lock:
            seq = self.seq[out.key]
            self.seq[out.key] = (seq + 1) % 2**32
        t0 = out.t0_ns + int(round(out.start * 1e9 / self.fs))
        chunk = Chunk(seq, t0, float(self.fs), out.views, out.data, out.quality, out.sent_ns)
        payload = to_json(chunk) if self.format == "json" else encode(chunk, self.format)
        ctype = CONTENT_TYPE_JSON if self.format == "json" else CONTENT_TYPE_BINARY
        if self.publisher.put(self.topics.virtual(*out.key), payload, qos=0, content_type=ctype,
                              expiry_s=self.expiry_s):
            self.chunks_out += 1
        if out.sent_ns:
            self.latency_ms.add((time.time_ns() - out.sent_ns) / 1e6)
