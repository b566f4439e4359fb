"""The README's code is the code: its Python example runs as written on a real record."""

import re
from pathlib import Path

import numpy as np

from panorama.records import read_record

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_calibration_example_runs_on_a_real_record(data_dir):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README holds one Python example"
    x = read_record(data_dir / "ludb" / "ludb001").signals  # (12, 5000) mV, the standard order
    scope = {"x": x}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    res, views = scope["res"], scope["views"]
    assert res.accepted and res.offsets_deg.shape == (12, 2) and np.abs(res.offsets_deg).max() <= 30
    assert views.shape == (3, x.shape[1]) and np.isfinite(views).all()
    assert 0.01 < float(np.std(views)) < 5  # mV: a drawn ECG, not zeros or a blow-up
