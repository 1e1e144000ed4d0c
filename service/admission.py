"""Admission: which requests to /items the service takes on, by the delay of its connection queue.

Past its capacity the service can only make requests wait longer for a pooled connection; it
cannot serve more of them. So a request is refused at the door when the queue it would join is
already as long as the latency target allows, but only while that queue *stands*: CoDel's rule
(Nichols and Jacobson, "Controlling Queue Delay"; Facebook, "Fail at Scale"), which sheds only
when the queue delay has stayed above its target for a whole interval, so a burst that drains
within the interval is absorbed and a queue that does not drain is cut back to the target.

A refusal costs next to nothing (a precomputed 503, before routing or reading a body) and is held
about `refusal_delay` seconds before it is sent: a client that sends again as soon as it is
answered, as most do, is then refused about once per `refusal_delay` per connection, instead of in
a loop as fast as the event loop can answer, which took the core from the admitted requests.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Protocol

import msgspec
from litestar.types import HTTPResponseStartEvent

from service.errors import PROBLEM_MEDIA_TYPE, RETRY_AFTER_SECONDS, problem_document

QUEUE_DELAY = "queue_delay"  # the queue stood above the target: refused to keep it there
IN_FLIGHT_LIMIT = "in_flight_limit"  # MAX_IN_FLIGHT admitted requests in progress already
REASONS = (QUEUE_DELAY, IN_FLIGHT_LIMIT)
# A queue of this many waiters per connection is never cut: what any load at the pool's capacity
# keeps (64 clients that send again at once keep 5.4 per connection of a pool of 10), and cutting
# it would buy a few leases of latency by refusing clients at the service's usual peak. On a
# machine busy with other work that queue stood above 20 ms, and such clients were refused.
MIN_QUEUE_PER_CONNECTION = 6
# Held refusals end on ticks of refusal_delay / REFUSAL_TICKS (see Admission.hold).
REFUSAL_TICKS = 10
# A refusal is held refusal_delay give or take this share of it, at random (Admission.hold).
REFUSAL_SPREAD = 0.15


class Queue(Protocol):
    """What admission reads of the connection queue (service.db's SessionPool)."""

    @property
    def size(self) -> int:
        """Connections it leases at once."""
        ...  # pragma: no cover

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection now."""
        ...  # pragma: no cover


class Refusal:
    """A 503 with Retry-After and its problem document, encoded once."""

    __slots__ = ("body", "headers", "reason")

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.body = msgspec.json.encode(problem_document(503, detail))
        self.headers = (
            (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
            (b"retry-after", RETRY_AFTER_SECONDS.encode()),
            (b"content-length", b"%d" % len(self.body)),
        )

    def start(self) -> HTTPResponseStartEvent:
        """The response's start message (a fresh header list: the middleware appends to it)."""
        return {"type": "http.response.start", "status": 503, "headers": list(self.headers)}


class Admission:
    """Takes a request to /items on, or refuses it, from what the connection queue measures.

    The pool reports each request's wait for a connection (`observe_wait`) and how long each
    lease held its connection (`observe_hold`). When no request has got a connection within
    `target` seconds for `interval` seconds while more than MIN_QUEUE_PER_CONNECTION waited
    per connection, the queue stands: admission sheds, refusing each request that would join a
    queue already as long as the pool serves within `target` seconds (its connections divided by
    the mean hold of the last interval, times the target) and longer than that minimum, so the
    queue holds what the pool serves within the target and no more. (Not the queue's observed
    drain rate: that falls with the queue admission allows, and the two would chase each other
    down.) It stops once no request has been refused for as long as the refused ones take to
    come back (`refusal_delay`, then `Retry-After`) and an interval more: the demand has fallen
    back below the capacity. (Stopping after a quieter interval, it began again 2 or 3 times a
    second under clients that wait out Retry-After: they come back together, and the queue
    overshot the target each time before shedding could begin again.) At most `max_in_flight`
    admitted requests are in progress at once, whatever the queue says: the last resort, for a
    flood faster than an interval. `target` 0 turns shedding off.
    """

    def __init__(
        self,
        *,
        target: float,
        interval: float,
        max_in_flight: int,
        refusal_delay: float,
        record_wait: Callable[[float], None] = lambda seconds: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.interval = interval
        self.max_in_flight = max_in_flight
        self.refusal_delay = refusal_delay
        # No refusal for this long, and the demand is below the capacity (see the docstring).
        self.calm = refusal_delay + float(RETRY_AFTER_SECONDS) + interval
        self.record_wait = record_wait  # the queue delay histogram
        self.clock = clock
        self.queue: Queue | None = None  # the primary's session pool, once the lifespan made it
        self.shedding = False
        self.in_flight = 0  # admitted requests to /items in progress
        self.refusals = dict.fromkeys(REASONS, 0)
        self.sheds = 0  # times shedding began
        self.mean_hold = 0.0  # seconds a lease held its connection, over the last interval
        now = clock()
        self._holds, self._held = 0, 0.0  # leases ended since `_counting_since`, their seconds
        self._counting_since = now
        # When a request last got a connection within the target; when the queue was last found
        # full while shedding (a refusal, or the moment shedding began).
        self._within_target_at = now
        self._full_at = 0.0
        self.by_delay = Refusal(
            QUEUE_DELAY,
            "the service is at capacity: requests wait longer than "
            f"{target * 1000:g} ms for a database connection; retry shortly",
        )
        self.by_limit = Refusal(
            IN_FLIGHT_LIMIT,
            f"the service is at capacity ({max_in_flight} requests in progress); retry shortly",
        )

    @property
    def queue_limit(self) -> float:
        """The waiters the pool serves within the target, and at least MIN_QUEUE_PER_CONNECTION
        per connection (see there; and when a single lease outlasts the target no queue meets
        it anyway)."""
        if self.queue is None or not self.mean_hold:
            return float("inf")
        return max(self.target * self.queue.size / self.mean_hold, _never_cut(self.queue))

    def _queue_is_short(self) -> bool:
        """Fewer waiters than the queue admission never cuts: not a queue to shed, whatever it
        waited."""
        queue = self.queue
        return queue is not None and queue.waiting < _never_cut(queue)

    def observe_hold(self, seconds: float) -> None:
        """A lease held its connection `seconds`."""
        self._holds += 1
        self._held += seconds

    def observe_wait(self, seconds: float) -> None:
        """A request waited `seconds` for a connection (or gave up after that long)."""
        self.record_wait(seconds)
        now = self.clock()
        if now - self._counting_since >= self.interval and self._holds:
            self.mean_hold = self._held / self._holds
            self._holds, self._held, self._counting_since = 0, 0.0, now
        if seconds <= self.target or self._queue_is_short():
            self._within_target_at = now
        elif not self.shedding and self.target and now - self._within_target_at >= self.interval:
            self.shedding = True
            self.sheds += 1
            self._full_at = now

    def admit(self) -> Refusal | None:
        """None, and the request counts as in progress until `done()`; or the refusal to send."""
        if self.in_flight >= self.max_in_flight:
            self.refusals[IN_FLIGHT_LIMIT] += 1
            return self.by_limit
        if self.shedding and self.queue is not None:
            if self.queue.waiting >= self.queue_limit:
                self.refusals[QUEUE_DELAY] += 1
                self._full_at = self.clock()
                return self.by_delay
            self.settle()
        self.in_flight += 1
        return None

    def done(self) -> None:
        """An admitted request has been answered."""
        self.in_flight -= 1

    def settle(self) -> None:
        """Stop shedding if no request has found the queue full for `calm` seconds."""
        if self.shedding and self.clock() - self._full_at >= self.calm:
            self.shedding = False

    def hold(self) -> float:
        """Seconds to hold the next refusal: `refusal_delay`, give or take REFUSAL_SPREAD of it
        at random, so that clients refused in the same instant do not all come back in the same
        instant (and the longest hold, 1.725 s by default, stays below a 2 s client timeout);
        ending on a tick of a tenth of `refusal_delay`. The refusals due in one tick are sent in
        one turn of the event loop, and the clients that resend at once come back together, so
        the loop wakes once for many instead of twice for each: a held refusal costs about half
        the CPU it costs one by one (90 against 190 us, measured with 1,024 clients).
        """
        now = self.clock()
        earliest = now + self.refusal_delay * (1 - REFUSAL_SPREAD)
        spread = self.refusal_delay * 2 * REFUSAL_SPREAD * random.random()  # noqa: S311 (not secret)
        due = earliest + spread
        tick = self.refusal_delay / REFUSAL_TICKS
        on_tick = math.floor(due / tick) * tick
        return (on_tick if on_tick >= earliest else on_tick + tick) - now


def _never_cut(queue: Queue) -> int:
    """The waiters admission never cuts: MIN_QUEUE_PER_CONNECTION per pooled connection."""
    return MIN_QUEUE_PER_CONNECTION * queue.size
