"""Admission's rules on a clock and a queue of the test's own: when shedding begins and ends,
what it refuses, the in-flight limit (tests/faults/test_admission.py runs them on a real process).
"""

from __future__ import annotations

import dataclasses

import pytest

from service.admission import IN_FLIGHT_LIMIT, MIN_QUEUE_PER_CONNECTION, QUEUE_DELAY, Admission

TARGET, INTERVAL = 0.020, 0.100
POOL = 10
HOLD = 0.002  # each lease holds its connection 2 ms: the pool serves 5,000 a second


@dataclasses.dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Queue:
    """A session pool as admission sees it."""

    size: int = POOL
    waiting: int = 0


def admission(clock: Clock, **overrides: float) -> Admission:
    settings = {"target": TARGET, "interval": INTERVAL, "max_in_flight": 1000}
    settings.update(overrides)
    admitting = Admission(
        target=settings["target"],
        interval=settings["interval"],
        max_in_flight=int(settings["max_in_flight"]),
        refusal_delay=1.0,
        clock=clock,
    )
    admitting.queue = Queue()
    return admitting


def admission_with_queue() -> tuple[Clock, Admission, Queue]:
    """A clock, admission as configured above on it, and the queue it reads."""
    clock = Clock()
    admitting = admission(clock)
    assert isinstance(admitting.queue, Queue)
    return clock, admitting, admitting.queue


def leases(
    admitting: Admission, clock: Clock, wait: float, seconds: float, hold: float = HOLD
) -> None:
    """Requests for `seconds`, each having waited `wait` and then held its connection `hold`."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now += hold / POOL
        admitting.observe_hold(hold)
        admitting.observe_wait(wait)


def test_a_queue_above_the_target_for_less_than_an_interval_is_absorbed() -> None:
    clock, admitting, queue = admission_with_queue()
    leases(admitting, clock, 0.0, 0.2)
    queue.waiting = 500
    leases(admitting, clock, 0.5, 0.09)  # a burst: every wait far above the target
    queue.waiting = 0
    leases(admitting, clock, 0.001, 0.2)  # then drained
    assert not admitting.shedding and admitting.sheds == 0
    queue.waiting = 5000
    assert admitting.admit() is None


def test_a_standing_queue_is_cut_to_what_the_pool_serves_within_the_target() -> None:
    clock, admitting, queue = admission_with_queue()
    leases(admitting, clock, 0.0, 0.2)
    queue.waiting = 200
    leases(admitting, clock, 0.030, INTERVAL + 0.001)
    assert admitting.shedding and admitting.sheds == 1
    # 10 connections, each lease 2 ms: 100 waiters are served within 20 ms.
    assert admitting.queue_limit == pytest.approx(TARGET * POOL / HOLD)
    queue.waiting = 99
    assert admitting.admit() is None
    queue.waiting = 100
    refusal = admitting.admit()
    assert refusal is not None and refusal.reason == QUEUE_DELAY
    assert admitting.refusals == {QUEUE_DELAY: 1, IN_FLIGHT_LIMIT: 0}
    assert admitting.in_flight == 1  # only the admitted one is in progress
    start = dict(refusal.start())
    assert start["status"] == 503
    assert (b"retry-after", b"1") in start["headers"]
    assert (b"content-type", b"application/problem+json") in start["headers"]
    assert b"wait longer than 20 ms" in refusal.body


def test_shedding_ends_once_refused_clients_could_have_come_back_and_were_not_refused() -> None:
    clock, admitting, queue = admission_with_queue()
    leases(admitting, clock, 0.0, 0.2)
    queue.waiting = 200
    leases(admitting, clock, 0.030, INTERVAL + 0.001)
    queue.waiting = 500
    assert admitting.admit() is not None
    queue.waiting = 3  # the demand falls below the capacity
    # The refusal delay (1 s), Retry-After (1 s) and an interval: 2.1 s without a refusal.
    assert admitting.calm == pytest.approx(2.1)
    clock.now += 2.0
    assert admitting.admit() is None and admitting.shedding  # refused clients may be on their way
    clock.now += 0.101
    assert admitting.admit() is None and not admitting.shedding
    queue.waiting = 500
    assert admitting.admit() is None  # a new burst is absorbed again


def test_a_few_waiters_per_connection_are_never_cut_however_long_they_wait() -> None:
    # 64 clients sending again at once on a pool of 10 keep at most 54 waiting. On a machine
    # busy with other work each lease takes 5 ms, and they wait 27 ms, above the target.
    clock, admitting, queue = admission_with_queue()
    queue.waiting = 54
    leases(admitting, clock, 0.027, 0.5, hold=0.005)
    assert not admitting.shedding and admitting.sheds == 0
    assert admitting.admit() is None
    admitting.done()
    # Past that minimum the same waits are a standing queue, cut to the minimum: the pool
    # serves 40 waiters within 20 ms, fewer than 6 per connection.
    queue.waiting = 61
    leases(admitting, clock, 0.027, INTERVAL + 0.05, hold=0.005)
    assert admitting.shedding and admitting.sheds == 1
    assert admitting.queue_limit == MIN_QUEUE_PER_CONNECTION * POOL == 60
    assert admitting.admit() is not None
    queue.waiting = 59
    assert admitting.admit() is None


def test_the_minimum_queue_holds_when_one_lease_outlasts_the_target() -> None:
    clock, admitting, queue = admission_with_queue()
    queue.waiting = 100
    for _ in range(100):
        clock.now += 0.01
        admitting.observe_hold(0.2)  # 200 ms statements: a single waiter waits past 20 ms
        admitting.observe_wait(0.1)
    assert admitting.shedding
    assert admitting.queue_limit == MIN_QUEUE_PER_CONNECTION * POOL


def test_the_in_flight_limit_refuses_whatever_the_queue() -> None:
    admitting = admission(Clock(), max_in_flight=2)
    assert admitting.admit() is None and admitting.admit() is None
    refusal = admitting.admit()
    assert refusal is not None and refusal.reason == IN_FLIGHT_LIMIT
    assert b"2 requests in progress" in refusal.body
    admitting.done()
    assert admitting.admit() is None
    assert admitting.refusals == {QUEUE_DELAY: 0, IN_FLIGHT_LIMIT: 1}


def test_a_zero_target_never_sheds() -> None:
    clock = Clock()
    admitting = admission(clock, target=0.0)
    leases(admitting, clock, 1.0, 1.0)
    assert not admitting.shedding


def test_refusals_are_held_about_the_refusal_delay_and_spread() -> None:
    clock = Clock()
    clock.now = 1000.037  # between two ticks
    holds = [admission(clock).hold() for _ in range(1000)]
    assert all(0.85 <= hold <= 1.15 for hold in holds)
    # Spread over 0.2 s (three ticks), so refused clients do not return together.
    assert max(holds) - min(holds) == pytest.approx(0.2)
    # ... on ticks of a tenth of the delay, so that the refusals due in one are sent together.
    ends = {round(clock.now + hold, 6) for hold in holds}
    assert all(abs(end * 10 - round(end * 10)) < 1e-6 for end in ends), ends
    assert len(ends) == 3
