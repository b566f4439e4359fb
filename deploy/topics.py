"""The fleet's topic tree (all retained, QoS 1):

    {prefix}/{group}/manifest          operator → devices   the signed envelope of the group's latest update
    {prefix}/artifacts/{sha256}        operator → devices   a checkpoint's bytes, named by their hash
    {prefix}/devices/{device}/state    device → operator    READY, QUEUED, IN_PROGRESS, SUCCEEDED, FAILED or
                                                            REJECTED, and the device's last verdict
"""

from __future__ import annotations

from edge.topics import Topics, _check_id

RESERVED_GROUPS = ("artifacts", "devices")


def check_group(group) -> str:
    """A group is one topic level, as any id, and not a name the fleet topics use."""
    _check_id("group", group)
    if group in RESERVED_GROUPS:
        raise ValueError(f"group may not be named {group!r}: the fleet topics use it")
    return group


class FleetTopics:
    def __init__(self, prefix: str = "panorama/fleet"):
        Topics(prefix)  # the same rules for a prefix as the daemon's
        self.prefix = prefix

    def manifest(self, group: str) -> str:
        return f"{self.prefix}/{check_group(group)}/manifest"

    def artifact(self, sha256: str) -> str:
        if not isinstance(sha256, str) or len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return f"{self.prefix}/artifacts/{sha256}"

    def state(self, device: str) -> str:
        return f"{self.prefix}/devices/{_check_id('device', device)}/state"

    def states(self) -> str:
        return f"{self.prefix}/devices/+/state"
