"""The streaming daemon as a user runs it: ``panorama serve`` in a subprocess, a real broker
(Mosquitto at 127.0.0.1:1883, skipped cleanly when none listens; the embedded amqtt broker),
the monitor replaying a real record, the listener's output compared with offline synthesis."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import wfdb
import yaml

from conftest import free_port, listening, wait

from edge import protocol
from edge.listen import Listener
from edge.monitor import run_monitor
from edge.sources import record_stream, sim_streams
from edge.mqtt import client_id, connect, make_client
from edge.topics import Topics
from panorama.calibrate import EVERY_LEAD, FEW_CHEST, MONITOR_MIN_CHEST
from panorama.records import find_records, read_record

REPO = Path(__file__).resolve().parents[1]
VIEWS = ["V7", "V8", "V3R", "V4R", "120:45"]


class Tap:
    """A plain paho subscriber that keeps every message of a topic filter."""

    def __init__(self, url: str, topic: str, protocol_version: str = "5"):
        self.messages: list[tuple[str, bytes]] = []
        self.client = make_client(client_id("tap"), protocol_version)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        connect(self.client, url)
        self.client.subscribe(topic, qos=1)
        assert done.wait(5)

    def payloads(self, suffix: str) -> list[bytes]:
        return [p for t, p in list(self.messages) if t.endswith(suffix)]

    def wait(self, cond, timeout: float = 30.0) -> bool:
        return wait(cond, timeout)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


@contextmanager
def serve(tmp_path: Path, url: str, prefix: str, proto: str = "5", **overrides):
    cfg = {"mqtt": {"broker": url, "protocol": proto, "prefix": prefix, "daemon_id": "test"},
           "stream": {"views": VIEWS, "idle_timeout_s": 1.5},
           "health": {"interval_s": 1.0, "metrics_port": free_port()}}
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    tap = Tap(url, f"{prefix}/#", proto)
    proc = subprocess.Popen([sys.executable, "-m", "panorama_cli", "serve", "--config", str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        online = tap.wait(lambda: b"online" in tap.payloads("_daemon/test/status"), timeout=60)
        if not online:
            proc.kill()
            pytest.fail(f"daemon did not come online:\n{proc.communicate()[0]}")
        yield proc, tap, cfg
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        tap.close()


@pytest.fixture
def prefix() -> str:
    return f"test/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def record_500hz(data_dir):
    for path in find_records(data_dir):
        head = wfdb.rdheader(str(path))
        if head.fs == 500 and head.sig_len >= 5000 and len(set(head.adc_gain)) == 1:
            rec = read_record(path)
            if np.isfinite(rec.signals).all() and len(rec.leads) == 12:
                return path
    pytest.skip("no 500 Hz 12-lead record with one ADC resolution in the data")


def test_validate_config(tmp_path, panorama):
    r = panorama("serve", "--config", REPO / "deploy" / "edge.yaml", "--validate-config")
    assert r.returncode == 0, r.stderr  # the documented example stays valid
    good = tmp_path / "good.yaml"
    good.write_text("mqtt:\n  protocol: '3.1.1'\nstream:\n  views: [V7, '120:45']\n")
    r = panorama("serve", "--config", good, "--validate-config")
    assert r.returncode == 0 and "valid" in r.stdout and "120:45" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("stream:\n  lookahed: 192\n  hop: 100\n  views: [V77]\ncalibration:\n  seconds: 0.5\n")
    r = panorama("serve", "--config", bad, "--validate-config")
    assert r.returncode == 2
    for word in ("lookahed", "hop", "multiple of 8", "V77", "0.5 s is too short to fit"):
        assert word in r.stderr
    # what serve would refuse only after loading its model, and milliseconds given as seconds
    bad.write_text("mqtt:\n  prefix: ecg/+/v1\n  daemon_id: bed edge 01\n  expiry_s: 2000000\n"
                   "health:\n  interval_s: 5000\nstream:\n  idle_timeout_s: 10000\nmodel:\n  reload_check_s: 5000\n")
    r = panorama("serve", "--config", bad, "--validate-config")
    assert r.returncode == 2 and "valid" not in r.stdout
    for says in ("mqtt.prefix: topic prefix 'ecg/+/v1' must be non-empty levels",
                 "mqtt.daemon_id: daemon id 'bed edge 01'",
                 "mqtt.expiry_s", "health.interval_s", "stream.idle_timeout_s", "model.reload_check_s"):
        assert says in r.stderr, (says, r.stderr)
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"\x80\x04not a checkpoint" * 100)
    for path, says in ((junk, "not a readable safetensors checkpoint"),
                       (tmp_path / "none.safetensors", "no checkpoint at"),
                       (tmp_path / "store" / "current" / "model.safetensors", "which the fleet agent makes on its "
                        "first start")):
        cfg = tmp_path / "model.yaml"
        cfg.write_text(f"model:\n  path: {path}\n")
        r = panorama("serve", "--config", cfg, "--validate-config")
        assert r.returncode != 0 and says in r.stderr and "valid" not in r.stdout


def test_devices_this_machine_lacks_are_refused_before_anything_loads(tmp_path, panorama):
    import onnxruntime as ort
    import torch

    from edge.config import EdgeConfig
    from edge.daemon import Daemon
    from panorama.errors import ConfigError
    from panorama.synth import Synthesizer

    cfg = tmp_path / "gpu.yaml"
    cfg.write_text("model:\n  device: gpu0\n")
    r = panorama("serve", "--config", cfg, "--validate-config")
    assert r.returncode == 2 and "model.device: device 'gpu0': use cpu, cuda or cuda:N" in r.stderr
    if torch.cuda.is_available() or "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("checks the errors on a machine without CUDA")
    # the Jetson settings of deploy/README on a machine (or a torch wheel) without CUDA: one line, no traceback
    cfg.write_text("model: {backend: onnxruntime, device: cuda}\ncalibration: {device: cuda}\n")
    for args in (("--validate-config",), ()):
        r = panorama("serve", "--config", cfg, *args, "--broker", "mqtt://127.0.0.1:9")
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert "model.device (backend onnxruntime): device cuda: this ONNX Runtime" in r.stderr
        assert "install onnxruntime-gpu" in r.stderr and "calibration.device: device cuda: this torch" in r.stderr
    with pytest.raises(ConfigError, match="model.device \\(backend torch\\): device cuda:1: this torch"):
        Daemon(EdgeConfig.model_validate({"model": {"backend": "torch", "device": "cuda:1"}}))
    with pytest.raises(ValueError, match="device cuda: this torch .* sees no CUDA GPU"):
        Synthesizer.load(device="cuda")  # bench, synthesize and the API go through it


def test_a_metrics_port_in_use_stops_the_start_naming_the_setting():
    import socket

    from edge.config import EdgeConfig
    from edge.daemon import Daemon

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(EdgeConfig.model_validate({"mqtt": {"broker": "mqtt://127.0.0.1:9"},
                                                   "health": {"metrics_port": port}}))
        with pytest.raises(OSError, match=f"health.metrics_port: cannot serve /metrics on 127.0.0.1:{port}: "
                                          "Address already in use"):
            daemon.start()  # before connecting (nothing listens on port 9) or starting a thread
        assert daemon.threads == [] and daemon.metrics is None
    daemon = Daemon(EdgeConfig.model_validate({"mqtt": {"broker": "mqtt://127.0.0.1:9"},
                                               "health": {"metrics_port": port}}))
    with pytest.raises(ConnectionError):
        daemon.start()  # the broker is not there
    with socket.socket() as again:  # and /metrics is not left bound, serving a daemon that never connected
        again.bind(("127.0.0.1", port))


def test_systemd_hears_ready_a_watchdog_that_stops_while_a_loop_is_stuck_and_stopping(mosquitto, prefix,
                                                                                        monkeypatch, caplog):
    import logging
    import socket
    import tempfile

    from edge.config import EdgeConfig
    from edge.daemon import Daemon

    folder = tempfile.mkdtemp(prefix="sd")  # a unix socket's path must stay short
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # what systemd hands a Type=notify service
    sock.bind(f"{folder}/notify")
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", f"{folder}/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # WatchdogSec=2: a ping each second, loops silent > 1 s are stuck

    def heard(seconds: float) -> list[str]:
        got, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                got.append(sock.recv(4096).decode())
            except socket.timeout:
                pass
        return got

    daemon = Daemon(EdgeConfig.model_validate({"mqtt": {"broker": mosquitto, "prefix": prefix, "daemon_id": "sd"},
                                               "calibration": {"seconds": 0}}))
    try:
        daemon.start()
        first = heard(2.5)
        assert first[0].startswith("READY=1\nSTATUS=serving") and "as sd" in first[0]
        assert sum(m.startswith("WATCHDOG=1") for m in first) >= 1 and "STATUS=no patient" in first[-1]
        with caplog.at_level(logging.ERROR, logger="panorama.serve"):
            with daemon.lock:  # the inference loop takes it every turn: stuck as a hung backend would leave it
                heard(1.6)  # the watchdog's next look finds it silent for over 1 s
                stuck = heard(1.5)
            assert not any(m.startswith("WATCHDOG=1") for m in stuck), stuck
            assert "loop(s) inference silent for over 1.0 s" in caplog.text
        assert any(m.startswith("WATCHDOG=1") for m in heard(2.0)), "pings resume once the loop runs"
        assert time.monotonic() - daemon.watchdog.beats["publisher"] < 0.5, "the publishing loop beats too"
        with caplog.at_level(logging.ERROR, logger="panorama.serve"):
            daemon.client.loop_stop()  # paho's network thread gone, as an exception inside paho would leave it
            try:
                heard(0.6)
                gone = heard(1.5)
            finally:
                daemon.client.loop_start()
            assert not any(m.startswith("WATCHDOG=1") for m in gone), gone
            assert "paho's MQTT network thread not running: no watchdog ping" in caplog.text
        assert any(m.startswith("WATCHDOG=1") for m in heard(2.0)), "pings resume with the thread"
    finally:
        daemon.stop()
    assert any(m.startswith("STOPPING=1") for m in heard(0.5))
    sock.close()


def test_a_monitor_says_when_no_daemon_answers_its_stream(mosquitto, prefix, tmp_path, monkeypatch, caplog):
    import logging

    import edge.monitor

    monkeypatch.setattr(edge.monitor, "ANSWER_S", 1.5)  # 10 s by default
    with serve(tmp_path, mosquitto, prefix, calibration={"seconds": 1}, stream={"idle_timeout_s": 30}) as (_, tap, _):
        with caplog.at_level(logging.WARNING):
            served = run_monitor(sim_streams(1, seconds=2.0), mosquitto, prefix=prefix, protocol="3.1.1")
            # restarted while the daemon still holds its stream: the daemon says the stream started again
            again = run_monitor(sim_streams(1, seconds=2.0), mosquitto, prefix=prefix, protocol="3.1.1")
            # the same stream where no daemon serves (over 3.1.1, as if the broker dropped its chunks)
            lost = run_monitor(sim_streams(1, seconds=2.0), mosquitto, prefix=f"{prefix}-nobody", protocol="3.1.1")
        said = [json.loads(p) for p in tap.payloads("bed/sim-000/status")]
    # calibrated by then: the restart takes it back to waiting, and says why (a dashboard sees a restart)
    assert [(d["state"], d.get("reason", "")[:24]) for d in said if d["counts"]["restarts"]][:1] == \
        [("waiting", "the stream started again")], said
    assert not served[0].unanswered and "no daemon answered" not in served[0].line() and not again[0].unanswered
    assert lost[0].unanswered and lost[0].line().endswith("; no daemon answered within 1.5 s")
    assert f"no daemon has answered bed/sim-000 within 1.5 s: is panorama serve running with prefix {prefix}-nobody" \
        in caplog.text


def test_a_full_daemon_tells_the_monitor_it_refused_the_stream(mosquitto, prefix, tmp_path, caplog):
    import logging

    with serve(tmp_path, mosquitto, prefix, proto="3.1.1", calibration={"seconds": 0},
               stream={"max_patients": 1, "idle_timeout_s": 30}) as (proc, tap, cfg):
        with caplog.at_level(logging.WARNING):  # over 3.1.1, where the broker says nothing itself
            stats = run_monitor(sim_streams(2, seconds=3.0), mosquitto, prefix=prefix, protocol="3.1.1")
            # restarted at once (within the 5 s a refusal is repeated after): told again on its first chunk
            again = run_monitor(sim_streams(2, seconds=3.0), mosquitto, prefix=prefix, protocol="3.1.1")
        refused = [json.loads(p) for p in tap.payloads("bed/sim-001/status")]
        later = Tap(mosquitto, f"{prefix}/bed/sim-001/status", "3.1.1")  # what a dashboard opened now gets
        time.sleep(0.5)
        left = later.payloads("status")
        later.close()
    for served, full in (stats, again):
        assert not served.daemon_refused and not served.unanswered and not full.unanswered
        assert full.daemon_refused == "this daemon serves at most 1 patients; stream refused"
        assert full.line().endswith("; REFUSED by the daemon (this daemon serves at most 1 patients; stream refused)")
    assert caplog.text.count("the daemon refused bed/sim-001: this daemon serves at most 1 patients") == 2
    # one for each run's first chunk, not one for each of the 24 chunks refused
    assert [d["state"] for d in refused] == ["refused", "refused"] and stats[1].chunks == 12
    assert left == [], "a refusal is not left retained on the broker"


def test_stream_equals_offline_synthesis(mosquitto, record_500hz, prefix, tmp_path, panorama):
    """A real record replayed by the monitor: after the 5 s calibration the streamed views
    equal ``panorama synthesize --calibrate 5`` of the same record within 1 µV RMS."""
    stream = record_stream(record_500hz, monitor_id="bed1", patient_id="p1")
    # at 4x real time the calibration's second or two is several seconds of stream: keep them
    with serve(tmp_path, mosquitto, prefix, stream={"max_backlog_s": 60}) as (proc, tap, cfg):
        with Listener(mosquitto, topic=f"{prefix}/+/+/virtual") as lis:
            run_monitor([stream], mosquitto, prefix=prefix, views=VIEWS, speed=4.0)
            n = stream.signals.shape[1]
            done = tap.wait(lambda: (s := lis.streams.get(("bed1", "p1"))) is not None
                            and s.signals.shape[1] + 2500 >= n, timeout=60)
            assert done, "the stream's tail was not flushed after it fell silent"
            got = lis.streams[("bed1", "p1")]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{cfg['health']['metrics_port']}/metrics").read()
        assert b"panorama_chunks_in" in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "SIGTERM drains and exits 0"
        assert tap.wait(lambda: tap.payloads("_daemon/test/status")[-1] == b"offline")
        cal = json.loads(tap.payloads("bed1/p1/calibration")[-1])
        said = proc.stdout.read()
        assert "calibration warmed up in" in said  # before the patient's fit, same result
        assert re.search(r"model \S+nefnet_v2_stage1.safetensors \(sha256 [0-9a-f]{12}…, stage 1\) on onnxruntime\n", said)
    assert got.views == VIEWS and got.stats.gaps == 0
    out = tmp_path / "offline"
    r = panorama("synthesize", record_500hz, "--inputs", ",".join(stream.leads), "--views", ",".join(VIEWS),
            "--calibrate", "5", "--out", out)
    assert r.returncode == 0, r.stderr
    ref = wfdb.rdrecord(str(out / record_500hz.name)).p_signal.T
    assert got.signals.shape == (len(VIEWS), ref.shape[1] - 2500)
    err_uv = (got.signals - ref[:, 2500:]) * 1000
    rms = float(np.sqrt(np.mean(err_uv ** 2)))
    print(f"streamed vs offline synthesize: RMS {rms:.3f} µV, max {np.abs(err_uv).max():.3f} µV "
          f"over {err_uv.size} samples")  # shown with pytest -s
    assert rms < 1.0
    assert cal["state"] == "streaming" and set(cal["offsets_deg"]) == set(stream.leads) and cal["swap"] is None
    assert cal["axes"] == ["theta", "phi"]  # every recorded lead is an input: both angles move
    few_chest = sum(n.startswith("V") for n in stream.leads) < MONITOR_MIN_CHEST
    assert cal["prior_weight"] == (FEW_CHEST if few_chest else EVERY_LEAD).prior_weight


def test_bad_input_is_refused_and_harms_no_other_stream(mosquitto, prefix, tmp_path):
    good = sim_streams(1, seconds=8.0, monitor_id="good")
    stop = threading.Event()
    topics = Topics(prefix)
    ok = protocol.Chunk(0, time.time_ns(), 500.0, ["I", "II"], np.zeros((2, 125), np.float32))
    wire = protocol.encode(ok, "float32")
    nan = bytearray(wire)
    nan[-4:] = np.array([np.nan], "<f4").tobytes()
    version = bytearray(wire)
    version[4] = 9
    cases = {
        "bad_magic": b"not an ecg chunk at all, " * 4,
        "truncated": wire[:30],
        "version": bytes(version),
        "non_finite": bytes(nan),
        "bad_fs": protocol.encode(protocol.Chunk(0, 0, 250.0, ["I"], np.zeros((1, 125), np.float32))),
        "unknown_lead": protocol.encode(protocol.Chunk(0, 0, 500.0, ["XYZ"], np.zeros((1, 125), np.float32))),
        "too_large": b"ECGP" + bytes(300_000),
        "bad_json": b"{ not json",
    }
    with serve(tmp_path, mosquitto, prefix, calibration={"seconds": 0}) as (proc, tap, cfg):
        with Listener(mosquitto, topic=f"{prefix}/good/+/virtual") as lis:
            feeder = threading.Thread(target=run_monitor, args=(good, mosquitto),
                                      kwargs={"prefix": prefix, "speed": 2.0, "stop_event": stop})
            feeder.start()
            pub = make_client(client_id("bad"), "5")
            connect(pub, mosquitto)
            for i, (code, payload) in enumerate(cases.items()):
                pub.publish(topics.raw("bad", f"p{i}"), payload, qos=1).wait_for_publish(5)
            pub.publish(topics.views("bad", "p0"), b'{"views": ["V99"]}', qos=1).wait_for_publish(5)
            t0, beat = time.time_ns(), np.sin(np.linspace(0, 2 * np.pi, 125, endpoint=False, dtype=np.float32))
            for k in range(8):  # raw samples of a DC-coupled amplifier: lead I 300 mV from zero
                dc = protocol.Chunk(k, t0 + k * 250_000_000, 500.0, ["I", "II", "V1"],
                                    np.stack([beat + 300.0, 0.8 * beat, -beat]))
                pub.publish(topics.raw("bad", "dc"), protocol.encode(dc, "float32"), qos=1).wait_for_publish(5)
            feeder.join(30)
            pub.loop_stop()
            pub.disconnect()
            errors = lambda: {json.loads(p)["code"] for p in tap.payloads("_daemon/test/errors")}
            assert tap.wait(lambda: set(cases) | {"bad_views", "dc_offset"} <= errors(), timeout=20), errors()
            (dc,) = [d for d in map(json.loads, tap.payloads("_daemon/test/errors")) if d["code"] == "dc_offset"]
            assert dc["patient"] == "dc" and dc["reason"].startswith("lead I sits +300 mV from zero")
            assert tap.wait(lambda: ("good", "sim-000") in lis.streams
                            and lis.streams[("good", "sim-000")].signals.shape[1] >= 3500, timeout=30)
            got = lis.streams[("good", "sim-000")]
        assert proc.poll() is None, "the daemon survives every bad input"
        health = json.loads(tap.payloads("_daemon/test/health")[-1])
        assert sum(health["rejected"].values()) >= len(cases)
    assert got.stats.gaps == 0 and np.isfinite(got.signals).all()
    for payload in tap.payloads("_daemon/test/errors"):
        doc = json.loads(payload)
        assert doc["reason"] and doc["code"]


def test_a_flooding_monitor_cannot_lock_out_another_and_a_patient_without_signal_is_seen(mosquitto, prefix,
                                                                                        tmp_path):
    """One monitor id sends flat chunks (every electrode off) for 5 patients: it gets 3 streams
    (`max_patients_per_monitor`), the rest are refused with `capacity`, and each of its streams
    says `signal: missing` with a `no_signal` error; a patient of another monitor still streams."""
    good = sim_streams(1, seconds=6.0, monitor_id="good")
    topics = Topics(prefix)
    with serve(tmp_path, mosquitto, prefix, calibration={"seconds": 0},
               stream={"max_patients": 4, "max_patients_per_monitor": 3}) as (proc, tap, cfg):
        with Listener(mosquitto, topic=f"{prefix}/good/+/virtual") as lis:
            pub = make_client(client_id("flood"), "5")
            connect(pub, mosquitto)
            t0 = time.time_ns()
            for k in range(8):  # 2 s of flat chunks for 5 patient ids
                for p in range(5):
                    chunk = protocol.Chunk(k, t0 + k * 250_000_000, 500.0, ["I", "II", "V1"],
                                           np.zeros((3, 125), np.float32))
                    pub.publish(topics.raw("flood", f"p{p}"), protocol.encode(chunk, "float32"), qos=1)
            pub.loop_stop()
            pub.disconnect()
            run_monitor(good, mosquitto, prefix=prefix, speed=4.0)
            assert tap.wait(lambda: ("good", "sim-000") in lis.streams
                            and lis.streams[("good", "sim-000")].signals.shape[1] >= 2500, timeout=30)
            errors = lambda: [json.loads(p) for p in tap.payloads("_daemon/test/errors")]
            assert tap.wait(lambda: len({e["patient"] for e in errors() if e["code"] == "no_signal"}) == 3, timeout=20)
        status = {p: [json.loads(d) for d in tap.payloads(f"flood/{p}/status")] for p in ("p0", "p1", "p2")}
    refused = [e for e in errors() if e["code"] == "capacity"]
    assert refused and {e["patient"] for e in refused} == {"p3", "p4"}
    assert all("monitor 'flood' already streams 3 patients" in e["reason"] for e in refused)
    for p in ("p3", "p4"):  # never taken: their status says refused, once, and nothing else
        said = [json.loads(d) for d in tap.payloads(f"flood/{p}/status")]
        assert [d["state"] for d in said] == ["refused"] and "already streams 3 patients" in said[0]["reason"]
    for docs in status.values():  # said when the signal went, and still so when the stream ends
        said = [d for d in docs if "no usable lead" in d.get("reason", "")]
        assert len(said) == 1 and said[0]["signal"] == "missing" and said[0]["counts"]["missing_windows"] > 0
        last = docs[-1]
        assert last["signal"] == "missing" and last["counts"]["missing_windows"] >= said[0]["counts"]["missing_windows"]
    got = lis.streams[("good", "sim-000")]
    assert np.isfinite(got.signals).all() and got.stats.gaps == 0


def test_swapped_electrodes_are_named_and_harm_no_other_stream(mosquitto, prefix, tmp_path):
    """A patient whose V1 and V5 electrodes are swapped keeps the table angles, and the retained
    calibration names the swap; the patient beside is fitted as usual, and both stream."""
    good, bad = sim_streams(2, seconds=7.0)
    i, j = bad.leads.index("V1"), bad.leads.index("V5")
    bad.signals[[i, j]] = bad.signals[[j, i]]
    with serve(tmp_path, mosquitto, prefix) as (proc, tap, cfg):
        with Listener(mosquitto, topic=f"{prefix}/+/+/virtual") as lis:
            run_monitor([good, bad], mosquitto, prefix=prefix, speed=4.0)
            assert tap.wait(lambda: all(tap.payloads(f"bed/{s.patient_id}/calibration") for s in (good, bad))
                            and len(lis.streams) == 2, timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log = proc.stdout.read()
    cal = {s.patient_id: json.loads(tap.payloads(f"bed/{s.patient_id}/calibration")[-1]) for s in (good, bad)}
    assert cal["sim-000"]["accepted"] and cal["sim-000"]["swap"] is None
    assert not cal["sim-001"]["accepted"] and cal["sim-001"]["swap"] == "V1 and V5 swapped"
    assert cal["sim-001"]["swap_fitted_on"] is False
    assert "check the electrodes" in cal["sim-001"]["reason"] and not any(map(any, cal["sim-001"]["offsets_deg"].values()))
    assert "WARNING" in log and "V1 and V5 swapped, by the look of it" in log
    assert all(np.isfinite(s.signals).all() and s.signals.shape[1] > 0 for s in lis.streams.values())


def test_through_the_embedded_broker(prefix, tmp_path):
    from edge.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        with serve(tmp_path, broker.url, prefix, proto="3.1.1", calibration={"seconds": 2}) as (proc, tap, cfg):
            with Listener(broker.url, protocol="3.1.1", topic=f"{prefix}/+/+/virtual") as lis:
                run_monitor(sim_streams(2, seconds=4.0), broker.url, protocol="3.1.1", prefix=prefix, speed=4.0)
                assert tap.wait(lambda: len(lis.streams) == 2 and all(
                    s.signals.shape[1] >= 1000 for s in lis.streams.values()), timeout=60)
                cal = [json.loads(p) for p in tap.payloads("/calibration")]
    assert len(cal) == 2 and all(c["state"] == "streaming" for c in cal)


def test_a_broker_outage_longer_than_the_idle_timeout_does_not_end_the_stream(tmp_path):
    """The broker is down 2.5 s, longer than idle_timeout_s (1.5 s): the daemon's silence is its
    own link's, so the patient keeps its stream and its calibration (one fit, one end)."""
    import shutil

    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")

    def broker():
        return subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    url, prefix = f"mqtt://127.0.0.1:{port}", f"test/{uuid.uuid4().hex[:8]}"
    first = broker()
    assert wait(lambda: listening("127.0.0.1", port), 10)
    try:
        with serve(tmp_path, url, prefix, proto="3.1.1") as (proc, tap, cfg):
            stop = threading.Event()
            sender = threading.Thread(target=run_monitor, args=(sim_streams(1, seconds=11.0), url),
                                      kwargs={"protocol": "3.1.1", "prefix": prefix, "stop_event": stop}, daemon=True)
            sender.start()
            time.sleep(6.0)  # calibrated after 5 s
            first.terminate()
            first.wait(10)
            time.sleep(2.5)
            second = broker()
            sender.join(60)
            time.sleep(2.5)  # silent past the idle timeout once the link is back: ended once
        log = proc.communicate(timeout=30)[0]
    finally:
        for b in (first, locals().get("second")):
            if b is not None and b.poll() is None:
                b.terminate()
                b.wait(10)
    assert log.count("ended (silent for 1.5 s)") == 1, log
    assert log.count("bed/sim-000: calibration") == 1, log
    assert "'gap_samples': 0," not in log  # the outage's samples are counted as a gap of the one stream


def test_a_second_daemon_with_the_same_id_yields_to_the_first(mosquitto, prefix, tmp_path):
    """panorama serve run by hand beside its unit: the newcomer stops at once, exit 3, naming
    the other, and leaves the shared status topic saying online; the first serves on. A
    retained report on their health topic (forged: no daemon retains it) moves neither."""
    forger = make_client(client_id("forger"), "5")
    connect(forger, mosquitto)
    health = f"{prefix}/_daemon/test/health"
    forger.publish(health, json.dumps({"instance": "forged", "started": 0, "serving": True}), qos=1,
                   retain=True).wait_for_publish(5)
    try:
        _two_daemons_one_id(mosquitto, prefix, tmp_path)
    finally:
        forger.publish(health, b"", qos=1, retain=True).wait_for_publish(5)
        forger.loop_stop()
        forger.disconnect()


def _two_daemons_one_id(mosquitto, prefix, tmp_path):
    with serve(tmp_path, mosquitto, prefix, calibration={"seconds": 0}) as (proc, tap, cfg):
        stop = threading.Event()  # a patient streams all along: the newcomer must not touch it
        sender = threading.Thread(target=run_monitor, args=(sim_streams(1, seconds=60.0), mosquitto),
                                  kwargs={"prefix": prefix, "stop_event": stop}, daemon=True)
        sender.start()
        assert tap.wait(lambda: tap.payloads("bed/sim-000/virtual"), 30)
        asker = make_client(client_id("asker"), "5")  # a views request mid-stream: the status says it
        connect(asker, mosquitto)
        asker.publish(f"{prefix}/bed/sim-000/views", json.dumps({"views": ["V8"]}), qos=1).wait_for_publish(5)
        asker.loop_stop()
        asker.disconnect()
        changed = lambda: [d for d in map(json.loads, tap.payloads("bed/sim-000/status"))  # noqa: E731
                           if d.get("reason") == "views changed"]
        assert tap.wait(changed, 10) and changed()[0]["views"] == ["V8"]
        again = tmp_path / "again.yaml"
        again.write_text(yaml.safe_dump({**cfg, "health": {"interval_s": 30.0, "metrics_port": 0}}))
        second = subprocess.run([sys.executable, "-m", "panorama_cli", "serve", "--config", str(again)], cwd=REPO,
                                capture_output=True, text=True, timeout=90)
        from edge.twins import EXIT_TWIN

        assert second.returncode == EXIT_TWIN == 3, second.stderr
        assert "another daemon with id 'test'" in second.stderr and "already serves this broker" in second.stderr
        assert "stopped: 0 chunks in, 0 virtual chunks out" in second.stderr  # it took nothing
        statuses = [json.loads(p) for p in tap.payloads("bed/sim-000/status")]
        assert sum(d["leads"] == [] for d in statuses) == 1, statuses  # one stream made, by the first daemon
        stop.set()
        sender.join(30)
        assert proc.poll() is None  # the first serves on
        said = []
        clean = make_client(client_id("tap"), "5")  # the retained status a dashboard opened now gets
        clean.on_message = lambda c, u, m: said.append(bytes(m.payload))
        connect(clean, mosquitto)
        clean.subscribe(f"{prefix}/_daemon/test/status", qos=1)
        assert wait(lambda: said, 5) and said[-1] == b"online"
        clean.loop_stop()
        clean.disconnect()
    log = proc.communicate(timeout=30)[0]
    assert "another daemon with id 'test' started" in log
