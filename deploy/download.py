"""An artifact on its way to a device: the retained messages its signed manifest names.

paho's network thread offers every message on the artifact's topics; each is checked as it
comes (in any order, and again when repeated) against the size and the hash the manifest
signed for it. The first copy that does not match ends the download with the reason: a
retained message stays what it is until the operator publishes it again. The device holds
at most the manifest's size, which the agent has already checked against
``max_artifact_bytes``.
"""

from __future__ import annotations

import hashlib
import threading

from panorama.errors import UpdateError

from .manifest import chunk_plan
from .topics import FleetTopics


class Download:
    def __init__(self, topics: FleetTopics, artifact: dict):
        self.sha256 = artifact["sha256"]
        self.plan = chunk_plan(artifact)
        if len(self.plan) == 1 and self.plan[0][0] is None:  # the whole file in one message
            self.filter = topics.artifact(self.sha256)
            self.index = {self.filter: 0}
        else:
            self.filter = topics.artifact_chunks(self.sha256)
            self.index = {topics.artifact_chunk(self.sha256, i): i for i in range(len(self.plan))}
        self.parts: list[bytes | None] = [None] * len(self.plan)
        self.failure: str | None = None
        self.finished = threading.Event()  # every part here, or a failure
        self._lock = threading.Lock()

    def describe(self) -> str:
        n = len(self.plan)
        return "one message" if self.plan[0][0] is None else f"{n} chunk{'s' if n > 1 else ''} of at most " \
            f"{self.plan[0][1] >> 10} KiB"

    def offer(self, topic: str, payload: bytes) -> bool:
        """File one message; False when it is none of this artifact's."""
        i = self.index.get(topic)
        if i is None:
            return False
        digest, size = self.plan[i]
        what = "the artifact" if digest is None else f"chunk {i} of {len(self.plan)}"
        problem = None
        if len(payload) != size:  # checked before anything is hashed or held
            problem = f"{what} on {topic} is {len(payload)} bytes, the manifest says {size}"
        elif digest is not None and hashlib.sha256(payload).hexdigest() != digest:
            problem = f"{what} on {topic} differs from the sha256 its manifest signed"
        with self._lock:
            if self.finished.is_set():
                return True  # a late or repeated copy
            if problem:
                self.failure = problem
            else:
                self.parts[i] = bytes(payload)
            if problem or all(p is not None for p in self.parts):
                self.finished.set()
        return True

    def result(self) -> bytes:
        """The artifact's bytes once finished; UpdateError for a damaged part."""
        with self._lock:
            if self.failure:
                raise UpdateError(self.failure)
            return b"".join(self.parts)

    def missing(self) -> str:
        """What has not come, for a timeout's reason."""
        with self._lock:
            gone = [i for i, p in enumerate(self.parts) if p is None]
        if self.plan[0][0] is None:
            return f"no artifact on {self.filter}"
        shown = ", ".join(map(str, gone[:8])) + (", …" if len(gone) > 8 else "")
        return f"{len(gone)} of {len(self.plan)} chunks missing on {self.filter} ({shown})"
