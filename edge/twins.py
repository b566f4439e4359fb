"""Two daemons with one ``mqtt.daemon_id`` on one broker and prefix (``panorama serve`` run
by hand beside its systemd unit) would both take every stream: every view sent twice, two
calibrations per patient, and the first to stop marking the other offline on their shared
status topic. Each daemon says in its health reports who it is (``instance``, ``started``)
and listens to its own id's health topic; on hearing another instance, the one that started
later yields (it stops without a word on the shared topics and ``panorama serve`` exits
``EXIT_TWIN``, naming the other, which the systemd unit's ``RestartPreventExitStatus`` keeps
from restarting it), and the earlier one answers at once with its own report, so that the
newcomer learns of it within milliseconds. A daemon takes streams only ``TWIN_WAIT_S`` after
its first connect, once no other has answered: a newcomer that yields has touched none.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable

log = logging.getLogger(__name__)

TWIN_WAIT_S = 0.5  # after its first connect a daemon waits this long for another with its id (which answers in ms)
RETRY_S = 0.02  # an answer the publisher's full queue refused is tried again this soon (well within TWIN_WAIT_S)
EXIT_TWIN = 3  # panorama serve's exit status when it yielded before it served: not a failure to restart on


class Twins:
    def __init__(self, daemon_id: str, started: float, answer: Callable[[], bool]):
        self.daemon_id, self.started, self.answer = daemon_id, started, answer
        self.instance = uuid.uuid4().hex
        self.yielded = threading.Event()
        self.cleared = threading.Event()  # no other answered within TWIN_WAIT_S of the first connect: this one serves
        self.why = ""
        self.had_served = False  # it yielded after it had served (two serving: a split broker healed)
        self._timer: threading.Timer | None = None
        self._answered: set[str] = set()
        self._answering: set[str] = set()  # newcomers whose answer waits for room in the publisher's queue
        self._retries: list[threading.Timer] = []
        self._stopped = False

    def connected(self, take: Callable[[], None]) -> None:
        """At each connect: ``take`` the streams now if this daemon serves (a reconnect), else
        ``TWIN_WAIT_S`` from now, once no other with its id has answered (the wait starts again
        if a first connect dropped before it ended)."""
        if self.cleared.is_set():
            take()
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(TWIN_WAIT_S, take)
        self._timer.daemon = True
        self._timer.start()

    def settle(self, timeout: float = TWIN_WAIT_S + 5) -> None:
        """Wait until this daemon serves (subscribed to the streams) or has yielded."""
        deadline = time.monotonic() + timeout
        while not (self.cleared.is_set() or self.yielded.is_set()) and time.monotonic() < deadline:
            time.sleep(0.01)

    def cancel(self) -> None:
        """No timer of this daemon's fires any more: its stream wait, or an answer's retries."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        for t in self._retries:
            t.cancel()

    def subscribed(self, reason_codes, topics: str) -> bool:
        """The broker's SUBACK for the streams: this daemon serves from now on, unless the broker
        refused them (its ACL), which is said and leaves it never serving."""
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            log.error("the broker refuses this daemon the stream topics %s (%s): check its ACL", topics,
                      ", ".join(refused))
            return False
        self.cleared.set()
        return True

    def card(self) -> dict:
        """What the health report carries of this daemon: who it is, since when, and whether it
        serves (has taken the streams)."""
        return {"instance": self.instance, "started": self.started, "serving": self.cleared.is_set()}

    def heard(self, payload: bytes, retained: bool = False) -> None:
        """A health report on this daemon's own id's topic (paho's thread: quick, no waiting).
        A retained one is no live daemon's (health reports are never retained): it is ignored,
        or one forged message would stop every daemon of this id, at every restart."""
        if retained:
            return
        try:
            doc = json.loads(payload)
            other, started, serving = str(doc["instance"]), float(doc["started"]), bool(doc.get("serving", True))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return  # a report of an older daemon, or not a report: nothing to tell
        if other == self.instance:
            return
        # the one serving stays, whatever the clocks say (a newcomer's may be behind: a Jetson before
        # NTP); between two serving (a split broker healed) or two starting, the one started first
        mine = self.cleared.is_set()
        if (serving, -started, other) > (mine, -self.started, self.instance):  # it stays: this one yields
            if not self.yielded.is_set():
                self.had_served = mine
                since = dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="seconds")
                self.why = (f"another daemon with id {self.daemon_id!r} (instance {other[:8]}, up since {since}) "
                            "already serves this broker and prefix; give each daemon its own mqtt.daemon_id, or "
                            "stop the other (systemctl stop panorama-serve?)")
                log.error("stopping: %s", self.why)
                self.yielded.set()
        elif other not in self._answered and other not in self._answering:  # it hears this one now, and yields
            self._answer(other)

    def _answer(self, other: str, tries: int = 0) -> None:
        """Tell newcomer ``other``: once the report went out (a full queue refuses it: tried again
        every ``RETRY_S``, for the newcomer's whole wait, then at its next report)."""
        if self._stopped or self.yielded.is_set():  # stopping, or the streams are another's: nothing to say
            self._answering.discard(other)
            return
        if self.answer():
            self._answering.discard(other)
            if len(self._answered) > 1000:  # newcomers over months: only the recent matter
                self._answered.clear()
            self._answered.add(other)
            log.warning("another daemon with id %r started (instance %s); it is told to stop", self.daemon_id,
                        other[:8])
        elif tries * RETRY_S < TWIN_WAIT_S:
            self._answering.add(other)
            t = threading.Timer(RETRY_S, self._answer, (other, tries + 1))
            t.daemon = True
            self._retries = [r for r in self._retries if r.is_alive()] + [t]
            t.start()
        else:
            self._answering.discard(other)
