"""Brokers that demand TLS and credentials: the settings checked before anything connects,
each refusal said plainly, and the daemon, monitor, listener and fleet working through a
real Mosquitto with a password listener and a client-certificate listener (tests/tls_support.py)."""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, wait
from tls_support import CLIENT_CN, DEVICE, OPERATOR, STATION, USER, make_pki, secure_mosquitto

from edge.config import load_config
from edge.listen import Listener
from edge.monitor import run_monitor
from edge.sources import sim_streams
from edge.mqtt import Broker, BrokerConnectionError, client_id, connect, explain_exception, make_client
from panorama.errors import ConfigError


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    with secure_mosquitto(tmp_path_factory.mktemp("secure-broker")) as broker:
        yield broker


def test_broker_settings_are_checked_before_anything_connects(pki, tmp_path, caplog):
    ok = Broker("mqtts://broker.ward3:8883", ca_file=pki.ca, username=USER, password_file=pki.password_file)
    assert (ok.host, ok.port, ok.tls) == ("broker.ward3", 8883, True)
    assert str(ok) == "mqtts://broker.ward3:8883" and "s3cret" not in repr(ok)  # never the password
    assert Broker("mqtts://b").port == 8883 and not Broker("mqtt://b").tls

    garbage, empty = tmp_path / "garbage.crt", tmp_path / "empty.password"
    garbage.write_text("not a certificate\n")
    empty.write_text("\n")
    refusals = [
        (dict(url="mqtt://b:1883", ca_file=pki.ca), "not TLS: write it as mqtts://b:8883"),
        (dict(url="mqtts://b", cert_file=pki.client_cert), "cert_file and key_file go together"),
        (dict(url="mqtts://b", password_file=pki.password_file), "password_file given without a username"),
        (dict(url="mqtts://b", username=USER, password_file=tmp_path / "none"), "password_file .* no such file"),
        (dict(url="mqtts://b", username=USER, password_file=tmp_path), "password_file .* not a file"),
        (dict(url="mqtts://b", ca_file=tmp_path), "ca_file .* not a file"),
        (dict(url="mqtts://b", cert_file=tmp_path / "none.crt", key_file=pki.client_key), "cert_file .* no such file"),
        (dict(url="mqtts://b", cert_file=pki.client_cert, key_file=tmp_path), "key_file .* not a file"),
        (dict(url="mqtts://b", username=" "), "username ' ' is empty or has spaces"),
        (dict(url="mqtts://ho st:8883"), "the host has a space"),
        (dict(url="mqtt://[::1]:1883", ca_file=pki.ca), r"write it as mqtts://\[::1\]:8883"),
        (dict(url="mqtts://b", username=USER, password_file=empty), "empty"),
        (dict(url="mqtts://b", ca_file=tmp_path / "none.crt"), "ca_file .* no such file"),
        (dict(url="mqtts://b", ca_file=garbage), "ca_file .* not a PEM certificate"),
        (dict(url="mqtts://b", cert_file=pki.client_cert, key_file=pki.client_key_encrypted), "encrypted"),
        (dict(url="mqtts://b", cert_file=pki.client_cert, key_file=pki.server_key), "KEY_VALUES_MISMATCH"),
        (dict(url="mqtts://u:p@b"), "no credentials in the URL"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(ValueError, match=message):
            Broker(**kwargs)
    for url in ("mqtts://daemon:Hunter2@b:8883", "mqtts://daemon:Hunter2@b:99999", "tcp://daemon:Hunter2@b",
                "mqtts://daemon:Hun/ter2@b", "mqtts://daemon:Hun@ter2@b", "daemon:Hunter2@b:8883",
                "mqtts:daemon:Hunter2@b", "mqtts:/daemon:Hunter2@b", "mqtts://daemon:Hunter2",
                "mqtts://b:8883?password=Hunter2", "mqtts://dae\nmon:Hunter2@b", "mqtts://[::1]:Hunter2"):
        with pytest.raises(ValueError) as refused:  # refused, and the password never echoed
            Broker(url)
        assert "ter2" not in str(refused.value) and "***" in str(refused.value), str(refused.value)
    with pytest.raises(ValueError, match=r"'mqtts://\[::1\]:8883/x'"):  # what is no secret is shown as written
        Broker("mqtts://[::1]:8883/x")
    with pytest.raises(ValueError, match=r"'mqtt://127.0.0.1:-5'"):  # a port out of range is shown, not masked
        Broker("mqtt://127.0.0.1:-5")
    with pytest.raises(ValueError) as refused:  # the password given where its file belongs
        Broker("mqtts://b", username=USER, password_file="Hunter2")
    assert "ter2" not in str(refused.value) and "give the path of a file holding it" in str(refused.value)
    assert Broker("MQTTS://b").tls and Broker("mqtts://[::1]").host == "::1"
    bom = tmp_path / "bom.password"
    bom.write_bytes("\ufeffpass word \r\n".encode())  # a Windows editor's: the mark goes, the spaces stay
    assert Broker("mqtts://b", username=USER, password_file=bom).password() == "pass word "

    loose = tmp_path / "loose.password"
    loose.write_text("pw\n")
    loose.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="edge.mqtt"):
        assert Broker("mqtts://b", username=USER, password_file=loose).password() == "pw"
    assert "password_file" in caplog.text and "may be read by every user" in caplog.text
    caplog.clear()
    loose_key = tmp_path / "loose.key"
    loose_key.write_bytes(pki.client_key.read_bytes())
    loose_key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="edge.mqtt"):
        Broker("mqtts://b", cert_file=pki.client_cert, key_file=loose_key)
    assert f"key_file {loose_key} may be read by every user" in caplog.text

    # the daemon's config: every problem named with the file, before anything starts
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump({"mqtt": {"broker": "mqtts://b", "ca_file": str(garbage)}}))
    with pytest.raises(ConfigError, match="edge.yaml: mqtt: .*ca_file .* not a PEM certificate"):
        load_config(path)
    path.write_text(yaml.safe_dump({"mqtt": {"broker": "mqtts://b", "ca_file": str(pki.ca), "username": USER,
                                             "password_file": str(pki.password_file)}}))
    assert load_config(path).mqtt.endpoint() == Broker("mqtts://b", pki.ca, None, None, USER, pki.password_file)


def test_serve_and_the_tools_refuse_bad_security_options_in_one_line(pki, tmp_path, panorama):
    r = panorama("serve", "--validate-config", "--broker", "mqtts://b", "--ca-file", tmp_path / "none.crt")
    assert r.returncode == 2 and "panorama serve: error: command line: mqtt: ca_file " in r.stderr
    assert "no such file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = panorama("serve", "--validate-config", "--broker", "mqtts://b", "--ca-file", pki.ca, "--username", USER,
                 "--password-file", pki.password_file)
    assert r.returncode == 0, r.stderr
    dumped = json.loads(r.stdout.split("\n", 1)[1])["mqtt"]
    assert dumped["ca_file"] == str(pki.ca) and dumped["username"] == USER and "s3cret" not in r.stdout
    for argv in (["listen", "--out", tmp_path, "--broker", "mqtt://b", "--cert-file", pki.client_cert],
                 ["monitor", "--sim", "1", "--broker", "mqtts://b", "--password-file", pki.password_file],
                 ["fleet", "status", "--broker", "mqtt://b", "--ca-file", pki.ca],
                 ["demo", "--username", USER]):
        r = panorama(*argv)
        assert r.returncode == 2 and r.stderr.startswith(f"panorama {argv[0]}: error:"), (argv, r.stderr)
        assert any(w in r.stderr for w in ("not TLS", "go together", "without a username", "need --broker")), r.stderr


def _connect(broker: Broker, protocol: str = "5") -> None:
    client = make_client(client_id("tls-test"), protocol)
    connect(client, broker, timeout=5)
    client.disconnect()
    client.loop_stop()


def test_each_refusal_says_why(secure, mosquitto):
    p = secure.pki
    _connect(Broker(secure.password_url, ca_file=p.ca, username=USER, password_file=p.password_file))
    _connect(Broker(secure.mutual_url, ca_file=p.ca, cert_file=p.client_cert, key_file=p.client_key), "3.1.1")
    cases = [
        (Broker(secure.password_url, username=USER, password_file=p.password_file), "5",
         "certificate is not trusted .*give the CA that signed it"),  # the system store knows no test CA
        (Broker(secure.password_url, ca_file=p.rogue_ca, username=USER, password_file=p.password_file), "5",
         "certificate is not trusted"),
        (Broker(f"mqtts://localhost:{secure.password_port}", ca_file=p.ca, username=USER,
                password_file=p.password_file), "5", "Hostname mismatch.*does it name localhost"),
        (Broker(secure.password_url, ca_file=p.ca, username=USER, password_file=p.wrong_password_file), "3.1.1",
         f"for user '{USER}'; check username and password_file"),
        (Broker(secure.password_url, ca_file=p.ca), "5", "anonymous client.*this broker wants credentials"),
        (Broker(f"mqtt://127.0.0.1:{secure.password_port}"), "3.1.1", "is it mqtts://"),
        (Broker(secure.mutual_url, ca_file=p.ca), "3.1.1", "it may want a client certificate"),
        (Broker(mosquitto.replace("mqtt://", "mqtts://"), ca_file=p.ca), "5", "is it a TLS port"),  # a plain port
    ]
    for broker, protocol, message in cases:
        with pytest.raises(BrokerConnectionError, match=message):
            _connect(broker, protocol)


def test_daemon_monitor_and_station_through_tls_under_the_documented_acl(secure, tmp_path):
    """The daemon with a password, a bedside monitor with its certificate (common name = monitor
    id), a nurse station with a password; deploy/README's ACL lets each do its part."""
    p = secure.pki
    station = Broker(secure.password_url, ca_file=p.ca, username=STATION, password_file=p.password_file)
    monitor = Broker(secure.mutual_url, ca_file=p.ca, cert_file=p.client_cert, key_file=p.client_key)
    cfg = {"mqtt": {"broker": secure.password_url, "daemon_id": "bed7", "ca_file": str(p.ca),
                    "username": USER, "password_file": str(p.password_file)},
           "stream": {"views": ["V7", "V4R"], "idle_timeout_s": 1.5}, "calibration": {"seconds": 2}}
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    seen: list[tuple[str, bytes]] = []
    tap = make_client(client_id("tls-tap"), "5")
    tap.on_message = lambda c, u, m: seen.append((m.topic, bytes(m.payload)))
    tap.on_connect = lambda c, u, f, rc, pr=None: c.subscribe(
        [("ecg/v1/_daemon/bed7/status", 1), ("ecg/v1/+/+/calibration", 1)])
    connect(tap, station)
    proc = subprocess.Popen([sys.executable, "-m", "panorama_cli", "serve", "--config", str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if not wait(lambda: ("ecg/v1/_daemon/bed7/status", b"online") in seen, 60):
            proc.kill()
            pytest.fail(f"the daemon did not come online through TLS:\n{proc.communicate()[0]}")
        with Listener(station, topic="ecg/v1/+/+/virtual") as lis:
            # the second stream claims another monitor's id: the broker refuses it, and only it
            streams = sim_streams(1, monitor_id=CLIENT_CN, seconds=4.0) + sim_streams(1, monitor_id="bed-99",
                                                                                     seconds=4.0)
            stats = run_monitor(streams, monitor, speed=4.0, views=["V7", "V4R", "V8"])
            assert stats[0].dropped == 0 and not stats[0].refused and stats[0].chunks == 16
            assert stats[1].refused == "Not authorized" and stats[1].chunks == 1
            assert "REFUSED by the broker (Not authorized)" in stats[1].line()
            assert wait(lambda: len(lis.streams) == 1 and next(iter(lis.streams.values())).signals.shape[1] >= 1000,
                        60), "no virtual leads came back through the TLS broker"
            (stream,) = lis.streams.values()
            assert stream.monitor == CLIENT_CN and stream.views == ["V7", "V4R", "V8"]  # the monitor's request
            assert stream.stats.gaps == 0
            assert lis.stats["broker"] == secure.password_url  # the summary names the URL, never a password
        cal = [json.loads(m) for t, m in seen if t == f"ecg/v1/{CLIENT_CN}/sim-000/calibration"]
        assert cal and cal[-1]["state"] == "streaming"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
        tap.disconnect()
        tap.loop_stop()
    assert "Traceback" not in out and "s3cret" not in out


def test_fleet_agent_and_operator_through_tls_under_the_documented_acl(secure, keys, tmp_path, panorama):
    """The operator publishes an update (each message read back) and the device's agent, as user
    ``bed7``, fetches and installs it; deploy/README's ACL lets each do its part."""
    from deploy.agent import Agent
    from fleet_support import STAGE2, agent_config, pack

    p = secure.pki
    private, public = keys
    cfg = agent_config(tmp_path, public, "panorama", broker=secure.password_url, ca_file=p.ca, username=DEVICE,
                       password_file=p.password_file, device_id=DEVICE, daemon_id=None)
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    r = panorama("fleet", "agent", "--config", path, "--validate-config")
    assert r.returncode == 0, r.stderr
    operator = ["--broker", secure.password_url, "--ca-file", p.ca, "--username", OPERATOR,
                "--password-file", p.password_file]
    agent = Agent(cfg).start()
    try:
        r = panorama("fleet", "publish", pack(tmp_path, private, STAGE2, 3), *operator)
        assert r.returncode == 0, r.stderr
        assert wait(lambda: agent.results[-1]["state"] in ("SUCCEEDED", "FAILED", "REJECTED"), 60)
        r = panorama("fleet", "status", *operator, "--wait", "1")
    finally:
        agent.stop()
    assert agent.results[-1]["state"] == "SUCCEEDED", agent.results[-1]
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith(DEVICE)]
    assert "SUCCEEDED" in line and " 3 " in line


def test_a_renewed_password_and_client_certificate_are_used_at_the_next_reconnect(tmp_path):
    """Credentials rotate while clients run: after the broker restarts with the new password, a
    client reconnects with the password file's new line; a client whose certificate was renewed
    on disk reconnects with the new one (the broker logs its common name)."""
    from tls_support import issue_client

    with secure_mosquitto(tmp_path / "broker") as b:
        p = b.pki
        password_file = tmp_path / "pw"
        password_file.write_text("s3cret-pass\n")
        cert, key = tmp_path / "client.crt", tmp_path / "client.key"
        cert.write_bytes(p.client_cert.read_bytes())
        key.write_bytes(p.client_key.read_bytes())
        states = {"password": [], "cert": []}
        clients = {}
        for name, broker in (("password", Broker(b.password_url, ca_file=p.ca, username=STATION,
                                                 password_file=password_file)),
                             ("cert", Broker(b.mutual_url, ca_file=p.ca, cert_file=cert, key_file=key))):
            c = make_client(client_id(f"renew-{name}"), "5")
            c.on_connect = lambda cl, u, f, rc, pr=None, n=name: states[n].append(rc.is_failure)
            connect(c, broker)
            clients[name] = c
        try:
            b.stop()
            b.set_password(STATION, "renewed-pass")
            password_file.write_text("renewed-pass\n")
            key.write_text("half-written\n")  # a renewal caught half done: the old pair stays in use
            for c in clients.values():
                c.reconnect_delay_set(0.2, 0.5)
            b.start()
            assert wait(lambda: states["cert"][-1:] == [False] and len(states["cert"]) == 2, 20), states
            issue_client(p, "bed-09", cert, key)  # now whole: renewed
            b.stop()
            b.start()
            assert wait(lambda: len(states["cert"]) == 3 and not states["cert"][-1], 20), states
            assert wait(lambda: states["password"] and not states["password"][-1] and len(states["password"]) >= 2,
                        20), states
        finally:
            for c in clients.values():
                c.disconnect()
                c.loop_stop()
        log = b.log
    assert f"u'{STATION}'" in log and "u'bed-09'" in log and log.count(f"u'{CLIENT_CN}'") == 2


def test_an_expired_certificate_points_at_its_dates_and_the_clock(pki):
    expired = ssl.SSLCertVerificationError(1, "certificate verify failed")
    expired.verify_code, expired.verify_message = 10, "certificate has expired"  # as OpenSSL reports it
    assert "renew it, or check this device's clock" in explain_exception(Broker("mqtts://b", ca_file=pki.ca), expired)


def test_a_reconnect_that_fails_is_logged_with_the_reason(tmp_path, caplog):
    """The daemon, the agent, the monitor, a listener and the operator log why a reconnect fails
    (paho says why only at DEBUG), once per reason and outage: a broker gone, one that no
    longer takes the password, one that revoked the client certificate, and a second outage."""
    with secure_mosquitto(tmp_path / "broker") as b:
        p = b.pki
        station = Broker(b.password_url, ca_file=p.ca, username=STATION, password_file=p.password_file)
        monitor = Broker(b.mutual_url, ca_file=p.ca, cert_file=p.client_cert, key_file=p.client_key)
        said = lambda text: text in caplog.text  # noqa: E731
        with caplog.at_level(logging.INFO, logger="edge.mqtt"), \
                Listener(station, topic="ecg/v1/+/+/virtual") as lis, Listener(monitor, topic="ecg/v1/bed-07/+/virtual") as own:
            for c in (lis._client, own._client):
                c.reconnect_delay_set(0.2, 0.5)
            b.stop()
            assert wait(lambda: caplog.text.count("Connection refused") == 2, 10), caplog.text
            b.start()  # back: both reconnect, and say so
            assert wait(lambda: caplog.text.count("reconnected to MQTT broker") == 2, 10), caplog.text
            b.stop()  # a second outage is said again at once
            assert wait(lambda: caplog.text.count("Connection refused") == 4, 10), caplog.text
            b.set_password(STATION, "changed-on-the-broker")
            b.revoke(p.client_cert)
            b.start()
            assert wait(lambda: said(f"not authorized for user '{STATION}'"), 10), caplog.text
            assert wait(lambda: said(f"does not take the client certificate {p.client_cert}")
                        or said(f"may not take the client certificate {p.client_cert}"), 10), caplog.text
    lines = [r.getMessage() for r in caplog.records if "cannot reconnect" in r.getMessage()]
    assert all(f"127.0.0.1:{b.password_port} (TLS)" in line or f"127.0.0.1:{b.mutual_port} (TLS)" in line
               for line in lines)
    assert len(lines) <= 8, lines  # once per reason and outage, not at every retry
    assert not [r for r in caplog.records if r.name == "paho.mqtt" and "Client is not connected" in r.getMessage()]
