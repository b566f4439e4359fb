from pathlib import Path

import numpy as np
import pytest
import wfdb

from panorama.errors import RecordError
from panorama.geometry import STANDARD_12
from panorama.records import find_records, lead_quality, read_record, write_record


def _write_uv_record(tmp_path, names, seconds=2.0, fs=250):
    t = np.arange(int(seconds * fs)) / fs
    sig = np.stack([1000 * np.sin(2 * np.pi * (k + 1) * t) for k in range(len(names))]).T  # µV
    wfdb.wrsamp("uvrec", fs=fs, units=["uV"] * len(names), sig_name=names, p_signal=sig,
                fmt=["16"] * len(names), write_dir=str(tmp_path))
    return tmp_path / "uvrec"


def test_microvolts_lower_case_names_and_resampling(tmp_path):
    base = _write_uv_record(tmp_path, ["i", "AVR", "v2", "MLII"])
    rec = read_record(str(base) + ".hea")  # with the extension: accepted too
    assert rec.leads == ["I", "aVR", "V2"]  # unknown MLII is left out
    assert rec.fs == 500 and rec.signals.shape == (3, 1000)  # 2 s at 500 Hz
    assert np.abs(rec.signals[0]).max() == pytest.approx(1.0, abs=0.02)  # 1000 µV → 1 mV
    only = read_record(base, leads=["V2"], fs=None)
    assert only.leads == ["V2"] and only.fs == 250


@pytest.mark.parametrize("names,seconds,fs,says", [
    (["I", "II", "V3", "DUP"], 2.0, 500, "names a lead more than once (V3 as 'V3', 'V3')"),  # DUP made V3 below
    (["I", "i", "V3"], 2.0, 500, "(I as 'I', 'i')"),
    (["I", "II", "V3"], 2.0, 40, "sampled at 40 Hz; an ECG needs at least 50 Hz"),
    (["I", "II", "V3"], 0.5, 500, "record holds 250 samples (0.5 s); at least 1 s (a beat) is needed"),
])
def test_records_that_cannot_be_used_say_why(tmp_path, names, seconds, fs, says):
    base = _write_uv_record(tmp_path, names, seconds=seconds, fs=fs)
    hea = Path(str(base) + ".hea")
    hea.write_text(hea.read_text().replace(" DUP\n", " V3\n"))  # wfdb writes no duplicate names itself
    with pytest.raises(RecordError, match="uvrec: ") as err:
        read_record(base)
    assert says in str(err.value)


def test_a_missing_lead_names_the_labels_not_recognised(tmp_path):
    base = _write_uv_record(tmp_path, ["MLII", "V1"])
    with pytest.raises(RecordError, match=r"lacks lead\(s\) II \(has V1; labels not recognised: MLII\); "
                                          "MLII is a modified lead II from torso electrodes"):
        read_record(base, leads=["II"])


def test_other_spellings_inverted_avr_and_spelled_out_units(tmp_path):
    """Einthoven's D1/D2, an "ECG " prefix, the Cabrera display's -aVR (stored upside down)
    and units spelled out are read as the leads and millivolts they are."""
    fs, t = 250, np.arange(500) / 250
    i, ii = np.sin(2 * np.pi * t), 0.5 * np.cos(2 * np.pi * 3 * t)
    avr = -(i + ii) / 2
    sig = np.stack([1000 * i, ii / 1000, -avr, ii]).T
    wfdb.wrsamp("spelt", fs=fs, units=["microvolts", "V", "mV", "millivolts"], sig_name=["D1", "ECG II", "-aVR", "V1"],
                p_signal=sig, fmt=["16"] * 4, adc_gain=[10.0, 1e6, 1000.0, 1000.0], baseline=[0] * 4,
                write_dir=str(tmp_path))
    rec = read_record(tmp_path / "spelt", fs=None)
    assert rec.leads == ["I", "II", "aVR", "V1"]
    for got, want in zip(rec.signals, (i, ii, avr, ii)):
        assert np.abs(got - want).max() < 2e-3  # mV, the right way up


def test_real_records_read_at_any_rate(data_dir):
    ptb = read_record(data_dir / "ptb_frank" / "ptb_tseal00")  # 1000 Hz with Frank leads
    assert ptb.fs == 500 and ptb.leads == [*STANDARD_12, "VX", "VY", "VZ"]
    raw = read_record(data_dir / "ptb_frank" / "ptb_tseal00", fs=None)
    assert raw.signals.shape[1] == 2 * ptb.signals.shape[1]
    # Einthoven holds in the recorded limb leads, so the leads were mapped correctly
    i, ii, iii = (ptb.lead(n) for n in ("I", "II", "III"))
    assert np.median(np.abs(iii - (ii - i))) < 0.02


def test_lead_quality_flags():
    rng = np.random.default_rng(0)
    ok = rng.standard_normal(5000) * 0.3
    flat = np.full(5000, 0.1) + rng.standard_normal(5000) * 1e-4
    sat = np.clip(ok * 10, -1.5, 1.5)
    missing = ok.copy()
    missing[:4000] = np.nan
    assert lead_quality(np.stack([ok, flat, sat, missing])) == ["ok", "flat", "saturated", "missing"]


@pytest.mark.parametrize("held,flag", [(11, "ok"), (30, "saturated")])
def test_a_short_lead_held_at_its_trough_is_saturated_only_from_a_rail_length(held, flag):
    """1 s of a lead whose trough sits at its minimum for 11 samples in a row (as ludb001's V6
    does, quantised to 1 µV) is fine; held 30 samples (60 ms) it is at a rail."""
    x = 0.5 * np.sin(2 * np.pi * np.arange(500) / 500)
    x[100: 100 + held] = x.min() - 0.1
    assert lead_quality(x) == [flag]


def test_write_then_read_back_any_view_names(tmp_path):
    t = np.arange(1000) / 500
    sig = np.stack([0.8 * np.sin(2 * np.pi * t), -2.5 * np.cos(2 * np.pi * 3 * t)]).astype(np.float32)
    base = write_record(tmp_path, "out", sig, ["V7", "120:45"], 500, ["fitted: none"])
    back = wfdb.rdrecord(str(base))
    assert back.sig_name == ["V7", "120:45"]
    assert np.abs(back.p_signal.T - sig).max() < 1e-3  # well under 1 µV... within 1 count
    assert back.comments == ["fitted: none"]


def test_errors_are_record_errors(tmp_path):
    with pytest.raises(RecordError, match="no WFDB record"):
        read_record(tmp_path / "nothing")
    with pytest.raises(RecordError, match="no WFDB records"):
        find_records(tmp_path)
    base = _write_uv_record(tmp_path, ["foo", "bar"])
    with pytest.raises(RecordError, match="no known lead names"):
        read_record(base)
    base = _write_uv_record(tmp_path, ["I", "II"])
    with pytest.raises(RecordError, match="lacks lead"):
        read_record(base, leads=["V3"])


def test_screen_keeps_real_leads_unlike_each_other_and_flags_noise_and_units(data_dir):
    """Three real leads whose waveforms correlate little (V3 beside I and II) are all usable:
    they share their beats. White noise, a lead in µV labelled mV and a clipped lead are not."""
    from panorama.records import screen_leads

    rec = read_record(data_dir / "challenge2021" / "A0010", leads=["I", "II", "V3"])
    x = rec.signals[:, :2500].copy()
    assert np.abs(np.corrcoef(x)[2, :2]).max() < 0.3  # the zero-lag test alone called V3 noise
    assert screen_leads(x, 500) == ["ok", "ok", "ok"]
    noisy = x.copy()
    noisy[2] = np.random.default_rng(0).standard_normal(2500) * x[2].std()
    assert screen_leads(noisy, 500) == ["ok", "ok", "noise-only"]
    assert screen_leads(x * [[1], [1], [1000]], 500)[2] == "not in mV (check the units)"
    nan = x.copy()
    nan[1, 100] = np.nan
    assert screen_leads(nan, 500)[1] == "missing samples"
    assert lead_quality(x[:, :25]) == ["ok"] * 3  # 25 samples: one at an extreme is no rail
