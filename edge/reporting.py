"""Per-stream reports besides virtual leads: each stream's status, its calibration
verdict, refusals on the errors topic (counted, and rate-limited in the log), and the
bounded latency windows the daemon's health report summarises. Everything goes out through
the ``Publisher``, the only thread that publishes; the daemon's own online/offline status
and health JSON stay in ``edge/daemon.py``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque

import numpy as np

from panorama.calibrate import CalibrationResult
from panorama.records import dc_warning

from .mqtt import Publisher
from .protocol import CONTENT_TYPE_JSON, ProtocolError
from .topics import Topics

log = logging.getLogger("panorama.serve")
REFUSED_EVERY_S = 5.0  # a refused stream is told again after this while it keeps sending (a monitor warns at 10 s)
NO_SIGNAL = ("no usable lead (every lead off, flat, saturated, missing or spanning over 50 mV: not in mV?): "
             "views marked missing")
LOST = "samples lost in transit (a hole in the stream, counted in gaps): views marked missing there"


class LatencyWindow:
    """Recent values for percentiles, bounded."""

    def __init__(self, n: int = 4096):
        self.values: deque[float] = deque(maxlen=n)

    def add(self, v: float) -> None:
        self.values.append(v)

    def percentiles(self) -> dict:
        if not self.values:
            return {"p50": None, "p99": None, "n": 0}
        a = np.fromiter(self.values, float)
        return {"p50": round(float(np.percentile(a, 50)), 2), "p99": round(float(np.percentile(a, 99)), 2),
                "n": int(a.size)}


class Reporter:
    """Retained status and calibration per stream, errors per daemon; counts refusals by code.

    Refusals are said on the errors topic as the log says them: the first three of a
    (stream, code) and every hundredth after, each with its count, and at most
    ``errors_per_s`` a second in all. A sender flooding bad payloads would otherwise fill the
    publisher's and paho's queues, which every patient's status and calibration share."""

    def __init__(self, publisher: Publisher, topics: Topics, daemon_id: str, errors_per_s: float = 20.0):
        self.publisher, self.topics, self.id = publisher, topics, daemon_id
        self.rejected: Counter = Counter()
        self._seen: Counter = Counter()  # (stream, code or label) → times, to keep the log quiet
        self.errors_per_s = errors_per_s
        self._tokens, self._filled = errors_per_s, time.monotonic()
        self.unsent = 0  # error reports held back by the limits (the counts above still hold them)
        self._lock = threading.Lock()  # ingest and inference threads both report
        self._refused: dict = {}  # stream → when its refusal was last said on its status topic

    def status(self, st, why: str = "") -> None:
        doc = {"state": st.state, "signal": st.signal, "leads": st.leads, "views": [v.name for v in st.views],
               "t_ns": time.time_ns(), "counts": vars(st.counts)}
        if why:
            doc["reason"] = why
        with self._lock:  # taken: a refusal after it is news again
            self._refused.pop(st.key, None)
        self._json(self.topics.status(*st.key), doc, qos=1, retain=True)

    def refused(self, key, why: str, first: bool = False) -> None:
        """A new stream refused for want of room: said on its own status topic, which its
        monitor reads (the errors topic is the operator's), not retained (a refusal is news
        for the sender, not a state to leave on the broker), at once on a sender's first
        chunk (``first``: a monitor started or restarted), else at most every
        ``REFUSED_EVERY_S`` per stream, and within the errors' bucket of ``errors_per_s``."""
        now = time.monotonic()
        with self._lock:
            last = self._refused.get(key)
            if last is not None and now - last < REFUSED_EVERY_S and not first:
                return
            if not self._token(now):
                self.unsent += 1
                return
            if len(self._refused) > 10_000:  # ids come from senders: keep it bounded
                self._refused.clear()
            self._refused[key] = now
        self._json(self.topics.status(*key), {"state": "refused", "reason": why, "t_ns": time.time_ns()}, qos=1)

    def _token(self, now: float) -> bool:
        """One from the bucket of ``errors_per_s`` (under the lock); False when it is empty."""
        self._tokens = min(self.errors_per_s, self._tokens + (now - self._filled) * self.errors_per_s)
        self._filled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def calibration(self, key, res: CalibrationResult, seconds: float) -> None:
        doc = {"state": "streaming", "accepted": bool(res.accepted), "reason": res.reason,
               "offsets_deg": {n: [round(float(a), 2) for a in d] for n, d in zip(res.leads, res.offsets_deg)},
               "residual_before_uv": _num(res.residual_before_uv), "residual_after_uv": _num(res.residual_after_uv),
               "seconds": seconds, "fit_s": round(res.seconds, 3), "used": res.used, "fitted": res.fitted,
               "axes": res.axes.split(",") if res.axes else [], "prior_weight": _num(res.prior_weight),
               "swap": res.swap or None, "swap_fitted_on": res.swap_fitted_on}
        self._json(self.topics.calibration(*key), doc, qos=1, retain=True)

    def signal(self, st) -> None:
        """Every lead of ``st`` lost, or one back: said on its status, and an alarm on the
        errors topic when it is the electrodes (not samples lost in transit)."""
        if st.signal != "missing":
            self.status(st, "signal back")
            return
        self.status(st, LOST if st.lost_in_transit else NO_SIGNAL)
        if not st.lost_in_transit:  # an alarm each time the electrodes go (within the bucket), not 3 per id
            self.error(st.key, "no_signal", NO_SIGNAL, self.topics.raw(*st.key), every=True)

    def dc_offsets(self, st) -> None:
        """The leads ``st`` found far from zero since the last look: said, once per stream."""
        for lead, mv in st.dc.items():
            self.error(st.key, "dc_offset", dc_warning(lead, mv), self.topics.raw(*st.key), limit=("dc_offset", lead))
        st.dc.clear()

    def stale(self, key, n: int, fs: float, ahead_s: float, lost: bool, max_backlog_s: float) -> None:
        """``n`` samples of ``key``'s output were already stale when due and skipped, and why."""
        why = (f"the monitor runs {ahead_s:.0f} s ahead of real time, as panorama monitor --fast does: "
               "output is drawn for a screen, in real time" if ahead_s > max_backlog_s
               else "samples lost in transit before them: a broker or network outage?" if lost
               else "calibration queue or overload")
        self.error(key, "stale_output", f"{n} samples ({n / fs:.1f} s) of output were already stale when due "
                   f"and were skipped ({why})")

    def reject(self, topic: str, code: str, reason: str) -> None:
        """A message refused: counted, and said on the errors topic for its stream."""
        self.rejected[code] += 1
        try:
            monitor, patient, _ = self.topics.parse(topic)
            key, limit = (monitor, patient), None
        except ProtocolError:  # no stream to say it for: each such topic is its own, not one for all
            key, limit = ("?", "?"), (code, topic)
        self.error(key, code, reason, topic, limit=limit)

    def unknown_lead(self, key, label: str, topic: str = "") -> None:
        """A lead label no one knows: counted each time, said once per stream and label."""
        self.rejected["unknown_lead"] += 1
        self.error(key, "unknown_lead", f"lead {label!r} is not a known lead or THETA:PHI direction; "
                   "ignored, the others are used", topic, limit=("unknown_lead", label), once=True)

    def forget(self, key) -> None:
        """A stream ended: its counts go, so a stream of that id later is told afresh."""
        with self._lock:
            for k in [k for k in self._seen if k[0] == key]:
                del self._seen[k]

    def error(self, key, code: str, reason: str, topic: str = "", limit=None, once: bool = False,
              every: bool = False) -> None:
        """Said per (``key``, ``limit`` or ``code``): the first three times and one in every
        hundred after (``once``: the first time only; ``every``: each time), within the bucket
        of ``errors_per_s``. The counts of a stream go when it ends (``forget``)."""
        with self._lock:
            if len(self._seen) > 10_000:  # ids and labels come from senders: keep it bounded
                self._seen.clear()
            n = self._seen[(key, limit or code)]
            self._seen[(key, limit or code)] += 1
            if not every and n >= (1 if once else 3) and (once or n % 100):
                self.unsent += 1
                return
            log.warning("%s/%s %s: %s%s", *key, code, reason, f" (seen {n + 1} times)" if n else "")
            if not self._token(time.monotonic()):
                self.unsent += 1
                return
        doc = {"monitor": key[0], "patient": key[1], "topic": topic, "code": code, "reason": reason,
               "count": n + 1, "t_ns": time.time_ns()}
        self._json(self.topics.errors(self.id), doc, qos=1)

    def _json(self, topic: str, doc: dict, **kw) -> None:
        self.publisher.put(topic, json.dumps(doc).encode(), content_type=CONTENT_TYPE_JSON, **kw)


def _num(x: float):
    return None if x is None or not np.isfinite(x) else round(float(x), 2)
