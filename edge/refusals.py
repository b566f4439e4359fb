"""Why a connection to an MQTT broker failed, in words an operator can act on: what a raised
exception means (an untrusted or expired certificate, a TLS port spoken to in plain MQTT)
and what a broker's refusal means (credentials, a client certificate, MQTT 3.1.1 only)."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .endpoint import Broker

_AUTH_REFUSALS = {134: "bad user name or password", 135: "not authorized", 140: "bad authentication method"}


def explain_exception(broker: Broker, exc: BaseException | None) -> str:
    """Why a connection attempt raised ``exc``, with what to check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in (9, 10):  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED
            hint = "outside its validity dates: renew it, or check this device's clock"
        elif broker.ca_file is None:
            hint = "give the CA that signed it (ca_file, --ca-file)"
        else:
            hint = f"is it signed by {broker.ca_file}, and does it name {broker.host}?"
        return f"its certificate is not trusted ({exc.verify_message or exc}); {hint}"
    if isinstance(exc, ssl.SSLError):
        if broker.cert_file is not None and "CERTIFICATE" in str(exc.reason or ""):  # revoked, expired, unknown
            return f"TLS failed ({exc.reason}): the broker does not take the client certificate {broker.cert_file}"
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
                     else f"it may not take the client certificate {broker.cert_file} (revoked or expired?)")
    elif reason_code is None:
        hints.append("a TLS port closes a plain connection: is it mqtts://?")
    if v5:
        hints.append("it may speak MQTT 3.1.1 only (amqtt does): try protocol 3.1.1")
    return why + "".join(f"; {h}" for h in hints)
