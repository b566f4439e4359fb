import numpy as np
import pytest

from panorama.metrics import pearson, score_record, ssim_1d, summarise


def test_psnr_golden_value():
    t = np.linspace(0, 1, 500)
    scale = np.stack([np.sin(2 * np.pi * 3 * t)] * 12)  # centred span exactly 2 mV
    truth = scale[:2].copy()
    pred = truth + 0.02  # constant offset: removed by median centring
    s = score_record(truth, pred, scale, ["A", "B"])
    assert s.psnr_db == float("inf") or s.psnr_db > 200
    pred = truth.copy()
    pred[0] += 0.2 * np.sign(np.sin(2 * np.pi * 50 * t))  # ±0.2 mV square error on view A
    s = score_record(truth, pred, scale, ["A", "B"])
    # scaled error 0.2/2 = 0.1 (up to centring) → 20 dB on A
    assert s.views["A"].psnr_db == pytest.approx(20.0, abs=0.2)
    assert s.views["A"].rmse_uv == pytest.approx(200.0, rel=0.02)


def test_ssim_and_r_bounds():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(1000)
    assert ssim_1d(a, a) == pytest.approx(1.0)
    assert ssim_1d(a, rng.standard_normal(1000)) < 0.2  # unrelated signals
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)


def test_summarise_reports_medians_and_counts():
    t = np.linspace(0, 1, 500)
    scale = np.stack([np.sin(2 * np.pi * 3 * t)] * 12)
    scores = [score_record(scale[:1], scale[:1] * k, scale, ["A"]) for k in (0.5, 0.8, 0.9)]
    s = summarise(scores)
    assert s["overall"]["records"] == 3
    assert s["per_view"]["A"]["r_median"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        summarise([])
