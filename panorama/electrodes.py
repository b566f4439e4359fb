"""Swapped electrodes: does the recording fit its labels, or a swap of two of them, better?

A chest electrode put on another's place (V1 and V5 exchanged) or the arm electrodes
reversed is a common recording error, and one no angle offset can mend: calibration
would bend the geometry to fit it (within its ±30° bounds) and accept a fit that draws
every view worse. So before anything is fitted, each recorded lead among I, II and V1–V6
is predicted from the others by a population linear model (least squares from the lead
covariance of the training split's records, 0.7–40 Hz, ``panorama bench electrodes``),
and the misfit (mean of 1 − r over the leads) of the recording as labelled is compared
with its misfit under each swap: two chest leads exchanged, the arm electrodes reversed
(LA/RA: I inverted, II becomes III) or the right arm and left leg exchanged (RA/LL). A swap
that lowers the misfit below ``SWAP_RATIO`` (0.4) of the labelled one is named.

Measured on the 280 usable records of ``../shared/data/ecg`` (``panorama bench electrodes
--split all``), the population model fitted on the training split's 216: no record as
recorded is called swapped (the lowest ratio 0.48; 0.53 on the validation split's 64); of
the records with two electrodes swapped on purpose, 98 % of V1/V5, 91 % of LA/RA and 92 %
of RA/LL swaps are named right, neighbours less often (V5/V6 11 %: their signals are
alike, and so is what the swap does to the views). LA and LL exchanged is not tested: the
recording changes little (I and II trade places), and tested at the same threshold it
called 4 of the 280 normal records reversed while naming 14 % of reversals made on
purpose. With fewer leads normal records are called swapped more often: on the 21 sets of I, II and 4 or 5 chest leads together 27 of 5,880 checks (0.46 %,
mostly neighbouring chest leads; none on I, II, V1, V3, V4, V5, the evaluation's
calibration leads), and 3 of 280 on I, V1, V3, V5; so the check needs I, II and at least
4 chest leads, and says so otherwise.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.signal import butter, sosfiltfilt

from .geometry import angle_between, resolve_view

LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")  # the independent leads of a 12-lead ECG
CHEST = LEADS[2:]
BAND_HZ = (0.7, 40.0)  # the heart's signal; baseline wander and mains left out
SWAP_RATIO = 0.4  # a swap must cut the misfit to this share of the labelled one
RIDGE = 1e-3  # of the mean variance, for the population regressions
COVARIANCE = Path(__file__).resolve().parent / "weights" / "lead_covariance.json"
MIN_SECONDS = 2.0  # a couple of beats at least
WINDOW_S = 5.0  # the first seconds looked at: what the threshold was measured on, in bounded memory
MIN_CHEST = 4  # with fewer, normal records are called swapped more often (module docstring)


@dataclass
class ElectrodeCheck:
    swap: str = ""  # "" when the labels fit, else the swap that fits better ("V1 and V5 swapped", "LA/RA reversed ...")
    misfit: float = float("nan")  # mean 1 − r of each lead against its prediction, as labelled
    misfit_swapped: float = float("nan")  # the same under the best swap
    tested: list[str] = field(default_factory=list)  # the swaps tried
    # how far apart two swapped chest electrodes are on the angle table (nan for a limb
    # reversal): within calibration's offset bounds its fit can reach the swap
    apart_deg: float = float("nan")
    reason: str = ""  # why nothing was tested, or what was found

    @property
    def suspect(self) -> bool:
        return bool(self.swap)


@lru_cache(maxsize=4)
def load_covariance(path: str | Path | None = None) -> np.ndarray:
    """(8, 8) covariance of ``LEADS`` from a file ``panorama bench electrodes --write`` made
    (the shipped ``COVARIANCE`` when ``path`` is None)."""
    path = COVARIANCE if path is None else path
    doc = json.loads(Path(path).read_text())
    if tuple(doc.get("leads", ())) != LEADS:
        raise ValueError(f"{path}: expected the covariance of {', '.join(LEADS)}, got {doc.get('leads')}")
    c = np.asarray(doc["covariance"], dtype=np.float64)
    if c.shape != (len(LEADS), len(LEADS)) or not np.isfinite(c).all():
        raise ValueError(f"{path}: covariance must be a finite {len(LEADS)}x{len(LEADS)} matrix")
    return c


def band(x: np.ndarray, fs: float) -> np.ndarray:
    """(leads, samples) band-passed to ``BAND_HZ``, each lead's median removed first."""
    x = np.asarray(x, dtype=np.float64)
    hi = min(BAND_HZ[1], 0.45 * fs)
    sos = butter(2, [BAND_HZ[0], hi], "bandpass", fs=fs, output="sos")
    return sosfiltfilt(sos, x - np.median(x, axis=1, keepdims=True), axis=1)


def loo_weights(cov: np.ndarray) -> np.ndarray:
    """(n, n) population regression of each lead from all the others (zero diagonal)."""
    n = len(cov)
    w = np.zeros((n, n))
    for j in range(n):
        o = [k for k in range(n) if k != j]
        g = cov[np.ix_(o, o)]
        w[j, o] = np.linalg.solve(g + RIDGE * np.trace(g) / len(o) * np.eye(len(o)), cov[o, j])
    return w


def misfit(x: np.ndarray, w: np.ndarray) -> float:
    """Mean over leads of 1 − r between each lead and its prediction from the others."""
    pred = w @ x
    xc = x - x.mean(axis=1, keepdims=True)
    pc = pred - pred.mean(axis=1, keepdims=True)
    den = np.sqrt((xc ** 2).sum(1) * (pc ** 2).sum(1))
    r = np.where(den > 0, (xc * pc).sum(1) / np.where(den > 0, den, 1), 0.0)
    return float(np.mean(1 - r))


def swaps(names: list[str]) -> list[tuple[str, object]]:
    """The swaps testable on leads ``names`` (a subset of ``LEADS``): (label, how)."""
    out: list[tuple[str, object]] = []
    if "I" in names and "II" in names:
        out += [("LA/RA reversed (left and right arm)", "LA/RA"), ("RA/LL reversed (right arm and left leg)", "RA/LL")]
    chest = [n for n in CHEST if n in names]
    out += [(f"{a} and {b} swapped", (names.index(a), names.index(b))) for a, b in itertools.combinations(chest, 2)]
    return out


def relabel(x: np.ndarray, names: list[str], how) -> np.ndarray:
    """``x`` as the swap ``how`` (from :func:`swaps`) would record it; each swap is its own inverse."""
    y = x.copy()
    if isinstance(how, tuple):
        a, b = how
        y[[a, b]] = x[[b, a]]
        return y
    i, ii = names.index("I"), names.index("II")
    if how == "LA/RA":  # recorded I is −I, recorded II is III = II − I (its own inverse)
        y[i], y[ii] = -x[i], x[ii] - x[i]
    else:  # RA/LL: recorded I is −III = I − II, recorded II is −II (its own inverse)
        y[i], y[ii] = x[i] - x[ii], -x[ii]
    return y


def check_electrodes(x: np.ndarray, names: list[str], fs: float, cov: np.ndarray | None = None,
                     ratio: float = SWAP_RATIO) -> ElectrodeCheck:
    """Whether the leads ``names`` of ``x`` (leads, samples) mV, all usable, fit their labels.

    Leads other than ``LEADS`` are ignored (III, aVR, aVL, aVF follow from I and II); only the
    first ``WINDOW_S`` seconds are looked at. Tests nothing, saying why (``tested`` empty),
    without I, II and ``MIN_CHEST`` chest leads, under ``MIN_SECONDS``, or with a sample of
    those leads not finite."""
    x = np.atleast_2d(np.asarray(x))
    if x.shape[0] != len(names):
        raise ValueError(f"{x.shape[0]} leads of samples for {len(names)} names")
    present = [n for n in LEADS if n in names]
    if "I" not in present or "II" not in present or len(present) - 2 < MIN_CHEST:
        return ElectrodeCheck(reason=f"not checked: needs I, II and {MIN_CHEST} chest leads")
    if x.shape[1] < MIN_SECONDS * fs:
        return ElectrodeCheck(reason=f"not checked: under {MIN_SECONDS:g} s")
    x = x[[names.index(n) for n in present], :int(round(WINDOW_S * fs))].astype(np.float64)
    if not np.isfinite(x).all():
        return ElectrodeCheck(reason="not checked: samples missing")
    if cov is None:
        try:
            cov = load_covariance()
        except (OSError, ValueError) as exc:  # a broken install must not stop calibration: said instead
            return ElectrodeCheck(reason=f"not checked: the population model is unreadable ({exc})")
    idx = [LEADS.index(n) for n in present]
    w = loo_weights(cov[np.ix_(idx, idx)])
    xb = band(x, fs)
    labelled = misfit(xb, w)
    tested = swaps(present)
    scores = [misfit(relabel(xb, present, how), w) for _, how in tested]
    if not tested:
        return ElectrodeCheck(misfit=labelled, reason="not checked: no swap to test")
    best = int(np.argmin(scores))
    res = ElectrodeCheck(misfit=labelled, misfit_swapped=scores[best], tested=[t for t, _ in tested])
    if scores[best] < ratio * labelled:
        res.swap = tested[best][0]
        how = tested[best][1]
        if isinstance(how, tuple):
            res.apart_deg = angle_between(resolve_view(present[how[0]]), resolve_view(present[how[1]]))
        res.reason = (f"{res.swap}, by the look of it: the leads agree {labelled / max(scores[best], 1e-9):.1f}x "
                      f"better with that undone (misfit {labelled:.2f} -> {scores[best]:.2f}); check the electrodes")
    else:
        res.reason = f"labels fit (misfit {labelled:.2f}; best swap {scores[best]:.2f})"
    return res
