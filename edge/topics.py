"""The wire protocol's topic tree and the views request (docs/wire-protocol.md); the chunk
itself is edge/protocol.py."""

from __future__ import annotations

import json
import re

from panorama.geometry import resolve_views

from .protocol import MAX_VIEWS_REQUEST_BYTES, Limits, ProtocolError, _check_label


# ----------------------------------------------------------------------------- views request

def parse_views_request(payload: bytes, limits: Limits = Limits()) -> list[str]:
    """The views a monitor asks for: ``{"views": ["V7", "V8", "120:45"]}`` → canonical names.
    An empty payload (a cleared retained message) or an empty list asks for none: the request
    is withdrawn (the daemon draws its default views again). At most
    ``limits.max_leads`` views, since they travel as the leads of one virtual chunk."""
    if len(payload) == 0:
        return []
    if len(payload) > MAX_VIEWS_REQUEST_BYTES:
        raise ProtocolError("bad_views", f"views request of {len(payload)} bytes exceeds {MAX_VIEWS_REQUEST_BYTES}")
    try:
        doc = json.loads(bytes(payload).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("bad_views", f"views request is not UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"views"} or not isinstance(doc["views"], list):
        raise ProtocolError("bad_views", 'views request must be {"views": [names]} and nothing else')
    specs = doc["views"]
    if not specs:
        return []
    if not all(isinstance(s, str) for s in specs):
        raise ProtocolError("bad_views", "every view must be a string such as \"V7\" or \"120:45\"")
    if len(specs) > limits.max_leads:
        raise ProtocolError("bad_views", f"{len(specs)} views requested; at most {limits.max_leads}")
    try:
        names = [v.name for v in resolve_views(specs)]
        for name in names:
            _check_label(name, ValueError)
    except ValueError as exc:
        raise ProtocolError("bad_views", str(exc)) from None
    return names


# ----------------------------------------------------------------------------- topics

_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
DAEMON = "_daemon"
STREAM_KINDS = ("raw", "virtual", "views", "calibration", "status")


def check_filter(topic) -> str:
    """``topic`` if it is an MQTT subscription filter: '+' a whole level, '#' only the last
    level; ValueError saying which rule it breaks otherwise (paho would refuse it inside its
    network thread, where the caller never hears why)."""
    if not isinstance(topic, str) or not topic or "\0" in topic or len(topic.encode()) > 65535:
        raise ValueError(f"topic filter {topic!r} must be 1 to 65535 bytes without NUL")
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"topic filter {topic!r}: '#' must be a whole level, and the last")
        if "+" in level and level != "+":
            raise ValueError(f"topic filter {topic!r}: '+' must be a whole level")
    return topic


def check_id(what: str, value) -> str:
    """``value``, a valid id of a ``what`` (monitor, patient, daemon, device, group) in a topic
    level; ValueError naming the rule otherwise."""
    if not isinstance(value, str) or not _ID.fullmatch(value) or value == DAEMON:
        raise ValueError(f"{what} id {value!r} must be 1-64 characters of A-Z a-z 0-9 _ . -, "
                         f"not start with '.', and not be {DAEMON!r}")
    return value


class Topics:
    """The topic tree: ``{prefix}/{monitor}/{patient}/{kind}`` per patient stream and
    ``{prefix}/_daemon/{daemon_id}/{status|health|errors}`` per daemon."""

    def __init__(self, prefix: str = "ecg/v1"):
        levels = prefix.split("/") if isinstance(prefix, str) else [""]
        if not all(levels) or any(c in prefix for c in "+#\0"):
            raise ValueError(f"topic prefix {prefix!r} must be non-empty levels without '+', '#' or "
                             "leading, trailing or double '/'")
        self.prefix = prefix

    def _stream(self, monitor, patient, kind) -> str:
        return f"{self.prefix}/{check_id('monitor', monitor)}/{check_id('patient', patient)}/{kind}"

    def raw(self, monitor, patient) -> str:
        return self._stream(monitor, patient, "raw")

    def virtual(self, monitor, patient) -> str:
        return self._stream(monitor, patient, "virtual")

    def views(self, monitor, patient) -> str:
        return self._stream(monitor, patient, "views")

    def calibration(self, monitor, patient) -> str:
        return self._stream(monitor, patient, "calibration")

    def status(self, monitor, patient) -> str:
        return self._stream(monitor, patient, "status")

    def daemon_status(self, daemon_id) -> str:
        return f"{self.prefix}/{DAEMON}/{check_id('daemon', daemon_id)}/status"

    def health(self, daemon_id) -> str:
        return f"{self.prefix}/{DAEMON}/{check_id('daemon', daemon_id)}/health"

    def errors(self, daemon_id) -> str:
        return f"{self.prefix}/{DAEMON}/{check_id('daemon', daemon_id)}/errors"

    def pattern(self, kind: str) -> str:
        """Subscription filter for one kind of every stream, e.g. ``ecg/v1/+/+/raw``."""
        if kind not in STREAM_KINDS:
            raise ValueError(f"kind must be one of {STREAM_KINDS}, got {kind!r}")
        return f"{self.prefix}/+/+/{kind}"

    def parse(self, topic) -> tuple[str, str, str]:
        """(monitor, patient, kind) of a stream topic; ProtocolError("bad_topic") otherwise."""
        head = self.prefix + "/"
        if not isinstance(topic, str) or not topic.startswith(head):
            raise ProtocolError("bad_topic", f"topic {topic!r} is not under {head!r}")
        parts = topic[len(head):].split("/")
        if len(parts) != 3:
            raise ProtocolError("bad_topic", f"topic {topic!r} is not {head}MONITOR/PATIENT/KIND")
        monitor, patient, kind = parts
        if monitor == DAEMON:
            raise ProtocolError("bad_topic", f"topic {topic!r} is a daemon topic, not a patient stream")
        if kind not in STREAM_KINDS:
            raise ProtocolError("bad_topic", f"topic {topic!r}: kind {kind!r} is not one of {STREAM_KINDS}")
        try:
            check_id("monitor", monitor)
            check_id("patient", patient)
        except ValueError as exc:
            raise ProtocolError("bad_topic", f"topic {topic!r}: {exc}") from None
        return monitor, patient, kind
