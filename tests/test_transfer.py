"""Residual transfer: the recorded leads' residuals reach the views near them, not far ones;
clean refusals; and, with the shipped model on simulated patients, a better unseen V2."""

import numpy as np
import pytest

from panorama.geometry import STANDARD_12, resolve_views
from panorama.synth import Synthesizer
from panorama.transfer import fit_transfer
from training.simulator import simulate

CAL = [n for n in STANDARD_12 if n not in ("V2", "V6")]
INPUTS = ["I", "II", "V3"]


@pytest.fixture(scope="module")
def synth():
    return Synthesizer.load()


def _record(seed: int, seconds: float = 10.0):
    p = simulate(seed, views=[*CAL, "V2", "V8"], duration_s=seconds, device="diagnostic")
    return np.stack([p.lead(n) for n in CAL]).astype(np.float32), np.stack([p.lead("V2"), p.lead("V8")])


def test_views_near_recorded_leads_take_their_residuals_far_views_do_not(synth):
    x, _ = _record(3)
    tr = fit_transfer(synth, x, resolve_views(",".join(CAL)), INPUTS)
    assert tr.fitted and [v.name for v in tr.leads] == [n for n in CAL if n not in INPUTS]
    assert tr.residual_after_uv < tr.residual_before_uv
    w = tr.weights(resolve_views("V2,V8,V9,V4R"))
    names = [v.name for v in tr.leads]
    assert w[0, names.index("V1")] > 0.2  # V2 lies between V1 and the input V3
    assert w[1].sum() < 0.05 and w[2].sum() < 0.05  # posterior: left to the model
    assert w[3, names.index("V1")] > 0.3  # V4R is V1's neighbour on the right
    assert np.all(w.sum(axis=1) <= 1 + 1e-9)
    corr = tr.correction(x[[CAL.index(n) for n in INPUTS]], resolve_views("V2,V8"))
    assert corr.shape == (2, x.shape[1]) and corr.dtype == np.float32
    assert np.abs(corr[1]).max() < 0.1 * np.abs(corr[0]).max()


def test_transfer_improves_an_unseen_neighbour_on_simulated_patients(synth):
    views = resolve_views(",".join(CAL))
    ins = resolve_views(",".join(INPUTS))
    before, after = [], []
    for seed in range(6):
        x, y = _record(100 + seed)
        xin = x[[CAL.index(n) for n in INPUTS]]
        tr = fit_transfer(synth, x, views, INPUTS)  # fitted on 0-5 s, never sees V2
        p = synth(xin, ins, resolve_views("V2"))[0]
        q = p + tr.correction(xin, resolve_views("V2"))[0]
        score = slice(2500, 5000)
        err = lambda z: np.mean(np.abs((z - y[0])[score] - np.median((z - y[0])[score])))  # noqa: E731
        before.append(err(p))
        after.append(err(q))
    assert np.mean(after) < 0.95 * np.mean(before), (before, after)


def test_refusals_are_clean(synth):
    x, _ = _record(5, seconds=3.0)
    views = resolve_views(",".join(CAL))
    short = fit_transfer(synth, x, views, INPUTS)
    assert not short.fitted and "only 3.0 s recorded, 5 s asked" in short.reason
    assert np.all(short.correction(x[:3], resolve_views("V2")) == 0)
    alone = fit_transfer(synth, x[[0, 1, CAL.index("V3")]], resolve_views("I,II,V3"), INPUTS, seconds=2)
    assert not alone.fitted and "no usable recorded lead beside the inputs" in alone.reason
    flat = x.copy()
    flat[CAL.index("V3")] = 0.0
    off = fit_transfer(synth, flat, views, INPUTS, seconds=2)
    assert not off.fitted and "V3 flat" in off.reason
    with pytest.raises(ValueError, match="V9 not among the recorded leads"):
        fit_transfer(synth, x, views, ["I", "II", "V9"], seconds=2)
    with pytest.raises(ValueError, match="model rate"):
        fit_transfer(synth, x, views, INPUTS, fs=250)
