"""What a non-editable install (``pip install .``, as on a Jetson) carries: every data file the
packages read at run time must be in the wheel, not only in a source checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_data_file_of_the_packages(tmp_path):
    src = tmp_path / "src"  # a clean copy: a build/ folder left in the checkout would lend the wheel stale files
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", "build", "*.egg-info", ".git", "runs", "out",
                                                             "__pycache__", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("panorama-*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    data = [p.relative_to(REPO).as_posix() for p in (REPO / "panorama").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert "panorama/weights/lead_covariance.json" in data  # the swapped-electrode check's population model
    missing = [d for d in data if d not in held]
    assert not missing, f"left out of the wheel (pyproject's package-data): {missing}"
