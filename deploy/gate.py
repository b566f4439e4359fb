"""The fleet agent's health gate: what the local daemon says on its health and status
topics (filed by paho's network thread), and the verdict on an installed update: the daemon
must report the new model's hash within ``adopt_timeout_s`` (or say it could not load it),
then stay online, reporting, on that model and with no failed inference batch, for
``healthy_s``. A retained health report is no live daemon's (the daemon never retains one)
and is ignored."""

from __future__ import annotations

import json
import logging
import math
import threading
import time

from edge.topics import Topics

from .agent_config import AgentConfig

log = logging.getLogger("panorama.fleet")


class Stopped(Exception):
    """The agent is stopping in the middle of a health gate."""


class HealthGate:
    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        daemon = Topics(cfg.daemon_prefix)
        self.health_topic = daemon.health(cfg.daemon_id) if cfg.daemon_id else None
        self.status_topic = daemon.daemon_status(cfg.daemon_id) if cfg.daemon_id else None
        self.health: tuple[float, dict] | None = None  # (monotonic time, last health report)
        self.status: tuple[bytes, float] = (b"", 0.0)  # (payload, when it came): one tuple, read whole

    def topics(self) -> list[tuple[str, int]]:
        """What to subscribe to (nothing without a daemon to gate on)."""
        return [(self.health_topic, 0), (self.status_topic, 1)] if self.health_topic else []

    def offer(self, msg) -> bool:
        """File a message of the daemon's health or status (paho's thread); False for others."""
        if msg.topic == self.health_topic:
            if msg.retain:
                log.warning("a retained message on %s ignored: the daemon's health reports are never retained",
                            msg.topic)
            else:
                try:
                    self.health = (time.monotonic(), json.loads(msg.payload))
                except ValueError:
                    log.warning("unreadable daemon health report ignored")
            return True
        if msg.topic == self.status_topic:
            self.status = (bytes(msg.payload), time.monotonic())
            return True
        return False

    def check(self, want: str, installed: str, stopping: threading.Event) -> str | None:
        """None when the daemon adopts the model of content hash ``want`` (the file
        ``installed``) and stays healthy; else what went wrong. Stopped when ``stopping``."""
        start = time.monotonic()
        deadline = start + self.cfg.adopt_timeout_s
        while True:  # adoption
            if stopping.is_set():
                raise Stopped
            heard = max(start, self.health[0]) if self.health else start
            if time.monotonic() - heard > self.cfg.health_timeout_s:  # down, or crash-looping on the new model
                return (f"no health report from the daemon for {self.cfg.health_timeout_s:g} s"
                        + (" (it is offline)" if self.status[0] == b"offline" else "")
                        + ("" if self.health else f" (none ever came on {self.health_topic}: is daemon_id "
                                                  f"{self.cfg.daemon_id!r} the daemon's mqtt.daemon_id, and "
                                                  "daemon_prefix its mqtt.prefix?)"))
            model = _model_block(self.health[1]) if self.health else {}
            if model.get("sha256") == want:
                break
            if model.get("reload_error") and model.get("failed_file") == installed:
                return f"the daemon could not load it: {model['reload_error']}"
            if time.monotonic() > deadline:
                return f"the daemon did not report the new model within {self.cfg.adopt_timeout_s:g} s"
            time.sleep(0.2)
        failures = _failures(model)
        end = time.monotonic() + self.cfg.healthy_s
        while time.monotonic() < end:  # then health
            if stopping.is_set():
                raise Stopped
            seen, doc = self.health
            model = _model_block(doc)
            said, said_at = self.status
            if said == b"offline" and said_at > seen:
                # (an offline from before its last report is stale: a daemon started after the agent says
                # online only after its first health reports, while the broker still holds its last will)
                return "the daemon went offline"
            if time.monotonic() - seen > self.cfg.health_timeout_s:
                return f"no health report from the daemon for {self.cfg.health_timeout_s:g} s"
            if model.get("sha256") != want:
                return "the daemon stopped running the new model"
            if _failures(model) > failures:
                return f"inference failed {_failures(model) - failures} time(s) on the new model"
            time.sleep(0.2)
        return None


def _model_block(health) -> dict:
    """The health report's model block, or {} for anything else (anyone may publish there)."""
    model = health.get("model") if isinstance(health, dict) else None
    return model if isinstance(model, dict) else {}


def _failures(model: dict) -> int:
    n = model.get("inference_failures", 0)
    return int(n) if isinstance(n, (int, float)) and math.isfinite(n) else 0
