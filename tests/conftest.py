"""Shared fixtures: the real records (skipped cleanly where absent) and a CLI runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from panorama.records import default_data_dir

REPO = Path(__file__).resolve().parents[1]


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
