"""Recording devices: what an electrocardiograph does to the clean body-surface signal.

Applied after rendering, as a separate step, in the order the signal meets them:
analogue interference at the skin (baseline wander from respiration and electrode motion,
mains pick-up, amplifier and electrode noise) → the front end's band-pass → per-channel
gain error → the ADC's own sampling rate (``adc_fs``: a Holter digitising at 250 Hz and
re-sampled to the requested rate loses everything above 125 Hz) → quantisation.

Named profiles follow the standards' corners: diagnostic 0.05–150 Hz (AHA/IEC 60601-2-25),
monitoring 0.5–40 Hz (IEC 60601-2-27 "monitor" mode), ambulatory (Holter) 0.05–40 Hz at
250 Hz; noise and LSB levels are typical of each class (diagnostic ADCs ~1 µV LSB, Holters
~5 µV). ``random_profile`` draws training profiles from ranges around them.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import numpy as np
from scipy.signal import butter, resample_poly, sosfilt, sosfilt_zi, sosfiltfilt


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    band_hz: tuple[float | None, float | None] = (None, None)  # high-pass, low-pass corners
    filter_order: int = 2
    zero_phase: bool = True  # offline diagnostic filtering; monitors filter causally
    gain_sd: float = 0.0  # per-lead relative gain error (0.05 = ±5 %)
    noise_uv: float = 0.0  # white noise RMS
    mains_hz: float | None = None  # 50 or 60
    mains_uv: float = 0.0  # peak amplitude of mains pick-up (varies per lead up to this)
    wander_uv: float = 0.0  # baseline wander amplitude
    resp_hz: tuple[float, float] = (0.15, 0.4)
    lsb_uv: float = 0.0  # quantisation step; 0 = none
    adc_fs: int | None = None  # the device's own sampling rate; None = the requested rate

    def __post_init__(self):
        lo, hi = self.band_hz
        if lo is not None and hi is not None and not 0 < lo < hi:
            raise ValueError(f"device {self.name!r}: band must satisfy 0 < low < high, got {self.band_hz}")
        if self.mains_hz is not None and self.mains_hz <= 0:
            raise ValueError(f"device {self.name!r}: mains_hz must be positive (50 or 60), got {self.mains_hz}")
        if min(self.gain_sd, self.noise_uv, self.mains_uv, self.wander_uv, self.lsb_uv) < 0:
            raise ValueError(f"device {self.name!r}: gain, noise, mains, wander and LSB must be ≥ 0")
        if self.adc_fs is not None and self.adc_fs <= 0:
            raise ValueError(f"device {self.name!r}: adc_fs must be a positive rate in Hz, got {self.adc_fs}")


DEVICE_PROFILES: dict[str, DeviceProfile] = {
    "ideal": DeviceProfile("ideal"),
    "diagnostic": DeviceProfile("diagnostic", (0.05, 150.0), gain_sd=0.02, noise_uv=10.0, mains_hz=50.0,
                                mains_uv=8.0, wander_uv=80.0, lsb_uv=1.0),
    "monitor": DeviceProfile("monitor", (0.5, 40.0), zero_phase=False, gain_sd=0.05, noise_uv=15.0,
                             mains_hz=60.0, mains_uv=20.0, wander_uv=120.0, lsb_uv=2.5),
    "holter": DeviceProfile("holter", (0.05, 40.0), zero_phase=False, gain_sd=0.05, noise_uv=20.0,
                            mains_hz=50.0, mains_uv=15.0, wander_uv=150.0, lsb_uv=5.0, adc_fs=250),
}


def resolve_device(device: str | DeviceProfile | None, rng: np.random.Generator) -> DeviceProfile:
    """A profile by name, ``"random"`` (drawn from ``rng``), a DeviceProfile, or None (= ideal)."""
    if device is None:
        return DEVICE_PROFILES["ideal"]
    if isinstance(device, DeviceProfile):
        return device
    if device == "random":
        return random_profile(rng)
    if device not in DEVICE_PROFILES:
        raise ValueError(f"unknown device profile {device!r}; choose from {', '.join(DEVICE_PROFILES)}, "
                         "'random', or pass a DeviceProfile")
    return DEVICE_PROFILES[device]


def random_profile(rng: np.random.Generator) -> DeviceProfile:
    """A training profile: corners, noise, interference and resolution drawn around the named ones."""
    hp = float(rng.choice([0.05, 0.05, 0.15, 0.5, 0.67]))
    lp = float(rng.choice([40.0, 100.0, 150.0, 150.0]))
    return DeviceProfile(
        "random", (hp, lp), zero_phase=bool(rng.random() < 0.6),
        gain_sd=float(rng.uniform(0.0, 0.05)), noise_uv=float(rng.uniform(2, 25)),
        mains_hz=float(rng.choice([50.0, 60.0])), mains_uv=float(rng.uniform(0, 30)),
        wander_uv=float(rng.uniform(0, 200)), lsb_uv=float(rng.choice([0.5, 1.0, 2.5, 5.0])),
        adc_fs=int(rng.choice([250, 500, 1000])),
    )


def apply_device(clean: np.ndarray, fs: int, profile: DeviceProfile, rng: np.random.Generator) -> np.ndarray:
    """The recorded signal (n_leads, n) in mV, same shape and rate as ``clean``."""
    x = np.array(clean, dtype=np.float64)
    n_leads, n = x.shape
    t = np.arange(n) / fs
    if profile.wander_uv > 0:  # respiration plus a slower electrode drift, per lead
        f = rng.uniform(*profile.resp_hz)
        ph = rng.uniform(0, 2 * np.pi, (n_leads, 2))
        amp = profile.wander_uv * 1e-3 * rng.uniform(0.2, 1.0, (n_leads, 2))
        x += amp[:, :1] * np.sin(2 * np.pi * f * t + ph[:, :1])
        x += amp[:, 1:] * np.sin(2 * np.pi * rng.uniform(0.03, 0.1) * t + ph[:, 1:])
    if profile.mains_hz is not None and profile.mains_uv > 0:
        ph = rng.uniform(0, 2 * np.pi, (n_leads, 1))
        amp = profile.mains_uv * 1e-3 * rng.uniform(0.5, 1.0, (n_leads, 1))
        x += amp * np.sin(2 * np.pi * profile.mains_hz * t + ph)
    if profile.noise_uv > 0:
        x += rng.normal(0.0, profile.noise_uv * 1e-3, x.shape)
    adc_fs = profile.adc_fs or fs
    if adc_fs != fs:  # the device digitises at its own rate; we deliver the requested one
        g = gcd(int(adc_fs), int(fs))
        x = resample_poly(x, adc_fs // g, fs // g, axis=1)
    x = _band_pass(x, adc_fs, profile)
    if profile.gain_sd > 0:
        x *= 1.0 + rng.normal(0.0, profile.gain_sd, (n_leads, 1))
    if adc_fs != fs:
        g = gcd(int(adc_fs), int(fs))
        x = resample_poly(x, fs // g, adc_fs // g, axis=1)[:, :n]
        x = np.pad(x, ((0, 0), (0, n - x.shape[1])), mode="edge")
    if profile.lsb_uv > 0:
        lsb = profile.lsb_uv * 1e-3
        x = np.round(x / lsb) * lsb
    return x


def _band_pass(x: np.ndarray, fs: float, profile: DeviceProfile) -> np.ndarray:
    lo, hi = profile.band_hz
    nyq = fs / 2
    hi = None if hi is None or hi >= 0.95 * nyq else hi  # corner above Nyquist: the ADC's job
    if lo is None and hi is None:
        return x
    if lo is not None and hi is not None:
        sos = butter(profile.filter_order, [lo, hi], btype="bandpass", fs=fs, output="sos")
    elif lo is not None:
        sos = butter(profile.filter_order, lo, btype="highpass", fs=fs, output="sos")
    else:
        sos = butter(profile.filter_order, hi, btype="lowpass", fs=fs, output="sos")
    if profile.zero_phase:
        return sosfiltfilt(sos, x, axis=1)
    # Start in the steady state for the first sample, as a device that has been on a while.
    zi = sosfilt_zi(sos)[:, None, :] * x[None, :, :1]
    return sosfilt(sos, x, axis=1, zi=zi)[0]
