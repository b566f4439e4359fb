"""The GPU check runs here too (CPU rows, and a row per GPU part saying it is missing), so a
lent GPU machine's minutes are never spent finding that the script itself broke."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_section_and_writes_its_table(tmp_path):
    torch = pytest.importorskip("torch")
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "deploy/gpu_check.py", "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["row"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    failed = {name: r["note"] for name, r in rows.items() if r.get("note", "").startswith("FAILED")}
    assert not failed
    assert rows["torch CPU"]["b1_ms"] > 0 and rows["ONNX Runtime CPU"]["err_uv"] < 1.0
    assert rows["calibration cpu"]["seconds"] > 0 and "12 leads x 5 s" in rows["calibration cpu"]["note"]
    assert "calibrate" in rows["Stage III chain cpu"]["note"]
    assert "ms a step" in rows["training cpu"]["note"] and "loss" in rows["training cpu"]["note"]
    if not torch.cuda.is_available():
        for name in ("calibration cuda", "training cuda"):
            assert rows[name]["note"] == "CUDA unavailable"
    assert "training cpu" in proc.stdout  # the printed table holds the same rows
