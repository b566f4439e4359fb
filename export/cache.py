"""On-disk caches: the cache folder, the sweep of stale temp files, and the TensorRT engine cache
(files are written with panorama.files.atomic_write).

An engine is tied to the GPU model and the exact TensorRT version it was built with
(TensorRT#2176), and building one takes minutes on a Jetson, so engines are cached under a
key of everything that makes one usable:

    <dir>/<digest>.engine   the serialized engine
    <dir>/<digest>.json     its sidecar: the key's fields, the engine's sha256 and size,
                            build time, panorama version; written last, so its presence
                            marks a complete entry
    <dir>/<digest>.lock     taken (flock) while the entry is built, so two processes never
                            build the same engine at once
    <dir>/.<name>.*.tmp     files being written; never read, swept when an hour old

Nothing here imports TensorRT: the cache stores and verifies bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from panorama.errors import BackendError
from panorama.files import atomic_write, file_sha256  # noqa: F401 (export's writers take them from here)

log = logging.getLogger(__name__)

ENV = "PANORAMA_CACHE"
SIDECAR_FORMAT = 1
STALE_TMP_S = 3600  # a writer writes a few MB in well under a second; an hour-old temp file is a crash's


def cache_root() -> Path:
    """``$PANORAMA_CACHE``, or ``~/.cache/panorama``."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "panorama"


def default_engine_dir() -> Path:
    return cache_root() / "engines"


def writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` if needed and prove it writable, or fail naming it and the env var."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe.", suffix=".tmp"):
            pass
    except OSError as exc:
        raise BackendError(f"the {what} cache folder {path} is not writable ({exc.strerror or exc}); "
                           f"set {ENV} to a writable folder") from exc
    return path


def sweep_stale(folder: Path, max_age_s: float = STALE_TMP_S, pattern: str = ".*.tmp") -> list[Path]:
    """Remove the temp files (``pattern``) in ``folder`` that writers which died left, once
    ``max_age_s`` old; returns what was removed."""
    removed, now = [], time.time()
    for tmp in Path(folder).glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            if now - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()
                removed.append(tmp)
    return removed


def forget_models(model_sha256s, root: str | Path | None = None) -> list[Path]:
    """Remove what the cache holds for these checkpoints (their content hashes): their ONNX
    exports under ``root/onnx`` and the TensorRT engines built from those exports under
    ``root/engines`` (``root``: ``cache_root()``). For models a fleet update retired, so a
    device's disk does not fill one update at a time. Returns the files removed; lock files
    stay (empty, and another process may hold one)."""
    root = Path(root) if root is not None else cache_root()
    removed, onnx_shas = [], set()
    exports = _listing(root / "onnx")  # an unreadable folder raises (glob would say nothing)
    for sha in model_sha256s:
        for export in sorted(p for p in exports if p.name.startswith(f"{sha[:32]}-v") and p.suffix == ".onnx"):
            with contextlib.suppress(FileNotFoundError):
                onnx_shas.add(file_sha256(export))
                export.unlink()
                removed.append(export)
    engines = root / "engines"
    for sidecar in sorted(p for p in _listing(engines) if p.suffix == ".json") if onnx_shas else ():
        try:
            key = json.loads(sidecar.read_text())["key"]
            built_from = key["onnx_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not an entry of ours, or damaged: lookup() reports and replaces those
        if built_from in onnx_shas:
            for path in (sidecar, sidecar.with_suffix(".engine")):  # the sidecar first: it marks the entry
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


def _listing(folder: Path) -> list[Path]:
    """The entries of ``folder`` (none if it does not exist); OSError if it cannot be read."""
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; any change means another engine."""

    tensorrt: str  # exact version: engines do not load across versions
    gpu: str  # device name, e.g. "Orin (nvgpu)"
    compute_capability: str  # e.g. "8.7"
    sm_count: int
    precision: str  # "fp32" | "fp16"
    profile: str  # Profile.describe(): the shapes the engine accepts
    onnx_sha256: str

    @property
    def digest(self) -> str:
        return _sha256(json.dumps(asdict(self), sort_keys=True).encode())[:32]

    def differences(self, cached: dict) -> list[str]:
        """The fields in which a cached key (a sidecar's ``key``) differs from this one."""
        return [f"{f.name} {cached.get(f.name)!r} (cached) vs {getattr(self, f.name)!r} (wanted)"
                for f in fields(self) if cached.get(f.name) != getattr(self, f.name)]


@dataclass
class Lookup:
    """A cache hit (``data`` holds the verified engine) or a miss with its reason."""

    path: Path
    data: bytes | None = None
    reason: str = ""

    @property
    def hit(self) -> bool:
        return self.data is not None


def panorama_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("panorama")
    except PackageNotFoundError:
        return "unknown"


class EngineCache:
    def __init__(self, directory: str | Path | None = None):
        self.dir = writable_dir(Path(directory) if directory else default_engine_dir(), "TensorRT engine")

    def paths(self, key: EngineKey) -> tuple[Path, Path]:
        return self.dir / f"{key.digest}.engine", self.dir / f"{key.digest}.json"

    def lookup(self, key: EngineKey) -> Lookup:
        """The engine for ``key``, verified against its sidecar, or why there is none."""
        engine, sidecar = self.paths(key)
        if not sidecar.is_file():
            return Lookup(engine, reason="no cached engine for this key" + self._nearest(key))
        try:
            meta = json.loads(sidecar.read_text())
            cached_key, size, sha = meta["key"], int(meta["engine_bytes"]), meta["engine_sha256"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return Lookup(engine, reason=f"sidecar {sidecar.name} unreadable or corrupt ({exc})")
        diff = key.differences(cached_key) if isinstance(cached_key, dict) else ["key (not a mapping)"]
        if diff:
            return Lookup(engine, reason="key mismatch: " + "; ".join(diff))
        try:
            data = engine.read_bytes()
        except FileNotFoundError:
            return Lookup(engine, reason=f"engine file {engine.name} missing (sidecar present)")
        if len(data) != size:
            kind = "truncated" if len(data) < size else "longer than recorded"
            return Lookup(engine, reason=f"engine {kind}: {len(data)} bytes, sidecar says {size}")
        if _sha256(data) != sha:
            return Lookup(engine, reason="engine corrupt: its sha256 differs from the sidecar's")
        return Lookup(engine, data=data)

    def _nearest(self, key: EngineKey) -> str:
        """Why a cached engine of the same ONNX model (if any) does not fit: after a TensorRT
        or JetPack upgrade this names the field that forced the rebuild."""
        best: list[str] | None = None
        for sidecar in sorted(self.dir.glob("*.json")):
            try:
                cached = json.loads(sidecar.read_text())["key"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(cached, dict) and cached.get("onnx_sha256") == key.onnx_sha256:
                diff = key.differences(cached)
                if best is None or len(diff) < len(best):
                    best = diff
        return f" (a cached engine of the same model differs: {'; '.join(best)})" if best else ""

    def store(self, key: EngineKey, data: bytes, build_s: float) -> Path:
        """Write the engine, then its sidecar, each atomically; returns the engine's path."""
        engine, sidecar = self.paths(key)
        with contextlib.suppress(FileNotFoundError):  # the entry is incomplete until the new sidecar lands
            sidecar.unlink()
        atomic_write(engine, data)
        meta = {"format": SIDECAR_FORMAT, "digest": key.digest, "key": asdict(key),
                "engine_sha256": _sha256(data), "engine_bytes": len(data),
                "build_seconds": round(build_s, 2),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "panorama_version": panorama_version()}
        atomic_write(sidecar, (json.dumps(meta, indent=2) + "\n").encode())
        self.sweep()
        return engine

    def sweep(self, max_age_s: float = STALE_TMP_S) -> list[Path]:
        """Remove temp files left by writers that died; returns what was removed."""
        return sweep_stale(self.dir, max_age_s)

    @contextlib.contextmanager
    def lock(self, key: EngineKey, timeout: float | None = None):
        """Hold ``<digest>.lock`` exclusively (flock: released by the kernel if the holder
        dies). Waits for another builder, saying so; ``timeout`` seconds, or forever."""
        path = self.dir / f"{key.digest}.lock"
        with open(path, "a+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("another process is building engine %s; waiting for it (lock %s)", key.digest, path)
                deadline = None if timeout is None else time.monotonic() + timeout
                while True:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if deadline is not None and time.monotonic() > deadline:
                            raise BackendError(f"engine {key.digest} is locked by another process "
                                               f"({path}) after waiting {timeout:g} s") from None
                        time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
