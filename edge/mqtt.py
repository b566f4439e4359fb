"""MQTT plumbing shared by the daemon and the tools: brokers (URL, TLS, credentials), clients,
one publisher thread.

paho-mqtt 2.x with VERSION2 callbacks. The protocol version is explicit ("5" or "3.1.1"):
Mosquitto 2 speaks both; the embedded amqtt broker speaks 3.1.1 only. MQTT v5 PUBLISH
properties (content type, message expiry) are sent only over v5.

Publishing from paho callbacks, or from many threads at once, is paho's most reported
deadlock, so every publish goes through one ``Publisher`` thread fed by a bounded queue:
a full queue drops (and counts) instead of blocking the caller.

A broker is ``mqtt://HOST[:PORT]`` (plain, port 1883) or ``mqtts://HOST[:PORT]`` (TLS 1.2 or
newer, port 8883, the server's certificate checked against ``ca_file`` or the system's
trust store, its host name too), with an optional client certificate and a user name whose
password is read from a file at each connect (never from a command line or YAML).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import re
import secrets
import socket
import ssl
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from panorama.errors import BackendError

__all__ = ["PROTOCOLS", "Broker", "BrokerConnectionError", "client_id", "parse_broker_url", "host_port", "make_client",
           "publish_props", "Publisher", "connect", "as_broker", "explain_exception", "explain_refusal",
           "add_security_args", "security_from_args"]

log = logging.getLogger(__name__)

PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
DEFAULT_PORT = 1883
TLS_PORT = 8883
SCHEMES = {"mqtt": DEFAULT_PORT, "mqtts": TLS_PORT}


class BrokerConnectionError(BackendError, ConnectionError):
    """The broker could not be reached, or refused the connection."""


def client_id(role: str) -> str:
    """A client id unique per host and process (duplicate ids make brokers kick clients in turn)."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
    return f"panorama-{role}-{host}-{os.getpid()}-{secrets.token_hex(6)}"


def _redact(url) -> str:
    """The URL as it may be shown: any user name and password before an ``@`` masked."""
    return re.sub(r"(?<=//).*@", "***@", url) if isinstance(url, str) else repr(url)  # up to the last @


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_broker_url(url: str) -> tuple[str, int]:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` → (host, port); port 1883 (8883 for
    mqtts) by default. Whether TLS is spoken is ``Broker(url).tls``. Errors never repeat a
    password written into the URL."""
    hint = "write the broker as mqtt://HOST[:PORT] or, for TLS, mqtts://HOST[:PORT], e.g. mqtt://127.0.0.1:1883"
    shown = repr(_redact(url))
    try:
        parts = urlsplit(url)
        port = parts.port
    except (ValueError, TypeError, AttributeError) as exc:
        # urllib's words may quote a piece of the URL, which with an "@" may be a password
        why = "malformed" if isinstance(url, str) and "@" in url else str(exc)
        raise ValueError(f"bad broker URL {shown} ({why}); {hint}") from None
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"bad broker URL {shown}: no credentials in the URL (they would show in logs and "
                         "process lists); give a user name and a password file")
    if parts.scheme.lower() not in SCHEMES:
        raise ValueError(f"bad broker URL {shown}: the scheme must be mqtt:// or mqtts:// (TLS); {hint}")
    if not parts.hostname:
        raise ValueError(f"bad broker URL {shown}: no host; {hint}")
    if re.search(r"\s", parts.hostname):
        raise ValueError(f"bad broker URL {shown}: the host has a space in it; {hint}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"bad broker URL {shown}: nothing may follow the port; {hint}")
    if port == 0:
        raise ValueError(f"bad broker URL {shown}: port 0 is not a broker's port; {hint}")
    return parts.hostname, SCHEMES[parts.scheme.lower()] if port is None else port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _EncryptedKey(ValueError):
    pass


def _refuse_encrypted_key() -> bytes:
    raise _EncryptedKey("the key is encrypted with a passphrase; give an unencrypted key file, readable by "
                        "this service only (mode 0600)")


def _readable_file(name: str, path: Path, secret: bool = False) -> str:
    """``path`` as a string if it is a file this process can read; ValueError naming the setting
    otherwise. A secret (a key, a password) that every user may read is warned about."""
    if not path.exists():
        raise ValueError(f"{name} {path}: no such file")
    if not path.is_file():
        raise ValueError(f"{name} {path}: not a file")
    try:
        with open(path, "rb"):
            pass
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"{name} {path}: {exc.strerror or exc}") from None
    if secret and mode & stat.S_IROTH:
        log.warning("%s %s may be read by every user of this machine: chmod 600 it", name, path)
    return str(path)


@dataclass(frozen=True)
class Broker:
    """A broker and how to reach it: URL, TLS trust and client certificate, user name and password
    file. Checked when made (ValueError naming the setting), so a bad file is said at start-up,
    not at the first reconnect. ``str(broker)`` is the URL: it never carries the password."""

    url: str
    ca_file: Path | None = None  # mqtts: the CA that signed the broker's certificate (default: system store)
    cert_file: Path | None = None  # mqtts: this client's certificate (PEM), for brokers that require one
    key_file: Path | None = None  # mqtts: its private key (PEM, unencrypted)
    username: str | None = None
    password_file: Path | None = None  # the password, on the file's first line; read at each connect
    host: str = field(init=False, repr=False, compare=False)
    port: int = field(init=False, repr=False, compare=False)
    tls: bool = field(init=False, repr=False, compare=False)
    _context: ssl.SSLContext | None = field(init=False, repr=False, compare=False, default=None)
    _loaded: dict = field(init=False, repr=False, compare=False, default_factory=dict)  # client cert files' mtimes
    _warned: dict = field(init=False, repr=False, compare=False, default_factory=dict)  # client → (why, when)

    def __post_init__(self) -> None:
        host, port = parse_broker_url(self.url)
        for name in ("ca_file", "cert_file", "key_file", "password_file"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "tls", urlsplit(self.url).scheme.lower() == "mqtts")
        tls_files = [n for n in ("ca_file", "cert_file", "key_file") if getattr(self, n) is not None]
        if tls_files and not self.tls:
            raise ValueError(f"{', '.join(tls_files)} given but the broker {self.url} is not TLS: write it as "
                             f"mqtts://{host_port(host, TLS_PORT if port == DEFAULT_PORT else port)}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (a client certificate and its private key)")
        if self.username is not None and (not self.username.strip() or self.username != self.username.strip()):
            raise ValueError(f"username {self.username!r} is empty or has spaces around it")
        if self.password_file is not None:
            if self.username is None:
                raise ValueError("password_file given without a username")
            self.password()  # readable and not empty, now
        if self.tls:
            object.__setattr__(self, "_context", self._tls_context())

    def __str__(self) -> str:
        return self.url

    def _tls_context(self) -> ssl.SSLContext:
        cafile = _readable_file("ca_file", self.ca_file) if self.ca_file is not None else None
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
        except ssl.SSLError as exc:
            raise ValueError(f"ca_file {self.ca_file}: not a PEM certificate ({exc.reason or exc})") from None
        except OSError as exc:
            raise ValueError(f"ca_file {self.ca_file}: {exc.strerror or exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            cert = _readable_file("cert_file", self.cert_file)
            key = _readable_file("key_file", self.key_file, secret=True)
            self._loaded["cert"] = self._cert_stamp()
            try:
                ctx.load_cert_chain(cert, key, password=_refuse_encrypted_key)
            except _EncryptedKey as exc:
                raise ValueError(f"key_file {self.key_file}: {exc}") from None
            except ssl.SSLError as exc:
                raise ValueError(f"cert_file {self.cert_file} / key_file {self.key_file}: not a PEM certificate "
                                 f"and its private key ({exc.reason or exc})") from None
            except OSError as exc:
                raise ValueError(f"cert_file {self.cert_file} / key_file {self.key_file}: "
                                 f"{exc.strerror or exc}") from None
        return ctx

    def password(self) -> str | None:
        """The first line of ``password_file`` (None without one). ValueError when it cannot be read
        or is empty; a warning when anyone on the machine may read it."""
        if self.password_file is None:
            return None
        path = _readable_file("password_file", self.password_file, secret=True)
        try:
            text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not the password's
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"password_file {self.password_file}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        password = text.splitlines()[0] if text.strip() else ""  # the whole first line: spaces are the password's
        if not password:
            raise ValueError(f"password_file {self.password_file}: empty (the password is its first line)")
        return password

    def configure(self, client: mqtt.Client) -> None:
        """Give ``client`` this broker's TLS and credentials (before its first connect), and
        have it pick up a renewed password or client certificate before each reconnect."""
        if self._context is not None:
            try:
                client.tls_set_context(self._context)
            except ValueError:  # paho: "SSL/TLS has already been configured" (a second connect)
                pass
        if self.username is not None:
            if not self.tls and not _is_loopback(self.host):
                log.warning("sending the MQTT password to %s unencrypted: use mqtts://", self.host)
            client.username_pw_set(self.username, self.password())
        client.on_pre_connect = lambda c, userdata: self.refresh(c)
        # paho calls this inside its except block, with the reason at DEBUG only: say it
        client.on_connect_fail = lambda c, userdata: self.reconnect_failed(c, explain_exception(self, sys.exc_info()[1]))

    def reconnect_failed(self, client: mqtt.Client, why: str) -> None:
        """Log why a reconnect failed: at once, then again when the reason changes or each
        minute while it lasts (paho retries every 1–30 s)."""
        now, key = time.monotonic(), id(client)
        if key not in self._warned:  # never connected yet: connect() raises with the reason
            return
        last = self._warned[key]
        if last[0] != why or now - last[1] >= 60:
            self._warned[key] = (why, now)
            log.warning("cannot reconnect to MQTT broker at %s%s: %s (retrying)", host_port(self.host, self.port),
                        " (TLS)" if self.tls else "", why)

    def refused(self, client: mqtt.Client, reason_code) -> None:
        """For an on_connect callback that got a failed CONNACK: log why (rate-limited)."""
        self.reconnect_failed(client, explain_refusal(self, reason_code, client.protocol == mqtt.MQTTv5))

    def _cert_stamp(self) -> tuple:
        return tuple(p.stat().st_mtime_ns for p in (self.cert_file, self.key_file))

    def refresh(self, client: mqtt.Client) -> None:
        """Before each (re)connect (paho's on_pre_connect): the password file is read again, and a
        client certificate and key renewed on disk are loaded once they match each other. What
        cannot be read is logged and the last good one kept: a half-done renewal never stops
        a reconnect that the old credentials would still pass."""
        if self.password_file is not None:
            try:
                client.username_pw_set(self.username, self.password())
            except ValueError as exc:
                log.warning("keeping the last MQTT password: %s", exc)
        if self._context is None or self.cert_file is None:
            return
        try:
            stamp = self._cert_stamp()
            if stamp == self._loaded.get("cert"):
                return
            trial = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # the pair must load whole before the live one takes it
            trial.load_cert_chain(str(self.cert_file), str(self.key_file), password=_refuse_encrypted_key)
            self._context.load_cert_chain(str(self.cert_file), str(self.key_file), password=_refuse_encrypted_key)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning("keeping the last client certificate: %s with %s cannot be loaded (%s)", self.cert_file,
                        self.key_file, getattr(exc, "reason", None) or exc)
            return
        self._loaded["cert"] = stamp
        log.info("client certificate %s renewed on disk: loaded for this connection", self.cert_file)


def as_broker(broker: "str | Broker") -> Broker:
    return broker if isinstance(broker, Broker) else Broker(broker)


def add_security_args(p) -> None:
    """The TLS and credential options every command that talks to a broker takes."""
    g = p.add_argument_group("broker security (mqtts:// brokers, user names)")
    g.add_argument("--ca-file", type=Path, metavar="PEM",
                   help="CA certificate the broker's certificate must chain to (default: the system's store)")
    g.add_argument("--cert-file", type=Path, metavar="PEM", help="client certificate, for brokers that require one")
    g.add_argument("--key-file", type=Path, metavar="PEM", help="its private key (unencrypted; chmod 600)")
    g.add_argument("--username", help="MQTT user name")
    g.add_argument("--password-file", type=Path, metavar="FILE",
                   help="file whose first line is the MQTT password (never on the command line)")


def security_from_args(args) -> dict:
    """The options of ``add_security_args`` that were given, as Broker/config keyword arguments."""
    keys = ("ca_file", "cert_file", "key_file", "username", "password_file")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


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
    client.enable_logger(logging.getLogger("paho.mqtt"))
    return client


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

    def __init__(self, client: mqtt.Client, maxsize: int = 2048, protocol: str = "5"):
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
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._lock = threading.Lock()
        self._props: dict[tuple, Properties | None] = {}
        self._last: mqtt.MQTTMessageInfo | None = None
        self._stopping = threading.Event()
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
        else:
            self.failed += 1


# CONNACK reason codes (paho maps MQTT 3.1.1's 4 and 5 onto these) that mean "who are you?"
_AUTH_REFUSALS = {134: "bad user name or password", 135: "not authorized", 140: "bad authentication method"}


def explain_exception(broker: Broker, exc: BaseException | None) -> str:
    """Why a connection attempt raised ``exc``, with what to check."""
    host = broker.host
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in (9, 10):  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED
            hint = "outside its validity dates: renew it, or check this device's clock"
        elif broker.ca_file is None:
            hint = "give the CA that signed it (ca_file, --ca-file)"
        else:
            hint = f"is it signed by {broker.ca_file}, and does it name {host}?"
        return f"its certificate is not trusted ({exc.verify_message or exc}); {hint}"
    if isinstance(exc, ssl.SSLError):
        hint = "; is it a TLS port? (mqtts:// speaks TLS, mqtt:// does not)" if broker.tls else ""
        return f"TLS failed ({exc.reason or exc}){hint}"
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError)) and broker.tls:
        return f"{exc}; is it a TLS port? (a plain MQTT port drops a TLS hello)"
    return str(exc) if exc is not None else "the connection failed"


def explain_refusal(broker: Broker, reason_code, v5: bool) -> str:
    """Why the broker refused (``reason_code`` from CONNACK, or None when it closed the
    connection without one), with what to check."""
    why = f"the broker refused the connection ({reason_code if reason_code is not None else 'closed unanswered'})"
    code = getattr(reason_code, "value", None)
    if code in _AUTH_REFUSALS:
        who = f"user {broker.username!r}" if broker.username is not None else "an anonymous client"
        return why + (f": {_AUTH_REFUSALS[code]} for {who}; check username and password_file"
                       + ("" if broker.username is not None or broker.cert_file is not None
                          else " (this broker wants credentials)"))
    hints = []
    if reason_code is None and broker.tls:  # closed during or right after the TLS handshake
        hints.append("it may want a client certificate (cert_file, --cert-file)" if broker.cert_file is None
                     else f"it may not take the client certificate {broker.cert_file}")
    elif reason_code is None:
        hints.append("a TLS port closes a plain connection: is it mqtts://?")
    if v5:
        hints.append("it may speak MQTT 3.1.1 only (amqtt does): try protocol 3.1.1")
    return why + "".join(f"; {h}" for h in hints)


def connect(client: mqtt.Client, broker: "str | Broker", timeout: float = 10.0, keepalive: int = 30) -> None:
    """Give the client the broker's TLS and credentials, connect, start paho's network thread
    (which then owns reconnects) and wait for the broker's CONNACK. BrokerConnectionError (a
    ConnectionError) naming the broker when it cannot be reached, its certificate is not
    trusted, it refuses, or it does not answer within ``timeout`` seconds. A reconnect that
    fails later is logged (``Broker.reconnect_failed``)."""
    broker = as_broker(broker)
    host, port = broker.host, broker.port
    where = host_port(host, port) + (" (TLS)" if broker.tls else "")
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

    broker.configure(client)
    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    try:
        client.connect_timeout = max(0.1, float(timeout))
        extra = {"clean_start": True} if client.protocol == mqtt.MQTTv5 else {}
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
    broker._warned.setdefault(id(client), ("", 0.0))  # connected: later failures are reconnects, logged
