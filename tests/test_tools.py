"""``panorama monitor`` and ``panorama listen``: reassembly logic on its own, then for real
through Mosquitto at 127.0.0.1:1883 (skipped when nothing listens) and the embedded broker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import wfdb

from edge import ecgpaper
from edge.listen import Listener, record_name, write_wfdb
from edge.reassembly import Stream
from edge.protocol import Chunk, encode, to_json
from panorama.records import find_records, read_record

REPO = Path(__file__).resolve().parents[1]

FS = 500.0
T0 = 1_700_000_000_000_000_000



@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own, so retained messages and other runs never mix in."""
    return f"paneltest/{uuid.uuid4().hex[:10]}"


def _chunk(seq: int, leads=("I", "II"), n: int = 125, value: float | None = None, sent_ns: int = 0) -> Chunk:
    data = np.full((len(leads), n), seq if value is None else value, dtype=np.float32)
    data += np.arange(len(leads), dtype=np.float32)[:, None] / 10
    return Chunk(seq=seq, t0_ns=T0 + int(seq * n * 1e9 / FS), fs=FS, leads=list(leads), data=data, sent_ns=sent_ns)


def _raw_client():
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-tools-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    return client


# --- reassembly, no broker ---------------------------------------------------------------------

def test_reassembly_counts_gaps_duplicates_and_out_of_order():
    s = Stream(("bed", "p1"))
    for seq in (0, 1, 3, 2, 2, 5, 6):
        s.add(_chunk(seq), recv_ns=0)
    st = s.stats
    assert (st.chunks, st.duplicates, st.out_of_order, st.gaps) == (6, 1, 1, 1)  # seq 4 never came
    a = s.assembled()
    assert a.signals.shape == (2, 7 * 125) and a.t0_ns == T0
    assert np.isnan(a.signals[:, 4 * 125:5 * 125]).all()
    for seq in (0, 1, 2, 3, 5, 6):  # placed by t0, the late seq 2 included
        assert np.allclose(a.signals[0, seq * 125:(seq + 1) * 125], seq)


def test_reassembly_places_by_time_not_by_seq_times_length():
    s = Stream(("bed", "p1"))
    first = _chunk(0, n=100)
    second = Chunk(seq=1, t0_ns=T0 + int(100e9 / FS), fs=FS, leads=["I", "II"], data=np.ones((2, 37), np.float32))
    third = Chunk(seq=2, t0_ns=T0 + int(137e9 / FS), fs=FS, leads=["I", "II"], data=np.full((2, 10), 2, np.float32))
    for c in (first, second, third):
        s.add(c, recv_ns=0)
    sig = s.assembled().signals
    assert sig.shape == (2, 147) and not np.isnan(sig).any()
    assert (sig[0, 100:137] == 1).all() and (sig[0, 137:] == 2).all()


def test_reassembly_view_change_starts_a_new_segment_and_seq_wraps():
    s = Stream(("bed", "p1"))
    for seq in (2**32 - 2, 2**32 - 1, 0):  # the u32 wraps: no gap, nothing out of order
        s.add(Chunk(seq=seq, t0_ns=T0 + ((seq + 2) % 2**32) * 250_000_000, fs=FS, leads=["V7"],
                    data=np.zeros((1, 125), np.float32)), recv_ns=0)
    s.add(Chunk(seq=1, t0_ns=T0 + 3 * 250_000_000, fs=FS, leads=["V7", "120:45"],
                data=np.ones((2, 125), np.float32)), recv_ns=0)
    a = s.assembled()
    assert (a.stats.gaps, a.stats.out_of_order, a.stats.duplicates) == (0, 0, 0)
    assert [seg.views for seg in a.segments] == [["V7"], ["V7", "120:45"]]
    assert a.views == ["V7"] and a.signals.shape == (1, 375)
    assert a.segments[1].t0_ns == T0 + 3 * 250_000_000
    assert record_name("bed.1", "p1", 1) == "bed-1_p1_2"


def test_reassembly_origin_restart_and_missing_quality():
    s = Stream(("bed", "p1"))
    s.add(_chunk(0), recv_ns=0)
    s.add(_chunk(1), recv_ns=0)
    restarted = _chunk(0)
    restarted.t0_ns += 3_600 * 10**9  # seq 0 again, an hour later: a new run of the monitor
    restarted.quality = ["ok", "missing"]
    s.add(restarted, recv_ns=0)
    masked = _chunk(1)
    masked.t0_ns, masked.quality = restarted.t0_ns + 250_000_000, ["masked", "masked"]
    s.add(masked, recv_ns=0)
    a = s.assembled()
    assert a.stats.restarts == 1 and a.stats.duplicates == 0 and len(a.segments) == 2
    assert np.isnan(a.segments[1].signals[1, :125]).all() and not np.isnan(a.segments[1].signals[0]).any()
    # what came marked is counted, for the summary line and summary.json
    assert (a.stats.missing_samples, a.stats.masked_samples) == (125, 125)
    assert {"missing_samples": 125, "masked_samples": 125}.items() <= a.stats.summary().items()


def test_write_wfdb_keeps_labels_and_missing_values(tmp_path):
    x = np.sin(np.linspace(0, 20, 1000, dtype=np.float32))[None].repeat(3, 0) * np.array([[1.0], [2.5], [0.2]])
    x[1, 100:200] = np.nan
    base = write_wfdb(tmp_path, "bed_p-1", x.astype(np.float32), ["V7", "120:45", "I"], FS, T0, ["test"])
    rec = wfdb.rdrecord(str(base))
    assert rec.sig_name == ["V7", "120:45", "I"] and rec.fs == FS and rec.units == ["mV"] * 3
    back = rec.p_signal.T
    assert np.array_equal(np.isnan(back), np.isnan(x))
    assert np.nanmax(np.abs(back - x)) < 1e-3 * 0.51  # at least 1 µV resolution


def test_ecgpaper_png_size_follows_rows_and_seconds(tmp_path):
    from PIL import Image

    x = np.random.default_rng(0).normal(0, 0.3, (3, 6000)).astype(np.float32)  # 12 s: last 10 s drawn
    x[1] = np.nan
    path = ecgpaper.render(x, ["I", "V7", "120:45"], FS, tmp_path / "strip.png", title="bed/p1")
    assert ecgpaper.shown_seconds(6000, FS) == 10.0
    assert Image.open(path).size == ecgpaper.size_px(3, 10.0)


def test_monitor_plan_loops_seamlessly_and_flags_missing_samples():
    from edge.monitor import _Plan
    from edge.sources import MonitorStream

    sig = np.arange(300, dtype=np.float32)[None].repeat(2, 0)
    sig[1, 10] = np.nan
    plan = _Plan(MonitorStream("bed", "p1", ["I", "V7"], sig), "t", 250, loop=True, duration_s=1.1, fmt="int16")
    chunks = [plan.chunk(i, T0) for i in range(5)]
    assert plan.done(5) and not plan.done(4)
    assert [c.n_samples for c in chunks] == [125, 125, 125, 125, 50]  # 1.1 s = 550 samples
    assert [c.seq for c in chunks] == [0, 1, 2, 3, 4] and chunks[3].t0_ns == T0 + 3 * 250_000_000
    assert np.array_equal(np.concatenate([c.data[0] for c in chunks]), np.arange(550) % 300)  # wraps at 300
    assert chunks[0].quality == ["ok", "missing"] and chunks[0].data[1, 10] == 0 and chunks[1].quality is None


# --- through Mosquitto -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def record_500hz(data_dir):
    """A real 500 Hz record, so the 500 Hz stream is the record itself."""
    from edge.sources import adc_resolution_mv

    for path in find_records(data_dir):
        rec = read_record(path, fs=None)
        if rec.fs == FS and np.isfinite(rec.signals).all() and adc_resolution_mv(path, rec.leads):
            return path
    pytest.skip("no 500 Hz record with finite samples and one ADC resolution in the data")


def test_monitor_replays_a_record_losslessly_and_listen_writes_it(mosquitto, record_500hz, prefix, tmp_path):
    from edge.monitor import run_monitor
    from edge.sources import record_stream
    from PIL import Image

    stream = record_stream(record_500hz, monitor_id="bed1")
    assert stream.scale_mv == pytest.approx(0.001)  # 1000 counts/mV: lossless in int16
    with Listener(mosquitto, topic=f"{prefix}/+/+/raw", out=tmp_path) as lis:
        stats = run_monitor([stream], mosquitto, fast=True, duration_s=3.0, prefix=prefix)
        assert [(s.chunks, s.samples, s.dropped) for s in stats] == [(12, 1500, 0)]
        assert lis.wait(chunks=12, timeout=10)
        got = lis.streams[("bed1", stream.patient_id)]
    assert got.views == stream.leads and got.fs == FS
    assert got.signals.shape == (len(stream.leads), 1500)
    assert np.abs(got.signals - stream.signals[:, :1500]).max() < 1e-6  # lossless int16 replay
    lat = got.stats.summary()["latency_ms"]
    assert lat["n"] == 12 and 0 <= lat["p50"] <= lat["p99"] <= lat["max"] < 5000

    name = f"bed1_{stream.patient_id}"
    rec = wfdb.rdrecord(str(tmp_path / name))
    assert rec.sig_name == stream.leads and rec.fs == FS and rec.p_signal.shape == (1500, len(stream.leads))
    assert np.abs(rec.p_signal.T - stream.signals[:, :1500]).max() < 1e-3
    png = Image.open(tmp_path / f"{name}.png")
    assert png.size == ecgpaper.size_px(len(stream.leads), 3.0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    entry = summary["streams"][f"bed1/{stream.patient_id}"]
    assert (entry["chunks"], entry["gaps"], entry["duplicates"], entry["out_of_order"]) == (12, 0, 0, 0)
    assert entry["records"][0]["name"] == name and summary["malformed"] == 0


def test_listen_counts_hand_made_chunks_and_survives_malformed_payloads(mosquitto, prefix, tmp_path):
    topic = f"{prefix}/bed2/p9/virtual"
    with Listener(mosquitto, topic=f"{prefix}/bed2/#", out=tmp_path) as lis:
        client = _raw_client()
        payloads = [encode(_chunk(0), "float32"), to_json(_chunk(1)), encode(_chunk(3)), b"garbage",
                    encode(_chunk(2)), encode(_chunk(2)), b"ECGP\x01", encode(_chunk(5, sent_ns=time.time_ns())),
                    encode(_chunk(6, leads=("V7", "120:45")), "float32")]
        for p in payloads:
            client.publish(topic, p, qos=1).wait_for_publish(5)
        client.publish(f"{prefix}/bed2/p9/status", b"{}", qos=1).wait_for_publish(5)  # not a chunk topic
        assert lis.wait(chunks=6, timeout=10)
        deadline = time.monotonic() + 5
        while lis.stats["ignored"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        client.loop_stop()
        client.disconnect()
    st = lis.stats["streams"]["bed2/p9"]
    assert (st["chunks"], st["duplicates"], st["out_of_order"], st["gaps"], st["malformed"]) == (6, 1, 1, 1, 2)
    assert lis.stats["malformed"] == 2 and lis.stats["ignored"] == 1 and lis.stats["errors"] == 0
    assert st["latency_ms"]["n"] == 1
    first = wfdb.rdrecord(str(tmp_path / "bed2_p9"))
    assert first.sig_name == ["I", "II"] and first.p_signal.shape == (6 * 125, 2)
    assert np.isnan(first.p_signal[4 * 125:5 * 125]).all() and not np.isnan(first.p_signal[:4 * 125]).any()
    assert wfdb.rdrecord(str(tmp_path / "bed2_p9_2")).sig_name == ["V7", "120:45"]
    assert (tmp_path / "bed2_p9.png").is_file() and (tmp_path / "bed2_p9_2.png").is_file()
    # the printed line says what the records lack, not only the seq counts
    from edge.listen import summary_line

    line = summary_line("bed2/p9", json.loads((tmp_path / "summary.json").read_text())["streams"]["bed2/p9"])
    assert line.startswith("bed2/p9: 6 chunks, 1 gaps, 1 duplicates, 1 out of order, 2 malformed")
    assert ", 125 of 875 samples missing -> bed2_p9, bed2_p9_2" in line, line


def test_listen_refuses_an_unusable_folder_or_filter_before_it_captures(tmp_path, panorama):
    (tmp_path / "afile").write_text("")
    bad = {("--out", tmp_path / "afile" / "sub"): "cannot write to .*afile/sub: Not a directory",
           ("--topic", "bad topic/#/x"): "'#' must be a whole level, and the last",
           ("--topic", "ecg/v1/bed+/+/virtual"): "'\\+' must be a whole level",
           ("--prefix", "ecg/+"): "topic prefix 'ecg/\\+' must be non-empty levels"}
    for args, says in bad.items():
        argv = ["listen", "--broker", "mqtt://127.0.0.1:9", "--duration", "30", *args]
        if "--out" not in args:
            argv += ["--out", tmp_path / "out"]
        t0 = time.monotonic()
        r = panorama(*argv)
        assert r.returncode == 2 and re.search(says, r.stderr), r.stderr
        assert time.monotonic() - t0 < 10, "refused before connecting, not after the capture"


def test_cli_monitor_and_listen_talk_over_mosquitto(mosquitto, prefix, tmp_path, caplog, monkeypatch):
    cmd = [sys.executable, "-m", "panorama_cli"]
    listen = subprocess.Popen([*cmd, "listen", "--broker", mosquitto, "--topic", f"{prefix}/+/+/raw",
                               "--out", str(tmp_path), "--chunks", "8", "--duration", "60"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert listen.stdout.readline().startswith("listening on"), listen.stderr.read()
        mon = subprocess.run([*cmd, "monitor", "--sim", "1", "--duration", "2", "--fast", "--broker", mosquitto,
                              "--prefix", prefix, "--monitor-id", "cli", "--leads", "I,II,V7",
                              "--views", "V8", "--format", "json"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        # no daemon here: sent, heard by the listener, and said (exit 1) by the end of a run too short for ANSWER_S
        assert mon.returncode == 1, mon.stderr
        assert re.fullmatch(r"cli/sim-000: 8 chunks, 1000 samples \(2\.0 s\) of 3 leads, json; no daemon answered "
                            r"within 2(\.\d)? s", mon.stdout.strip()), mon.stdout
        assert "no daemon has answered cli/sim-000 by the end of its run, 2" in mon.stderr
        out, err = listen.communicate(timeout=30)
    finally:
        listen.kill()
    assert listen.returncode == 0, err
    assert "cli/sim-000: 8 chunks, 0 gaps" in out
    assert wfdb.rdrecord(str(tmp_path / "cli_sim-000")).sig_name == ["I", "II", "V7"]
    # the retained views request stays for a daemon that comes later
    got = []
    client = _raw_client()
    client.on_message = lambda c, u, m: got.append(m.payload)
    client.subscribe(f"{prefix}/cli/sim-000/views", qos=1)
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    client.loop_stop()
    client.disconnect()
    assert got and json.loads(got[0]) == {"views": ["V8"]}
    # a later run without --views is told the request still holds; --views default withdraws it
    import logging

    import edge.monitor
    from edge.monitor import run_monitor
    from edge.sources import sim_streams

    monkeypatch.setattr(edge.monitor, "END_ANSWER_S", 0.3)  # no daemon here: its silence need not be waited out

    with caplog.at_level(logging.WARNING, logger="edge.monitor"):
        run_monitor(sim_streams(1, seconds=0.5, monitor_id="cli"), mosquitto, prefix=prefix, fast=True)
    assert "cli/sim-000: a views request retained from before still holds: the daemon draws V8 (--views NAMES " \
        "asks for others, --views default withdraws it)" in caplog.text
    run_monitor(sim_streams(1, seconds=0.5, monitor_id="cli"), mosquitto, prefix=prefix, fast=True, views=[])
    left = []
    client = _raw_client()
    client.on_message = lambda c, u, m: left.append(m.payload)
    client.subscribe(f"{prefix}/cli/sim-000/views", qos=1)
    time.sleep(0.5)
    client.loop_stop()
    client.disconnect()
    assert left == []  # withdrawn: nothing retained


def test_listen_by_prefix_and_a_capture_that_heard_nothing_says_so(mosquitto, prefix, tmp_path, panorama):
    r = panorama("listen", "--broker", mosquitto, "--prefix", f"{prefix}-none", "--duration", "0.5",
                 "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"listening on {prefix}-none/+/+/virtual" in r.stdout
    assert f"nothing came on {prefix}-none/+/+/virtual: streams are PREFIX/MONITOR/PATIENT/virtual" in r.stderr


def test_monitor_raw_chunks_carry_the_protocols_expiry_over_mqtt5(mosquitto, prefix):
    """Raw chunks expire after 2 s at the broker (wire protocol), as the daemon's virtual ones do;
    a --fast replay, stamped ahead of the wall clock, sends none."""
    from edge.monitor import run_monitor
    from edge.sources import sim_streams

    got = []
    client = _raw_client()
    client.on_message = lambda c, u, m: got.append((m.topic, getattr(m.properties, "MessageExpiryInterval", None)))
    client.subscribe(f"{prefix}/#", qos=0)
    time.sleep(0.3)
    try:
        run_monitor(sim_streams(1, seconds=1.0, monitor_id="exp"), mosquitto, prefix=prefix, speed=4.0)
        run_monitor(sim_streams(1, seconds=1.0, monitor_id="fast"), mosquitto, prefix=prefix, fast=True)
        deadline = time.monotonic() + 5
        while len(got) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        client.loop_stop()
        client.disconnect()
    timed = [e for t, e in got if t.startswith(f"{prefix}/exp/")]
    assert len(timed) == 4 and all(e is not None and 1 <= e <= 2 for e in timed), got
    assert [e for t, e in got if t.startswith(f"{prefix}/fast/")] == [None] * 4


def test_monitor_stops_on_its_event(mosquitto, prefix):
    from edge.monitor import run_monitor
    from edge.sources import MonitorStream

    stop = threading.Event()
    stream = MonitorStream("bed3", "p1", ["I"], np.zeros((1, 500), np.float32))
    result = []
    t = threading.Thread(target=lambda: result.append(
        run_monitor([stream], mosquitto, chunk_ms=100, loop=True, stop_event=stop, prefix=prefix)))
    t.start()
    time.sleep(0.45)
    stop.set()
    t.join(5)
    assert not t.is_alive()
    (st,) = result[0]
    assert 3 <= st.chunks <= 5 and st.samples == 50 * st.chunks  # real time: a chunk per 100 ms


# --- through the embedded broker (MQTT 3.1.1) --------------------------------------------------

def test_monitor_and_listener_over_the_embedded_broker(prefix):
    broker_mod = pytest.importorskip("edge.broker")
    pytest.importorskip("amqtt")
    from edge.monitor import run_monitor
    from edge.sources import sim_streams

    (stream,) = sim_streams(1, seed=3, monitor_id="emb", seconds=1.0)
    with broker_mod.EmbeddedBroker() as broker:
        with Listener(broker.url, protocol="3.1.1", topic=f"{prefix}/+/+/raw") as lis:
            (st,) = run_monitor([stream], broker.url, protocol="3.1.1", fast=True, prefix=prefix)
            assert lis.wait(chunks=4, timeout=10)
            got = lis.streams[("emb", "sim-000")]
    assert st.chunks == 4 and got.stats.gaps == 0
    assert np.abs(got.signals - stream.signals).max() <= 0.0005 + 1e-6  # int16 at 1 µV


def test_a_record_in_microvolts_labelled_mv_is_said_before_it_is_sent(data_dir, tmp_path, caplog):
    import logging

    from edge.sources import record_stream

    rec = wfdb.rdrecord(str(data_dir / "ludb" / "ludb001"))
    wfdb.wrsamp("uvasmv", fs=rec.fs, units=["mV"] * 12, sig_name=rec.sig_name, p_signal=rec.p_signal * 1000,
                fmt=["16"] * 12, adc_gain=[1.0] * 12, baseline=[0] * 12, write_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        record_stream(data_dir / "ludb" / "ludb001")
        assert "the daemon" not in caplog.text
        record_stream(tmp_path / "uvasmv")
    assert "uvasmv: I,II,III,aVR,aVL,aVF,V1,V2,V3,V4,V5,V6 not in mV (check the units): the daemon finds each " \
        "window implausible and leaves them out" in caplog.text
