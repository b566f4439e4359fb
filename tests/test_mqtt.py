"""MQTT plumbing against real brokers: the embedded amqtt (3.1.1) always, and the Mosquitto
at 127.0.0.1:1883 (5 and 3.1.1) where one listens; skipped cleanly where none does."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import pytest

from edge.broker import EmbeddedBroker
from edge.mqtt import (BrokerConnectionError, Publisher, client_id, connect, make_client,
                       parse_broker_url, publish_props)
from conftest import listening
from edge.protocol import CONTENT_TYPE_BINARY
from panorama.errors import BackendError

@pytest.fixture(scope="module")
def embedded():
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture(scope="module")
def mosquitto_url(mosquitto):
    return mosquitto


@pytest.fixture(params=["embedded-3.1.1", "mosquitto-5", "mosquitto-3.1.1"])
def broker(request):
    """(url, protocol) of each broker and protocol the project supports."""
    where, protocol = request.param.split("-")
    url = request.getfixturevalue("embedded").url if where == "embedded" else \
        request.getfixturevalue("mosquitto_url")
    return url, protocol


@pytest.fixture
def clients():
    """Make connected clients; all are disconnected and their threads ended afterwards."""
    made = []

    def make(url, protocol, on_message=None, subscribe=None):
        c = make_client(client_id("test"), protocol)
        if on_message:
            c.on_message = on_message
        made.append(c)
        connect(c, url, timeout=5)
        if subscribe:
            done = threading.Event()
            c.on_subscribe = lambda *a: done.set()
            c.subscribe(subscribe, qos=1)
            assert done.wait(5), "no SUBACK"
        return c

    yield make
    for c in made:
        c.disconnect()
        c.loop_stop()


def collect(url, protocol, clients, topic_filter):
    got: list = []
    clients(url, protocol, on_message=lambda c, u, m: got.append(m), subscribe=topic_filter)
    return got


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def base_topic() -> str:
    return f"panorama-test/{uuid.uuid4().hex}"


# ----------------------------------------------------------------------------- publishing

def test_publisher_delivers_everything_in_order(broker, clients):
    url, protocol = broker
    topic = base_topic()
    got = collect(url, protocol, clients, topic + "/#")
    publisher = Publisher(clients(url, protocol), maxsize=1000, protocol=protocol).start()
    payloads = [i.to_bytes(4, "little") * 750 for i in range(300)]  # 3 kB, like a 250 ms chunk
    assert all(publisher.put(f"{topic}/raw", p, content_type=CONTENT_TYPE_BINARY, expiry_s=2) for p in payloads)
    publisher.stop(timeout=5)
    assert publisher.queued == 0 and publisher.published == 300 and publisher.dropped == 0
    assert wait_for(lambda: len(got) == 300), f"{len(got)} of 300 arrived"
    assert [m.payload for m in got] == payloads


def test_v5_properties_reach_the_subscriber(mosquitto_url, clients):
    topic = base_topic()
    got = collect(mosquitto_url, "5", clients, topic + "/#")
    publisher = Publisher(clients(mosquitto_url, "5"), protocol="5").start()
    publisher.put(f"{topic}/raw", b"ECGP...", content_type=CONTENT_TYPE_BINARY, expiry_s=2)
    publisher.put(f"{topic}/status", b"{}", qos=1, content_type="application/json")
    publisher.stop()
    assert wait_for(lambda: len(got) == 2)
    raw, status = sorted(got, key=lambda m: m.topic)
    assert raw.properties.ContentType == CONTENT_TYPE_BINARY
    assert 1 <= raw.properties.MessageExpiryInterval <= 2  # the broker counts down what is left
    assert status.properties.ContentType == "application/json"
    assert not hasattr(status.properties, "MessageExpiryInterval")


def test_a_v5_client_is_never_sent_a_packet_over_its_maximum(mosquitto_url, clients):
    """The daemon and the fleet agent bound what the broker may send them (``max_packet``): a
    message larger is dropped for them by Mosquitto, never read into their memory."""
    topic = base_topic()
    got: list = []
    c = make_client(client_id("small"), "5")
    c.on_message = lambda cl, u, m: got.append(m.payload)
    connect(c, mosquitto_url, max_packet=4096)
    try:
        c.subscribe(topic, qos=1)
        time.sleep(0.2)
        publisher = Publisher(clients(mosquitto_url, "5"), protocol="5").start()
        for size in (1000, 100_000, 2000):
            publisher.put(topic, bytes(size), qos=1)
        publisher.stop()
        assert wait_for(lambda: len(got) == 2) and [len(p) for p in got] == [1000, 2000]
        time.sleep(0.3)
        assert len(got) == 2 and c.is_connected()
    finally:
        c.disconnect()
        c.loop_stop()


def test_v311_carries_no_properties(mosquitto_url, clients):
    topic = base_topic()
    got = collect(mosquitto_url, "5", clients, topic + "/#")  # a v5 subscriber would see them
    publisher = Publisher(clients(mosquitto_url, "3.1.1"), protocol="3.1.1").start()
    publisher.put(f"{topic}/raw", b"x", content_type=CONTENT_TYPE_BINARY, expiry_s=2)
    publisher.stop()
    assert wait_for(lambda: len(got) == 1)
    assert not hasattr(got[0].properties, "ContentType")
    assert not hasattr(got[0].properties, "MessageExpiryInterval")


def test_full_queue_drops_and_counts_without_blocking(embedded, clients):
    topic = base_topic()
    got = collect(embedded.url, "3.1.1", clients, topic + "/#")
    publisher = Publisher(clients(embedded.url, "3.1.1"), maxsize=3, protocol="3.1.1")  # not started
    t = time.monotonic()
    accepted = [publisher.put(f"{topic}/raw", bytes([i])) for i in range(5)]
    assert time.monotonic() - t < 0.1
    assert accepted == [True, True, True, False, False]
    assert publisher.dropped == 2 and publisher.queued == 3
    publisher.start()
    publisher.stop()  # drains the three it holds
    assert wait_for(lambda: len(got) == 3)
    assert [m.payload for m in got] == [b"\x00", b"\x01", b"\x02"]
    assert not publisher.put(f"{topic}/raw", b"late") and publisher.dropped == 3  # stopped


def test_bad_topic_is_counted_and_the_thread_carries_on(embedded, clients):
    topic = base_topic()
    got = collect(embedded.url, "3.1.1", clients, topic + "/#")
    publisher = Publisher(clients(embedded.url, "3.1.1"), protocol="3.1.1").start()
    publisher.put(f"{topic}/+/raw", b"wildcards are not publishable")
    publisher.put(f"{topic}/raw", b"ok")
    publisher.stop()
    assert publisher.failed == 1 and publisher.published == 1
    assert wait_for(lambda: len(got) == 1) and got[0].payload == b"ok"


def test_retained_state_survives_for_late_subscribers(embedded, clients):
    topic = base_topic()
    publisher = Publisher(clients(embedded.url, "3.1.1"), protocol="3.1.1").start()
    publisher.put(f"{topic}/status", b"online", qos=1, retain=True)
    publisher.stop()
    got = collect(embedded.url, "3.1.1", clients, f"{topic}/status")
    assert wait_for(lambda: len(got) == 1)
    assert got[0].payload == b"online" and got[0].retain


def test_publisher_refuses_a_protocol_the_client_does_not_speak():
    with pytest.raises(ValueError, match="speaks 3.1.1"):
        Publisher(make_client("x", "3.1.1"), protocol="5")


# ----------------------------------------------------------------------------- connecting

def test_connect_keeps_the_callers_on_connect(embedded, clients):
    calls = []
    c = make_client(client_id("test"), "3.1.1")
    c.on_connect = lambda *args: calls.append(args[3])
    connect(c, embedded.url)
    try:
        assert wait_for(lambda: len(calls) == 1) and not calls[0].is_failure
        # connect's own wrapper is gone; the broker's watch chains in front of the caller's callback
        assert c.on_connect.__wrapped__ is not None and c.on_connect.__wrapped__.__name__ == "<lambda>"
    finally:
        c.disconnect()
        c.loop_stop()


def test_connect_to_a_closed_port_fails_fast():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    with pytest.raises(ConnectionError, match=f"cannot reach MQTT broker at 127.0.0.1:{port}"):
        connect(make_client("x", "3.1.1"), f"mqtt://127.0.0.1:{port}", timeout=5)
    assert time.monotonic() - t < 1.0


def test_connect_times_out_when_nothing_answers():
    with socket.socket() as server:  # accepts TCP, never speaks MQTT
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        c = make_client("x", "3.1.1")
        t = time.monotonic()
        with pytest.raises(BrokerConnectionError, match="no answer"):
            connect(c, f"mqtt://127.0.0.1:{port}", timeout=0.5)
        assert time.monotonic() - t < 2.0
    assert c._thread is None  # paho's network thread was stopped


def test_v5_is_refused_by_the_embedded_broker_with_a_clear_error(embedded):
    with pytest.raises(ConnectionError, match="3.1.1"):
        connect(make_client(client_id("test"), "5"), embedded.url, timeout=5)


def test_broker_connection_error_is_both_kinds():
    assert issubclass(BrokerConnectionError, ConnectionError)
    assert issubclass(BrokerConnectionError, BackendError)


@pytest.mark.parametrize("url, expected", [
    ("mqtt://127.0.0.1:1883", ("127.0.0.1", 1883)),
    ("mqtt://broker.local", ("broker.local", 1883)),
    ("mqtt://[::1]:1884/", ("::1", 1884)),
    ("mqtts://broker.local", ("broker.local", 8883)),
    ("mqtts://10.0.0.2:8884", ("10.0.0.2", 8884)),
])
def test_parse_broker_url(url, expected):
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize("url", ["127.0.0.1:1883", "tcp://h:1883", "ssl://h", "mqtt://", "mqtt://h:99999",
                                 "mqtt://h:x", "mqtt://u:p@h", "mqtt://h:1883/topic", "mqtt://h:0", ""])
def test_parse_broker_url_refuses(url):
    with pytest.raises(ValueError, match="mqtt://|port|credentials"):
        parse_broker_url(url)


def test_make_client_and_properties():
    with pytest.raises(ValueError, match="3.1.1"):
        make_client("x", "4")
    assert publish_props("3.1.1", CONTENT_TYPE_BINARY, 2) is None
    assert publish_props("5", None, None) is None
    props = publish_props("5", CONTENT_TYPE_BINARY, 2)
    assert props.ContentType == CONTENT_TYPE_BINARY and props.MessageExpiryInterval == 2
    with pytest.raises(ValueError):
        publish_props("5", None, 0)


def test_client_ids_are_unique_and_name_the_role():
    ids = {client_id("daemon") for _ in range(2000)}  # 48 random bits: a clash here is ~1e-8
    assert len(ids) == 2000
    assert all(i.startswith("panorama-daemon-") for i in ids)


# ----------------------------------------------------------------------------- embedded broker

def test_embedded_broker_starts_and_stops_without_leaking_threads():
    before = set(threading.enumerate())
    broker = EmbeddedBroker().start()
    host, port = parse_broker_url(broker.url)
    assert host == "127.0.0.1" and port > 0 and listening(host, port)
    c = make_client(client_id("test"), "3.1.1")
    connect(c, broker.url)  # left connected on purpose: stop() must still be clean
    broker.stop()
    broker.stop()  # twice is harmless
    assert not listening(host, port)
    c.loop_stop()
    assert wait_for(lambda: set(threading.enumerate()) <= before, 2), threading.enumerate()


def test_embedded_broker_on_a_taken_port_fails_clearly(embedded):
    port = parse_broker_url(embedded.url)[1]
    with pytest.raises(BackendError, match=f"cannot listen on 127.0.0.1:{port}"):
        EmbeddedBroker(port=port).start()


# ----------------------------------------------------------------------------- refusals

def test_a_flood_of_refusals_leaves_other_patients_state_through(mosquitto_url, clients):
    """One sender's junk is said on the errors topic as the log says it (the first three of a
    stream and code, then one in every hundred, with its count; at most errors_per_s a second in
    all): it never fills the queues another patient's retained status shares."""
    import json

    from edge.topics import Topics
    from edge.reporting import Reporter

    prefix = base_topic()
    got = collect(mosquitto_url, "5", clients, prefix + "/#")
    publisher = Publisher(clients(mosquitto_url, "5"), maxsize=1000, protocol="5").start()
    report = Reporter(publisher, Topics(prefix), "d1", errors_per_s=20)
    for _ in range(5000):
        report.reject(f"{prefix}/bad/p9/raw", "bad_magic", "not a chunk")
    for i in range(3000):  # a sender that changes its monitor id every message
        report.reject(f"{prefix}/bad{i}/p9/raw", "bad_magic", "not a chunk")
    other = Reporter(publisher, Topics(prefix), "d2", errors_per_s=20)  # a daemon of its own, its own bucket
    for label in ("X1", "X2", "X3", "X4", "X5", "X1"):  # unknown labels: each said once per stream
        other.unknown_lead(("bed2", "p2"), label)
    publisher.put(f"{prefix}/bed1/p1/status", b'{"state": "streaming"}', qos=1, retain=True)
    publisher.stop(timeout=5)
    assert report.rejected["bad_magic"] == 8000 and other.rejected["unknown_lead"] == 6  # all counted
    errors = lambda: [json.loads(m.payload) for m in got if m.topic.endswith("/errors")]  # noqa: E731
    assert wait_for(lambda: any(m.topic.endswith("/status") for m in got))
    said = errors()
    assert [e["count"] for e in said if e["monitor"] == "bad"][:4] == [1, 2, 3, 101]
    labels = [e["reason"].split("'")[1] for e in said if e["code"] == "unknown_lead"]
    assert labels == ["X1", "X2", "X3", "X4", "X5"] and other.unsent == 1
    said = [e for e in said if e["code"] != "unknown_lead"]
    assert len(said) <= 20 + 20 * 5  # the bucket, plus what it refilled in a few seconds at most
    assert report.unsent == 8000 - len(said) and publisher.failed == 0 and publisher.dropped == 0


def test_a_run_on_a_users_broker_leaves_no_retained_message(mosquitto_url, clients):
    """demo --broker and bench stream clear what their run retained under its own prefix
    (edge.demo.leave_nothing), and nothing outside it."""
    from edge.demo import leave_nothing
    from edge.mqtt import retained_messages

    topic = base_topic()
    publisher = Publisher(clients(mosquitto_url, "5"), protocol="5").start()
    for t in ("run/_daemon/demo/status", "run/bed/p1/status", "run/bed/p1/calibration", "other/keep"):
        publisher.put(f"{topic}/{t}", b"{}", qos=1, retain=True)
    publisher.stop()
    time.sleep(0.2)
    leave_nothing(mosquitto_url, "5", f"{topic}/run")
    reader = clients(mosquitto_url, "5")
    try:
        assert list(retained_messages(reader, f"{topic}/#", quiet=0.3)) == [f"{topic}/other/keep"]
    finally:
        reader.publish(f"{topic}/other/keep", b"", qos=1, retain=True).wait_for_publish(5)


def test_a_patient_id_back_after_its_stream_ended_is_told_afresh(mosquitto_url, clients):
    """The errors' rate limit counts per stream: a no-usable-lead alarm is said every time the
    electrodes go, and an unknown lead once per stream, not once per id for ever."""
    from edge.reporting import Reporter
    from edge.stream import PatientStream, StreamParams
    from edge.topics import Topics
    from panorama.geometry import resolve_views

    prefix = base_topic()
    got = collect(mosquitto_url, "5", clients, f"{prefix}/_daemon/d/errors")
    publisher = Publisher(clients(mosquitto_url, "5"), protocol="5").start()
    report = Reporter(publisher, Topics(prefix), "d")
    key = ("bed", "p1")
    for stay in range(5):  # a bed's id back five times, its electrodes off each time
        st = PatientStream(key, StreamParams(calibrate_s=0), resolve_views("V7"))
        st.signal = "missing"
        report.signal(st)
        report.unknown_lead(key, "XYZ")
        report.unknown_lead(key, "XYZ")
        report.forget(key)  # the stream ended
    publisher.stop()
    assert wait_for(lambda: len(got) == 10)
    codes = [json.loads(m.payload)["code"] for m in got]
    assert codes.count("no_signal") == 5 and codes.count("unknown_lead") == 5
