"""The daemon's calibration pool: each patient's first seconds → angle offsets
(``panorama.calibrate``), fitted off the hot path in ``calibration.workers`` threads, one
fit per stream at a time. A fit whose stream restarted or ended meanwhile is dropped; a
failed fit keeps the table angles and the stream goes on."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from panorama.calibrate import CalibrationResult, calibrate, warm_up

from .model_slot import ModelSlot
from .reporting import Reporter
from .stream import PatientStream

log = logging.getLogger("panorama.serve")


class Fitter:
    """Fits for the daemon's streams (``streams`` and ``lock`` are the daemon's own; ``wake``
    tells its inference loop that a stream may now be due)."""

    def __init__(self, slot: ModelSlot, device: str, seconds: float, workers: int, report: Reporter,
                 streams: dict, lock: threading.Lock, wake: threading.Event):
        self.slot, self.device, self.seconds, self.report = slot, device, seconds, report
        self.streams, self.lock, self.wake = streams, lock, wake
        self.fitting: set[tuple[str, str]] = set()  # streams with a calibration queued or running
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="calibrate")

    def warm_up(self) -> None:
        """Queue one throw-away fit first (``panorama.calibrate.warm_up``): PyTorch's lazy
        start-up is paid before any patient waits for it."""
        if self.seconds > 0:
            self.pool.submit(self._warm_up)

    def submit_if_due(self, st: PatientStream) -> None:
        """Queue ``st``'s fit once it holds its first seconds (under the daemon's lock)."""
        if st.calibration_due() and st.key not in self.fitting:
            x, views = st.calibration_input()
            self.fitting.add(st.key)
            self.pool.submit(self._fit, st, x, views, st.generation)

    def shutdown(self, wait: bool = True) -> None:
        """Fits under way finish (when ``wait``); queued ones do not."""
        self.pool.shutdown(wait=wait, cancel_futures=True)

    def _warm_up(self) -> None:
        t0 = time.perf_counter()
        try:
            warm_up(self.slot.model, device=self.device)
        except Exception:  # only the first patient's fit is slower for it
            log.exception("calibration warm-up failed")
            return
        log.info("calibration warmed up in %.2f s", time.perf_counter() - t0)

    def _fit(self, st: PatientStream, x: np.ndarray, views, generation: int) -> None:
        names = [v.name for v in views]
        try:
            res = calibrate(self.slot.model, x, views, seconds=self.seconds, inputs=names, device=self.device)
        except Exception as exc:  # a failed fit keeps the table angles; the stream goes on
            log.exception("calibration of %s failed", st.key)
            res = CalibrationResult(names, np.zeros((len(names), 2)), False, f"calibration failed: {exc}")
        with self.lock:
            self.fitting.discard(st.key)
            if st.generation != generation or self.streams.get(st.key) is not st:
                return  # the stream restarted or ended meanwhile: this fit is of a time base gone
            st.set_calibration(res)
            self.report.status(st)
        (log.warning if res.swap else log.info)("%s/%s: %s", *st.key, res.summary())  # a swap: check the patient
        self.report.calibration(st.key, res, self.seconds)
        self.wake.set()
