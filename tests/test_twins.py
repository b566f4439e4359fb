"""Who yields when two daemons share one daemon_id (edge/twins.py): pure logic, no broker."""

import json

from edge.twins import Twins


def _report(instance: str, started: float, serving: bool) -> bytes:
    return json.dumps({"instance": instance, "started": started, "serving": serving}).encode()


def test_the_daemon_serving_stays_whatever_the_clocks_say():
    answers = []
    serving = Twins("bed", 1000.0, lambda: answers.append(1) or True)
    serving.cleared.set()
    serving.heard(_report("newcomer", 880.0, False))  # its clock is behind (a Jetson before NTP)
    assert not serving.yielded.is_set() and answers == [1]
    newcomer = Twins("bed", 880.0, lambda: True)
    newcomer.heard(json.dumps(serving.card()).encode())
    assert newcomer.yielded.is_set() and not newcomer.had_served
    assert "already serves this broker and prefix" in newcomer.why and "1970-01-01T00:16:40+00:00" in newcomer.why


def test_between_two_serving_or_two_starting_the_first_started_stays():
    late = Twins("bed", 900.0, lambda: True)
    late.cleared.set()
    late.heard(_report("early", 800.0, True))  # a split broker healed: both served
    assert late.yielded.is_set() and late.had_served  # exits 1: restarted, it then yields for good
    early = Twins("bed", 800.0, lambda: True)
    early.heard(_report("late", 900.0, False))
    assert not early.yielded.is_set()
    own = Twins("bed", 800.0, lambda: True)
    own.heard(json.dumps(own.card()).encode())  # its own report, heard back
    own.heard(b"not a report")
    assert not own.yielded.is_set()
    own.heard(_report("forged", 0.0, True), retained=True)  # no live daemon's: health is never retained
    assert not own.yielded.is_set()


def test_an_answer_the_queue_dropped_is_sent_again_within_the_newcomers_wait():
    import time

    from edge.twins import RETRY_S, TWIN_WAIT_S

    tries = []
    serving = Twins("bed", 100.0, lambda: tries.append(time.monotonic()) or len(tries) > 2)  # the queue full twice
    serving.cleared.set()
    for _ in range(3):
        serving.heard(_report("newcomer", 200.0, False))  # its reports while the answer waits: no second retry
    time.sleep(10 * RETRY_S)
    assert len(tries) == 3 and tries[-1] - tries[0] < TWIN_WAIT_S  # tried again, answered in the newcomer's wait
    serving.heard(_report("newcomer", 200.0, False))
    assert len(tries) == 3  # answered: not again
    never = []
    full = Twins("bed", 100.0, lambda: never.append(1) and False)  # the queue stays full: it gives up, then
    full.cleared.set()
    full.heard(_report("other", 200.0, False))
    time.sleep(TWIN_WAIT_S + 20 * RETRY_S)
    n = len(never)
    assert 2 < n <= TWIN_WAIT_S / RETRY_S + 2
    full.heard(_report("other", 200.0, False))  # at the newcomer's next report it tries again
    assert len(never) == n + 1
    time.sleep(3 * RETRY_S)
    full.cancel()  # stopping: a retry under way says nothing more
    n = len(never)
    time.sleep(10 * RETRY_S)
    assert len(never) == n
