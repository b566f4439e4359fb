"""One patient's stream: samples in by position, calibration, and the windows to synthesise.

The model has a finite receptive field (±224 samples at 500 Hz, measured) and nothing in it
pools over time, so synthesising a long record in overlapping windows gives the same views
as one pass over the whole record, provided each window keeps ``context`` samples before and
``lookahead`` samples after the part it emits, and starts on a multiple of the encoder's
stride (8) counted from the record's first sample. This is what makes the daemon's output
continuous, of any length and seamless: it equals ``panorama synthesize`` of the same record
(within 0.03 µV at the default margins).

Timeline of a stream, in samples from its first chunk::

    0 ........ cal (5 s) ........ emitted ..... ready = floor8(end) − lookahead ..... end
    |— calibration data —|— views already published —|— due now —|— lookahead (held back) —|

Output starts at the end of the calibration period: the views of the first seconds would
otherwise be synthesised with the table angles and then change character once the offsets
arrive. The ``lookahead`` is an algorithmic delay of the output (384 ms by default), on top
of the chunk duration and the processing time.

This module is pure logic (numpy, no MQTT, no model) so it is tested directly.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from panorama.calibrate import CalibrationResult
from panorama.geometry import View, descriptors, redundant_limb_leads, resolve_view
from panorama.model import DOWNSAMPLE
from panorama.records import MODEL_FS, dc_offsets

from .batch import Window, bridge_holes, runs, window_quality

RECEPTIVE_FIELD = 224  # samples each side whose input can change an output sample (measured)
STAMPS = 1024  # seqs whose stamps a stream remembers (256 s of 250 ms chunks): a restart told from a late resend
REORDER_SEQ = 64  # a chunk this many seqs behind the newest, or fewer, is a resend or reordered
AHEAD_WINDOW_S = 10.0  # how far back ahead_s looks


def floor8(n: int) -> int:
    return n - n % DOWNSAMPLE


def ceil8(n: int) -> int:
    return n + (-n) % DOWNSAMPLE


@dataclass(frozen=True)
class StreamParams:
    fs: float = MODEL_FS
    context: int = 256  # samples before the emitted part (≥ the receptive field: exact)
    lookahead: int = 192  # samples after it (0.03 µV from exact at 192; exact from 224)
    hop: int = 128  # at most this many output samples per window
    calibrate_s: float = 5.0  # 0: no calibration, output from the first sample
    max_buffer_s: float = 60.0  # a jump in time beyond this restarts the stream (seq following: moves its clock)
    reorder: int = 256  # samples of newer data to wait for a late chunk before giving up on it
    max_backlog: int = 1000  # output due beyond this (samples) is skipped, not delivered late
    calibration_wait_s: float = 20.0  # no hole-free seconds by then: calibrate on what there is
    bridge: int = 256  # holes up to this long in a window's context or lookahead are bridged (batch.bridge_holes)

    @property
    def window(self) -> int:
        """The steady-state window length (a multiple of 8)."""
        return ceil8(self.context + self.hop + self.lookahead) + DOWNSAMPLE

    @property
    def calibration_samples(self) -> int:
        return int(round(self.calibrate_s * self.fs))


@dataclass
class Counters:
    chunks: int = 0
    samples: int = 0
    gaps: int = 0  # chunks that arrived after a hole
    gap_samples: int = 0  # samples a hole left that no chunk has filled in time (a reorder's are taken off)
    duplicates: int = 0
    out_of_order: int = 0  # filled a hole that was still open
    snapped: int = 0  # a sample off its predecessor's end or its hole's edge (clock jitter): placed where it fits
    clock_steps: int = 0  # the sender's clock moved while its seq ran on: its time base follows
    late: int = 0  # arrived after its samples were already synthesised: dropped
    skipped: int = 0  # output samples never synthesised because they were already stale
    masked_windows: int = 0
    missing_windows: int = 0  # no usable lead at all: every view marked missing
    bridged_windows: int = 0  # a short hole in the context or lookahead bridged (batch.bridge_holes)
    restarts: int = 0  # the time base started again (a sender restarted, or its clock jumped)


class PatientStream:
    """Samples of one (monitor, patient) stream, placed by time, and what is due from them."""

    def __init__(self, key: tuple[str, str], params: StreamParams, views: list[View]):
        self.key = key
        self.p = params
        self.views = list(views)
        self.leads: list[str] = []  # input slots, in order of first appearance
        self.lead_views: list[View] = []
        self.buf = np.full((0, 0), np.nan, dtype=np.float32)  # (L, capacity)
        self.have = np.zeros(0, dtype=bool)  # (capacity,): a chunk covered this sample
        self.base = 0  # stream sample index of buf[:, 0]
        self.end = 0  # one past the last sample placed (holes before it are NaN)
        self.consumed = 0  # one past the last sample any window has read
        self.t0_ns: int | None = None
        self.seq_high: int | None = None  # the newest seq received (mod 2**32), placed or not
        self.last_n = 0  # samples in the newest chunk placed
        self.placed: dict[int, tuple[int, int, int]] = {}  # seq -> (position, samples, t0_ns) of recent chunks
        self.stamps: dict[int, int] = {}  # seq -> t0_ns of the last STAMPS chunks: a resend from a restart, far back
        self.last_sent_ns = 0
        self.arrivals: deque[tuple[float, int]] = deque()  # (monotonic time, samples) of the last AHEAD_WINDOW_S
        self.state = "waiting" if params.calibrate_s > 0 else "streaming"
        self.emitted = 0 if params.calibrate_s <= 0 else params.calibration_samples
        self.offsets: np.ndarray | None = None  # (L, 2) degrees, once calibrated
        self.calibration: CalibrationResult | None = None
        self.counts = Counters()
        self.signal = "ok"  # the newest window's quality: ok, masked or missing (no usable lead)
        self.lost_in_transit = False  # missing because samples never came, not because leads are off
        self.generation = 0  # +1 at every reset: a calibration of an earlier time base is void
        self.cal_start = 0  # stream sample where the calibration seconds begin
        self.pending: list[Window] = []  # made at a reset, of the time base before it
        self.dc: dict[str, float] = {}  # leads first found far from zero since the daemon last looked (mV)
        self.dc_said: set[str] = set()  # every lead found so: each is said once per stream

    # ---- ingest -----------------------------------------------------------------------
    def position(self, t0_ns: int) -> int:
        """Stream sample index of a chunk that starts at ``t0_ns``."""
        if self.t0_ns is None:
            self.t0_ns = t0_ns
        return int(round((t0_ns - self.t0_ns) * self.p.fs / 1e9))

    def ingest(self, seq: int, t0_ns: int, leads: list[str], data: np.ndarray, sent_ns: int = 0) -> str:
        """Place one chunk's samples ``data`` (len(leads), n) mV by its start time; returns
        what happened: "ok", "gap" (a hole before it), "duplicate" (dropped), "out_of_order"
        (filled a hole), "late" (filled a hole whose output was already published, or too old
        to place: dropped) or "reset" (a jump in time: the stream starts again from this
        chunk, after ``due`` has handed out what the old time base held). A chunk whose seq
        follows the newest one's (or runs up to ``REORDER_SEQ`` ahead of it, chunks between
        still to come) but whose time does not is the sender's clock stepping: it is placed
        where its seq puts it, and the time base moves (``counts.clock_steps``). A chunk
        reordered across such a step is placed beside its seq neighbour, whichever time
        base it was stamped in; a seq already placed goes where it went then if it carries
        the same stamp (a resend), and restarts the stream if not (a restarted monitor), as a
        seq further back than ``REORDER_SEQ`` does (a monitor restarted after a longer run)."""
        n = data.shape[1]
        pos = self.position(t0_ns)
        outcome = "ok"
        jump = int(self.p.max_buffer_s * self.p.fs)
        far = pos <= -jump or pos > self.end + jump
        behind = self.seq_high is not None and 0 <= (self.seq_high - seq) % 2**32 <= REORDER_SEQ
        # a seq placed before: resent with its first stamp, it goes where it went then (a clock
        # step may have moved the time base since); stamped at another time, it is a monitor
        # that restarted and counts from 0 again, however soon it came back
        again = self.placed.get(seq) if behind else None
        restarted = again is not None and abs(t0_ns - again[2]) * self.p.fs > 1e9
        # seq further back than any reordering (a wrap is one step ahead, never back): a very late
        # resend (a QoS 1 one) carries the stamp its seq had; a sender counting from 0 again after a
        # longer run, another. Past what is remembered, one stamped at or after the newest samples
        # is the restart, one before them the late chunk
        if self.seq_high is not None and not behind and not restarted and (seq - self.seq_high) % 2**32 > 2**31:
            known = self.stamps.get(seq)
            restarted = abs(t0_ns - known) * self.p.fs > 1e9 if known is not None else pos + n > self.end
            behind = not restarted  # late: it may fill a hole, never moves the newest seq
        if again is not None and not restarted:
            pos = again[0]
        # a seq not yet placed, beside one that was: reordered, whatever its time says
        by_seq = self._by_seq(seq, n) if behind and again is None else None
        if restarted or (behind and far and seq < REORDER_SEQ and again is None and by_seq is None):
            behind = False  # far off in time and counting from 0 again: a restarted monitor
        ahead = 0 if self.seq_high is None or behind else (seq - self.seq_high) % 2**32
        if by_seq is not None and abs(by_seq - pos) > 1:
            pos = by_seq  # its time and seq disagree: a clock step came between
        if behind:  # resent or reordered: it may fill a hole, never extend or restart the stream
            if pos < max(0, self.base) or pos + n > self.end:
                self.counts.late += 1
                return "late"
        else:  # newer, or far off (a restarted monitor counts from 0 again)
            self.seq_high = seq
        # at most this far after the end, by seq: the chunks still to come, none longer than the longest seen
        room = (ahead - 1) * max((m for _, m, _ in self.placed.values()), default=self.last_n) if ahead > 1 else 0
        if 1 <= ahead <= REORDER_SEQ and self.end > 0 and not self.end - 1 <= pos <= self.end + room + 1:
            # after the newest, by seq, but not by time: the sender's clock stepped (NTP,
            # daylight saving) or it paused. Its samples follow on (after the chunks still to
            # come, if as long as the newest); the time base moves
            pos = self.end + (ahead - 1) * self.last_n
            self.t0_ns = t0_ns - int(round(pos * 1e9 / self.p.fs))
            self.counts.clock_steps += 1
        elif abs(pos - self.end) == 1 and self.end > 0 and not behind:  # jitter within a sample (the protocol's)
            pos = self.end
            self.counts.snapped += 1
        if -jump < pos < 0 and not restarted:  # from before the stream's first chunk (reordered): too late
            self.counts.late += 1
            return "late"
        if restarted or pos <= -jump or pos > self.end + jump:
            self.pending += self._due(final=True)  # the old time base's held-back tail first
            self.reset(t0_ns)  # a clock jump or a restarted monitor (seq_high is already this chunk's)
            pos, outcome = 0, "reset"
        elif pos < self.end:
            if self.base < pos and pos + n <= self.end + 1:  # filling a hole: one sample off its edge?
                fill = {d: int((~self.have[pos + d - self.base: min(pos + d + n, self.end) - self.base]).sum())
                        for d in (0, -1, 1)}
                d = max(fill, key=lambda k: (fill[k], k == 0))
                if d:
                    pos += d
                    self.counts.snapped += 1
            if pos + n <= self.end and np.isfinite(self.slice(leads, pos, pos + n)).all():
                self.counts.duplicates += 1
                return "duplicate"
            if pos < self.base:
                if pos + n <= self.end:
                    self.counts.late += 1
                    return "late"
                data, n, pos = data[:, self.base - pos:], n - (self.base - pos), self.base  # the rest is new
            if pos + n <= self.end:
                outcome = "late" if pos < self.consumed else "out_of_order"
        elif pos > self.end:
            outcome = "gap"
            self.counts.gaps += 1
            self.counts.gap_samples += pos - self.end
        self.placed[seq] = (pos, n, t0_ns)
        while len(self.placed) > 2 * REORDER_SEQ:
            del self.placed[next(iter(self.placed))]
        self.stamps[seq] = t0_ns
        while len(self.stamps) > STAMPS:
            del self.stamps[next(iter(self.stamps))]
        slots = [self._slot(name) for name in leads]
        self._ensure(pos, pos + n)
        # samples of an earlier hole this chunk fills before any window read them: a reorder, not a loss
        filled = 0 if outcome in ("gap", "reset") else \
            int((~self.have[max(pos, self.consumed) - self.base: min(pos + n, self.end) - self.base]).sum())
        self.buf[slots, pos - self.base: pos + n - self.base] = data
        self.have[pos - self.base: pos + n - self.base] = True
        if outcome == "late":
            self.counts.late += 1
        elif outcome == "out_of_order":
            self.counts.out_of_order += 1
        self.counts.gap_samples = max(0, self.counts.gap_samples - filled)
        self.end = max(self.end, pos + n)
        self.counts.chunks += 1
        self.counts.samples += n
        now = time.monotonic()
        self.arrivals.append((now, n))
        while now - self.arrivals[0][0] > AHEAD_WINDOW_S:
            self.arrivals.popleft()
        self.last_n = n
        if not behind:  # the newest chunk's stamp, not the largest ever: a sender's clock may step back
            self.last_sent_ns = sent_ns
        return outcome

    def ahead_s(self) -> float:
        """Seconds of signal received over the last ``AHEAD_WINDOW_S`` beyond the time they
        took to come: a sender faster than real time (``panorama monitor --fast``) runs ahead;
        a real monitor stays near 0 whatever it did before (a burst at connect, a drifting
        crystal), so its overloads are not blamed on it."""
        if not self.arrivals:
            return 0.0
        first_t, first_n = self.arrivals[0]
        took = time.monotonic() - first_t + first_n / self.p.fs  # the first chunk took its own length to record
        return sum(n for _, n in self.arrivals) / self.p.fs - took

    def _by_seq(self, seq: int, n: int) -> int | None:
        """Where a chunk of ``n`` samples goes by its seq: right after ``seq − 1``, or right
        before ``seq + 1``, if either was placed (consecutive chunks are contiguous)."""
        if (prev := self.placed.get((seq - 1) % 2**32)) is not None:
            return prev[0] + prev[1]
        if (after := self.placed.get((seq + 1) % 2**32)) is not None:
            return after[0] - n
        return None

    def reset(self, t0_ns: int) -> None:
        """Start again from a new time base (a restarted sender, a clock jump): nothing of the
        old one is kept, its leads included (a monitor may come back with other electrodes)."""
        self.generation += 1
        self.counts.restarts += 1
        self.placed.clear()
        self.stamps.clear()
        self.t0_ns = t0_ns
        self.leads, self.lead_views = [], []
        self.dc, self.dc_said = {}, set()
        self.arrivals.clear()
        self.buf = np.full((0, 0), np.nan, dtype=np.float32)
        self.have = np.zeros(0, dtype=bool)
        self.base = self.end = self.consumed = 0
        self.state = "waiting" if self.p.calibrate_s > 0 else "streaming"
        self.cal_start = 0
        self.emitted = 0 if self.p.calibrate_s <= 0 else self.p.calibration_samples
        self.offsets, self.calibration = None, None
        self.signal = "ok"

    def _slot(self, name: str) -> int:
        if name not in self.leads:
            self.leads.append(name)
            self.lead_views.append(resolve_view(name))
            grown = np.full((len(self.leads), self.buf.shape[1]), np.nan, dtype=np.float32)
            grown[: self.buf.shape[0]] = self.buf
            self.buf = grown
            if self.offsets is not None:
                self.offsets = np.vstack([self.offsets, np.zeros((1, 2))])
        return self.leads.index(name)

    def _ensure(self, start: int, stop: int) -> None:
        """Room for samples up to ``stop``. When the buffer is full, what no window can need
        any more is dropped (everything is kept until calibration has its seconds)."""
        if stop - self.base <= self.buf.shape[1]:
            return
        keep_from = self.base
        if self.state == "streaming":
            keep_from = max(self.base, min(floor8(max(0, self.emitted - self.p.window)), floor8(start)))
        cap = max(2 * (stop - keep_from), 4 * self.p.window)
        new = np.full((len(self.leads), cap), np.nan, dtype=np.float32)
        have = np.zeros(cap, dtype=bool)
        live = self.end - keep_from
        if live > 0:
            new[:, :live] = self.buf[:, keep_from - self.base: self.end - self.base]
            have[:live] = self.have[keep_from - self.base: self.end - self.base]
        self.buf, self.have, self.base = new, have, keep_from

    def slice(self, leads: list[str], start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) of ``leads`` (NaN where never received)."""
        if leads == self.leads and self.base <= start and stop <= self.end:
            return self.buf[:, start - self.base: stop - self.base].copy()
        out = np.full((len(leads), stop - start), np.nan, dtype=np.float32)
        lo, hi = max(start, self.base), min(stop, self.end)
        for i, name in enumerate(leads):
            if name in self.leads and hi > lo:
                out[i, lo - start: hi - start] = self.buf[self.leads.index(name), lo - self.base: hi - self.base]
        return out

    # ---- calibration ------------------------------------------------------------------
    def calibration_due(self) -> bool:
        """The first calibration seconds no chunk is missing from have arrived (a lost or
        late chunk moves them on past its hole, after the reorder wait), or none have within
        ``calibration_wait_s``: then the fit gets what there is, and says which leads it lacks."""
        if self.state != "waiting":
            return False
        need = self.p.calibration_samples
        while self.end - self.cal_start >= need:
            lo, hi = self.cal_start - self.base, self.cal_start + need - self.base
            missing = np.flatnonzero(~self.have[lo:hi])
            if missing.size:
                hole = self.cal_start + int(missing[-1])
                if self.end - hole <= self.p.reorder:
                    break  # a late chunk may still fill it
                self.cal_start = hole + 1  # the seconds after the hole
                continue
            # a lead missing early in the window but on at its end (attached late, or back):
            # move past its hole rather than fit without it for the patient's whole stay
            gaps = ~np.isfinite(self.buf[:, lo:hi])
            on = np.isfinite(self.buf[:, hi - min(need, self.p.reorder): hi]).all(axis=1)
            late = gaps.any(axis=1) & on
            if not late.any():
                return True
            self.cal_start += int(max(np.flatnonzero(gaps[i])[-1] for i in np.flatnonzero(late))) + 1
        if self.end < (self.p.calibrate_s + self.p.calibration_wait_s) * self.p.fs:
            return False
        self.cal_start = self._fullest_window()  # no whole seconds by now: the most leads there are
        return True

    def _fullest_window(self) -> int:
        """Start of the calibration window (on a 125-sample grid) in which most leads have no
        hole; the earliest of equals."""
        need, best, most = self.p.calibration_samples, self.base, -1
        for start in range(self.base, self.end - need + 1, 125):
            whole = int(np.isfinite(self.buf[:, start - self.base: start + need - self.base]).all(axis=1).sum())
            if whole > most:
                best, most = start, whole
        return best

    def calibration_input(self) -> tuple[np.ndarray, list[View]]:
        """The calibration seconds of every lead received, for ``panorama.calibrate``: the
        first ones without a hole (from ``cal_start``), or the first ones if there are none."""
        self.state = "calibrating"
        need = self.p.calibration_samples
        start = self.cal_start if self.end - self.cal_start >= need else self.base
        return self.slice(self.leads, start, start + need), list(self.lead_views)

    def set_calibration(self, result: CalibrationResult) -> None:
        self.calibration = result
        self.offsets = result.offsets_for(self.leads)
        self.state = "streaming"

    # ---- windows ----------------------------------------------------------------------
    def due(self, final: bool = False) -> list[Window]:
        """The windows whose output can be published now (all that is left when ``final``)."""
        held, self.pending = self.pending, []
        return held + self._due(final)

    def _due(self, final: bool) -> list[Window]:
        if self.state != "streaming" or not self.views:
            return []
        completed = floor8(self.end) - self.p.lookahead  # output the chunks so far made due
        ready = self.end if final else completed
        # a late chunk may still fill a hole begun this recently (an older one, given up, hides none)
        hole = None if final else self.first_hole(since=self.end - self.p.lookahead - self.p.reorder)
        if hole is not None:
            ready = min(ready, floor8(hole) - self.p.lookahead)
        if not final and ready - self.emitted > self.p.max_backlog + self.last_n:
            # (the newest chunk's own samples are not stale, however long the chunk)
            # behind (a slow calibration, an overload): what is stale is worth nothing to a
            # bedside screen, so skip it rather than deliver it late, and count it
            skip = ready - max(self.p.hop, self.last_n) - self.emitted
            self.counts.skipped += skip
            self.emitted += skip
        out = []
        while self.emitted < ready:
            o0 = self.emitted
            o1 = min(o0 + self.p.hop, ready)
            if final and ready - o0 <= self.p.hop + self.p.lookahead + DOWNSAMPLE:
                o1 = ready  # the tail: one window that ends at the stream's end
            if final and o0 < completed:
                o1 = min(o1, completed)  # what the chunks made due, apart from what only the close does
            last = final and o1 == self.end
            e = self.end if last else ceil8(o1 + self.p.lookahead)
            s = max(0, floor8(e - self.p.window) if not last else floor8(o0 - self.p.context))
            s = min(s, floor8(max(0, o0 - self.p.context)))
            out.append(self._window(s, e, o0, o1, last))
            if final and o1 > completed:
                out[-1].sent_ns = 0  # its lookahead never came: made by the close, not by a chunk; no latency
            self.emitted = o1
            self.consumed = max(self.consumed, e)
        return out

    def _window(self, s: int, e: int, o0: int, o1: int, final: bool) -> Window:
        x, bridged = bridge_holes(self.slice(self.leads, s, e), (o0 - s, o1 - s), self.p.bridge)
        self.counts.bridged_windows += bridged
        flags = window_quality(x)
        ok = np.array([f == "ok" for f in flags], dtype=bool)
        far = dc_offsets(x[ok], [n for n, k in zip(self.leads, ok) if k])
        self.dc.update({n: mv for n, mv in far.items() if n not in self.dc_said})
        self.dc_said.update(far)
        x = np.where(ok[:, None], np.nan_to_num(x), 0.0).astype(np.float32)
        # III, aVR, aVL and aVF are sums of I and II: the model is given the two alone, and a
        # window is "masked" only when a lead off changes what the model is given
        names = [v.name for v in self.lead_views]
        mask = ok & ~redundant_limb_leads(names, ok)
        if np.array_equal(mask, ~redundant_limb_leads(names)):
            quality = "ok"
        elif mask.any():
            quality = "masked"
            self.counts.masked_windows += 1
        else:
            quality = "missing"
            self.counts.missing_windows += 1
        self.signal = quality
        self.lost_in_transit = quality == "missing" and all(f == "missing" for f in flags)  # holes, not electrodes
        return Window(self.key, x, mask, descriptors(self.lead_views, self.offsets), descriptors(self.views),
                      [v.name for v in self.views], o0 - s, o1 - o0, o0, [quality] * len(self.views),
                      self.last_sent_ns, final, self.t0_ns or 0)

    def first_hole(self, since: int = 0) -> int | None:
        """The first sample no chunk has covered, from what the next window reads on; with
        ``since``, the start of the first hole that begins there or later."""
        lo = max(self.base, floor8(max(0, self.emitted - self.p.context)) - DOWNSAMPLE)
        return next((lo + a for a, _ in runs(~self.have[lo - self.base: self.end - self.base]) if lo + a >= since),
                    None)
