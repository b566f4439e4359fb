"""An MQTT broker inside this process, for tests, the demo and a single-box setup.

amqtt 0.12 runs in a background thread with its own asyncio event loop. It speaks MQTT
3.1.1 only: clients must connect with protocol "3.1.1" (a v5 CONNECT is refused with
"unacceptable protocol version"). Anonymous clients are allowed and it listens on
loopback by default; for anything shared, run Mosquitto.

    with EmbeddedBroker() as broker:      # port 0: the OS picks a free port
        connect(make_client(client_id("x"), "3.1.1"), broker.url)
"""

from __future__ import annotations

import asyncio
import logging
import threading

from panorama.errors import BackendError

__all__ = ["EmbeddedBroker"]

log = logging.getLogger(__name__)

# amqtt logs every connection at INFO and a client's abrupt close as a traceback; only
# warnings and worse from it (and from `transitions`, its state machine) reach our logs.
_QUIET = ("amqtt", "transitions")


class EmbeddedBroker:
    """amqtt in its own thread and asyncio loop; MQTT 3.1.1 only."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"port must lie in 0..65535 (0 = any free port), got {port}")
        self.host, self.port = host, int(port)
        self.url = ""  # "mqtt://HOST:PORT" once started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> "EmbeddedBroker":
        """Return once the broker accepts connections; BackendError if it cannot start."""
        if self._thread is not None:
            raise RuntimeError("this EmbeddedBroker was already started")
        for name in _QUIET:
            if logging.getLogger(name).getEffectiveLevel() < logging.WARNING:
                logging.getLogger(name).setLevel(logging.WARNING)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="panorama-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise BackendError(f"embedded MQTT broker did not start within {timeout:g} s")
        if self._error is not None:
            self._thread.join(timeout)
            raise BackendError(f"embedded MQTT broker cannot listen on {self.host}:{self.port}: "
                               f"{self._error}") from self._error
        self.url = f"mqtt://{self.host}:{self.port}"
        log.info("embedded MQTT broker (3.1.1) listening at %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close every client session and the listener, then end the loop and the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        if self._broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop).result(timeout)
            except Exception as exc:  # shutting down: report, but still stop the loop
                log.warning("embedded MQTT broker shut down uncleanly: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("embedded MQTT broker thread did not end within %g s", timeout)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ the broker's thread

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._start_broker())
        except BaseException as exc:  # reported to start() by the caller's thread
            self._error = exc
            self._ready.set()
            self._close_loop()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._close_loop()

    async def _start_broker(self) -> None:
        from amqtt.broker import Broker  # imported here: only this class needs amqtt

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # no $SYS publisher and no packet/event loggers; anonymous clients allowed
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = Broker(config, loop=asyncio.get_running_loop())
        await self._broker.start()
        if self.port == 0:  # bound to port 0: read back the port the OS chose (no race)
            server = self._broker._servers["default"].instance
            self.port = server.sockets[0].getsockname()[1]

    def _close_loop(self) -> None:
        loop = self._loop
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
