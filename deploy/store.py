"""The device's model store: installed versions side by side, one ``current`` link.

    STORE/
      versions/0/model.safetensors        the factory model (the shipped checkpoint)
      versions/7/model.safetensors        an update, beside its manifest.json
      current -> versions/7               what the daemon reads (model.path: STORE/current/model.safetensors)
      state.json                          installed, previous, newest version seen, history
      staging/                            downloads before they are checked
      .lock                               held by the one agent that uses the store

A version is written whole into ``versions/<v>.tmp``, synced and renamed; ``current`` is
swapped by renaming a new link over it (``os.replace``), so a power cut leaves the old
model or the new one, never half of either. The previous version and the factory model are
kept for rollback; nothing ``current`` points at is ever removed. ``state.json`` is written
the same way and only by this module, never by an update: the newest version seen only
grows, so a replayed older manifest is refused after a restart too. Before ``current`` is
swapped, ``state.json`` records the swap under way (``pending``), so that a power cut
between the swap and the state written after it is finished at the next start
(``reconcile``): an install is then gated, a rollback recorded as the failure it was. Without a
``state.json`` (moved aside because it was damaged) the store rebuilds one from the versions
on disk, taking the highest of them as the newest seen and the installed one as not yet
gated (the agent gates it again).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path

from panorama import checkpoint as ckpt
from panorama.errors import CheckpointError, UpdateError
from panorama.files import atomic_write, fsync_dir

from .manifest import ARTIFACT_NAME

HISTORY = 50  # entries kept in state.json
log = logging.getLogger("panorama.fleet")


class ModelStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.staging = self.root / "staging"
        self.current = self.root / "current"
        self.state_path = self.root / "state.json"
        self._lock_fd: int | None = None

    @property
    def model_path(self) -> Path:
        """What the daemon's ``model.path`` names: through the link, so a swap is seen."""
        return self.current / ARTIFACT_NAME

    def lock(self) -> None:
        """Hold the store for this process: two agents on one store would undo each other's work."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UpdateError(f"another agent uses the store {self.root}: one agent per store") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    # ---- state ----------------------------------------------------------------------
    def current_version(self) -> int | None:
        try:
            return int(Path(os.readlink(self.current)).name)
        except (OSError, ValueError):
            return None

    def on_disk(self) -> list[int]:
        if not self.versions.is_dir():
            return []
        return sorted(int(p.name) for p in self.versions.iterdir() if p.name.isdigit())

    def state(self) -> dict:
        if not self.state_path.exists():
            present, installed = self.on_disk(), self.current_version()
            # whether the installed version passed its health gate is not known: gate it again
            history = [{"version": installed, "result": "QUEUED", "reason": "state rebuilt from the versions on disk",
                        "t": _now()}] if installed else []
            return {"installed": installed, "previous": None, "newest_seen": max(present, default=0),
                    "history": history}
        try:
            doc = json.loads(self.state_path.read_text())
            if not isinstance(doc, dict) or type(doc["newest_seen"]) is not int or not isinstance(doc["history"], list):
                raise TypeError("newest_seen must be a whole number and history a list")
            for h in doc["history"]:
                if not isinstance(h, dict) or not isinstance(h.get("result"), str) or "version" not in h:
                    raise TypeError(f"history entry {h!r} is not {{version, result, ...}}")
            return doc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # without it a replayed old manifest could not be told from a new one: stop, do not guess
            raise UpdateError(f"{self.state_path} is unreadable ({exc}); updates are refused until it is repaired, "
                              "or moved aside: the store then rebuilds it from the versions on disk") from None

    def _save(self, doc: dict) -> None:
        doc["history"] = doc["history"][-HISTORY:]
        atomic_write(self.state_path, json.dumps(doc, indent=1).encode())

    def record(self, version, result: str, reason: str = "", seen: int | None = None) -> None:
        """History entry (and the newest version seen, which never goes down)."""
        doc = self.state()
        doc.pop("pending", None)  # reconciled at start: one seen now is of a swap this run undid
        if seen is not None:
            doc["newest_seen"] = max(int(doc["newest_seen"]), int(seen))
        doc["history"].append({"version": version, "result": result, "reason": reason, "t": _now()})
        self._save(doc)

    # ---- versions -------------------------------------------------------------------
    def ensure_factory(self, checkpoint: Path) -> None:
        """A store with no ``current`` gets ``checkpoint`` as version 0, so the daemon always
        has a model to start with and an update always has one to roll back to."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.current.exists():
            return
        try:
            ckpt.read_header(checkpoint)  # the last resort must be a model the daemon can load
        except CheckpointError as exc:
            raise UpdateError(f"factory model: {exc}") from exc
        self._write_version(0, Path(checkpoint), {"version": 0, "notes": f"factory model {Path(checkpoint).name}"})
        self._point(0)
        doc = self.state()
        doc.update(installed=0, previous=None)
        self._save(doc)

    def sweep(self) -> None:
        """What an interrupted run left: staged downloads, half-written versions, temp files."""
        for p in list(self.staging.glob("*")) if self.staging.is_dir() else []:
            p.unlink(missing_ok=True)
        for p in self.root.glob(".*.tmp"):  # a state.json or current link being replaced
            p.unlink(missing_ok=True)
        for p in list(self.versions.glob("*.tmp")) if self.versions.is_dir() else []:
            shutil.rmtree(p, ignore_errors=True)

    def stage(self, data: bytes, name: str) -> Path:
        self.staging.mkdir(parents=True, exist_ok=True)
        path = self.staging / name
        try:
            atomic_write(path, data)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot stage the download in {self.staging}: {exc.strerror}") from exc
        return path

    def install(self, version: int, staged: Path, manifest: dict) -> list[str]:
        """Make ``staged`` version ``version`` and point ``current`` at it; the old one becomes previous.
        Returns the content hashes of the models no version on disk holds any more (their
        cached ONNX exports and engines can go)."""
        running = self.current_version()
        if version == running:  # never write over the folder the daemon reads
            raise UpdateError(f"version {version} is the one installed")
        self._write_version(version, staged, manifest)
        doc = self.state()
        doc.pop("pending", None)
        try:
            self._save({**doc, "pending": {"op": "install", "version": version, "from": running}})
            self._point(version)
            self._save({**doc, "previous": running, "installed": version})
        except BaseException as exc:  # state.json must say what current is: point it back
            if running is None:
                raise
            if self.current_version() != running:
                self._point(running)
            shutil.rmtree(self.versions / str(version), ignore_errors=True)  # its room, for the verdict
            try:  # no record of a swap left behind: it was undone
                self._save(doc)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise OSError(exc.errno, f"cannot record version {version} in {self.state_path} "
                                         f"({exc.strerror}); version {running} stays current") from exc
            raise
        return self._prune(keep={version, running})

    def rollback(self, why: str = "") -> int:
        """Point ``current`` back at the previous version, or the factory model when there is
        none, because of ``why`` (the failed health gate), and record the version rolled away
        from FAILED in the same write of state.json; returns the version now current. A
        state.json that cannot be written (a full disk) does not stop the swap, which matters
        more: the state is finished at the next start (``reconcile``)."""
        doc = self.state()
        doc.pop("pending", None)
        now = self.current_version()
        for v in (doc.get("previous"), 0):
            if v is not None and v != now and (self.versions / str(v) / ARTIFACT_NAME).is_file():
                try:
                    self._save({**doc, "pending": {"op": "rollback", "version": v, "from": now, "why": why}})
                except OSError as exc:
                    log.warning("cannot record the rollback in %s (%s); rolling back all the same", self.state_path,
                                exc.strerror)
                self._point(v)
                doc.update(installed=v, previous=None)
                if now is not None:
                    doc["history"].append({"version": now, "result": "FAILED", "t": _now(),
                                           "reason": f"rolled back to version {v}" + (f": {why}" if why else "")})
                try:
                    self._save(doc)
                except OSError as exc:
                    log.error("rolled back to version %s, but cannot write %s (%s): the next start finishes it",
                              v, self.state_path, exc.strerror)
                return v
        raise UpdateError("no previous version and no factory model to roll back to")

    def reconcile(self) -> str:
        """Make state.json agree with ``current`` after a power cut (or a kill) between a swap
        and the state written after it: an install it reached is installed (its history,
        QUEUED, has the agent gate it), a rollback it reached is done and the version rolled
        away from FAILED; a swap it never reached is forgotten. A rollback whose record of the
        swap could not be written (a full disk) is told by ``current`` pointing at the previous
        version or the factory model. Returns what was done, or ""."""
        doc = self.state()
        pending = doc.pop("pending", None)
        cur, installed = self.current_version(), doc.get("installed")
        if not isinstance(pending, dict):
            if cur is None or installed is None or cur == installed or cur not in (doc.get("previous"), 0):
                return ""
            pending = {"op": "rollback", "version": cur, "from": installed, "why": ""}
        v, was = pending.get("version"), pending.get("from")
        if cur != v:
            said = f"the {pending.get('op')} of version {v} did not finish; version {cur} stays current"
        elif pending.get("op") == "install":
            doc.update(installed=v, previous=was)
            said = f"version {v} was installed when the agent stopped; it is gated now"
        else:
            doc.update(installed=v, previous=None)
            why = f"rolled back to version {v}: {pending.get('why') or 'its health gate failed'}"
            ends = [h for h in doc["history"] if h.get("version") == was]
            if was is not None and not (ends and ends[-1]["result"] == "FAILED"):
                doc["history"].append({"version": was, "result": "FAILED", "t": _now(),
                                       "reason": f"{why} (finished after a restart)"})
            said = f"the rollback from version {was} to {v} is finished"
        self._save(doc)
        return said

    def _write_version(self, version: int, source: Path, manifest: dict) -> None:
        self.versions.mkdir(parents=True, exist_ok=True)
        final, tmp = self.versions / str(version), self.versions / f"{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            atomic_write(tmp / ARTIFACT_NAME, Path(source).read_bytes())
            atomic_write(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
            if final.exists():  # a version installed before and since rolled away from: replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.versions)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(exc.errno, f"cannot write version {version} into {self.versions}: {exc.strerror}") from exc

    def _point(self, version: int) -> None:
        link = self.root / f".current.{os.getpid()}.tmp"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(Path("versions") / str(version), link)  # relative: the store can move
        os.replace(link, self.current)
        fsync_dir(self.root)

    def _prune(self, keep: set) -> list[str]:
        """Versions on disk: current, previous and the factory model (the last resort). Returns
        the content hashes of the models only the removed versions held."""
        keep = keep | {0, self.current_version()}
        removed, kept = set(), set()
        for v in self.on_disk():
            sha = self._model_sha(v)
            if v in keep:
                kept.add(sha)
            else:
                shutil.rmtree(self.versions / str(v), ignore_errors=True)
                removed.add(sha)
        return sorted(removed - kept - {None})

    def _model_sha(self, version: int) -> str | None:
        try:
            return ckpt.read_header(self.versions / str(version) / ARTIFACT_NAME)["sha256"]
        except CheckpointError:
            return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
