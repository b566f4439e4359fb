"""``panorama fleet ...``: fleet device-calibration updates, operator and device side.

Operator: ``keygen`` once, then per update ``pack`` (sign a checkpoint's manifest),
``rollout`` (wave by wave, stopping when devices fail it; deploy/rollout.py) or ``publish``
(every group at once), and ``status`` (what every device says).
Device: ``agent`` beside ``panorama serve`` (deploy/agent.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from pathlib import Path

from edge import mqtt as mq
from panorama.errors import UpdateError

from .topics import CHUNK_BYTES, MIN_CHUNK_BYTES

log = logging.getLogger("panorama.fleet")


def register(sub) -> None:
    p = sub.add_parser("fleet", help="fleet device-calibration updates: keys, signed packages, the device agent",
                       description="Sign a checkpoint for a group of devices, publish it over MQTT, and run the "
                       "agent that verifies, installs and, if the daemon does not stay healthy, rolls it back. "
                       "See deploy/README.md.")
    fleet = p.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)

    k = fleet.add_parser("keygen", help="make the operator's Ed25519 key pair")
    k.add_argument("--out", type=Path, required=True, help="folder for fleet.key (private) and fleet.pub")
    k.set_defaults(func=_keygen)

    pk = fleet.add_parser("pack", help="sign a checkpoint as an update for groups of devices")
    pk.add_argument("model", type=Path, help="the checkpoint (e.g. runs/stage2_ludb/best.safetensors)")
    pk.add_argument("--key", type=Path, required=True, help="the operator's private key (fleet.key)")
    pk.add_argument("--version", type=int, required=True, help="update version; must exceed every earlier one")
    pk.add_argument("--group", action="append", required=True, dest="groups",
                    help="a group the update is for (the agents' group; repeat for several, e.g. a canary group)")
    pk.add_argument("--device-model", action="append", required=True, dest="device_models",
                    help="a device model the update is for (repeat for several)")
    pk.add_argument("--expires-days", type=float, default=30.0, help="devices refuse it after this (default 30)")
    pk.add_argument("--notes", default="", help="free text carried in the manifest")
    pk.add_argument("--chunk-kb", type=int, default=CHUNK_BYTES >> 10,
                    help=f"send the model in retained messages of at most this many KiB, each hash signed "
                    f"(default {CHUNK_BYTES >> 10}: fits brokers that cap a message, AWS IoT Core at 128 KB; "
                    f"at least {MIN_CHUNK_BYTES >> 10}; 0: the whole file in one message)")
    pk.add_argument("--out", type=Path, required=True, help="folder for manifest.json and model.safetensors")
    pk.set_defaults(func=_pack)

    pb = fleet.add_parser("publish", help="publish a packed update (retained) for its groups at once")
    pb.add_argument("package", type=Path, help="a folder written by `panorama fleet pack`")
    pb.add_argument("--group", action="append", dest="groups", help="only these of its groups (repeat)")
    pb.add_argument("--public-key", type=Path, help="check the package's signature with fleet.pub first")
    _broker_args(pb)
    pb.set_defaults(func=_publish)

    ro = fleet.add_parser("rollout", help="publish a packed update wave by wave, stopping when devices fail it")
    ro.add_argument("package", type=Path, help="a folder written by `panorama fleet pack`")
    ro.add_argument("--wave", action="append", required=True, dest="waves",
                    help="groups of one wave, comma-separated (repeat, in order: --wave canary --wave ward-1,ward-2)")
    ro.add_argument("--public-key", type=Path, help="check the package's signature with fleet.pub first")
    ro.add_argument("--max-failed", type=int, default=0, help="FAILED devices a wave may have (default 0)")
    ro.add_argument("--min-devices", type=int, default=1, help="verdicts a wave needs at least (default 1)")
    ro.add_argument("--timeout", type=float, default=1800.0,
                    help="seconds a wave may take (default 1800: a TensorRT build on a Jetson takes minutes)")
    _broker_args(ro)
    ro.set_defaults(func=_rollout)

    st = fleet.add_parser("status", help="print what every device last said about its updates")
    _broker_args(st)
    st.add_argument("--wait", type=float, default=2.0, help="seconds to collect retained states (default 2)")
    st.set_defaults(func=_status)

    fg = fleet.add_parser("forget", help="clear retained messages: a retired device's state, a group's manifest, "
                          "an old model file")
    fg.add_argument("--device", action="append", default=[], dest="devices",
                    help="a retired device: rollouts stop waiting for it (repeat)")
    fg.add_argument("--manifest", action="append", default=[], dest="manifests", metavar="GROUP",
                    help="withdraw a group's retained manifest (a rollout stopped at its canary, a version devices "
                    "refused): devices that join the group later no longer get it (repeat)")
    fg.add_argument("--artifact", action="append", default=[], dest="artifacts",
                    help="the sha256 of a model file no manifest names any more (repeat); refused while a retained "
                    "manifest still names it, which devices coming back later would fail on, unless --force")
    fg.add_argument("--force", action="store_true", help="clear an --artifact even while a manifest names it")
    _broker_args(fg)
    fg.set_defaults(func=_forget)

    ag = fleet.add_parser("agent", help="run the device's update agent")
    ag.add_argument("--config", type=Path, required=True, help="agent YAML (deploy/fleet.yaml)")
    ag.add_argument("--validate-config", action="store_true", help="check the config and exit")
    ag.set_defaults(func=_agent)


def _broker_args(p) -> None:
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883",
                   help="mqtt:// or mqtts:// for TLS (default mqtt://127.0.0.1:1883)")
    p.add_argument("--protocol", choices=("5", "3.1.1"), default="5",
                   help="MQTT version (default 5; 3.1.1 for brokers without it, such as the embedded amqtt one)")
    p.add_argument("--prefix", default="panorama/fleet", help="root of the fleet topics (default panorama/fleet)")
    mq.add_security_args(p)


def _broker(args) -> "mq.Broker":
    return mq.Broker(args.broker, **mq.security_from_args(args))


def _keygen(args) -> int:
    from .manifest import generate_keys, trusted_keys

    private, public = generate_keys(args.out)
    (kid,) = trusted_keys(public)
    print(f"private key {private} (keep it off the devices), public key {public} (install on every device), "
          f"key id {kid}")
    return 0


def _pack(args) -> int:
    from .manifest import ARTIFACT_NAME, build, chunk_plan, sign

    if args.out.exists() and any(args.out.iterdir()):
        raise UpdateError(f"{args.out} is not empty: pack into a new folder")
    if args.chunk_kb != 0 and not args.chunk_kb >= MIN_CHUNK_BYTES >> 10:
        raise ValueError(f"--chunk-kb must be 0 (one message) or at least {MIN_CHUNK_BYTES >> 10}, got {args.chunk_kb}")
    manifest = build(args.model, args.version, args.groups, args.device_models, args.expires_days, args.notes,
                     chunk_bytes=args.chunk_kb * 1024)
    envelope = sign(manifest, args.key)
    from .agent import MAX_MANIFEST_BYTES

    if len(envelope) > MAX_MANIFEST_BYTES:  # a device would ignore it
        raise UpdateError(f"the signed manifest is {len(envelope)} bytes, more than a device takes "
                          f"({MAX_MANIFEST_BYTES}): a larger --chunk-kb lists fewer chunk hashes")
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.model, args.out / ARTIFACT_NAME)
    (args.out / "manifest.json").write_bytes(envelope)
    art = manifest["artifact"]
    model = f"stage {art['stage']}" + (f" calibrated for recording device {art['calibrated_for']}"
                                       if art["calibrated_for"] else "") \
        + (f", validation {art['validation_psnr_db']:.2f} dB" if art["validation_psnr_db"] is not None else "")
    print(f"{args.out}: version {args.version} for groups {', '.join(manifest['target']['groups'])} "
          f"({', '.join(manifest['target']['device_models'])}), {model}, "
          f"{art['size']} bytes in {len(chunk_plan(art))} message(s), sha256 {art['sha256'][:16]}…, "
          f"expires {manifest['expires']}")
    return 0


def _publish(args) -> int:
    from .manifest import chunk_plan
    from .rollout import Fleet, read_package

    envelope, manifest, data = read_package(args.package, args.public_key)
    groups = args.groups or manifest["target"]["groups"]
    unknown = sorted(set(groups) - set(manifest["target"]["groups"]))
    if unknown:
        raise UpdateError(f"groups {unknown} are not among the update's {manifest['target']['groups']}")
    fleet = Fleet(_broker(args), args.prefix, args.protocol)
    try:
        from .rollout import warn_stale

        fleet.settle()  # the devices' retained states: a version they have passed is said before it goes out
        warn_stale(fleet.snapshot(), manifest["version"], groups)
        fleet.publish_update(envelope, manifest, data, groups)
    finally:
        fleet.close()
    n = len(chunk_plan(manifest["artifact"]))
    print(f"published version {manifest['version']} for {', '.join(groups)} ({len(data)} bytes in {n} message(s) "
          f"and the manifest) on {args.broker}")
    return 0


def _model_said(model) -> str:
    """An agent's ``model`` block as a column: ``stage 2 · ludb`` (stage, calibrated for)."""
    if not isinstance(model, dict) or model.get("stage") is None:
        return ""
    return f"stage {model['stage']}" + (f" · {model['calibrated_for']}" if model.get("calibrated_for") else "")


def _printable(text) -> str:
    """What a device wrote, safe for a terminal: control characters (a carriage return or an
    escape sequence could redraw another row) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _print_states(states: dict[str, dict]) -> None:
    print(f"{'device':24} {'group':12} {'state':12} {'version':>7} {'installed':>9} {'model':16} {'at (UTC)':20}  "
          "reason")
    for dev in sorted(states):
        d = {k: "" if v is None else _printable(v) for k, v in states[dev].items()}  # as written by anyone: text only
        claimed = states[dev].get("claimed")
        if not d.get("version") and isinstance(claimed, dict) and claimed.get("version") is not None:
            d["version"] = f"{claimed['version']}?"  # a refused manifest's claim, unverified
        print(f"{_printable(dev):24} {d.get('group', ''):12} {d.get('state', '?'):12} {d.get('version', ''):>7} "
              f"{d.get('installed', ''):>9} {_printable(_model_said(states[dev].get('model'))):16} "
              f"{d.get('t', ''):20}  "
              f"{d.get('reason', '')}")


def _status(args) -> int:
    from .rollout import Fleet

    fleet = Fleet(_broker(args), args.prefix, args.protocol)
    time.sleep(args.wait)  # retained states arrive within it
    states = fleet.snapshot()
    fleet.close()
    if not states:
        print("no device has reported")
    else:
        _print_states(states)
    return 0


def _rollout(args) -> int:
    from .rollout import Fleet, rollout

    waves = [[g.strip() for g in w.split(",") if g.strip()] for w in args.waves]
    fleet = Fleet(_broker(args), args.prefix, args.protocol)
    try:
        results = rollout(fleet, args.package, waves, args.max_failed, args.min_devices, args.timeout,
                          public_key=args.public_key)
    finally:
        fleet.close()
    for i, r in enumerate(results, 1):
        print(f"wave {i} ({', '.join(r.groups)}): {r.count('SUCCEEDED')} succeeded, {r.count('FAILED')} failed, "
              f"{r.count('REJECTED')} refused, {len(r.pending)} without a verdict"
              + (f"; STOPPED: {r.stopped}" if r.stopped else ""))
        for dev, v in sorted({**{d: {"state": "PENDING", "reason": ""} for d in r.pending}, **r.verdicts}.items()):
            print(f"  {dev:24} {v['state']:10} {v['reason']}")
    left = len(waves) - len(results)
    if results and results[-1].stopped:
        print(f"rollout stopped; {left} wave(s) not published" if left else "rollout stopped at its last wave")
        return 1
    print("rollout complete")
    return 0


def _forget(args) -> int:
    from .rollout import Fleet

    if not args.devices and not args.artifacts and not args.manifests:
        raise ValueError("name a --device, a --manifest or an --artifact to forget")
    fleet = Fleet(_broker(args), args.prefix, args.protocol)
    try:
        for sha in args.artifacts:
            fleet.topics.artifact(sha)  # a bad hash is refused before anything is cleared
        manifest_topics = [fleet.topics.manifest(g) for g in args.manifests]
        if args.artifacts and not args.force:
            named = {g: m for g, m in fleet.manifests().items() if m["sha256"] in args.artifacts
                     and fleet.topics.manifest(g) not in manifest_topics}
            if named:
                raise UpdateError("a retained manifest still names that model file: " + ", ".join(
                    f"group {g} (version {m['version']}, sha256 {m['sha256'][:16]}…)" for g, m in sorted(named.items()))
                    + "; a device that comes back later would fail that version for want of it. Withdraw the "
                    "manifest too (--manifest GROUP), publish a newer version there first, or --force")
        cleared = 0
        for group, topic in zip(args.manifests, manifest_topics):
            n = fleet.forget(topic)
            if not n:
                print(f"the broker holds no manifest of group {group!r} that this client may read")
            cleared += n
        for device in args.devices:
            n = fleet.forget(fleet.topics.state(device))
            if not n:
                print(f"the broker holds no state of device {device!r} that this client may read")
            cleared += n
        for sha in args.artifacts:
            n = fleet.forget(fleet.topics.artifact_all(sha))  # the whole file and every chunk, however cut
            if not n:
                print(f"the broker holds no message of artifact {sha[:16]}… that this client may read")
            cleared += n
    finally:
        fleet.close()
    print(f"cleared {cleared} retained message(s) on {args.broker}")
    return 0


def _agent(args) -> int:
    from .agent import Agent
    from .agent_config import load_agent_config

    cfg = load_agent_config(args.config)
    if args.validate_config:  # load_agent_config checked the key, topics, store and factory model too
        print(f"{args.config}: valid")
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    agent = Agent(cfg).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("fleet agent for %s (group %s, model %s) on %s; store %s", cfg.device_id, cfg.group,
             cfg.device_model, cfg.broker, cfg.store)
    while not stop.wait(0.5):
        pass
    log.info("stopping (version %s current)", agent.store.current_version())
    agent.stop()
    log.info("stopped")
    return 0
