"""The operator's side on the broker: publish a packed update, read every device's state,
and roll an update out in waves that stop when devices fail it.

A wave is one or more of the manifest's groups. Its manifest is published, then the
rollout waits until every device known in those groups (by the group in its retained state)
has a verdict on this version — SUCCEEDED, FAILED or REJECTED — and at least
``min_devices`` have one. More than ``max_failed`` FAILED, or no device of the wave taking
the update, stops the rollout before the next wave: the groups not yet published never see
the manifest. A device that does not answer within ``timeout_s`` stops it too.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edge import mqtt as mq
from panorama.errors import UpdateError
from panorama.files import file_sha256

from .manifest import ARTIFACT_NAME, chunked, split, verify
from .topics import FleetTopics

log = logging.getLogger("panorama.fleet")
PROGRESS_S = 30.0  # while a wave waits, what it waits for is said this often
FINAL = ("SUCCEEDED", "FAILED", "REJECTED")


def read_package(folder: Path, public_key: Path | None = None) -> tuple[bytes, dict, bytes]:
    """(signed envelope, manifest, artifact bytes) of a folder from ``panorama fleet pack``;
    with ``public_key``, its signature checked as a device will check it."""
    folder = Path(folder)
    try:
        envelope = (folder / "manifest.json").read_bytes()
        manifest = json.loads(envelope)["manifest"]
        manifest["artifact"]["sha256"], manifest["target"]["groups"], manifest["version"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UpdateError(f"{folder} is not a package from `panorama fleet pack`: {exc}") from None
    try:
        same = file_sha256(folder / ARTIFACT_NAME) == manifest["artifact"]["sha256"]
    except OSError as exc:
        raise UpdateError(f"cannot read {folder / ARTIFACT_NAME}: {exc.strerror}") from None
    if not same:
        raise UpdateError(f"{folder / ARTIFACT_NAME} is not the file its manifest signed (sha256 differs)")
    if public_key is not None:
        verify(envelope, public_key)
    return envelope, manifest, (folder / ARTIFACT_NAME).read_bytes()


class Fleet:
    """One connection to the fleet's broker that keeps every device's latest state."""

    def __init__(self, broker: "str | mq.Broker", prefix: str = "panorama/fleet", protocol: str = "5"):
        self.topics = FleetTopics(prefix)
        self.states: dict[str, dict] = {}
        self._echo: dict[str, bytes | None] = {}  # topics read back after publishing, and what came back
        self._lock = threading.Lock()
        self.client = mq.make_client(mq.client_id("fleet-operator"), protocol)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.broker = mq.as_broker(broker)
        mq.connect(self.client, self.broker)

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if not reason_code.is_failure:  # every (re)connect: a clean session forgets subscriptions
            client.subscribe(self.topics.states(), qos=1)

    def _on_message(self, client, userdata, msg):
        with self._lock:
            if msg.topic in self._echo:
                self._echo[msg.topic] = bytes(msg.payload)
                return
        try:
            doc = json.loads(msg.payload)
            device = doc["device"]
            if not isinstance(device, str) or not isinstance(doc, dict):
                raise TypeError
            if msg.topic != self.topics.state(device):  # a state filed under another device's name
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return  # not a state this device's agent wrote (anyone who may publish there can write one)
        with self._lock:
            self.states[device] = doc

    def settle(self, quiet: float = 0.2) -> None:
        """Wait for the devices' retained states, which come in a burst right after connecting:
        until none has come for ``quiet`` s, at most ``SETTLE_S``."""
        end = time.monotonic() + SETTLE_S
        seen, still = -1, time.monotonic()
        while time.monotonic() < end:
            n = len(self.snapshot())
            if n != seen:
                seen, still = n, time.monotonic()
            elif n and time.monotonic() - still >= quiet:
                return
            time.sleep(0.02)

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return dict(self.states)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def publish(self, topic: str, payload: bytes, timeout: float = 30.0) -> None:
        """Publish retained, then read it back: a broker may acknowledge and still drop a
        message (Mosquitto over MQTT 3.1.1 past its message_size_limit, or an ACL refusal)."""
        info = self.client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout)
        hint = "is its message_size_limit smaller, or does its ACL refuse this client?"
        if not info.is_published():
            raise UpdateError(f"the broker did not acknowledge {topic} ({len(payload)} bytes) within {timeout:g} s: "
                              f"{hint}")
        with self._lock:
            self._echo[topic] = None
        self.client.subscribe(topic, qos=1)  # the broker sends the retained message on every subscribe
        deadline = time.monotonic() + 5  # a retained message comes back within milliseconds
        try:
            while time.monotonic() < deadline:
                with self._lock:
                    back = self._echo[topic]
                if back == payload:
                    return
                time.sleep(0.05)
        finally:
            self.client.unsubscribe(topic)
            with self._lock:
                self._echo.pop(topic, None)
        raise UpdateError(f"the broker acknowledged {topic} ({len(payload)} bytes) but does not hold it: {hint}")

    def clear(self, topic: str) -> None:
        """Remove a retained message (an empty one replaces it)."""
        self.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(30)

    def manifests(self) -> dict[str, dict]:
        """Each group's retained manifest, as it claims (unverified: what is on the broker,
        for the operator's own checks): group → {version, sha256}."""
        out = {}
        for topic, payload in self.retained_messages(self.topics.manifests()).items():
            try:
                m = json.loads(payload)["manifest"]
                out[topic.split("/")[-2]] = {"version": m["version"], "sha256": m["artifact"]["sha256"]}
            except (ValueError, KeyError, TypeError, IndexError):
                out[topic.split("/")[-2]] = {"version": None, "sha256": None}
        return out

    def retained_messages(self, topic_filter: str, quiet: float = 0.5, timeout: float = 30.0) -> dict[str, bytes]:
        """The retained messages under ``topic_filter`` this client may read, topic → payload
        (``edge.mqtt.retained_messages``)."""
        with _as_update_errors():
            return mq.retained_messages(self.client, topic_filter, quiet, timeout)

    def forget(self, topic_filter: str, passes: int = 100) -> int:
        """Clear every retained message under ``topic_filter``, asking again until the broker
        holds none; how many were cleared. UpdateError where some remain."""
        with _as_update_errors():
            return mq.clear_retained(self.client, topic_filter, passes)

    def publish_update(self, envelope: bytes, manifest: dict, data: bytes, groups: list[str]) -> None:
        """The artifact first (its chunks, as the manifest signed them), so a device that
        sees the manifest finds its bytes there."""
        art = manifest["artifact"]
        pieces = split(art, data)
        if not chunked(art):
            self.publish(self.topics.artifact(art["sha256"]), data)
        else:
            try:
                for i, piece in enumerate(pieces):
                    self.publish(self.topics.artifact_chunk(art["sha256"], art["chunk_bytes"], i), piece)
            except (UpdateError, RuntimeError, ValueError) as exc:  # paho's, when the connection drops mid-way
                raise UpdateError(f"{exc}; the chunks before it stay retained until published again or cleared "
                                  f"(panorama fleet forget --artifact {art['sha256']})") from None
        for g in groups:
            self.publish(self.topics.manifest(g), envelope)


def verdict(state: dict, version: int) -> dict | None:
    """A device's answer on ``version`` in its retained state, as {"state", "reason"}: the state
    itself, or the last verdict it carries (a READY after a restart replaces the state), or a
    refusal of a manifest claiming that version (a signature this device does not trust)."""
    if state.get("version") == version and state.get("state") in FINAL:
        return {"state": state["state"], "reason": state.get("reason", "")}
    last = state.get("last")
    if isinstance(last, dict) and last.get("version") == version and last.get("result") in FINAL:
        return {"state": last["result"], "reason": last.get("reason", "")}
    claimed = state.get("claimed")
    if state.get("state") == "REJECTED" and isinstance(claimed, dict) and claimed.get("version") == version:
        return {"state": "REJECTED", "reason": state.get("reason", "")}
    return None


@dataclass
class WaveResult:
    groups: list[str]
    verdicts: dict[str, dict] = field(default_factory=dict)  # device → {"state", "reason"} on this version
    pending: list[str] = field(default_factory=list)
    stopped: str = ""  # why the rollout stopped here; empty when the wave passed

    def count(self, state: str) -> int:
        return sum(d["state"] == state for d in self.verdicts.values())


@contextmanager
def _as_update_errors():
    """The broker's refusals while the operator reads or clears retained messages, as UpdateError."""
    try:
        yield
    except (TimeoutError, RuntimeError) as exc:
        raise UpdateError(str(exc)) from None
    except PermissionError as exc:
        raise UpdateError(f"{exc}: its ACL must let the operator read what it may clear") from None


SETTLE_S = 1.0  # the longest a rollout waits for the devices' retained states before its first wave


def warn_stale(states: dict[str, dict], version: int, groups: list[str]) -> list[str]:
    """Warn about the devices of ``groups`` that already hold or handled a version newer than
    ``version`` (they will refuse it as not newer); their names."""
    def seen(s: dict) -> int:  # the newest version a state shows the device took in (a refusal raises none)
        last = s.get("last") if isinstance(s.get("last"), dict) else {}
        told = s.get("version") if s.get("state") != "REJECTED" else None
        return max((v for v in (s.get("installed"), told, last.get("version"))
                    if isinstance(v, int) and not isinstance(v, bool)), default=-1)

    passed = sorted(d for d, s in states.items() if isinstance(s, dict) and s.get("group") in groups
                    and version < seen(s))
    if passed:
        log.warning("%d device(s) of %s already hold or handled a version newer than %s and will refuse it: %s",
                    len(passed), ",".join(groups), version, ", ".join(passed[:8])
                    + (", …" if len(passed) > 8 else ""))
    return passed


def rollout(fleet: Fleet, package: Path, waves: list[list[str]], max_failed: int = 0, min_devices: int = 1,
            timeout_s: float = 1800.0, poll_s: float = 0.2, public_key: Path | None = None) -> list[WaveResult]:
    """Publish ``package`` wave by wave; the results of the waves published (the last one
    says why the rollout stopped, if it did)."""
    envelope, manifest, data = read_package(package, public_key)
    targets = manifest["target"]["groups"]
    unknown = sorted({g for w in waves for g in w} - set(targets))
    if unknown:
        raise UpdateError(f"groups {unknown} are not among the update's {targets}: pack it for them")
    if not waves or not all(waves):
        raise ValueError("every wave names at least one group")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"--timeout must be a positive number of seconds, got {timeout_s}")
    if max_failed < 0 or min_devices < 1:
        raise ValueError("--max-failed must be 0 or more and --min-devices 1 or more")
    version, results = manifest["version"], []
    fleet.settle()
    for groups in waves:
        states = fleet.snapshot()
        known = [d for d, s in states.items() if s.get("group") in groups]
        warn_stale(states, version, groups)
        fleet.publish_update(envelope, manifest, data, groups)
        log.info("wave %s: version %s published", ",".join(groups), version)
        if not known:  # said now, not when the timeout runs out
            log.warning("wave %s: no device of it has announced itself on this broker (every running agent "
                        "leaves a retained state): waiting up to %g s for one; is an agent of the group running "
                        "and connected, with this prefix?", ",".join(groups), timeout_s)
        res = WaveResult(groups)
        results.append(res)
        deadline = time.monotonic() + timeout_s
        said: dict[str, tuple] = {}  # device → the (state, version, reason) last said: each change said once
        next_note = time.monotonic() + PROGRESS_S
        while True:
            mine = {d: s for d, s in fleet.snapshot().items() if s.get("group") in groups}
            res.verdicts = {d: v for d, v in ((d, verdict(s, version)) for d, s in mine.items()) if v}
            res.pending = sorted(set(mine) - set(res.verdicts))
            for d, s in sorted(mine.items()):
                now = (s.get("state"), s.get("version"), s.get("reason"))
                if s.get("version") != version and d not in res.verdicts:
                    continue  # an earlier update's state, or READY: not news of this one
                if said.get(d) != now:
                    said[d] = now
                    log.info("  %s: %s%s%s", d, now[0], f" version {now[1]}" if now[1] is not None else "",
                             f" ({s['reason']})" if s.get("reason") else "")
            if res.count("FAILED") > max_failed:
                res.stopped = f"{res.count('FAILED')} device(s) failed the update (at most {max_failed} allowed)"
                break
            if not res.pending and len(res.verdicts) >= min_devices:
                if not res.count("SUCCEEDED"):
                    res.stopped = "no device of the wave took the update"
                break
            if time.monotonic() > deadline:
                if res.pending:
                    res.stopped = f"no verdict within {timeout_s:g} s from {', '.join(res.pending)}"
                else:  # too few devices in the wave's groups have announced themselves
                    res.stopped = (f"{len(res.verdicts)} device(s) of {','.join(groups)} answered within "
                                   f"{timeout_s:g} s, fewer than --min-devices {min_devices} (is an agent of the "
                                   "group running and connected?)")
                break
            if time.monotonic() >= next_note:  # a long wait (a health gate, a TensorRT build) is not silence
                next_note += PROGRESS_S
                log.info("wave %s: %d verdict(s), waiting for %s (%.0f s left)", ",".join(groups), len(res.verdicts),
                         ", ".join(res.pending) or f"at least {min_devices} device(s)", deadline - time.monotonic())
            time.sleep(poll_s)
        if res.stopped:
            log.warning("wave %s: rollout stopped: %s", ",".join(groups), res.stopped)
            break
    return results
