import numpy as np
import pytest

from panorama.metrics import band_names, error_bands, pearson, score_record, ssim_1d, summarise


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


@pytest.mark.parametrize("n", [2500, 2501])
def test_error_bands_split_the_scored_error_exactly_and_place_each_tone_in_its_band(n):
    rng = np.random.default_rng(3)
    t = np.arange(n) / 500
    truth = rng.normal(size=(6, n))
    scale = rng.normal(size=(12, n))
    # one error per band: 0.2, 2, 10, 25 and 60 Hz, and a drift that ends away from where it began
    err = [np.sin(2 * np.pi * f * t) for f in (0.2, 2.0, 10.0, 25.0, 60.0)] + [t / t[-1]]
    pred = truth + 0.05 * np.stack(err)
    shares, without = error_bands(truth, pred, scale, 500.0)
    assert band_names() == ["<0.5 Hz", "0.5-5 Hz", "5-15 Hz", "15-40 Hz", ">40 Hz"]
    assert np.allclose(shares.sum(axis=1), 1.0)
    assert [int(np.argmax(row)) for row in shares] == [0, 1, 2, 3, 4, 0]
    # (the median centring leaves each some DC, which counts below 0.5 Hz)
    assert shares.max(axis=1).min() > 0.85 and shares[5, 0] > 0.99  # the ramp: no sawtooth spread upward
    # Parseval: the bands' energies add up to the error score_record turns into PSNR, and
    # without the band holding the tone, little is left
    got = score_record(truth, pred, scale, list("abcdef"))
    for i, name in enumerate("abcdef"):
        total = 10 ** (-got.views[name].psnr_db / 10)  # the scaled error's mean square
        assert np.allclose(10 ** (-without[i] / 10), total * (1 - shares[i]), rtol=1e-6, atol=1e-12)
        assert without[i][np.argmax(shares[i])] > got.views[name].psnr_db + 8
    with pytest.raises(ValueError, match="differ in shape"):
        error_bands(truth, pred[:2], scale, 500.0)
