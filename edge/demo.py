"""``panorama demo``: the main job on an embedded default, runnable on a fresh machine.

An MQTT broker (the embedded amqtt one on a free loopback port, unless ``--broker`` names
one), the streaming daemon, a few simulated bedside monitors and a listener, all in this
process, for about 30 s of real time. The simulated patients' electrodes are displaced
(σ = 10.6°, as measured by CT), and the simulator also renders the views the monitors never
send, so each patient's synthesised views are scored against the truth. Prints each
patient's calibration, quality and latency; writes the received views as WFDB records and
ECG-paper figures.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from panorama.geometry import STANDARD_12
from panorama.metrics import score_record
from panorama.records import MODEL_FS

from .mqtt import Broker, add_security_args, security_from_args

log = logging.getLogger(__name__)

DEMO_VIEWS = ["V7", "V8", "V9", "V3R", "V4R", "V5R", "120:45", "60:120"]


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="the main job: broker, daemon, simulated monitors and a listener for ~30 s",
        description="Start an MQTT broker (embedded, unless --broker), the streaming daemon, simulated "
        "bedside monitors and a listener in this process; stream for --seconds of real time; print each "
        "patient's calibration, synthesis quality against the simulator's truth and latency; write the "
        "received views (WFDB) and ECG-paper figures to --out.")
    p.add_argument("--patients", type=int, default=3, help="simulated patients (default 3)")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds of streaming (default 30)")
    p.add_argument("--broker", help="use this broker (mqtt://HOST:PORT, mqtts:// for TLS) instead of the embedded one")
    p.add_argument("--protocol", choices=("5", "3.1.1"),
                   help="MQTT version (default: 3.1.1 on the embedded broker, 5 otherwise)")
    p.add_argument("--backend", default="onnxruntime", choices=("torch", "onnxruntime"),
                   help="inference backend (default onnxruntime, the fastest on a CPU)")
    p.add_argument("--seed", type=int, default=2026, help="first simulated patient's seed")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    add_security_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from training.simulator import simulate

    from .broker import EmbeddedBroker
    from .config import EdgeConfig
    from .listen import Listener
    from .monitor import run_monitor
    from .sources import MonitorStream
    from .daemon import Daemon

    if args.patients < 1 or args.seconds < 8:
        raise ValueError("--patients must be ≥ 1 and --seconds ≥ 8 (5 s calibration, then streaming)")
    security = security_from_args(args)
    if security and args.broker is None:
        raise ValueError("the embedded broker takes anonymous plain MQTT on loopback: TLS and credential "
                         "options need --broker")
    if args.broker is not None:
        Broker(args.broker, **security)  # a bad URL or file: said before anything starts
    broker = None
    url = args.broker
    if url is None:
        broker = EmbeddedBroker().start()
        url = broker.url
        print(f"embedded MQTT broker (amqtt, MQTT 3.1.1) at {url}")
    protocol = args.protocol or ("3.1.1" if broker else "5")
    prefix = f"demo/{int(time.time())}"
    print(f"simulating {args.patients} patient{'s' if args.patients != 1 else ''}: 12 leads sent, views {', '.join(DEMO_VIEWS)} synthesised")
    sims = [simulate(args.seed + i, list(STANDARD_12) + DEMO_VIEWS, duration_s=args.seconds, device="diagnostic")
            for i in range(args.patients)]
    streams = [MonitorStream("demo-bed", f"patient-{i + 1}", list(STANDARD_12), s.signals[:12])
               for i, s in enumerate(sims)]
    cfg = EdgeConfig.model_validate({
        "mqtt": {"broker": url, "protocol": protocol, "prefix": prefix, "daemon_id": "demo", **security},
        "model": {"backend": args.backend},
        # every sample after calibration is scored, so none is skipped as stale here
        "stream": {"views": DEMO_VIEWS, "idle_timeout_s": 1.0, "max_backlog_s": 60,  # one monitor id: every patient
                   "max_patients": max(64, args.patients), "max_patients_per_monitor": max(64, args.patients)}})
    url = cfg.mqtt.endpoint()  # the broker with its TLS and credentials, for every client below
    daemon = listener = None
    try:
        daemon = Daemon(cfg).start()
        listener = Listener(url, protocol=protocol, topic=f"{prefix}/+/+/virtual").start()
        cal_msgs: dict[str, dict] = {}
        tap = _calibration_tap(url, protocol, prefix, cal_msgs)
        print(f"streaming {args.seconds:g} s in real time (calibration on the first 5 s)...")
        t0 = time.monotonic()
        run_monitor(streams, url, protocol=protocol, prefix=prefix, chunk_ms=250)
        _wait_for_tails(listener, streams, timeout=30)
        print(f"streamed in {time.monotonic() - t0:.1f} s; daemon health: "
              f"{json.dumps({k: daemon.health()[k] for k in ('chunks_in', 'chunks_out', 'latency_ms', 'inference_ms')})}")
        tap.loop_stop()
        tap.disconnect()
    finally:
        if daemon:
            daemon.stop()
        if listener:
            listener.stop(write=False)
        if broker:
            broker.stop()
        elif daemon:  # a broker of the user's, reached: the run's statuses and calibrations are not left on it
            leave_nothing(url, protocol, prefix)
    return _report(args, sims, streams, listener, cal_msgs)


def leave_nothing(url, protocol: str, prefix: str) -> None:
    """Clear the retained messages a run left under ``prefix`` on a broker that outlives it
    (each run has a prefix of its own, so they would pile up); a failure is only said."""
    from .mqtt import BrokerConnectionError, clear_retained, client_id, connect, make_client

    c = make_client(client_id("cleanup"), protocol)
    try:
        connect(c, url)
        n = clear_retained(c, f"{prefix}/#", quiet=0.3, timeout=10)
        log.info("cleared the %d retained message(s) the run left under %s/", n, prefix)
    except BrokerConnectionError as exc:  # nothing this run could have left there either, or it is down now
        log.info("the retained messages under %s/ were not cleared: %s", prefix, exc)
    except Exception as exc:
        log.warning("could not clear the retained messages under %s/ (%s): clear them with mosquitto_pub -r -n",
                    prefix, exc)
    finally:
        c.loop_stop()
        c.disconnect()


def _calibration_tap(url, protocol, prefix, into: dict):
    from .mqtt import client_id, connect, make_client

    c = make_client(client_id("demo-tap"), protocol)
    c.on_message = lambda cl, u, m: into.__setitem__(m.topic.split("/")[-2], json.loads(m.payload))
    c.on_connect = lambda cl, u, f, rc, p=None: cl.subscribe(f"{prefix}/+/+/calibration", qos=1)
    connect(c, url)
    return c


def _wait_for_tails(listener, streams, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = listener.streams
        if all((s.monitor_id, s.patient_id) in got and
               got[(s.monitor_id, s.patient_id)].signals.shape[1] + 2500 >= s.signals.shape[1] for s in streams):
            return
        time.sleep(0.2)
    log.warning("not every stream's tail arrived within %g s", timeout)


def _report(args, sims, streams, listener, cal_msgs) -> int:
    from panorama.records import write_record

    from .ecgpaper import render

    args.out.mkdir(parents=True, exist_ok=True)
    got = listener.streams
    print(f"\n{'patient':<11} {'calibration':<58} {'PSNR dB':>8} {'r':>6} {'RMSE µV':>8} "
          f"{'latency p50/p99 ms':>19}")
    failed = 0
    for sim, st in zip(sims, streams):
        key = (st.monitor_id, st.patient_id)
        cal = cal_msgs.get(st.patient_id, {})
        verdict = "none"
        if cal:
            off = np.array([d for n, d in cal["offsets_deg"].items() if n in cal.get("fitted", [])] or [[0.0, 0.0]])
            verdict = (f"{'accepted' if cal['accepted'] else 'rejected'}, median |offset| "
                       f"{np.median(np.abs(off)):.1f}°, residual {cal['residual_before_uv']}→{cal['residual_after_uv']} µV")
        if key not in got:
            print(f"{st.patient_id:<11} {verdict:<58} no virtual leads received")
            failed += 1
            continue
        a = got[key]
        start = int(5 * MODEL_FS)  # the daemon's output starts where the 5 s of calibration end
        n = a.signals.shape[1]
        truth = sim.signals[12:, start: start + n]
        ok = np.isfinite(a.signals).all(axis=0)
        sc = score_record(truth[:, ok], a.signals[:, ok], sim.signals[:12, start: start + n][:, ok], a.views)
        psnr = np.mean([v.psnr_db for v in sc.views.values()])
        r = np.median([v.r for v in sc.views.values()])
        rmse = np.median([v.rmse_uv for v in sc.views.values()])
        lat = a.stats.summary()["latency_ms"]
        print(f"{st.patient_id:<11} {verdict:<58} {psnr:8.2f} {r:6.3f} {rmse:8.0f} "
              f"{lat.get('p50', float('nan')):9.0f}/{lat.get('p99', float('nan')):<9.0f}")
        base = f"{st.monitor_id}_{st.patient_id}"
        write_record(args.out, base, np.nan_to_num(a.signals), a.views, a.fs,
                     [f"virtual leads streamed by panorama serve for {st.patient_id}"])
        render(a.signals, a.views, a.fs, args.out / f"{base}.png",
               title=f"{st.patient_id}: synthesised views (black) vs simulator truth (blue)", reference=truth)
    print("\nlatency = monitor publish of the raw chunk that completed a virtual chunk → its receipt; "
          "the output also trails the input by the model's lookahead (384 ms) and one chunk (250 ms).")
    print(f"wrote WFDB records and ECG-paper PNGs to {args.out}/")
    return 1 if failed else 0
