"""Shared fixtures: the real records (skipped cleanly where absent) and a CLI runner."""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from panorama.records import default_data_dir

REPO = Path(__file__).resolve().parents[1]
MOSQUITTO = ("127.0.0.1", 1883)  # `.ci/run` starts one here when none listens


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def mosquitto() -> str:
    """URL of the real Mosquitto broker on loopback; skips cleanly where none listens."""
    if not listening(*MOSQUITTO):
        pytest.skip("no MQTT broker listens on 127.0.0.1:1883")
    return "mqtt://127.0.0.1:1883"


@pytest.fixture
def device_folder(data_dir, tmp_path) -> tuple[Path, list[str]]:
    """A folder of one device's own records, as a fleet operator has: copies of ludb001-004."""
    import shutil

    folder = tmp_path / "mydevice"
    folder.mkdir()
    picked = sorted((data_dir / "ludb").glob("ludb00[1-4].hea"))
    for p in picked:
        shutil.copy(p, folder)
        shutil.copy(p.with_suffix(".dat"), folder)
    return folder, [p.stem for p in picked]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = default_data_dir()
    if d is None:
        pytest.skip("real records (../shared/data/ecg) not present")
    return d


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``panorama`` as a user would, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "panorama_cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def run_main(*args: str) -> subprocess.CompletedProcess:
    """Run ``panorama``'s own ``main()`` in this process: the same parser, dispatch and one-line
    errors as the command, without a fresh interpreter importing torch and the model (about 3 s
    a call on 2 cores). For refusals and repeated runs; ``cli`` keeps the real subprocess."""
    import panorama_cli

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(REPO)  # as ``cli`` runs it
    root.handlers[:] = []  # so main()'s logging.basicConfig writes to this stderr, as in a process
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = panorama_cli.main([str(a) for a in args])
            except SystemExit as exc:  # argparse's usage errors and --help
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:  # main() configures logging for a process; leave pytest's as it was
        root.handlers[:], root.level = handlers, level
        os.chdir(cwd)
    return subprocess.CompletedProcess(["panorama", *map(str, args)], code, out.getvalue(), err.getvalue())


@pytest.fixture
def panorama():
    return run_main


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(cond, timeout: float = 30.0) -> bool:
    """Poll ``cond`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    """A fleet operator's Ed25519 key pair (private, public) for the fleet tests."""
    from deploy.manifest import generate_keys

    return generate_keys(tmp_path_factory.mktemp("keys"))
