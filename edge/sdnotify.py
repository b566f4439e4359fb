"""systemd's service notifications, for a unit of ``Type=notify`` with ``WatchdogSec=``.

systemd hands a service a datagram socket in ``$NOTIFY_SOCKET`` and, with a watchdog, its
period in ``$WATCHDOG_USEC``. The protocol is one datagram of ``KEY=value`` lines
(sd_notify(3)): ``READY=1`` once serving, ``WATCHDOG=1`` at least once a period while
healthy, ``STOPPING=1`` while draining, ``STATUS=...`` for ``systemctl status``. Outside
systemd (no ``$NOTIFY_SOCKET``) every call does nothing. The protocol is a few lines of
the standard library; the bindings (python-systemd) need libsystemd's headers to build.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

log = logging.getLogger("panorama.serve")
_warned: set[str] = set()  # reasons a notification failed, said once each


def notify(*lines: str) -> bool:
    """Send ``lines`` to systemd; False outside systemd or when the socket is gone."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall("\n".join(lines).encode())
        return True
    except OSError as exc:
        if str(exc) not in _warned:  # once per reason, not at every ping
            _warned.add(str(exc))
            log.warning("could not notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False


def watchdog_period() -> float | None:
    """The watchdog's period in seconds where systemd set one for this process, else None."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        period = int(usec) / 1e6
    except ValueError:
        return None
    return period if period > 0 else None


class Watchdog:
    """Pings systemd's watchdog every quarter period while each named loop has beaten within
    half a period and each named check holds; a loop that stops beating (stuck on a lock, a
    hung backend call) or a check that fails (paho's network thread gone) stops the pings,
    and systemd restarts the service at most a period and a half after the last beat.
    ``beat(name)`` is cheap: call it every turn, and between the steps of a long turn.
    ``checks`` map a name to a callable that says False when what it watches is dead; one
    that raises counts as failed too."""

    def __init__(self, period_s: float, loops: list[str], stopping: threading.Event,
                 status: Callable[[], str] | None = None, checks: dict[str, Callable[[], bool]] | None = None):
        self.period = period_s
        self.beats = {name: time.monotonic() for name in loops}
        self.checks = dict(checks or {})
        self.stopping = stopping
        self.status = status
        self.stuck: list[str] = []  # loops silent, then checks failed, as last said
        self.pings = 0
        self.thread = threading.Thread(target=self._run, name="serve-watchdog", daemon=True)

    def beat(self, name: str) -> None:
        self.beats[name] = time.monotonic()  # one writer per name; a dict store is atomic

    def start(self) -> "Watchdog":
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stopping.wait(self.period / 4):
            try:
                self._look()
            except Exception:  # the thread must outlive a bad status line, or pings stop for nothing
                log.exception("watchdog check failed")

    def _failed(self) -> list[str]:
        failed = []
        for name, check in self.checks.items():
            try:
                ok = check()
            except Exception:
                log.exception("watchdog check %s raised", name)
                ok = False
            if not ok:
                failed.append(name)
        return failed

    def _look(self) -> None:
        now = time.monotonic()
        silent = sorted(n for n, t in self.beats.items() if now - t > self.period / 2)
        failed = self._failed()
        if silent + failed != self.stuck:
            then = f"no watchdog ping, systemd restarts the daemon when its WatchdogSec ({self.period:.0f} s) runs out"
            if silent:
                log.error("loop(s) %s silent for over %.1f s: %s", ", ".join(silent), self.period / 2, then)
            if failed:
                log.error("%s not running: %s", ", ".join(failed), then)
            if not silent and not failed:
                log.warning("every loop beats again: watchdog pings resume")
            self.stuck = silent + failed
        if not self.stuck:
            lines = ["WATCHDOG=1"] + ([f"STATUS={self.status()}"] if self.status else [])
            if notify(*lines):
                self.pings += 1
