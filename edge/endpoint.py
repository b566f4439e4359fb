"""Where a broker is and how to reach it safely: URL, TLS, credentials, and why a connection failed.

A broker is ``mqtt://HOST[:PORT]`` (plain, port 1883) or ``mqtts://HOST[:PORT]`` (TLS 1.2 or
newer, port 8883, the server's certificate checked against ``ca_file`` or the system's
trust store, its host name too), with an optional client certificate and a user name whose
password is read from a file at each connect (never from a command line or YAML).

A ``Broker`` is checked when made, so a bad file is said at start-up. Given to a client
(``edge.mqtt.connect``) it also watches that client's connection: before each reconnect the
password file is read again and a client certificate renewed on disk is taken up, and a
reconnect that fails is logged with its reason — paho itself says why only at DEBUG.
Nothing here ever writes a password, or a URL that may hold one, into a message.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import ssl
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

from .refusals import explain_exception, explain_refusal

__all__ = ["DEFAULT_PORT", "TLS_PORT", "Broker", "as_broker", "parse_broker_url", "host_port", "explain_exception",
           "explain_refusal", "add_security_args", "security_from_args"]

log = logging.getLogger("edge.mqtt")  # one logger for everything MQTT, as operators filter it

DEFAULT_PORT = 1883
TLS_PORT = 8883
SCHEMES = {"mqtt": DEFAULT_PORT, "mqtts": TLS_PORT}
_SCHEME = re.compile(r"\A([A-Za-z][A-Za-z0-9+.\-]*:/*)?(.*)\Z", re.S)


# ----------------------------------------------------------------------------- URLs

def _redact(url) -> str:
    """The URL as it may be shown in a message: everything up to the last ``@`` (user name and
    password), a port that is not a (signed) number (``user:password`` without a host looks like
    ``host:port``) and anything after ``?`` or ``#`` masked."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    scheme, rest = _SCHEME.match(url).groups()
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    rest = re.sub(r"[?#].*\Z", "?***", rest, flags=re.S)
    host, sep, tail = rest.rpartition("]") if rest.startswith("[") else ("", "", rest)
    tail = re.sub(r":(?!-?[0-9]*(?:/|\Z))[^/]*", ":***", tail, flags=re.S)  # "-5" is a port out of range
    return (scheme or "") + host + sep + tail


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
    except (ValueError, TypeError, AttributeError):
        # urllib's own words quote pieces of the URL, and any piece may be a password
        raise ValueError(f"bad broker URL {shown}: not HOST[:PORT] with a port from 1 to 65535; {hint}") from None
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


# ----------------------------------------------------------------------------- files

class _EncryptedKey(ValueError):
    pass


def _refuse_encrypted_key() -> bytes:
    raise _EncryptedKey("the key is encrypted with a passphrase; give an unencrypted key file, readable by "
                        "this service only (mode 0600)")


_loose_warned: set[str] = set()
_loose_lock = threading.Lock()


def _readable_file(name: str, path: Path, secret: bool = False) -> str:
    """``path`` as a string if it is a file this process can read; ValueError naming the setting
    otherwise. A secret (a key, a password) that every user may read is warned about, once."""
    # a password given where its file's path belongs must not be echoed back
    shown = str(path) if not secret or "/" in str(path) or path.exists() else "(the value given)"
    hint = " (give the path of a file holding it)" if shown == "(the value given)" else ""
    if not path.exists():
        raise ValueError(f"{name} {shown}: no such file{hint}")
    if not path.is_file():
        raise ValueError(f"{name} {shown}: not a file")
    try:
        with open(path, "rb"):
            pass
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"{name} {shown}: {exc.strerror or exc}") from None
    if secret and mode & stat.S_IROTH:
        with _loose_lock:
            first = str(path) not in _loose_warned
            _loose_warned.add(str(path))
        if first:
            log.warning("%s %s may be read by every user of this machine: chmod 600 it", name, path)
    return str(path)


# ----------------------------------------------------------------------------- a client's connection

class _Watch:
    """One client's connection as its Broker follows it (kept on the client: each is touched
    only by that client's network thread, after ``connect`` made it)."""

    def __init__(self) -> None:
        self.connected = False  # CONNACK accepted once: later failures are reconnects, logged
        self.answered = True  # the current attempt got a CONNACK
        self.refused = False  # ... and it was a refusal (said already)
        self.last: tuple[str, float] | None = None  # the last failure logged, and when
        self.failures = 0
        self.cert_stamp: tuple | None = None  # the client certificate files this client's context holds


def _watch(client: mqtt.Client) -> _Watch:
    w = getattr(client, "_panorama_watch", None)
    if w is None:
        w = _Watch()
        client._panorama_watch = w
    return w


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
    _stamp: tuple | None = field(init=False, repr=False, compare=False, default=None)

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
            if self.cert_file is not None:  # before loading: a renewal meanwhile is then seen as one
                with contextlib.suppress(OSError):  # a missing file: _tls_context says which
                    object.__setattr__(self, "_stamp", self._cert_stamp())
            object.__setattr__(self, "_context", self._tls_context())

    def __str__(self) -> str:
        return self.url

    @property
    def where(self) -> str:
        return host_port(self.host, self.port) + (" (TLS)" if self.tls else "")

    # ---- TLS and credentials ------------------------------------------------------------
    def _cert_stamp(self) -> tuple:
        return tuple(p.stat().st_mtime_ns for p in (self.cert_file, self.key_file))

    def _tls_context(self) -> ssl.SSLContext:
        """A client context: the CA (or the system's store), TLS 1.2 or newer, the client certificate."""
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
        """The first line of ``password_file`` (None without one): the whole line, spaces
        included, without a byte-order mark. ValueError when it cannot be read or is empty."""
        if self.password_file is None:
            return None
        path = _readable_file("password_file", self.password_file, secret=True)
        try:
            text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not in it
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"password_file {self.password_file}: "
                             f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
        password = text.splitlines()[0] if text.strip() else ""
        if not password:
            raise ValueError(f"password_file {self.password_file}: empty (the password is its first line)")
        return password

    def configure(self, client: mqtt.Client) -> None:
        """Give ``client`` this broker's TLS and credentials (before its first connect), have
        it take up a renewed password or client certificate before each reconnect, and say why
        a reconnect fails."""
        if self._context is not None:
            try:
                client.tls_set_context(self._context)
            except ValueError:  # paho: "SSL/TLS has already been configured" (a second connect)
                pass
            _watch(client).cert_stamp = self._stamp
        if self.username is not None:
            if not self.tls and not _is_loopback(self.host):
                log.warning("sending the MQTT password to %s unencrypted: use mqtts://", self.host)
            client.username_pw_set(self.username, self.password())
        client.on_pre_connect = lambda c, userdata: self.refresh(c)
        # paho calls this inside its except block and says why only at DEBUG: say it
        client.on_connect_fail = lambda c, userdata: self.reconnect_failed(c, explain_exception(self, sys.exc_info()[1]))

    def refresh(self, client: mqtt.Client) -> None:
        """Before each (re)connect (paho's on_pre_connect): read the password file again, and
        give the client a new TLS context when its certificate and key were renewed on disk
        and load together. What cannot be read is logged and the last good one kept: a
        renewal caught half done never stops a reconnect the old credentials would pass."""
        w = _watch(client)
        w.answered = w.refused = False
        if self.password_file is not None:
            try:
                client.username_pw_set(self.username, self.password())
            except ValueError as exc:
                log.warning("keeping the last MQTT password: %s", exc)
        if self._context is None or self.cert_file is None:
            return
        try:
            stamp = self._cert_stamp()
            if stamp == w.cert_stamp:
                return
            fresh = self._tls_context()  # a whole new context: the one in use is never half changed
        except (OSError, ValueError) as exc:
            log.warning("keeping the last client certificate: %s", getattr(exc, "reason", None) or exc)
            return
        if not hasattr(client, "_ssl_context"):  # paho 2.x keeps it there; a later paho may not
            log.warning("client certificate %s renewed on disk: restart to use it (this paho cannot take a new "
                        "TLS context)", self.cert_file)
            w.cert_stamp = stamp
            return
        client._ssl_context = fresh
        w.cert_stamp = stamp
        log.info("client certificate %s renewed on disk: used from this connection on", self.cert_file)

    # ---- a client's connection, after connect() -----------------------------------------
    def watch(self, client: mqtt.Client) -> None:
        """Called by ``connect`` once the first CONNACK accepted: from now on the client's
        refusals, closes before a CONNACK and lost connections are logged, chained in front of
        its own on_connect and on_disconnect (``__wrapped__`` holds those)."""
        w = _watch(client)
        w.connected, w.answered = True, True
        v5 = client.protocol == mqtt.MQTTv5
        own_connect, own_disconnect = client.on_connect, client.on_disconnect

        def on_connect(c, userdata, flags, reason_code, properties=None):
            w.answered = True
            if reason_code.is_failure:
                w.refused = True
                self.reconnect_failed(c, explain_refusal(self, reason_code, v5))
            elif w.failures:
                log.info("reconnected to MQTT broker at %s after %d failed attempt(s)", self.where, w.failures)
                w.failures, w.last = 0, None
            if own_connect is not None:
                own_connect(c, userdata, flags, reason_code, properties)

        def on_disconnect(c, userdata, flags, reason_code, properties=None):
            if not w.answered:  # closed during the handshake or before CONNACK: a refusal without words
                self.reconnect_failed(c, explain_refusal(self, None, v5))
            elif reason_code.is_failure and not w.refused:
                log.warning("lost the connection to MQTT broker at %s (%s); reconnecting", self.where, reason_code)
            if own_disconnect is not None:
                own_disconnect(c, userdata, flags, reason_code, properties)

        on_connect.__wrapped__, on_disconnect.__wrapped__ = own_connect, own_disconnect
        client.on_connect, client.on_disconnect = on_connect, on_disconnect

    def reconnect_failed(self, client: mqtt.Client, why: str) -> None:
        """Log why a reconnect failed: at once, then when the reason changes or each minute
        while it lasts (paho retries every 1–30 s); a new outage after a reconnect is logged at
        once again. Nothing before the first connection: ``connect`` raises with the reason."""
        w = _watch(client)
        if not w.connected:
            return
        w.failures += 1
        now = time.monotonic()
        if w.last is None or w.last[0] != why or now - w.last[1] >= 60:
            w.last = (why, now)
            log.warning("cannot reconnect to MQTT broker at %s: %s (retrying)", self.where, why)


def as_broker(broker: "str | Broker") -> Broker:
    return broker if isinstance(broker, Broker) else Broker(broker)


# ----------------------------------------------------------------------------- command lines

def add_security_args(p) -> None:
    """The TLS and credential options of the commands that talk to a broker."""
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
