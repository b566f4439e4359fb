"""``panorama bench stream``: how many patients the daemon sustains in real time.

The daemon runs as its own process (``panorama serve``), as deployed, so its memory is its
own; this process plays the monitors (simulated patients, 12 leads at 500 Hz in 250 ms
chunks, in real time) and the listener, through a real broker (Mosquitto by default).

Measured after warm-up (every patient calibrated and streaming, the backlog gathered while
they waited for calibration worked off, then 10 s more):
- end-to-end latency: monitor publish of the raw chunk that completed a virtual chunk →
  that virtual chunk received by the listener, p50/p99;
- delivery: virtual samples received / expected for the measured period;
- the daemon's resident memory, sampled every 2 s: growth from the first to the last third.
A run is "sustained" when p99 ≤ 300 ms + the chunk duration, delivery ≥ 99 % and memory
growth ≤ 5 %.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import yaml

from panorama.records import MODEL_FS

CHUNK_MS = 250.0
WARM_EXTRA_S = 10.0
WARM_MAX_S = 600.0


def add_arguments(p) -> None:
    g = p.add_argument_group("stream")
    g.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="stream: MQTT broker (default Mosquitto on loopback)")
    g.add_argument("--seconds", type=float, default=300.0, help="stream: measured seconds after warm-up (default 300)")
    g.add_argument("--backend", default="onnxruntime", choices=("torch", "onnxruntime"),
                   help="stream: the daemon's inference backend (default onnxruntime, the fastest on CPU)")
    g.add_argument("--ramp", default=None,
                   help="stream: comma-separated patient counts to try in turn (e.g. 16,32,48,64); "
                        "reports the largest sustained")


def run_stream(args) -> dict:
    counts = [int(n) for n in args.ramp.split(",")] if args.ramp else [args.patients]
    results, best = [], 0
    for n in counts:
        res = bench_stream(n, args.broker, args.seconds, args.backend, args.threads)
        results.append(res)
        print(json.dumps(res, indent=2))
        if res["sustained"]:
            best = max(best, n)
        elif args.ramp:
            break
    return {"largest_sustained_patients": best, "runs": results}


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def bench_stream(patients: int, broker: str, seconds: float, backend: str, threads: int) -> dict:
    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    cfg = {"mqtt": {"broker": broker, "prefix": prefix, "daemon_id": "bench",
                    "protocol": "5" if "1883" in broker else "3.1.1"},
           "model": {"backend": backend, "threads": threads},
           "stream": {"max_patients": max(64, patients), "max_patients_per_monitor": max(64, patients),
                      "idle_timeout_s": 5.0},  # every simulated patient comes from one monitor id
           "health": {"interval_s": 2.0}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "edge.yaml"
        path.write_text(yaml.safe_dump(cfg))
        daemon = subprocess.Popen([sys.executable, "-m", "panorama_cli", "serve", "--config", str(path)],
                                  stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / "serve.log", "w"))
        try:
            return _drive(daemon, patients, broker, cfg, seconds, prefix)
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(60)
                except subprocess.TimeoutExpired:
                    daemon.kill()
            from .demo import leave_nothing

            leave_nothing(broker, cfg["mqtt"]["protocol"], prefix)


def _drive(daemon, patients, broker, cfg, seconds, prefix) -> dict:
    from .monitor import run_monitor
    from .sources import sim_streams
    from .mqtt import client_id, connect, make_client

    proto = cfg["mqtt"]["protocol"]
    states: dict[str, str] = {}
    tap = make_client(client_id("bench-tap"), proto)
    def on_status(c, u, m):
        if m.payload and "/_daemon/" not in m.topic:  # the daemon's own status matches +/+/status too
            states[m.topic] = json.loads(m.payload).get("state", "?")

    tap.on_message = on_status
    tap.on_connect = lambda c, u, f, rc, p=None: c.subscribe(f"{prefix}/+/+/status", qos=1)
    online = threading.Event()
    watcher = make_client(client_id("bench-watch"), proto)
    watcher.on_message = lambda c, u, m: online.set() if m.payload == b"online" else None
    watcher.on_connect = lambda c, u, f, rc, p=None: c.subscribe(f"{prefix}/_daemon/bench/status", qos=1)
    connect(tap, broker)
    connect(watcher, broker)
    if not online.wait(120):
        raise RuntimeError("the daemon did not come online within 120 s")
    streams = sim_streams(patients, seed=100, seconds=60.0)
    listener = _Tally(broker, proto, f"{prefix}/+/+/virtual")
    stop = threading.Event()
    feeder = threading.Thread(target=run_monitor, args=(streams, broker),
                              kwargs={"protocol": proto, "prefix": prefix, "chunk_ms": CHUNK_MS, "loop": True,
                                      "stop_event": stop}, daemon=True)
    t_start = time.monotonic()
    feeder.start()
    # warm-up: every patient calibrated and streaming, then a little more
    while sum(s == "streaming" for s in states.values()) < patients:
        if time.monotonic() - t_start > 60 + 5 * patients:
            break
        if daemon.poll() is not None:
            raise RuntimeError("the daemon exited during warm-up")
        time.sleep(0.5)
    # ... and the backlog that built up while patients waited for calibration worked off
    while time.monotonic() - t_start < WARM_MAX_S and daemon.poll() is None:
        recent = listener.recent(3.0)
        if len(recent) >= patients and np.percentile(recent, 99) <= 300 + CHUNK_MS:
            break
        time.sleep(1.0)
    warm_s = time.monotonic() - t_start
    time.sleep(WARM_EXTRA_S)
    base, lat_mark = listener.mark()
    rss, t0 = [], time.monotonic()
    while time.monotonic() - t0 < seconds and daemon.poll() is None:
        rss.append(_rss_mb(daemon.pid))
        time.sleep(2.0)
    elapsed = time.monotonic() - t0
    got, latencies = listener.since(base, lat_mark)
    stop.set()
    feeder.join(30)
    listener.close()
    for c in (tap, watcher):
        c.loop_stop()
        c.disconnect()
    expected = patients * elapsed * MODEL_FS
    third = max(1, len(rss) // 3)
    growth = (np.nanmean(rss[-third:]) / np.nanmean(rss[:third]) - 1) * 100 if rss else float("nan")
    p99 = float(np.percentile(latencies, 99)) if latencies else float("nan")
    res = {"patients": patients, "warm_up_s": round(warm_s, 1), "measured_s": round(elapsed, 1),
           "latency_ms_p50": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
           "latency_ms_p99": round(p99, 1), "latency_budget_ms": 300 + CHUNK_MS,
           "delivered": round(got / expected, 4) if expected else None,
           "rss_mb_start": round(float(np.nanmean(rss[:third])), 1) if rss else None,
           "rss_mb_end": round(float(np.nanmean(rss[-third:])), 1) if rss else None,
           "rss_growth_pct": round(float(growth), 2), "daemon_alive": daemon.poll() is None}
    res["sustained"] = bool(p99 <= 300 + CHUNK_MS and (res["delivered"] or 0) >= 0.99 and growth <= 5.0
                            and res["daemon_alive"])
    return res


class _Tally:
    """A subscriber that keeps only counts and latencies (the listener keeps every sample,
    which a 5-minute run at scale does not need)."""

    def __init__(self, url: str, proto: str, topic: str):
        from .mqtt import client_id, connect, make_client
        from .protocol import ProtocolError, decode

        self.samples, self.latency, self.times, self.malformed = 0, [], [], 0
        self.lock = threading.Lock()

        def on_message(c, u, m):
            now = time.time_ns()
            try:
                chunk = decode(m.payload)
            except ProtocolError:
                self.malformed += 1
                return
            with self.lock:
                self.samples += chunk.n_samples
                if chunk.sent_ns:
                    self.latency.append((now - chunk.sent_ns) / 1e6)
                    self.times.append(now)

        self.client = make_client(client_id("bench-tally"), proto)
        self.client.on_message = on_message
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, qos=0)
        connect(self.client, url)

    def recent(self, seconds: float) -> list[float]:
        """Latencies of the chunks received in the last ``seconds``."""
        since = time.time_ns() - int(seconds * 1e9)
        with self.lock:
            i = len(self.times)
            while i and self.times[i - 1] >= since:
                i -= 1
            return self.latency[i:]

    def mark(self) -> tuple[int, int]:
        with self.lock:
            return self.samples, len(self.latency)

    def since(self, samples: int, n_lat: int) -> tuple[int, list[float]]:
        with self.lock:
            return self.samples - samples, self.latency[n_lat:]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
