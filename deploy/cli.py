"""``panorama fleet ...``: fleet device-calibration updates, operator and device side.

Operator: ``keygen`` once, then per update ``pack`` (sign a checkpoint's manifest),
``publish`` (to the broker the devices listen on) and ``status`` (what every device says).
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

from panorama.errors import UpdateError

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

    pk = fleet.add_parser("pack", help="sign a checkpoint as an update for a group of devices")
    pk.add_argument("model", type=Path, help="the checkpoint (e.g. runs/stage2_ludb/best.safetensors)")
    pk.add_argument("--key", type=Path, required=True, help="the operator's private key (fleet.key)")
    pk.add_argument("--version", type=int, required=True, help="update version; must exceed every earlier one")
    pk.add_argument("--group", required=True, help="the rollout group (the devices' agent group)")
    pk.add_argument("--device-model", action="append", required=True, dest="device_models",
                    help="a device model the update is for (repeat for several)")
    pk.add_argument("--expires-days", type=float, default=30.0, help="devices refuse it after this (default 30)")
    pk.add_argument("--notes", default="", help="free text carried in the manifest")
    pk.add_argument("--out", type=Path, required=True, help="folder for manifest.json and model.safetensors")
    pk.set_defaults(func=_pack)

    pb = fleet.add_parser("publish", help="publish a packed update (retained) for its group")
    pb.add_argument("package", type=Path, help="a folder written by `panorama fleet pack`")
    _broker_args(pb)
    pb.set_defaults(func=_publish)

    st = fleet.add_parser("status", help="print what every device last said about its updates")
    _broker_args(st)
    st.add_argument("--wait", type=float, default=2.0, help="seconds to collect retained states (default 2)")
    st.set_defaults(func=_status)

    ag = fleet.add_parser("agent", help="run the device's update agent")
    ag.add_argument("--config", type=Path, required=True, help="agent YAML (deploy/fleet.yaml)")
    ag.add_argument("--validate-config", action="store_true", help="check the config and exit")
    ag.set_defaults(func=_agent)


def _broker_args(p) -> None:
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="default mqtt://127.0.0.1:1883")
    p.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    p.add_argument("--prefix", default="panorama/fleet", help="root of the fleet topics (default panorama/fleet)")


def _keygen(args) -> int:
    from .manifest import generate_keys

    private, public = generate_keys(args.out)
    print(f"private key {private} (keep it off the devices), public key {public} (install on every device)")
    return 0


def _pack(args) -> int:
    from .manifest import ARTIFACT_NAME, build, sign

    if args.out.exists() and any(args.out.iterdir()):
        raise UpdateError(f"{args.out} is not empty: pack into a new folder")
    manifest = build(args.model, args.version, args.group, args.device_models, args.expires_days, args.notes)
    envelope = sign(manifest, args.key)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.model, args.out / ARTIFACT_NAME)
    (args.out / "manifest.json").write_bytes(envelope)
    art = manifest["artifact"]
    print(f"{args.out}: version {args.version} for group {args.group} ({', '.join(manifest['target']['device_models'])}), "
          f"{art['size']} bytes, sha256 {art['sha256'][:16]}…, expires {manifest['expires']}")
    return 0


def _read_package(folder: Path) -> tuple[bytes, dict, bytes]:
    from panorama.files import file_sha256

    from .manifest import ARTIFACT_NAME

    try:
        envelope = (folder / "manifest.json").read_bytes()
        manifest = json.loads(envelope)["manifest"]
        art = manifest["artifact"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UpdateError(f"{folder} is not a package from `panorama fleet pack`: {exc}") from None
    if file_sha256(folder / ARTIFACT_NAME) != art["sha256"]:
        raise UpdateError(f"{folder / ARTIFACT_NAME} is not the file its manifest signed (sha256 differs)")
    return envelope, manifest, (folder / ARTIFACT_NAME).read_bytes()


def _publish(args) -> int:
    from edge import mqtt as mq

    from .agent import FleetTopics

    envelope, manifest, data = _read_package(args.package)
    topics = FleetTopics(args.prefix)
    client = mq.make_client(mq.client_id("fleet-publish"), args.protocol)
    mq.connect(client, args.broker)
    try:  # the artifact first: a device that sees the manifest finds its bytes already there
        for topic, payload in ((topics.artifact(manifest["artifact"]["sha256"]), data),
                               (topics.manifest(manifest["target"]["group"]), envelope)):
            info = client.publish(topic, payload, qos=1, retain=True)
            info.wait_for_publish(30)
            if not info.is_published():
                raise UpdateError(f"the broker did not acknowledge {topic} ({len(payload)} bytes) within 30 s: "
                                  "is its message_size_limit smaller?")
    finally:
        client.loop_stop()
        client.disconnect()
    print(f"published version {manifest['version']} for group {manifest['target']['group']} "
          f"({len(data)} bytes) on {args.broker}")
    return 0


def _status(args) -> int:
    from edge import mqtt as mq

    states: dict[str, dict] = {}
    client = mq.make_client(mq.client_id("fleet-status"), args.protocol)

    def on_message(c, u, msg):
        try:
            doc = json.loads(msg.payload)
            states[doc["device"]] = doc
        except (ValueError, KeyError, TypeError):
            pass

    client.on_message = on_message
    mq.connect(client, args.broker)
    client.subscribe(f"{args.prefix}/devices/+/state", qos=1)
    time.sleep(args.wait)
    client.loop_stop()
    client.disconnect()
    if not states:
        print("no device has reported")
        return 0
    print(f"{'device':24} {'state':12} {'version':>7} {'installed':>9}  reason")
    for dev in sorted(states):
        d = states[dev]
        print(f"{dev:24} {d.get('state', '?'):12} {str(d.get('version')):>7} {str(d.get('installed')):>9}  "
              f"{d.get('reason', '')}")
    return 0


def _agent(args) -> int:
    from .agent import Agent, load_agent_config

    cfg = load_agent_config(args.config)
    if args.validate_config:
        from .manifest import _load_key

        _load_key(cfg.public_key, private=False)
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
    agent.stop()
    return 0
