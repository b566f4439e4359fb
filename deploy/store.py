"""The device's model store: installed versions side by side, one ``current`` link.

    STORE/
      versions/0/model.safetensors        the factory model (the shipped checkpoint)
      versions/7/model.safetensors        an update, beside its manifest.json
      current -> versions/7               what the daemon reads (model.path: STORE/current/model.safetensors)
      state.json                          installed, previous, newest version seen, history
      staging/                            downloads before they are checked

A version is written whole into ``versions/<v>.tmp``, synced and renamed; ``current`` is
swapped by renaming a new link over it (``os.replace``), so a power cut leaves the old
model or the new one, never half of either. The previous version is kept for rollback.
``state.json`` is written the same way and only by this module, never by an update: the
newest version seen only grows, so a replayed older manifest is refused after a restart too.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from panorama.errors import UpdateError
from panorama.files import atomic_write

from .manifest import ARTIFACT_NAME

HISTORY = 50  # entries kept in state.json


class ModelStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.staging = self.root / "staging"
        self.current = self.root / "current"
        self.state_path = self.root / "state.json"

    @property
    def model_path(self) -> Path:
        """What the daemon's ``model.path`` names: through the link, so a swap is seen."""
        return self.current / ARTIFACT_NAME

    # ---- state ----------------------------------------------------------------------
    def state(self) -> dict:
        if not self.state_path.exists():
            return {"installed": None, "previous": None, "newest_seen": 0, "history": []}
        try:
            doc = json.loads(self.state_path.read_text())
            int(doc["newest_seen"])
            return doc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # without it a replayed old manifest could not be told from a new one: stop, do not guess
            raise UpdateError(f"{self.state_path} is unreadable ({exc}); updates are refused until it is "
                              "repaired or removed by hand") from None

    def _save(self, doc: dict) -> None:
        doc["history"] = doc["history"][-HISTORY:]
        atomic_write(self.state_path, json.dumps(doc, indent=1).encode())

    def record(self, version, result: str, reason: str = "", seen: int | None = None) -> None:
        """History entry (and the newest version seen, which never goes down)."""
        doc = self.state()
        if seen is not None:
            doc["newest_seen"] = max(int(doc["newest_seen"]), int(seen))
        doc["history"].append({"version": version, "result": result, "reason": reason,
                               "t": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self._save(doc)

    # ---- versions -------------------------------------------------------------------
    def ensure_factory(self, checkpoint: Path) -> None:
        """A store with no ``current`` gets ``checkpoint`` as version 0, so the daemon always
        has a model to start with and an update always has one to roll back to."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.current.exists():
            return
        self._write_version(0, Path(checkpoint), {"version": 0, "notes": f"factory model {Path(checkpoint).name}"})
        self._point(0)
        doc = self.state()
        doc.update(installed=0, previous=None)
        self._save(doc)

    def stage(self, data: bytes, name: str) -> Path:
        self.staging.mkdir(parents=True, exist_ok=True)
        path = self.staging / name
        atomic_write(path, data)
        return path

    def install(self, version: int, staged: Path, manifest: dict) -> None:
        """Make ``staged`` version ``version`` and point ``current`` at it; the old one becomes previous."""
        self._write_version(version, staged, manifest)
        doc = self.state()
        self._point(version)
        doc.update(previous=doc.get("installed"), installed=version)
        self._save(doc)
        self._prune(keep={version, doc["previous"]})

    def rollback(self) -> int:
        """Point ``current`` back at the previous version; returns it."""
        doc = self.state()
        prev = doc.get("previous")
        if prev is None or not (self.versions / str(prev) / ARTIFACT_NAME).is_file():
            raise UpdateError("no previous version to roll back to")
        self._point(prev)
        doc.update(installed=prev, previous=None)
        self._save(doc)
        return prev

    def _write_version(self, version: int, source: Path, manifest: dict) -> None:
        self.versions.mkdir(parents=True, exist_ok=True)
        final, tmp = self.versions / str(version), self.versions / f"{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        atomic_write(tmp / ARTIFACT_NAME, Path(source).read_bytes())
        atomic_write(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
        if final.exists():  # a version installed before and since rolled away from: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.versions)

    def _point(self, version: int) -> None:
        link = self.root / f".current.{os.getpid()}.tmp"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(Path("versions") / str(version), link)  # relative: the store can move
        os.replace(link, self.current)
        _fsync_dir(self.root)

    def _prune(self, keep: set) -> None:
        """Versions on disk: current, previous and the factory model (the last resort)."""
        for p in self.versions.iterdir():
            if p.name.isdigit() and int(p.name) not in keep | {0}:
                shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
