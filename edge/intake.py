"""What the daemon takes from a message before any stream sees it: a raw chunk's checks and
the leads it can place (``raw_leads``), and the views requests it holds per stream
(``ViewRequests``). Pure logic under the daemon's lock; errors are ``ProtocolError``s the
daemon reports on the errors topic."""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np

from panorama.geometry import View, canonical_lead_name, resolve_view
from panorama.records import MODEL_FS

from .protocol import Chunk, ProtocolError


def raw_leads(chunk: Chunk, unknown: Callable[[str], None]) -> tuple[np.ndarray, list[str]]:
    """(data, names): the chunk's leads the daemon can place, as float32 mV with what the
    monitor itself flagged (quality other than ok) as NaN; ``unknown(label)`` is told of each
    label that names no lead or direction. ProtocolError for a chunk no stream can take."""
    if not 0 <= chunk.t0_ns < 2**62:
        raise ProtocolError("bad_header", f"t0_ns {chunk.t0_ns} is not a time this daemon can place")
    if chunk.fs != MODEL_FS:
        raise ProtocolError("bad_fs", f"{chunk.fs:g} Hz: this daemon takes {MODEL_FS} Hz chunks "
                            "(resample at the monitor: panorama monitor does)")
    rows, names = [], []
    for i, label in enumerate(chunk.leads):
        name = canonical_lead_name(label)
        if name is None:
            try:
                name = resolve_view(label).name
            except ValueError:
                unknown(label)
                continue
        rows.append(i)
        names.append(name)
    if not rows:
        raise ProtocolError("unknown_lead", f"no known lead among {chunk.leads}")
    data = chunk.data[rows].astype(np.float32, copy=True)
    if chunk.quality:  # what the monitor itself flags is not used
        for i, r in enumerate(rows):
            if chunk.quality[r] != "ok":
                data[i] = np.nan
    return data, names


HELD_PER_PATIENT = 256  # views requests held per patient the daemon serves (64 → 16,384 ids)


class ViewRequests:
    """The views each stream asked for (its retained ``.../views`` message), at most
    ``HELD_PER_PATIENT × max_patients`` held (a few hundred kB): every patient id a ward has had
    for years keeps its request, retained on the broker, and the broker sends them all again at
    each reconnect; past the cap a new one forgets one of a stream not running, or is refused."""

    def __init__(self, max_views: int, max_patients: int, default: list[View]):
        self.max_views, self.cap, self.default = max_views, HELD_PER_PATIENT * max_patients, default
        self.held: dict[tuple[str, str], list[str]] = {}

    def ask(self, key: tuple[str, str], names: list[str], running: Collection[tuple[str, str]]) -> list[View]:
        """Hold ``names`` for ``key`` ([]: withdraw); returns the views it now gets."""
        if len(names) > self.max_views:
            raise ProtocolError("bad_views", f"{len(names)} views asked; this daemon serves at most "
                                f"{self.max_views} per patient")
        self.held.pop(key, None)
        if names:
            if len(self.held) >= self.cap:  # forget an idle one
                idle = next((k for k in self.held if k not in running), None)
                if idle is None:
                    raise ProtocolError("capacity", "too many views requests held")
                del self.held[idle]
            self.held[key] = names
        return self.views(key)

    def views(self, key: tuple[str, str]) -> list[View]:
        return [resolve_view(n) for n in self.held.get(key, [])] or list(self.default)
