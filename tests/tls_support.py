"""A small PKI and a Mosquitto that demands TLS and credentials, for the broker-security tests.

Certificates are made with ``cryptography`` (a project dependency) for each test session;
the broker is the real ``mosquitto`` binary on free loopback ports:

- ``password``: TLS, no anonymous clients, users from a ``mosquitto_passwd`` file;
- ``mutual``: TLS that requires a client certificate signed by the CA, whose common name is
  the MQTT user name.

The configuration and both ACLs are deploy/README's examples ("Securing the broker"), read
from it with only the paths and ports replaced, so the daemon, a monitor, a nurse station
and the fleet working through them shows those examples are enough, role by role.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import free_port, listening, wait

PASSWORD = "s3cret-pass"  # every password user's, in this test broker
USER = "daemon-bed7"  # the streaming daemon of device bed7 (its daemon_id)
STATION = "nurse-station"  # a central station reading every patient's views
OPERATOR = "fleet-operator"
DEVICE = "bed7"  # a device's fleet agent, named as its device id
CLIENT_CN = "bed-07"  # a bedside monitor's certificate: its common name is its monitor id

README = Path(__file__).resolve().parents[1] / "deploy" / "README.md"


def documented(kind: str) -> list[str]:
    """deploy/README's code blocks of ``kind`` (``conf``: the Mosquitto configuration; ``acl``:
    the services' ACL, then the monitors')."""
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(), flags=re.S)


def documented_config(folder: Path, password_port: int, mutual_port: int, pki: "Pki") -> str:
    """The README's Mosquitto configuration with this test's files and ports (and ``user root``,
    which only matters where the test runs as root: its files are in a private tmp folder)."""
    (conf,) = documented("conf")
    subs = {"/etc/mosquitto/certs/ca.crt": pki.ca, "/etc/mosquitto/certs/broker.crt": pki.server_cert,
            "/etc/mosquitto/certs/broker.key": pki.server_key, "/etc/mosquitto/passwd": folder / "passwd",
            "/etc/mosquitto/acl-monitors": folder / "acl-monitors", "/etc/mosquitto/acl": folder / "acl",
            "listener 8883": f"listener {password_port} 127.0.0.1", "listener 8884": f"listener {mutual_port} 127.0.0.1"}
    for old, new in subs.items():
        assert old in conf, f"deploy/README's Mosquitto configuration no longer names {old}"
        conf = re.sub(rf"{re.escape(old)}$", str(new), conf, flags=re.M)
    return "user root\n" + conf


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path, passphrase: bytes | None = None) -> None:
    enc = (serialization.BestAvailableEncryption(passphrase) if passphrase
           else serialization.NoEncryption())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
    path.chmod(0o600)


def _cert(subject: str, key, issuer_cert, issuer_key, *, ca: bool = False, sans=()) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject))
         .issuer_name(issuer_cert.subject if issuer_cert is not None else _name(subject))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def _pem(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@dataclass
class Pki:
    ca: Path  # the CA that signed the broker's and the client's certificates
    rogue_ca: Path  # a CA that signed nothing here
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_key_encrypted: Path
    password_file: Path
    wrong_password_file: Path


def make_pki(folder: Path) -> Pki:
    """The broker's certificate names 127.0.0.1 only (so ``localhost`` fails the host check)."""
    folder.mkdir(parents=True, exist_ok=True)
    new = lambda: ec.generate_private_key(ec.SECP256R1())  # noqa: E731
    ca_key, rogue_key, server_key, client_key = new(), new(), new(), new()
    ca = _cert("panorama test CA", ca_key, None, None, ca=True)
    rogue = _cert("someone else's CA", rogue_key, None, None, ca=True)
    server = _cert("127.0.0.1", server_key, ca, ca_key, sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _cert(CLIENT_CN, client_key, ca, ca_key)
    _write_key(ca_key, folder / "ca.key")
    _write_key(server_key, folder / "server.key")
    _write_key(client_key, folder / "client.key")
    _write_key(client_key, folder / "client-encrypted.key", b"passphrase")
    pw, wrong = folder / "mqtt.password", folder / "wrong.password"
    pw.write_text(PASSWORD + "\n")
    wrong.write_text("not-the-password\n")
    pw.chmod(0o600)
    wrong.chmod(0o600)
    return Pki(_pem(ca, folder / "ca.crt"), _pem(rogue, folder / "rogue-ca.crt"), _pem(server, folder / "server.crt"),
               folder / "server.key", _pem(client, folder / "client.crt"), folder / "client.key",
               folder / "client-encrypted.key", pw, wrong)


def issue_client(pki: Pki, cn: str, cert: Path, key: Path) -> None:
    """A new client key and certificate signed by the test CA, written over ``cert`` and ``key``
    (a renewal as a device's certificate tooling would do it)."""
    ca_key = serialization.load_pem_private_key((pki.ca.parent / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    new = ec.generate_private_key(ec.SECP256R1())
    _write_key(new, key)
    _pem(_cert(cn, new, ca, ca_key), cert)


@dataclass
class SecureBroker:
    pki: Pki
    password_port: int
    mutual_port: int
    folder: Path
    proc: subprocess.Popen | None = None

    @property
    def password_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.password_port}"

    @property
    def mutual_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.mutual_port}"

    @property
    def log(self) -> str:
        return (self.folder / "mosquitto.log").read_text(errors="replace")

    def start(self) -> None:
        with open(self.folder / "mosquitto.log", "ab") as out:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(self.folder / "mosquitto.conf")], stdout=out,
                                         stderr=subprocess.STDOUT)
        if not wait(lambda: listening("127.0.0.1", self.password_port) and listening("127.0.0.1", self.mutual_port),
                    10):
            self.stop()
            pytest.fail(f"mosquitto did not start:\n{self.log}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def revoke(self, cert: Path) -> None:
        """Revoke a client certificate: a CRL signed by the test CA, named by the certificate
        listener's ``crlfile`` (the last listener in the configuration), read at the next start."""
        ca_key = serialization.load_pem_private_key((self.pki.ca.parent / "ca.key").read_bytes(), password=None)
        ca = x509.load_pem_x509_certificate(self.pki.ca.read_bytes())
        now = dt.datetime.now(dt.timezone.utc)
        revoked = (x509.RevokedCertificateBuilder().serial_number(x509.load_pem_x509_certificate(
            cert.read_bytes()).serial_number).revocation_date(now - dt.timedelta(minutes=1)).build())
        crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(now - dt.timedelta(minutes=5))
               .next_update(now + dt.timedelta(days=1)).add_revoked_certificate(revoked).sign(ca_key, hashes.SHA256()))
        path = self.folder / "revoked.crl"
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        conf = self.folder / "mosquitto.conf"
        if "crlfile" not in conf.read_text():
            conf.write_text(conf.read_text().rstrip("\n") + f"\ncrlfile {path}\n")

    def set_password(self, user: str, password: str) -> None:
        """Change a user's password in the broker's file (it reads it at its next start)."""
        subprocess.run(["mosquitto_passwd", "-b", str(self.folder / "passwd"), user, password], check=True,
                       capture_output=True)


@contextmanager
def secure_mosquitto(folder: Path):
    """Mosquitto with the two listeners above; skips where the binaries are not installed."""
    if shutil.which("mosquitto") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto and mosquitto_passwd are needed for a broker that demands TLS and passwords")
    pki = make_pki(folder)
    passwd, acl = folder / "passwd", folder / "acl"
    for i, user in enumerate((USER, STATION, OPERATOR, DEVICE)):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwd), user, PASSWORD],
                       check=True, capture_output=True)
    services, monitors = documented("acl")
    acl.write_text(services)
    (folder / "acl-monitors").write_text(monitors)
    broker = SecureBroker(pki, free_port(), free_port(), folder)
    (folder / "mosquitto.conf").write_text(documented_config(folder, broker.password_port, broker.mutual_port, pki))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
