"""MQTT plumbing shared by the daemon and the tools: clients, connecting, one publisher thread.

paho-mqtt 2.x with VERSION2 callbacks. The protocol version is explicit ("5" or "3.1.1"):
Mosquitto 2 speaks both; the embedded amqtt broker speaks 3.1.1 only. MQTT v5 PUBLISH
properties (content type, message expiry) are sent only over v5.

Publishing from paho callbacks, or from many threads at once, is paho's most reported
deadlock, so every publish goes through one ``Publisher`` thread fed by a bounded queue:
a full queue drops (and counts) instead of blocking the caller.

Brokers — URL, TLS, credentials, and why a connection failed — are ``edge.endpoint``'s
``Broker`` (re-exported here): ``connect`` takes one, or a plain URL.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import secrets
import socket
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from panorama.errors import BackendError

from .endpoint import (DEFAULT_PORT, TLS_PORT, Broker, add_security_args, as_broker, explain_exception,
                       explain_refusal, host_port, parse_broker_url, security_from_args)

__all__ = ["PROTOCOLS", "DEFAULT_PORT", "TLS_PORT", "Broker", "BrokerConnectionError", "client_id",
           "parse_broker_url", "host_port", "make_client", "publish_props", "Publisher", "connect", "as_broker",
           "explain_exception", "explain_refusal", "add_security_args", "security_from_args"]

log = logging.getLogger(__name__)

PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


class _RetryNoise(logging.Filter):
    """paho logs these at ERROR on every retry, with no reason; the Broker's rate-limited
    warning says what failed and why instead. Anything else paho says (an exception in a
    callback) still comes through."""

    NOISE = ("failed to receive on socket", "Client is not connected", "failed to send on socket")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


_PAHO_LOG = logging.getLogger("paho.mqtt")
_PAHO_LOG.addFilter(_RetryNoise())


class BrokerConnectionError(BackendError, ConnectionError):
    """The broker could not be reached, or refused the connection."""


def client_id(role: str) -> str:
    """A client id unique per host and process (duplicate ids make brokers kick clients in turn)."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
    return f"panorama-{role}-{host}-{os.getpid()}-{secrets.token_hex(6)}"


def _check_protocol(protocol: str) -> int:
    if protocol not in PROTOCOLS:
        raise ValueError(f"MQTT protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    return PROTOCOLS[protocol]


def make_client(client_id: str, protocol: str = "5") -> mqtt.Client:
    """A paho client with back-off reconnects (1 s to 30 s) and at most 1000 QoS>0 messages
    queued while disconnected. An exception in one of its callbacks is logged and the
    network thread carries on, rather than dying silently with the connection."""
    version = _check_protocol(protocol)
    kwargs = {"clean_session": True} if version == mqtt.MQTTv311 else {}  # v5: clean_start at connect
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version, **kwargs)
    client.reconnect_delay_set(1, 30)
    client.max_queued_messages_set(1000)
    client.suppress_exceptions = True
    client.enable_logger(_PAHO_LOG)
    return client


def network_running(client: mqtt.Client) -> bool:
    """Whether paho's network thread (``loop_start``; it reads, writes, pings and reconnects)
    is alive. paho keeps the thread in ``_thread`` (None once it ends) and offers no public
    way to ask; a paho without that attribute is taken as running (it cannot say)."""
    thread = getattr(client, "_thread", True)
    return thread is True or (thread is not None and thread.is_alive())


def publish_props(protocol: str, content_type: str | None, expiry_s: int | None) -> Properties | None:
    """MQTT v5 PUBLISH properties (content type, message expiry); None on 3.1.1 or when empty."""
    if _check_protocol(protocol) != mqtt.MQTTv5 or (content_type is None and expiry_s is None):
        return None
    props = Properties(PacketTypes.PUBLISH)
    if content_type is not None:
        props.ContentType = content_type
    if expiry_s is not None:
        if int(expiry_s) < 1:
            raise ValueError(f"message expiry must be at least 1 s, got {expiry_s}")
        props.MessageExpiryInterval = int(expiry_s)
    return props


_STOP = object()


class Publisher:
    """One thread that owns all publishing, fed by a bounded queue (never publish from callbacks)."""

    def __init__(self, client: mqtt.Client, maxsize: int = 2048, protocol: str = "5", track_refusals: bool = False,
                 beat: Callable[[], None] | None = None):
        version = _check_protocol(protocol)
        actual = getattr(client, "protocol", version)
        if actual in PROTOCOLS.values() and actual != version:
            raise ValueError(f"Publisher told protocol {protocol!r} but the client speaks "
                             f"{'5' if actual == mqtt.MQTTv5 else '3.1.1'}")
        self.client = client
        self.protocol = protocol
        self.dropped = 0  # refused by put: queue full, or publisher stopped
        self.published = 0  # handed to paho successfully
        self.failed = 0  # paho refused (not connected with QoS 0, its own queue full, bad topic)
        # track_refusals (MQTT 5): topic → why the broker refused a QoS ≥ 1 message (its PUBACK)
        self.refused: dict[str, str] = {}
        self._track = track_refusals
        self._acks = threading.Lock()  # never held while calling paho: its network thread calls back holding its own
        self._pending: dict[int, str] = {}  # mid → topic of QoS ≥ 1 messages whose PUBACK has not come
        self._early: dict[int, str] = {}  # acks that came back before their mid was filed: why refused, or ""
        if track_refusals:
            client.on_publish = self._on_publish
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._lock = threading.Lock()
        self._props: dict[tuple, Properties | None] = {}
        self._last: mqtt.MQTTMessageInfo | None = None
        self._stopping = threading.Event()
        self._beat = beat or (lambda: None)  # each turn, at least every 0.1 s: for a watchdog
        self._thread = threading.Thread(target=self._run, name="panorama-publisher", daemon=True)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> "Publisher":
        self._thread.start()
        return self

    def put(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
            content_type: str | None = None, expiry_s: int | None = None) -> bool:
        """Queue one message; False (and a drop counted) when the queue is full. Never blocks."""
        if not self._stopping.is_set():
            try:
                self._queue.put_nowait((topic, payload, qos, retain, content_type, expiry_s))
                return True
            except queue.Full:
                pass
        with self._lock:
            self.dropped += 1
        return False

    def stop(self, timeout: float = 5.0) -> None:
        """Publish what is queued (within ``timeout`` seconds), then end the thread."""
        deadline = time.monotonic() + timeout
        self._stopping.set()
        try:
            self._queue.put_nowait(_STOP)  # wakes the thread at once once the queue is drained
        except queue.Full:
            pass  # the thread notices _stopping when the queue runs dry
        if self._thread.is_alive():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("publisher stopped with %d messages still queued", self.queued)
            return
        last = self._last
        if last is not None and self.client.is_connected():
            try:  # in order on one connection: the last one out means all are out
                last.wait_for_publish(max(0.01, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass

    def _run(self) -> None:
        while True:
            self._beat()
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            if item is _STOP:
                if self._queue.empty():
                    return
                continue
            self._publish(*item)

    def _publish(self, topic, payload, qos, retain, content_type, expiry_s) -> None:
        try:
            key = (content_type, expiry_s)
            if key not in self._props:
                self._props[key] = publish_props(self.protocol, content_type, expiry_s)
            info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=self._props[key])
        except Exception as exc:  # a bad topic or payload must not end the publishing thread
            self.failed += 1
            log.warning("cannot publish to %r: %s", topic, exc)
            return
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self.published += 1
            self._last = info
            if qos > 0 and self._track:
                with self._acks:
                    if info.mid in self._early:  # acknowledged already
                        if why := self._early.pop(info.mid):
                            self.refused[topic] = why
                    else:
                        self._pending[info.mid] = topic
                        while len(self._pending) > 4096:  # PUBACKs that never come (a 3.1.1 broker drops silently)
                            self._pending.pop(next(iter(self._pending)))
        else:
            self.failed += 1

    @property
    def awaiting(self) -> int:
        """QoS ≥ 1 messages published whose PUBACK has not come back."""
        with self._acks:
            return len(self._pending)

    def _on_publish(self, client, userdata, mid, reason_code, properties=None) -> None:
        failed = getattr(reason_code, "is_failure", False)
        with self._acks:
            topic = self._pending.pop(mid, None)
            if topic is None:  # before _publish filed it (or a QoS 0 message): kept for a moment
                self._early[mid] = str(reason_code) if failed else ""
                while len(self._early) > 1024:
                    self._early.pop(next(iter(self._early)))
            elif failed:
                self.refused[topic] = str(reason_code)


def connect(client: mqtt.Client, broker: "str | Broker", timeout: float = 10.0, keepalive: int = 30,
            max_packet: int | None = None) -> None:
    """Give the client the broker's TLS and credentials, connect, start paho's network thread
    (which then owns reconnects) and wait for the broker's CONNACK. Over MQTT 5 ``max_packet``
    bytes is the largest packet the broker may send it (larger messages are dropped for this
    client, never read into its memory; 3.1.1 has no such bound: set the broker's
    ``max_packet_size``). BrokerConnectionError (a
    ConnectionError) naming the broker when it cannot be reached, its certificate is not
    trusted, it refuses, or it does not answer within ``timeout`` seconds. A reconnect that
    fails later is logged (``Broker.watch``)."""
    broker = as_broker(broker)
    host, port, where = broker.host, broker.port, broker.where
    broker.configure(client)
    answered = threading.Event()
    result: dict = {}
    previous_connect, previous_disconnect = client.on_connect, client.on_disconnect

    def on_connect(c, userdata, flags, reason_code, properties):
        result.setdefault("rc", reason_code)
        answered.set()
        if previous_connect is not None:
            previous_connect(c, userdata, flags, reason_code, properties)

    def on_disconnect(c, userdata, flags, reason_code, properties):
        result.setdefault("closed", reason_code)  # closed before any CONNACK: refused
        answered.set()
        if previous_disconnect is not None:
            previous_disconnect(c, userdata, flags, reason_code, properties)

    def restore():
        if client.on_connect is on_connect:
            client.on_connect = previous_connect
        if client.on_disconnect is on_disconnect:
            client.on_disconnect = previous_disconnect

    def fail(why: str, exc: BaseException | None = None):
        client.disconnect()
        client.loop_stop()
        restore()
        raise BrokerConnectionError(f"cannot reach MQTT broker at {where}: {why}") from exc

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    try:
        client.connect_timeout = max(0.1, float(timeout))
        extra = {"clean_start": True} if client.protocol == mqtt.MQTTv5 else {}
        if max_packet and client.protocol == mqtt.MQTTv5:
            extra["properties"] = Properties(PacketTypes.CONNECT)
            extra["properties"].MaximumPacketSize = int(max_packet)
        client.connect(host, port, keepalive=keepalive, **extra)
    except (OSError, ValueError, RuntimeError) as exc:  # ssl.SSLError is an OSError
        restore()
        raise BrokerConnectionError(f"cannot reach MQTT broker at {where}: {explain_exception(broker, exc)}"
                                    ) from exc
    client.loop_start()
    if not answered.wait(timeout):
        hint = ("; a broker that speaks MQTT 3.1.1 only (the embedded amqtt one) drops an MQTT 5 CONNECT "
                "without a word: try protocol 3.1.1") if client.protocol == mqtt.MQTTv5 else ""
        if not broker.tls:
            hint += "; a TLS port says nothing to a plain CONNECT: is it mqtts://?"
        fail(f"no answer to CONNECT within {timeout:g} s{hint}")
    rc = result.get("rc")
    if rc is None or rc.is_failure:
        fail(explain_refusal(broker, rc, client.protocol == mqtt.MQTTv5))
    restore()
    broker.watch(client)  # from now on a failed reconnect is logged, with why


def retained_messages(client: mqtt.Client, topic_filter: str, quiet: float = 0.5,
                      timeout: float = 30.0) -> dict[str, bytes]:
    """The retained messages under ``topic_filter`` that the broker sends a connected
    ``client`` after acknowledging its subscription (meanwhile the client's own
    ``on_subscribe`` and any callback on that filter are set aside: use a client nothing else
    subscribes with, as the operator's and a run's clean-up are), until none has come for ``quiet`` s (a
    broker whose ACL hides them sends none, and says nothing); topic → payload. A broker
    queues only so many for one client (Mosquitto about 1,000): clear what this finds and ask
    again until it finds none. PermissionError where the broker refuses the subscription,
    TimeoutError where it never acknowledges it."""
    found: dict[str, bytes] = {}
    acked: set[int] = set()  # message ids of the SUBACKs come (one may come before subscribe() returns)
    refused: list[str] = []
    lock = threading.Lock()
    last = [time.monotonic()]

    def on_message(c, userdata, msg):
        if msg.retain and msg.payload:
            with lock:
                found[msg.topic] = bytes(msg.payload)
                last[0] = time.monotonic()

    def on_subscribe(c, userdata, mid, reason_codes, properties=None):
        with lock:
            refused.extend(str(rc) for rc in reason_codes if rc.is_failure)
            acked.add(mid)
            last[0] = time.monotonic()

    previous = client.on_subscribe
    client.message_callback_add(topic_filter, on_message)  # before the client's own callback
    client.on_subscribe = on_subscribe
    try:
        _, mid = client.subscribe(topic_filter, qos=1)
        end = time.monotonic() + timeout
        while True:
            with lock:
                if mid in acked:
                    break
            if time.monotonic() > end:
                raise TimeoutError(f"the broker did not acknowledge a subscription to {topic_filter} in {timeout:g} s")
            time.sleep(0.02)
        if refused:
            raise PermissionError(f"the broker refuses this client a subscription to {topic_filter} ({refused[0]})")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with lock:
                if time.monotonic() - last[0] > quiet:
                    break
            time.sleep(0.05)
    finally:
        client.unsubscribe(topic_filter)
        client.message_callback_remove(topic_filter)
        client.on_subscribe = previous
    with lock:
        return dict(found)


def clear_retained(client: mqtt.Client, topic_filter: str, passes: int = 100, **kw) -> int:
    """Clear every retained message under ``topic_filter`` (an empty retained message replaces
    each), asking again until the broker holds none; how many were cleared. RuntimeError where
    some remain."""
    cleared = 0
    for _ in range(passes):
        held = retained_messages(client, topic_filter, **kw)
        if not held:
            return cleared
        for topic in held:
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(30)
        cleared += len(held)
    raise RuntimeError(f"retained messages remain under {topic_filter} after clearing {cleared}")
