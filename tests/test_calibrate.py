"""On-the-fly calibration: clean refusals, and recovery of known displacements on the simulator."""

import numpy as np
import pytest
import torch

from panorama.calibrate import calibrate
from panorama.geometry import NAMED, STANDARD_12, resolve_views
from panorama.model import ModelConfig, NefNetV2
from panorama.synth import DEFAULT_CHECKPOINTS, Synthesizer
from training.simulator import render, sample_patient

CAL = [n for n in STANDARD_12 if n not in ("V2", "V6")]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return NefNetV2(ModelConfig(channels=16, embed_dim=16, heads=2, blocks=1, encoder_blocks=2))


def _patient(seed, displacement):
    rng = np.random.default_rng(seed)
    table = np.array([[NAMED[n].theta, NAMED[n].phi] for n in CAL], dtype=float)
    true = table.copy()
    true[CAL.index("V1"):] += displacement
    return render(sample_patient(rng, "sinus"), true, CAL, 6.0, 500).astype(np.float32), true - table


def test_fewer_seconds_than_asked(tiny):
    x, _ = _patient(0, 0.0)
    res = calibrate(tiny, x[:, :1000], resolve_views(",".join(CAL)))
    assert not res.accepted and "only 2.0 s recorded, 5 s asked" in res.reason
    assert np.all(res.offsets_deg == 0)


def test_a_single_lead_or_flat_leads_cannot_calibrate(tiny):
    x, _ = _patient(0, 0.0)
    res = calibrate(tiny, x[:1], resolve_views("I"))
    assert not res.accepted and "usable lead" in res.reason
    flat = x.copy()
    flat[2:] = 0.05  # every lead but I and II off
    res = calibrate(tiny, flat, resolve_views(",".join(CAL)))
    assert not res.accepted and "V1 flat" in res.reason and np.all(res.offsets_deg == 0)


def test_noise_only_leads_are_refused(tiny):
    noise = np.random.default_rng(1).standard_normal((len(CAL), 3000)).astype(np.float32) * 0.2
    res = calibrate(tiny, noise, resolve_views(",".join(CAL)))
    assert not res.accepted and "noise-only" in res.reason


def test_bad_arguments_are_value_errors(tiny):
    x, _ = _patient(0, 0.0)
    with pytest.raises(ValueError, match="expected"):
        calibrate(tiny, x, resolve_views("I,II"))
    with pytest.raises(ValueError, match="model rate"):
        calibrate(tiny, x, resolve_views(",".join(CAL)), fs=250)


def test_recovers_a_known_displacement_and_improves_synthesis():
    synth = Synthesizer.load(DEFAULT_CHECKPOINTS["pretrained"])
    shift = np.array([0.0, 12.0])  # every chest electrode 12° further round to the left
    gains, errs = [], []
    for seed in range(4):
        x, true_off = _patient(seed, shift)
        res = calibrate(synth.model, x, resolve_views(",".join(CAL)))
        assert res.residual_after_uv < res.residual_before_uv
        chest = [CAL.index(n) for n in ("V1", "V3", "V4", "V5")]
        errs.append(np.abs(res.offsets_deg[chest] - true_off[chest]).mean())
        gains.append(res.accepted)
    # fitted offsets are closer to the truth than the table (error 6° on average per component)
    assert np.mean(errs) < 6.0 and sum(gains) >= 3
