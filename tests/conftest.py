"""Shared fixtures: the real records (skipped cleanly where absent) and a CLI runner."""

from __future__ import annotations

import socket
import subprocess
import sys
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
