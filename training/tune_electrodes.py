"""``panorama bench electrodes``: the swapped-electrode check (panorama/electrodes.py) on real
records: its population model fitted on the training split, then scored on ``--split``:
how many records as recorded it calls swapped (false alarms), and for each swap, made on
purpose on every record, how often it names that swap. ``--write`` stores the covariance
the check ships with (``panorama/weights/lead_covariance.json``)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from panorama.electrodes import BAND_HZ, COVARIANCE, LEADS, SWAP_RATIO, band, check_electrodes, relabel, swaps
from panorama.errors import RecordError
from panorama.records import MODEL_FS, find_records, read_record, screen_leads

from . import splits

SECONDS = 5.0  # what calibration sees
MIN_WRITE_RECORDS = 100  # fewer records are no population to ship a model of
log = logging.getLogger("panorama.bench")


def read_windows(data, split: str) -> list[tuple[str, np.ndarray]]:
    """The first ``SECONDS`` of ``LEADS`` of every record of ``split`` that holds them all usable."""
    out = []
    paths = [p for p in find_records(*data) if split == "all" or splits.split_of(p) == split]
    for p in tqdm(paths, desc=f"reading {split}", unit="record", file=sys.stderr, leave=False):
        try:
            rec = read_record(p, fs=MODEL_FS)
        except RecordError as exc:  # one unreadable record is left out, as eval leaves it
            log.warning("skipped: %s", exc)
            continue
        if not rec.has(LEADS) or rec.seconds < SECONDS:
            continue
        x = np.stack([rec.lead(n) for n in LEADS])[:, :int(SECONDS * MODEL_FS)]
        if all(f == "ok" for f in screen_leads(x, MODEL_FS)):
            out.append((rec.name, x))
    return out


def fit_covariance(windows: list[np.ndarray]) -> np.ndarray:
    """Covariance of ``LEADS`` over ``windows`` (each (8, samples) mV in that order, at
    ``MODEL_FS``), each band-passed as the check does."""
    acc = np.zeros((len(LEADS), len(LEADS)))
    for x in windows:
        xb = band(x, MODEL_FS)
        acc += xb @ xb.T
    return acc / len(windows)


def tune_electrodes(data, split: str = "val", write: Path | None = None,
                    min_records: int = MIN_WRITE_RECORDS) -> dict:
    train = read_windows(data, "train")
    if not train:
        raise ValueError(f"no training-split record holds {', '.join(LEADS)} usable for {SECONDS:g} s")
    cov, used = fit_covariance([x for _, x in train]), len(train)
    if write is not None and used < min_records:
        raise ValueError(f"--write: only {used} training-split records hold {', '.join(LEADS)} usable for "
                         f"{SECONDS:g} s; a population model wants {min_records} or more (the shipped one "
                         "was fitted on 216), so nothing was written")
    if write is not None:
        meta = {"records": used, "split": "train", "seconds": SECONDS, "band_hz": list(BAND_HZ), "fs": MODEL_FS,
                "made_by": "panorama bench electrodes --write"}
        rows = ",\n  ".join(json.dumps([float(f"{v:.8g}") for v in row]) for row in cov)  # one row a line
        write.write_text(f'{{"leads": {json.dumps(list(LEADS))},\n "covariance": [\n  {rows}],\n'
                         + "\n".join(f" {json.dumps(k)}: {json.dumps(v)}," for k, v in meta.items())[:-1] + "}\n")
    windows = train if split == "train" else read_windows(data, split)
    if not windows:
        raise ValueError(f"no record of split {split!r} holds {', '.join(LEADS)} usable for {SECONDS:g} s")
    clean = [check_electrodes(x, list(LEADS), MODEL_FS, cov) for _, x in windows]
    ratios = [c.misfit_swapped / c.misfit for c in clean]
    res = {"split": split, "records": len(windows), "fitted_on_train_records": used, "swap_ratio": SWAP_RATIO,
           "false_alarms": [f"{n}: {c.swap}" for (n, _), c in zip(windows, clean) if c.suspect],
           "lowest_ratio_as_recorded": round(float(min(ratios)), 3),
           "lowest_ratio_record": windows[int(np.argmin(ratios))][0], "swaps": {}}
    for label, how in tqdm(swaps(list(LEADS)), desc="swaps", file=sys.stderr, leave=False):
        found = [check_electrodes(relabel(x, list(LEADS), how), list(LEADS), MODEL_FS, cov) for _, x in windows]
        res["swaps"][label] = {"named": round(float(np.mean([f.swap == label for f in found])), 3),
                               "flagged": round(float(np.mean([f.suspect for f in found])), 3)}
    if write is not None:
        res["wrote"] = str(write)
    return res


def format_electrodes(res: dict) -> str:
    lines = [f"{res['records']} records of the {res['split']} split (population model from "
             f"{res['fitted_on_train_records']} training records; a swap must cut the misfit below "
             f"{res['swap_ratio']:g} of the labelled one)",
             f"as recorded: {len(res['false_alarms'])} called swapped"
             + (f" ({'; '.join(res['false_alarms'])})" if res["false_alarms"] else "")
             + f"; lowest ratio {res['lowest_ratio_as_recorded']} ({res['lowest_ratio_record']})",
             f"{'swapped on purpose':<52}{'named':>7}{'flagged':>9}"]
    for label, v in res["swaps"].items():
        lines.append(f"{label:<52}{v['named']:>7.0%}{v['flagged']:>9.0%}")
    if "wrote" in res:
        lines.append(f"wrote {res['wrote']}")
    return "\n".join(lines)


__all__ = ["tune_electrodes", "format_electrodes", "read_windows", "COVARIANCE"]
