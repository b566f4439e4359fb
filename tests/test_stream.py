"""The daemon's per-patient stream logic, without MQTT: windowed synthesis equals one pass
over the whole record, and holes, duplicates, late chunks and leads going off are handled."""

from __future__ import annotations

import numpy as np
import pytest

from edge.backends.torch import TorchBackend
from edge.batch import run_windows, window_quality
from edge.stream import PatientStream, StreamParams
from panorama.calibrate import calibrate
from panorama.geometry import STANDARD_12, resolve_views
from panorama.synth import Synthesizer, default_checkpoint
from training.simulator import simulate

VIEWS = resolve_views("V7,V8,V3R,V4R,120:45")
T0 = 1_700_000_000_000_000_000


@pytest.fixture(scope="module")
def synth():
    return Synthesizer.load()


@pytest.fixture(scope="module")
def backend():
    return TorchBackend(default_checkpoint())


@pytest.fixture(scope="module")
def record():
    sim = simulate(7, duration_s=7.0, device="diagnostic")
    return sim.signals.astype(np.float32), sim.names


def stream_all(st: PatientStream, x, names, backend, chunk=125, order=None, synth=None, silences=None):
    """Feed ``x`` in chunks (in ``order`` of chunk index if given), calibrating when due;
    returns the stream's output stitched: (start, (Q, n))."""
    outs = []
    starts = list(range(0, x.shape[1], chunk))
    for k in order if order is not None else range(len(starts)):
        i = starts[k]
        st.ingest(k, T0 + int(i * 2e6), names, x[:, i: i + chunk])
        if st.calibration_due():
            xc, lv = st.calibration_input()
            st.set_calibration(calibrate(synth.model, xc, lv, seconds=st.p.calibrate_s,
                                         inputs=[v.name for v in lv]))
        outs += run_windows(backend.run, st.due(), silences=silences)
    outs += run_windows(backend.run, st.due(final=True), silences=silences)
    for a, b in zip(outs, outs[1:]):
        assert b.start == a.start + a.data.shape[1], "output must be contiguous"
    return outs[0].start, np.concatenate([o.data for o in outs], axis=1), outs


@pytest.mark.parametrize("chunk", [125, 40, 333])
def test_streamed_views_equal_one_pass(record, synth, backend, chunk):
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    start, y, _ = stream_all(st, x, names, backend, chunk=chunk)
    ref = synth(x, resolve_views(names), VIEWS)
    assert start == 0 and y.shape == ref.shape
    err_uv = (y - ref) * 1000
    assert np.sqrt((err_uv ** 2).mean()) < 0.05 and np.abs(err_uv).max() < 1.0


def test_calibrated_stream_equals_offline_calibrated(record, synth, backend):
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=5.0), VIEWS)
    start, y, _ = stream_all(st, x, names, backend, synth=synth)
    res = calibrate(synth.model, x, resolve_views(names), seconds=5.0, inputs=names)
    ref = synth(x, resolve_views(names), VIEWS, offsets=res.offsets_for(names))
    assert start == 2500, "output starts when the calibration period ends"
    assert np.allclose(st.offsets, res.offsets_for(st.leads))
    assert np.abs(y - ref[:, start:]).max() * 1000 < 1.0


def test_duplicates_dropped_and_out_of_order_filled(record, synth, backend):
    x, names = record
    order = [0, 1, 3, 2, 2, 4, 5, 5] + list(range(6, -(-x.shape[1] // 125)))
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0, lookahead=256), VIEWS)
    _, y, _ = stream_all(st, x, names, backend, order=order)
    assert st.counts.duplicates == 2 and st.counts.out_of_order == 1 and st.counts.gaps == 1
    ref = synth(x, resolve_views(names), VIEWS)
    assert np.abs(y - ref).max() * 1000 < 1.0, "a chunk that arrives within the lookahead loses nothing"


def test_gap_masks_then_recovers(record, synth, backend):
    x, names = record
    n = -(-x.shape[1] // 125)
    order = [k for k in range(n) if k != 20]  # one 250 ms chunk never arrives
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    _, y, outs = stream_all(st, x, names, backend, order=order)
    assert st.counts.gaps == 1 and st.counts.gap_samples == 125
    assert y.shape[1] == x.shape[1] and np.isfinite(y).all()
    hole = [o for o in outs if o.start < 21 * 125 and o.start + o.data.shape[1] > 20 * 125]
    assert hole and all(q == "missing" for o in hole for q in o.quality)
    assert all(np.all(o.data == 0) for o in hole), "no usable input: zeros flagged missing, not invented"
    after = [o for o in outs if o.start >= 21 * 125 + st.p.context + 8]  # windows that cannot see it
    assert after and all(q == "ok" for o in after for q in o.quality), "the stream recovers after the hole"
    # the windows that read the hole only in their context or lookahead bridge it: a lost chunk
    # blanks the output it would have made (two chunks of output here), not every window that reads it
    near = [o for o in outs if o not in hole and o.start < 21 * 125 + st.p.context + 8
            and o.start + o.data.shape[1] > 20 * 125 - st.p.lookahead - 8]
    assert len(hole) <= 2 and st.counts.missing_windows == len(hole) and st.counts.bridged_windows >= 3
    assert all(q == "ok" for o in near for q in o.quality)
    ref = synth(x, resolve_views(names), VIEWS)
    err_uv = np.concatenate([(o.data - ref[:, o.start: o.start + o.data.shape[1]]).ravel() for o in near]) * 1000
    print(f"bridged: {np.sqrt((err_uv ** 2).mean()):.2f} µV RMS, {np.abs(err_uv).max():.1f} µV at most")
    assert np.sqrt((err_uv ** 2).mean()) < 5 and np.abs(err_uv).max() < 60


def test_a_reordered_chunk_soon_after_a_lost_one_is_still_waited_for(record, synth, backend):
    """Chunk 20 never comes, and 25 comes before 24 within the reorder wait: the hole it leaves
    waits for 24 as a lone reorder would, though the lost chunk's hole is still in view."""
    x, names = record
    n = -(-x.shape[1] // 125)
    order = [k for k in range(n) if k != 20]
    a, b = order.index(24), order.index(25)
    order[a], order[b] = 25, 24
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    _, y, outs = stream_all(st, x, names, backend, order=order)
    assert st.counts.late == 0 and st.counts.out_of_order == 1
    assert st.counts.gaps == 2 and st.counts.gap_samples == 125  # the lost chunk's; the reorder's taken back
    ref = synth(x, resolve_views(names), VIEWS)
    clear = slice(21 * 125 + st.p.context + 8, None)  # what the lost chunk cannot reach
    assert np.abs(y[:, clear] - ref[:, clear]).max() * 1000 < 1.0, "the reordered chunk lost nothing"


def test_a_lead_far_from_zero_is_named_for_the_daemon_to_say(record, backend):
    """A DC-coupled amplifier's lead (300 mV from zero): the windows name it with its level, so
    that the daemon can say once that the inputs are expected high-passed; high-passed leads are
    not named."""
    x, names = record
    for offset, named in ((0.0, {}), (300.0, {"I"})):
        st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
        y = x.copy()
        y[names.index("I")] += offset
        seen = []
        for k, i in enumerate(range(0, 1500, 125)):
            st.ingest(k, T0 + int(i * 2e6), names, y[:, i: i + 125])
            run_windows(backend.run, st.due())
            seen += st.dc.items()  # as the daemon takes them: each lead once per stream
            st.dc.clear()
        assert [n for n, _ in seen] == sorted(named) and all(abs(mv - offset) < 1 for _, mv in seen)


@pytest.mark.parametrize("lead,quality", [
    ("V2", "masked"),
    ("I", "masked"),  # II and III then carry the frontal plane
    ("aVF", "ok"),  # a sum of I and II: the model never had it, so nothing it is given changes
])
def test_lead_off_is_masked_and_stream_continues(record, synth, backend, lead, quality):
    x, names = record
    x = x.copy()
    v2 = names.index(lead)
    x[v2, 2000:] = 0.0  # electrode falls off: flat
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    _, y, outs = stream_all(st, x, names, backend)
    late = [o for o in outs if o.start > 2500]
    assert late and all(q == quality for o in late for q in o.quality)
    keep = [i for i in range(len(names)) if i != v2]
    ref = synth(x[keep], resolve_views([names[i] for i in keep]), VIEWS)
    assert np.abs(y[:, 2600:] - ref[:, 2600:]).max() * 1000 < 1.0, "synthesised from the leads still on"


def test_the_silent_heart_is_taken_off_each_window_as_offline(record, synth, backend):
    """With a cache, each window loses what the model draws of a silent heart for its own
    inputs (all of them, then without the lead off), as panorama synthesize does offline."""
    from panorama.synth import silence

    x, names = record
    x = x.copy()
    x[names.index("V2"), 2000:] = 0.0
    cache: dict = {}
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    _, y, outs = stream_all(st, x, names, backend, silences=cache)
    ins = resolve_views(names)
    keep = [i for i, n in enumerate(names) if n != "V2"]
    sub_ins = [ins[i] for i in keep]
    whole = synth(x, ins, VIEWS) - silence(lambda z: synth(z, ins, VIEWS), len(ins))[:, None]
    fewer = synth(x[keep], sub_ins, VIEWS) - silence(lambda z: synth(z, sub_ins, VIEWS), len(keep))[:, None]
    assert np.abs(y[:, :1500] - whole[:, :1500]).max() * 1000 < 1.0
    assert np.abs(y[:, 2600:] - fewer[:, 2600:]).max() * 1000 < 1.0
    assert len(cache) == 2  # one per set of inputs, not one per window
    offset = silence(lambda z: synth(z, ins, VIEWS), len(ins))
    assert np.all((offset > -0.25) & (offset < -0.05)), offset  # what was taken off: the model's own constant


def test_memory_is_bounded_on_a_long_stream(backend):
    x = simulate(3, duration_s=30.0).signals.astype(np.float32)
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    sizes = []
    for k, i in enumerate(range(0, x.shape[1], 125)):
        st.ingest(k, T0 + int(i * 2e6), list(STANDARD_12), x[:, i: i + 125])
        run_windows(backend.run, st.due())
        sizes.append(st.buf.shape[1])
    assert max(sizes[len(sizes) // 2:]) == max(sizes[:len(sizes) // 2 + 1]) <= 4 * st.p.window * 2


def test_stale_output_is_skipped_not_delivered_late(record, backend, monkeypatch):
    import types

    import edge.stream

    clock = [1000.0]  # time stands still: 6 s of signal arrive at once, as from panorama monitor --fast
    monkeypatch.setattr(edge.stream, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0, max_backlog=500), VIEWS)
    for k, i in enumerate(range(0, 3000, 125)):  # 6 s arrive while nothing is synthesised
        st.ingest(k, T0 + int(i * 2e6), names, x[:, i: i + 125])
    windows = st.due()
    ready = 3000 - st.p.lookahead
    assert st.counts.skipped == ready - st.p.hop
    assert len(windows) == 1 and windows[0].start == ready - st.p.hop and windows[0].n == st.p.hop
    assert st.ahead_s() == pytest.approx(6.0 - 0.25)  # sent faster than real time: the report names that cause
    for k, i in enumerate(range(3000, 3000 + 11 * 500, 125), start=24):  # then in real time for 11 s
        clock[0] += 0.25
        st.ingest(k, T0 + int(i * 2e6), names, np.zeros((len(names), 125), np.float32))
    assert abs(st.ahead_s()) < 0.3  # the burst at the start is forgotten: a later overload is not blamed on it
    out = run_windows(backend.run, windows)[0]
    assert out.data.shape == (len(VIEWS), st.p.hop) and np.isfinite(out.data).all()


def test_windows_carry_the_newest_sent_time_and_a_closing_flush_none(record):
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    windows = []
    for k, i in enumerate(range(0, 1500, 125)):
        st.ingest(k, T0 + int(i * 2e6), names, x[:, i: i + 125], sent_ns=T0 + k)
        windows += [(k, w) for w in st.due()]
    assert windows and all(w.sent_ns == T0 + k for k, w in windows)  # the raw chunk that completed each
    flushed = st.due(final=True)  # the stream closing (silent, or the daemon stopping): no chunk completed it
    assert flushed and all(w.sent_ns == 0 for w in flushed), "a flush would count its wait as latency"
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    for k, i in enumerate(range(0, 1500, 125)):  # the daemon stops before drawing the last chunk's due output
        st.ingest(k, T0 + int(i * 2e6), names, x[:, i: i + 125], sent_ns=T0 + k)
        if k < 11:
            st.due()
    completed = 1500 - st.p.lookahead
    flushed = st.due(final=True)
    assert [w.sent_ns for w in flushed if w.start + w.n <= completed] == [T0 + 11]  # made due by chunk 11
    assert all(w.sent_ns == 0 for w in flushed if w.start + w.n > completed)
    assert sum(w.n for w in flushed) == 1500 - min(w.start for w in flushed)  # the output stays contiguous


def test_clock_jump_restarts_the_stream():
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=5.0), VIEWS)
    x = np.ones((12, 125), np.float32)
    st.ingest(5, T0, list(STANDARD_12), x)
    assert st.ingest(3, T0 - 10**9, list(STANDARD_12), x) == "late"  # an older chunk, reordered: dropped
    assert st.end == 125 and st.counts.late == 1
    generation = st.generation
    assert st.ingest(0, T0 - 10**11, list(STANDARD_12), x) == "reset"  # a restarted monitor, 100 s back
    assert st.end == 125 and st.state == "waiting" and st.generation == generation + 1


@pytest.mark.parametrize("step_s", [-30.0, -3600.0, 3600.0])
def test_a_clock_step_with_the_seq_running_on_keeps_the_stream(record, synth, backend, step_s):
    """A monitor whose clock steps (NTP, daylight saving) while its seq runs on: its samples
    follow on, the stream keeps its calibration, and the output takes the new time base."""
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    outs, at = [], 20 * 125  # the step comes with chunk 20
    for k, i in enumerate(range(0, x.shape[1], 125)):
        t0 = T0 + int(i * 2e6) + (int(step_s * 1e9) if i >= at else 0)
        assert st.ingest(k, t0, names, x[:, i: i + 125]) == "ok"
        outs += run_windows(backend.run, st.due())
    outs += run_windows(backend.run, st.due(final=True))
    assert st.generation == 0 and st.counts.clock_steps == 1 and st.counts.gaps == st.counts.late == 0
    y = np.concatenate([o.data for o in outs], axis=1)
    ref = synth(x, resolve_views(names), VIEWS)
    assert y.shape == ref.shape and np.abs(y - ref).max() * 1000 < 1.0, "nothing lost, nothing moved"
    for o in outs:  # each output sample at the time its inputs were stamped with
        stamp = T0 + int(round(o.start * 2e6)) + (int(step_s * 1e9) if o.t0_ns != T0 else 0)
        assert o.t0_ns + int(round(o.start * 2e6)) == stamp
    assert any(o.t0_ns != T0 for o in outs) and outs[0].t0_ns == T0


def test_timestamp_jitter_within_a_sample_leaves_no_hole(record, synth, backend):
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    outs = []
    for k, i in enumerate(range(0, x.shape[1], 125)):
        jitter = 1_100_000 if k % 3 == 1 else -1_100_000 if k % 3 == 2 else 0  # ±1.1 ms: rounds a sample off
        st.ingest(k, T0 + int(i * 2e6) + jitter, names, x[:, i: i + 125])
        outs += run_windows(backend.run, st.due())
    outs += run_windows(backend.run, st.due(final=True))
    assert st.counts.snapped > 0 and st.counts.gaps == 0
    assert all(q == "ok" for o in outs for q in o.quality)
    y = np.concatenate([o.data for o in outs], axis=1)
    assert np.abs(y - synth(x, resolve_views(names), VIEWS)).max() * 1000 < 1.0


def test_a_reordered_chunk_a_sample_off_fills_its_hole_exactly(record, synth, backend):
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0, lookahead=256), VIEWS)
    outs = []
    for k in [*range(20), 21, 20, *range(22, 28)]:  # 20 comes late, stamped 1.1 ms late as well
        i = k * 125
        st.ingest(k, T0 + int(i * 2e6) + (1_100_000 if k == 20 else 0), names, x[:, i: i + 125])
        outs += run_windows(backend.run, st.due())
    outs += run_windows(backend.run, st.due(final=True))
    assert st.counts.snapped == 1 and st.counts.out_of_order == 1 and st.first_hole() is None
    assert all(q == "ok" for o in outs for q in o.quality)
    y = np.concatenate([o.data for o in outs], axis=1)
    assert np.abs(y - synth(x, resolve_views(names), VIEWS)).max() * 1000 < 1.0


def test_long_chunks_are_delivered_not_skipped_as_stale(record, synth, backend):
    """The protocol allows chunks of up to 8192 samples: a fresh one is not a backlog."""
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    _, y, _ = stream_all(st, x, names, backend, chunk=2000)
    assert st.counts.skipped == 0 and y.shape == (len(VIEWS), x.shape[1])
    assert np.abs(y - synth(x, resolve_views(names), VIEWS)).max() * 1000 < 1.0


def test_a_lost_chunk_in_the_calibration_seconds_moves_them_past_its_hole(record, synth):
    """One chunk lost in the first 5 s: the fit waits for 5 s without a hole, not a fit of
    nothing (which would leave the patient on the table's angles for the whole stay)."""
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=5.0), VIEWS)
    due_at = None
    for k, i in enumerate(range(0, x.shape[1], 125)):
        if k == 7:
            continue  # samples 875-999 never arrive
        st.ingest(k, T0 + int(i * 2e6), names, x[:, i: i + 125])
        if due_at is None and st.calibration_due():
            due_at = st.end
    assert due_at == 3500 and st.cal_start == 1000
    xc, lv = st.calibration_input()
    assert np.array_equal(xc, x[:, 1000:3500])
    res = calibrate(synth.model, xc, lv, seconds=5.0, inputs=[v.name for v in lv])
    assert res.accepted, res.reason
    # swapped chunks arrive within the reorder wait: the first 5 s as they are
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=5.0), VIEWS)
    for k in [*range(18), 19, 18, 20]:
        st.ingest(k, T0 + int(k * 125 * 2e6), names, x[:, k * 125: k * 125 + 125])
    assert st.calibration_due() and st.cal_start == 0
    assert np.array_equal(st.calibration_input()[0], x[:, :2500])


def test_a_lead_attached_late_is_waited_for_and_a_flickering_one_left_out(record, synth):
    x, names = record
    late = x.copy()
    late[names.index("V3"), :1000] = np.nan  # V3 put on 2 s into the stream
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=5.0), VIEWS)
    for k, i in enumerate(range(0, late.shape[1], 125)):
        st.ingest(k, T0 + int(i * 2e6), names, late[:, i: i + 125])
        if st.calibration_due():
            break
    assert st.cal_start == 1000 and np.isfinite(st.calibration_input()[0]).all()  # V3 calibrated too
    sim = simulate(3, duration_s=30.0, device="diagnostic")
    x, names = sim.signals.astype(np.float32), sim.names
    x[names.index("V6"), np.arange(x.shape[1]) % 1000 < 125] = np.nan  # V6 off a quarter second in every 2
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=5.0), VIEWS)
    for k, i in enumerate(range(0, x.shape[1], 125)):
        st.ingest(k, T0 + int(i * 2e6), names, x[:, i: i + 125])
        if st.calibration_due():
            break
    assert st.end >= 12500  # waited calibration_wait_s for V6, then fits without it
    xc, lv = st.calibration_input()
    assert np.isfinite(np.delete(xc, names.index("V6"), axis=0)).all()
    res = calibrate(synth.model, xc, lv, seconds=5.0, inputs=names)
    assert res.accepted and "V6" not in res.used, res.reason


def test_calibration_on_a_stream_never_whole_for_5_s_says_what_it_lacks(synth):
    sim = simulate(3, duration_s=30.0, device="diagnostic")
    x, names = sim.signals.astype(np.float32), sim.names
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=5.0), VIEWS)
    for k, i in enumerate(range(0, x.shape[1], 125)):
        if k % 16 == 8:
            continue  # one chunk in 16 lost, every lead: never 5 s whole
        st.ingest(k, T0 + int(i * 2e6), names, x[:, i: i + 125])
        if st.calibration_due():
            break
    assert st.end >= 12500  # waited calibration_wait_s, then tries what there is
    res = calibrate(synth.model, *st.calibration_input(), seconds=5.0, inputs=names)
    assert not res.accepted and "missing samples" in res.reason and res.reason.endswith("V6 missing samples")


@pytest.mark.parametrize("step_s", [-10.0, 30.0, -3600.0, 3600.0])
@pytest.mark.parametrize("stepped_from", [20, 21])
def test_chunks_reordered_across_a_clock_step_lose_nothing(record, synth, backend, step_s, stepped_from):
    """The clock steps (an hour: daylight saving; 10 s: NTP) and the chunks around it arrive
    out of order, 21 before 20: chunk 21 is placed where its seq puts it (a hole left for 20),
    20 fills the hole beside 19 whichever clock it was stamped on, and the stream keeps its
    calibration and every sample, as in one pass over the record."""
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    outs, step = [], int(step_s * 1e9)
    for k in [*range(20), 21, 22, 20, *range(23, 28)]:  # 28 chunks: the 7 s record
        i = k * 125
        st.ingest(k, T0 + int(i * 2e6) + (step if k >= stepped_from else 0), names, x[:, i: i + 125])
        outs += run_windows(backend.run, st.due())
    outs += run_windows(backend.run, st.due(final=True))
    assert st.counts.clock_steps == 1 and st.counts.gaps == 1 and st.counts.out_of_order == 1
    assert st.generation == 0 and st.counts.late == st.counts.skipped == 0
    assert st.end == 28 * 125 and st.first_hole() is None
    y = np.concatenate([o.data for o in outs], axis=1)
    ref = synth(x, resolve_views(names), VIEWS)
    assert y.shape == ref.shape and np.abs(y - ref).max() * 1000 < 1.0, "nothing lost, nothing moved"
    assert all(q == "ok" for o in outs for q in o.quality)


def test_a_lost_chunk_of_a_monitor_sending_chunks_of_two_lengths_is_a_gap_not_a_clock_step(record):
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    bounds = np.cumsum([0] + [100, 150] * 8)
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if k != 5:  # a 150-sample chunk lost after a 100-sample one
            st.ingest(k, T0 + int(a * 2e6), names, x[:, a:b])
    assert st.counts.clock_steps == 0 and st.counts.gaps == 1 and st.counts.gap_samples == 150
    assert st.first_hole() == bounds[5] and st.end == bounds[-1]


@pytest.mark.parametrize("chunks,first_seq,later_s", [(8, 0, 1000), (8, 1, 1000), (100, 1, 1000), (8, 0, 10),
                                                     (8, 0, -5), (160, 0, 42), (160, 1, 40.5), (160, 0, 35), (160, 0, 3)])
def test_a_restarted_monitor_is_not_a_clock_step(record, chunks, first_seq, later_s):
    """A monitor restarted (seq from 0 again, a new time; its chunk 0 perhaps lost) starts the
    stream again, whether its old stream was young (the new seq behind the newest) or long,
    and however soon it came back (10 s on, or its clock 5 s behind; a run of 160 chunks, past
    what the stream remembers of seqs, followed 0.5-2 s after its end by seq 0 or 1: a gap before)."""
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    for k in range(chunks):
        st.ingest(k, T0 + int(k * 125 * 2e6), names, x[:, :125])
    assert st.ingest(first_seq, T0 + int(later_s * 1e9), names, x[:, :125]) == "reset"
    assert st.generation == 1 and st.counts.clock_steps == 0 and st.counts.restarts == 1 and st.end == 125
    assert st.ingest(first_seq + 1, T0 + int(later_s * 1e9) + 250_000_000, names, x[:, 125:250]) == "ok"
    assert st.generation == 1 and st.end == 250 and st.counts.late == 0


def test_a_very_late_first_chunk_is_not_a_restart(record):
    """Seq 0 resent (QoS 1) after 100 newer chunks, with its own stamp: late, the stream goes on."""
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    for k in range(0, 101):
        st.ingest(k, T0 + int(k * 125 * 2e6), names, x[:, :125])
    assert st.ingest(0, T0, names, x[:, :125]) == "duplicate"  # its stamp is the one seq 0 had
    assert st.generation == 0 and st.counts.restarts == 0 and st.seq_high == 100
    assert st.ingest(101, T0 + int(101 * 125 * 2e6), names, x[:, :125]) == "ok" and st.counts.gaps == 0
    # after a clock step back, a resend far behind with its first stamp is still that chunk
    for k in range(102, 112):
        st.ingest(k, T0 + int(k * 125 * 2e6) - 30 * 10**9, names, x[:, :125])
    assert st.counts.clock_steps == 1
    assert st.ingest(30, T0 + int(30 * 125 * 2e6), names, x[:, :125]) == "duplicate" and st.generation == 0


def test_a_monitor_back_with_other_electrodes_and_a_clock_stepped_back_starts_clean(record, backend):
    """A restart keeps nothing of the old session: a monitor back with three leads of its
    twelve is drawn from those three, unmasked; and the sent time windows carry is the newest
    chunk's, not the largest ever seen (a sender's clock corrected back by an hour)."""
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    sent = 10**18
    for k in range(8):
        st.ingest(k, T0 + int(k * 125 * 2e6), names, x[:, k * 125:(k + 1) * 125], sent_ns=sent + k)
    three = [names.index(n) for n in ("I", "II", "V3")]
    back = T0 + 100 * 10**9
    for k in range(8):  # restarted: seq from 0, a new time, three leads, its clock an hour earlier
        st.ingest(k, back + int(k * 125 * 2e6), ["I", "II", "V3"], x[three, k * 125:(k + 1) * 125],
                  sent_ns=sent - 3600 * 10**9 + k)
        windows = st.due()
    assert st.counts.restarts == 1 and st.leads == ["I", "II", "V3"]
    assert windows and {q for w in windows for q in w.quality} == {"ok"} and st.signal == "ok"
    assert windows[-1].sent_ns == sent - 3600 * 10**9 + 7


def test_a_chunk_resent_after_a_clock_step_is_a_duplicate_not_a_restart(record):
    """A resend carries its first stamp: after the clock stepped it is placed by its seq,
    found already there, and dropped; the stream goes on."""
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    for k in range(8):
        step = -3600 * 10**9 if k >= 5 else 0
        assert st.ingest(k, T0 + int(k * 125 * 2e6) + step, names, x[:, k * 125:(k + 1) * 125]) == "ok"
    assert st.counts.clock_steps == 1
    assert st.ingest(3, T0 + int(3 * 125 * 2e6), names, x[:, 375:500]) == "duplicate"
    assert st.generation == 0 and st.end == 1000


def test_a_reset_flushes_the_old_time_base_first(record, backend):
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    outs = []
    for k, i in enumerate(range(0, 2500, 125)):
        st.ingest(k, T0 + int(i * 2e6), names, x[:, i: i + 125])
        outs += run_windows(backend.run, st.due())
    assert st.ingest(0, T0 + 10**11, names, x[:, :125]) == "reset"  # the monitor restarted 100 s on
    tail = run_windows(backend.run, st.due())
    assert tail and all(o.t0_ns == T0 for o in tail)
    assert tail[-1].start + tail[-1].data.shape[1] == 2500  # every sample of the old time base out
    assert outs[-1].start + outs[-1].data.shape[1] == tail[0].start


def test_bridge_holes_fills_short_holes_outside_the_output_span_only():
    from edge.batch import bridge_holes

    x = np.tile(np.arange(40, dtype=np.float32), (4, 1))
    x[0, 5:9] = np.nan  # in the context: bridged by a straight line
    x[1, 20:22] = np.nan  # in the output span [16, 24): left, the lead is masked
    x[2, 30:40] = np.nan  # too long (limit 8): left
    x[3, 36:40] = np.nan  # at the end of the lookahead: held at the last sample
    y, filled = bridge_holes(x, (16, 24), 8)
    assert filled and np.array_equal(y[0], np.arange(40, dtype=np.float32))
    assert np.isnan(y[1, 20:22]).all() and np.isnan(y[2, 30:40]).all()
    assert np.array_equal(y[3, 36:], np.full(4, 35, np.float32))
    assert not bridge_holes(np.ones((2, 40), np.float32), (16, 24), 8)[1]


def test_window_quality_flags():
    rng = np.random.default_rng(0)
    ok = rng.standard_normal(640) * 0.3
    rail = ok.copy()
    rail[100:160] = ok.max() + 1
    hole = ok.copy()
    hole[5] = np.nan
    flags = window_quality(np.stack([ok, np.zeros(640), rail, hole, 1000 * ok, 3e37 * ok.astype(np.float32)]))
    assert flags == ["ok", "flat", "saturated", "missing", "implausible", "implausible"]  # µV as mV; overflow-free


@pytest.mark.parametrize("fed,back", [(2500, -8), (3000, 200)])
def test_a_long_resent_chunk_is_placed_after_the_buffer_moved_on(record, backend, fed, back):
    """A long chunk reaching back into what the buffer keeps, or before it, places its new
    samples (the part before the buffer is dropped), not a crash."""
    x, names = record
    st = PatientStream(("m", "p"), StreamParams(calibrate_s=0), VIEWS)
    for k, i in enumerate(range(0, fed, 125)):
        st.ingest(k, T0 + int(i * 2e6), names, x[:, i: i + 125])
        run_windows(backend.run, st.due())
    pos = st.base - back
    assert st.ingest(99, T0 + int(pos * 2e6), names, x[:, pos: 3500]) in ("ok", "late", "out_of_order")
    assert st.end == 3500 and np.isfinite(st.slice(names, fed, 3500)).all() and st.first_hole() is None
