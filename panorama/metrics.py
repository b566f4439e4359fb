"""Scoring exactly as ``../shared/data/README.md`` defines it.

Per record: every lead (truth, prediction, and the 12 leads that set the scale) is centred
on its median over the scored window; the scale is the min..max of the 12 centred true
leads; PSNR = 20·log10(1/RMSE) of the scaled error, per view. A record's PSNR is the mean
of its views', and the overall figure the mean over records (this reproduces the data
README's reference figures: 24.0 / 28.0 / 29.5 dB for zero / dipole / least squares).
SSIM uses data range 1 on the same scaled signals; RMSE is reported in µV and Pearson r
per view, because the PSNR flatters (predicting 0 mV scores about 24 dB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import uniform_filter1d

SSIM_WINDOW = 7  # samples; the common default (scikit-image) for SSIM


@dataclass
class ViewScore:
    psnr_db: float
    ssim: float
    rmse_uv: float
    r: float


@dataclass
class RecordScore:
    psnr_db: float  # mean over the scored views
    ssim: float
    views: dict[str, ViewScore]


def centre(x: np.ndarray) -> np.ndarray:
    """Subtract each row's median (an unseen lead's DC offset carries no information)."""
    x = np.asarray(x, dtype=np.float64)
    return x - np.median(x, axis=-1, keepdims=True)


def psnr(err_scaled: np.ndarray) -> float:
    rmse = float(np.sqrt(np.mean(np.square(err_scaled))))
    return float("inf") if rmse == 0 else 20.0 * np.log10(1.0 / rmse)


def ssim_1d(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, win: int = SSIM_WINDOW) -> float:
    """Mean structural similarity of two 1-D signals (Wang et al. 2004, uniform window,
    sample covariances, K1 = 0.01, K2 = 0.03), as scikit-image computes it for images."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ux, uy = uniform_filter1d(a, win), uniform_filter1d(b, win)
    cov = win / (win - 1)
    vx = cov * (uniform_filter1d(a * a, win) - ux * ux)
    vy = cov * (uniform_filter1d(b * b, win) - uy * uy)
    vxy = cov * (uniform_filter1d(a * b, win) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (win - 1) // 2  # skimage crops the border where the window is incomplete
    return float(s[pad:len(s) - pad].mean())


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _centred(truth: np.ndarray, pred: np.ndarray, scale_leads: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Truth and prediction centred on their medians, and the low end and span of the
    centred scale leads: what PSNR is scaled by. ValueError for mismatched shapes or flat
    scale leads."""
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    s = centre(scale_leads)
    lo, hi = float(s.min()), float(s.max())
    if hi - lo <= 0:
        raise ValueError("the scale leads are flat: the record cannot be scored")
    return centre(truth), centre(pred), lo, hi - lo


def score_record(truth: np.ndarray, pred: np.ndarray, scale_leads: np.ndarray,
                 names: list[str]) -> RecordScore:
    """Score predicted views against the truth over one window.

    truth, pred: (views, samples) mV; scale_leads: (12, samples) mV, the record's 12
    standard leads over the same window, which set the PSNR scale.
    """
    t, p, lo, span = _centred(truth, pred, scale_leads)
    tn, pn = (t - lo) / span, (p - lo) / span
    views = {}
    for i, name in enumerate(names):
        views[name] = ViewScore(
            psnr_db=psnr(pn[i] - tn[i]),
            ssim=ssim_1d(tn[i], pn[i]),
            rmse_uv=float(np.sqrt(np.mean(np.square(p[i] - t[i]))) * 1000.0),
            r=pearson(t[i], p[i]),
        )
    return RecordScore(float(np.mean([v.psnr_db for v in views.values()])),
                       float(np.mean([v.ssim for v in views.values()])), views)


BAND_EDGES_HZ = (0.5, 5.0, 15.0, 40.0)  # baseline | T wave and ST | QRS | QRS detail | noise


def band_names(edges=BAND_EDGES_HZ) -> list[str]:
    lo = (0.0, *edges)
    hi = (*edges, float("inf"))
    return [f"<{b:g} Hz" if a == 0 else (f">{a:g} Hz" if b == float("inf") else f"{a:g}-{b:g} Hz")
            for a, b in zip(lo, hi)]


def error_bands(truth: np.ndarray, pred: np.ndarray, scale_leads: np.ndarray, fs: float,
                edges=BAND_EDGES_HZ) -> tuple[np.ndarray, np.ndarray]:
    """Where one record's error lies in frequency, scored as :func:`score_record` scores it.

    The scaled error of each view is split exactly (Parseval) over the bins of its
    orthonormal DCT-II, bin k standing for k·fs/(2·samples) Hz, into the half-open bands
    [0, e1), [e1, e2), … between ``edges`` (Hz). The DCT, not the FFT: the FFT takes the
    window as one period, so a drift that ends away from where it began (a ramp) would
    spread as a sawtooth into the bands above; the DCT's even extension keeps it below
    0.5 Hz. Returns (shares, psnr_without): both (views, bands); each band's share of the
    view's squared error (a row sums to 1, or is all 0 where there is no error), and the
    view's PSNR with that band's error taken away (inf where nothing is left)."""
    from scipy.fft import dct

    t, p, _, span = _centred(truth, pred, scale_leads)
    err = (p - t) / span  # (views, T), as score_record scales it
    n = err.shape[-1]
    power = dct(err, type=2, norm="ortho", axis=-1) ** 2 / n  # sums to the mean square
    which = np.searchsorted(np.asarray(edges, float), np.arange(n) * fs / (2.0 * n), side="right")
    energy = np.stack([power[..., which == b].sum(-1) for b in range(len(edges) + 1)], -1)
    total = energy.sum(-1, keepdims=True)
    shares = np.divide(energy, total, out=np.zeros_like(energy), where=total > 0)
    with np.errstate(divide="ignore"):
        psnr_without = -10.0 * np.log10(np.maximum(total - energy, 0.0))
    return shares, psnr_without


def _median(values) -> float:
    """Median ignoring NaN (r is undefined for a constant prediction); NaN when none is finite."""
    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else float("nan")


def summarise(scores: list[RecordScore]) -> dict:
    """Overall and per-view figures over many records: mean PSNR and SSIM, median RMSE and r."""
    if not scores:
        raise ValueError("no scored records to summarise")
    names = list(scores[0].views)
    per_view = {}
    for n in names:
        vs = [s.views[n] for s in scores]
        per_view[n] = {
            "psnr_db": float(np.mean([v.psnr_db for v in vs])),
            "ssim": float(np.mean([v.ssim for v in vs])),
            "rmse_uv_median": float(np.median([v.rmse_uv for v in vs])),
            "r_median": _median([v.r for v in vs]),
        }
    every = [v for s in scores for v in s.views.values()]
    overall = {
        "psnr_db": float(np.mean([s.psnr_db for s in scores])),
        "ssim": float(np.mean([s.ssim for s in scores])),
        "rmse_uv_median": float(np.median([v.rmse_uv for v in every])),
        "r_median": _median([v.r for v in every]),
        "records": len(scores),
    }
    return {"overall": overall, "per_view": per_view}
