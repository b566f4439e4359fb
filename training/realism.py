"""``panorama bench realism``: how the simulator's neighbouring leads relate, against real records.

The model learns every angle no real recording here holds (V2, V6, posterior, right-sided)
from the simulator alone, so how alike the simulator's neighbouring leads are — their
correlation and their amplitude ratio — decides how it draws those angles. This compares,
per lead pair, the median over simulated patients with the median over real records. Both
are high-passed at 0.67 Hz first (a monitor's diagnostic filter), so baseline wander, which
real records have more of, does not pass for a difference in shape (raw, I–V6 correlates
0.72 on the validation records; filtered, 0.89).

Per lead it also compares the QRS polarity, (max + min) / (max − min) of the filtered
signal: −1 for a lead that only sees S waves, +1 for one that only sees R waves. Its
progression across the chest leads places the R/S transition, which is where the
precordial leads change most from one electrode to the next.

Pairs that involve V2 or V6 are marked: those leads are never supervised, so use those rows
to diagnose and never to tune the simulator (tune on the others).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scipy.signal import butter, sosfiltfilt

from panorama.errors import RecordError
from panorama.records import MODEL_FS, find_records, lead_quality, read_record

from . import splits

PAIRS = (("I", "II"), ("V1", "V3"), ("V3", "V4"), ("V4", "V5"), ("I", "V5"),
         ("V1", "V2"), ("V2", "V3"), ("V5", "V6"), ("I", "V6"))
HIDDEN = ("V2", "V6")
POLARITY_LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
HIGHPASS_HZ = 0.67
_SOS = butter(2, HIGHPASS_HZ, "highpass", fs=MODEL_FS, output="sos")


def _stats(leads: dict[str, np.ndarray]) -> dict:
    """(a, b) → (correlation, RMS ratio a/b) per pair, and lead name → QRS polarity."""
    f = {n: sosfiltfilt(_SOS, np.asarray(v, dtype=np.float64)) for n, v in leads.items()}
    out = {}
    for a, b in PAIRS:
        if a not in f or b not in f:
            continue
        x, y = f[a], f[b]
        sx, sy = np.sqrt(np.mean(x ** 2)), np.sqrt(np.mean(y ** 2))
        if sx > 0 and sy > 0:
            out[(a, b)] = (float(np.mean(x * y) / (sx * sy)), float(sx / sy))
    for n in POLARITY_LEADS:
        if n in f and np.ptp(f[n]) > 0:
            out[n] = float((f[n].max() + f[n].min()) / np.ptp(f[n]))
    return out


def compare_realism(data: list[Path], split: str = "val", patients: int = 60, seed: int = 2000,
                    anatomy: str = "v1") -> dict:
    from .simulator import simulate

    names = sorted({n for p in PAIRS for n in p} | set(POLARITY_LEADS))
    sim = [_stats({n: s.lead(n) for n in names})
           for s in (simulate(seed + i, views=names, duration_s=10.0, anatomy=anatomy) for i in range(patients))]
    real = []
    for path in splits.select(find_records(*data), split):
        try:
            rec = read_record(path, fs=MODEL_FS)
        except RecordError:
            continue
        ok = {n: rec.lead(n) for n, f in zip(rec.leads, lead_quality(rec.signals)) if f == "ok" and n in names}
        real.append(_stats(ok))
    if not real:
        raise RecordError(f"no readable record in split {split!r} of {', '.join(map(str, data))}")
    rows = {}
    for pair in PAIRS:
        s = [d[pair] for d in sim if pair in d]
        r = [d[pair] for d in real if pair in d]
        if s and r:
            rows["-".join(pair)] = {"corr_sim": round(float(np.median([v[0] for v in s])), 2),
                                    "corr_real": round(float(np.median([v[0] for v in r])), 2),
                                    "rms_ratio_sim": round(float(np.median([v[1] for v in s])), 2),
                                    "rms_ratio_real": round(float(np.median([v[1] for v in r])), 2),
                                    "hidden": any(n in HIDDEN for n in pair), "real_records": len(r)}
    polarity = {}
    for n in POLARITY_LEADS:
        s = [d[n] for d in sim if n in d]
        r = [d[n] for d in real if n in d]
        if s and r:
            polarity[n] = {"sim": round(float(np.median(s)), 2), "real": round(float(np.median(r)), 2),
                           "hidden": n in HIDDEN}
    return {"patients": patients, "split": split, "anatomy": anatomy, "pairs": rows, "polarity": polarity}


def format_realism(res: dict) -> str:
    lines = [f"{res['patients']} simulated patients (anatomy {res.get('anatomy', 'v1')}) against real records "
             f"(split {res['split']}); medians, "
             f"high-passed at {HIGHPASS_HZ} Hz",
             f"{'pair':<8}{'corr sim':>10}{'corr real':>11}{'rms a/b sim':>13}{'rms a/b real':>14}"]
    for pair, r in res["pairs"].items():
        mark = "  (V2/V6: diagnose, never tune)" if r["hidden"] else ""
        lines.append(f"{pair:<8}{r['corr_sim']:>+10.2f}{r['corr_real']:>+11.2f}{r['rms_ratio_sim']:>13.2f}"
                     f"{r['rms_ratio_real']:>14.2f}{mark}")
    lines.append("QRS polarity (max + min) / (max - min): " + ", ".join(
        f"{n} {p['sim']:+.2f} / {p['real']:+.2f}{'*' if p['hidden'] else ''}"
        for n, p in res.get("polarity", {}).items()) + "  (simulated / real; * diagnose only)")
    return "\n".join(lines)
