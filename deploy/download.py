"""An artifact on its way to a device: the retained messages its signed manifest names.

The device asks for the chunks a window at a time (``WINDOW`` subscriptions to exact
topics): a broker sends a subscription's retained messages in one burst and queues only so
many for a client (Mosquitto: ``max_queued_messages`` 1000, the rest dropped), so a wildcard
over a few thousand chunks would lose some. A chunk asked for that does not come is asked
for again (``asked_topics``). paho's network thread offers every message on the artifact's
topics; each is checked as it comes (in any order, and again when repeated) against the size
and the hash the manifest signed for it (a whole-file artifact against the artifact's own
hash). The first retained copy that does not match ends the download with the reason: the
broker holds it, and it stays what it is until the operator publishes it again. A live copy
that does not match (a stray publish: no retained message is damaged) is dropped and the
download waits on; it is named if the download then times out. The device holds at most the
manifest's size, which the agent has already checked against ``max_artifact_bytes``, and
gives the parts up with ``result``.
"""

from __future__ import annotations

import hashlib
import threading
import time

from panorama.errors import UpdateError

from .manifest import chunk_plan, chunked
from .topics import FleetTopics

WINDOW = 32  # chunks asked for at once (2 MiB at the default 64 KiB)


class Download:
    def __init__(self, topics: FleetTopics, artifact: dict):
        self.sha256 = artifact["sha256"]
        self.plan = chunk_plan(artifact)
        self.whole = not chunked(artifact)  # the file in one message
        self.topics = [topics.artifact(self.sha256)] if self.whole else \
            [topics.artifact_chunk(self.sha256, artifact["chunk_bytes"], i) for i in range(len(self.plan))]
        self.index = {t: i for i, t in enumerate(self.topics)}
        self.parts: list[bytes | None] = [None] * len(self.plan)
        self.asked: set[int] = set()  # subscribed to (until the window moves past it, or ``release``)
        self.failure: str | None = None
        self.strays: list[str] = []  # live copies that did not match, dropped (the first few)
        self.finished = threading.Event()  # every part here, or a failure
        self.progress_at = time.monotonic()  # when the last new part came (or the download began)
        self._lock = threading.Lock()

    def describe(self) -> str:
        n = len(self.plan)
        return "one message" if self.whole else f"{n} chunk{'s' if n > 1 else ''} of at most " \
            f"{self.plan[0][1] >> 10} KiB"

    # ---- the agent's worker thread -----------------------------------------------------
    def next_topics(self, window: int = WINDOW) -> tuple[list[str], list[str]]:
        """(topics to subscribe to, topics to unsubscribe from): the window moves on past
        the parts that came."""
        with self._lock:
            came = sorted(i for i in self.asked if self.parts[i] is not None)
            self.asked.difference_update(came)
            room = max(0, window - len(self.asked))
            want = [i for i, p in enumerate(self.parts) if p is None and i not in self.asked][:room]
            self.asked.update(want)
        return [self.topics[i] for i in want], [self.topics[i] for i in came]

    def asked_topics(self) -> list[str]:
        """What is asked for and has not come: subscribed again after a reconnect or a stall."""
        with self._lock:
            return [self.topics[i] for i in sorted(self.asked) if self.parts[i] is None]

    def release(self) -> list[str]:
        """Every topic still subscribed, come or not, to unsubscribe at the end (failure too)."""
        with self._lock:
            held, self.asked = sorted(self.asked), set()
        return [self.topics[i] for i in held]

    # ---- paho's network thread ---------------------------------------------------------
    def offer(self, topic: str, payload: bytes, retained: bool = True) -> bool:
        """File one message (``retained``: the broker's stored copy, as every part the
        operator publishes is); False when it is none of this artifact's."""
        i = self.index.get(topic)
        if i is None:
            return False
        digest, size = self.plan[i]
        what = "the artifact" if digest is None else f"chunk {i} of {len(self.plan)}"
        problem = None
        if len(payload) != size:  # checked before anything is hashed or held
            problem = f"{what} on {topic} is {len(payload)} bytes, the manifest says {size}"
        elif hashlib.sha256(payload).hexdigest() != (digest or self.sha256):
            problem = f"{what} on {topic} differs from the sha256 its manifest signed"
        with self._lock:
            if self.finished.is_set() or self.parts[i] is not None:
                return True  # a late or repeated copy
            if problem and not retained:
                if len(self.strays) < 4:
                    self.strays.append(problem)
                return True
            if problem:
                self.failure = problem
            else:
                self.parts[i] = bytes(payload)
                self.progress_at = time.monotonic()
            if problem or all(p is not None for p in self.parts):
                self.finished.set()
        return True

    # ---- the outcome -------------------------------------------------------------------
    def result(self) -> bytes:
        """The artifact's bytes once finished, the parts given up; UpdateError for a damaged part."""
        with self._lock:
            if self.failure:
                raise UpdateError(self.failure)
            parts, self.parts = self.parts, [None] * len(self.plan)
        return b"".join(parts)

    def missing(self) -> str:
        """What has not come, for a timeout's reason."""
        with self._lock:
            gone = [i for i, p in enumerate(self.parts) if p is None]
        strays = f" (copies dropped: {'; '.join(self.strays)})" if self.strays else ""
        if self.whole:
            return f"no artifact on {self.topics[0]}{strays}"
        shown = ", ".join(map(str, gone[:8])) + (", …" if len(gone) > 8 else "")
        return f"{len(gone)} of {len(self.plan)} chunks missing under {self.topics[0].rsplit('/', 1)[0]}/ " \
            f"({shown}){strays}"
