"""``panorama serve``: the streaming daemon's command (the daemon is ``edge/daemon.py``;
what it speaks, ``docs/wire-protocol.md``)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path

from panorama import checkpoint
from panorama.errors import CheckpointError
from panorama.synth import default_checkpoint

from . import mqtt as mq
from .config import check_devices, load_config, with_overrides
from .daemon import Daemon
from .twins import EXIT_TWIN

log = logging.getLogger("panorama.serve")


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the streaming daemon (MQTT in, virtual leads out)",
                       description="Ingest lead samples over MQTT, calibrate each patient on their first "
                       "seconds, and publish synthesised views continuously. See docs/wire-protocol.md.")
    p.add_argument("--config", type=Path, help="edge YAML config (default: every default)")
    p.add_argument("--broker", help="override mqtt.broker, e.g. mqtt://127.0.0.1:1883 or mqtts://HOST:8883")
    p.add_argument("--protocol", choices=("5", "3.1.1"), help="override mqtt.protocol")
    p.add_argument("--validate-config", action="store_true", help="check the config and exit")
    mq.add_security_args(p)  # each overrides the mqtt key of the same name
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = load_config(args.config)
    given = {"broker": args.broker, "protocol": args.protocol, **mq.security_from_args(args)}
    cfg = with_overrides(cfg, "mqtt", {k: v for k, v in given.items() if v is not None})
    path = Path(cfg.model.path) if cfg.model.path else None
    if path is not None and not path.exists() and path.parent.name == "current":
        raise CheckpointError(f"no checkpoint at {path}: it goes through a fleet store's current link, which the "
                              "fleet agent makes on its first start (panorama fleet agent --config FILE, whose "
                              "store is that folder; the daemon's unit starts after it)")
    if args.validate_config:
        checkpoint.read_header(cfg.model.path or default_checkpoint())  # the model must be one this code reads
        check_devices(cfg)
        print(f"{args.config or 'defaults'}: valid")
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    daemon = Daemon(cfg)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    daemon.start()
    log.info("serving %s as %s (backend %s); Ctrl-C or SIGTERM drains and exits",
             cfg.mqtt.broker, cfg.mqtt.daemon_id, cfg.model.backend)
    while not stop.wait(0.5) and not daemon.twins.yielded.is_set():
        pass
    daemon.stop()
    if daemon.twins.yielded.is_set():  # a daemon that had served exits as failed: restarted, it yields for good
        print(f"panorama serve: {daemon.twins.why}", file=sys.stderr)
        return 1 if daemon.twins.had_served else EXIT_TWIN
    return 0
