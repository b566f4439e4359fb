"""The fleet's topic tree (all retained, QoS 1):

    {prefix}/{group}/manifest          operator → devices   the signed envelope of the group's latest update
    {prefix}/artifacts/{sha256}/{n}/{i}  operator → devices chunk i of a checkpoint's bytes cut in chunks of n,
                                                            named by their hash (the manifest signs each chunk's)
    {prefix}/artifacts/{sha256}        operator → devices   the whole checkpoint, where its manifest names
                                                            no chunks (``panorama fleet pack --chunk-kb 0``)
    {prefix}/devices/{device}/state    device → operator    READY, QUEUED, IN_PROGRESS, SUCCEEDED, FAILED or
                                                            REJECTED, and the device's last verdict
"""

from __future__ import annotations

from edge.topics import Topics, check_id

RESERVED_GROUPS = ("artifacts", "devices")
# An artifact travels in chunks of at most this many bytes, each its own retained message
# whose hash the manifest signs: managed brokers cap a message (AWS IoT Core at 128 KB).
CHUNK_BYTES = 64 << 10
MIN_CHUNK_BYTES = 16 << 10  # keeps the manifest's list of hashes small (≤ 4,096 for a 64 MB artifact)


def is_sha256(s) -> bool:
    """64 lower-case hex digits."""
    return isinstance(s, str) and len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def check_group(group) -> str:
    """A group is one topic level, as any id, and not a name the fleet topics use."""
    check_id("group", group)
    if group in RESERVED_GROUPS:
        raise ValueError(f"group may not be named {group!r}: the fleet topics use it")
    return group


class FleetTopics:
    def __init__(self, prefix: str = "panorama/fleet"):
        Topics(prefix)  # the same rules for a prefix as the daemon's
        self.prefix = prefix

    def manifest(self, group: str) -> str:
        return f"{self.prefix}/{check_group(group)}/manifest"

    def manifests(self) -> str:
        """Every group's manifest (a filter)."""
        return f"{self.prefix}/+/manifest"

    def artifact(self, sha256: str) -> str:
        if not is_sha256(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return f"{self.prefix}/artifacts/{sha256}"

    def artifact_chunk(self, sha256: str, chunk_bytes: int, index: int) -> str:
        """Chunk ``index`` of an artifact cut in ``chunk_bytes``: the same file cut two ways
        (packed twice, for two brokers) never shares a topic."""
        return f"{self.artifact(sha256)}/{int(chunk_bytes)}/{int(index)}"

    def artifact_all(self, sha256: str) -> str:
        """The filter for every message of one artifact, whole or in chunks ('#' matches the
        level above it too)."""
        return f"{self.artifact(sha256)}/#"

    def state(self, device: str) -> str:
        return f"{self.prefix}/devices/{check_id('device', device)}/state"

    def states(self) -> str:
        return f"{self.prefix}/devices/+/state"
