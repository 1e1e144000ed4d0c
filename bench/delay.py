"""A delaying TCP proxy: a database 0.5 or 2 ms away (each way), on one machine.

`tc qdisc ... netem` is not available here, so the delay is made in user space: a server under
test connects to this proxy instead of to PostgreSQL (or to PgBouncer), and every chunk of bytes
read from either side is written to the other side `--one-way-ms` later, in the order it was
read. The delay is the same for every chunk, so one queue ordered by arrival holds everything
that is in flight, and one timer, armed for the head of the queue, serves all connections.

The timer is a Linux timerfd in the event loop: asyncio's and uvloop's own timers have a
resolution of 1 ms, too coarse for a delay of 0.5 ms. It runs as a process of its own (uvloop
when installed) so its CPU time is its own, apart from the servers' figures.

It also measures, per connection, how long the far side took to answer: the time between
forwarding a chunk from the client and the first chunk of the answer (PostgreSQL's time per
round trip, loopback included), for the Little's-law bound in bench/production.py, and how long
the client kept the connection to itself between an answer and its next request.

Run by bench/production.py through `DelayProxy`; by hand,
`python bench/delay.py --one-way-ms 0.5 --upstream unix:/var/run/postgresql/.s.PGSQL.5432`
prints the port it listens on, answers `stats` on stdin with one JSON line, and exits when stdin
closes.
"""

# The proxy starts itself as a subprocess of the benchmark (S603).
# ruff: noqa: S603

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CLOCK_MONOTONIC = 1  # <linux/time.h>; time.monotonic() reads the same clock
TFD_TIMER_ABSTIME = 1
# A paused reader resumes when the other side's buffer drains below the low mark.
WRITE_BUFFER_HIGH = 1 << 20


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Timer:
    """A one-shot timer with microsecond resolution: a timerfd watched by the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Any) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.timerfd_create(CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        self.spec = _Itimerspec()  # it_interval stays zero: one shot
        self.callback = callback
        loop.add_reader(self.fd, self._fired)

    def arm(self, when: float) -> None:
        """Fire at `when` (time.monotonic() seconds); at once if that is past."""
        seconds = int(when)
        self.spec.it_value.tv_sec = seconds
        self.spec.it_value.tv_nsec = max(int((when - seconds) * 1e9), 1)  # zero would disarm
        if self.libc.timerfd_settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(self.spec), None):
            raise OSError(ctypes.get_errno(), "timerfd_settime")

    def _fired(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)
        self.callback()


class Stats:
    """What the proxy did, summed since it started; `as_dict()` is the `stats` answer."""

    def __init__(self) -> None:
        self.chunks = self.bytes = 0
        self.late_seconds = self.late_max = 0.0
        self.late_over_100us = 0
        self.answers = 0  # chunks from the client that the far side answered
        self.answer_seconds = 0.0  # the far side's time for them
        # The client's time from an answer written to it to its next chunk (the connection
        # idle at the client: reading the answer, giving the connection to its next user).
        self.client_turns = 0
        self.client_seconds = 0.0
        self.connections = 0

    def as_dict(self) -> dict[str, float]:
        return {
            "chunks": self.chunks,
            "bytes": self.bytes,
            "late_seconds": self.late_seconds,
            "late_max_seconds": self.late_max,
            "late_over_100us": self.late_over_100us,
            "answers": self.answers,
            "answer_seconds": self.answer_seconds,
            "client_turns": self.client_turns,
            "client_seconds": self.client_seconds,
            "connections": self.connections,
        }


class Delayer:
    """Every chunk written `delay` seconds after it was read, in order, by one timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, stats: Stats) -> None:
        self.delay = delay
        self.stats = stats
        # (due, side to write to, bytes or None for "close it"), in arrival order, so by due.
        self.queue: collections.deque[tuple[float, Side, bytes | None]] = collections.deque()
        self.timer = Timer(loop, self._flush)

    def later(self, side: Side, data: bytes | None) -> None:
        due = time.monotonic() + self.delay
        self.queue.append((due, side, data))
        if len(self.queue) == 1:
            self.timer.arm(due)

    def _flush(self) -> None:
        now = time.monotonic()
        queue, stats = self.queue, self.stats
        while queue and queue[0][0] <= now:
            due, side, data = queue.popleft()
            late = now - due
            stats.late_seconds += late
            stats.late_max = max(stats.late_max, late)
            stats.late_over_100us += late > 1e-4
            side.write(data, now)
        if queue:
            self.timer.arm(queue[0][0])


class Side(asyncio.Protocol):
    """One end of a proxied connection; `peer` is the other end."""

    def __init__(self, delayer: Delayer, upstream: bool) -> None:
        self.delayer = delayer
        self.upstream = upstream  # the PostgreSQL (or PgBouncer) end
        self.peer: Side | None = None
        self.transport: Any = None  # asyncio's or uvloop's transport
        self.pending: list[bytes | None] = []  # read before the peer was connected
        # On the upstream end: when the client's last chunk was written here, if unanswered;
        # on the client's end: when the last answer was written here, if not followed yet.
        self.asked_at: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        with contextlib.suppress(OSError):
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        stats = self.delayer.stats
        stats.chunks += 1
        stats.bytes += len(data)
        if self.asked_at is not None:
            if self.upstream:
                stats.answers += 1
                stats.answer_seconds += time.monotonic() - self.asked_at
            else:
                stats.client_turns += 1
                stats.client_seconds += time.monotonic() - self.asked_at
            self.asked_at = None
        if self.peer is None:
            self.pending.append(data)
        else:
            self.delayer.later(self.peer, data)

    def eof_received(self) -> bool:
        self._closed_here()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed_here()

    def _closed_here(self) -> None:
        if self.peer is not None:
            self.delayer.later(self.peer, None)
        else:
            self.pending.append(None)

    def write(self, data: bytes | None, now: float) -> None:
        """Called by the delayer when `data` (None: the other end closed) is due here."""
        if self.transport is None or self.transport.is_closing():
            return
        if data is None:
            self.transport.close()
            return
        if self.asked_at is None:
            self.asked_at = now
        self.transport.write(data)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


async def serve(upstream: str, one_way_seconds: float, port: int) -> None:
    """Listen on 127.0.0.1:`port` (0: any free one), print it, answer `stats` until stdin ends."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    delayer = Delayer(loop, one_way_seconds, stats)

    async def connect(client: Side) -> None:
        far = Side(delayer, upstream=True)
        try:
            if upstream.startswith("unix:"):
                await loop.create_unix_connection(lambda: far, upstream.removeprefix("unix:"))
            else:
                host, _, far_port = upstream.removeprefix("tcp:").rpartition(":")
                await loop.create_connection(lambda: far, host, int(far_port))
        except OSError:
            if client.transport is not None:
                client.transport.close()
            return
        stats.connections += 1
        far.peer, client.peer = client, far
        for data in client.pending:
            delayer.later(far, data)
        client.pending.clear()

    tasks: set[asyncio.Task[None]] = set()

    def accept() -> Side:
        client = Side(delayer, upstream=False)
        task = loop.create_task(connect(client))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return client

    server = await loop.create_server(accept, "127.0.0.1", port)
    print(f"LISTENING {server.sockets[0].getsockname()[1]}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"stats":
            print(json.dumps(stats.as_dict()), flush=True)
    server.close()


class DelayProxy:
    """The proxy as a child process of ours: `start()` gives its port, `stats()` its counts."""

    def __init__(self, upstream: str, one_way_ms: float, log_path: Path) -> None:
        self.upstream = upstream
        self.one_way_ms = one_way_ms
        self.log_path = log_path
        self.process: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the delay proxy is not running")
        return self.process.pid

    def start(self) -> int:
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, __file__, "--upstream", self.upstream,
                 "--one-way-ms", str(self.one_way_ms)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            )  # fmt: skip
        assert self.process.stdout is not None  # noqa: S101 (a pipe, asked for above)
        first = self.process.stdout.readline()
        if not first.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"the delay proxy did not start; see {self.log_path}")
        self.port = int(first.split()[1])
        return self.port

    def stats(self) -> dict[str, float]:
        assert self.process is not None and self.process.stdin and self.process.stdout  # noqa: S101
        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        result: dict[str, float] = json.loads(self.process.stdout.readline())
        return result

    def stop(self) -> None:
        """Close its stdin (it exits by itself), by its PID if it does not."""
        if self.process is None:
            return
        with contextlib.suppress(OSError):
            if self.process.stdin:
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        finally:
            if self.process.stdout:
                self.process.stdout.close()

    def __enter__(self) -> DelayProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--upstream", required=True, help="tcp:HOST:PORT or unix:SOCKET_PATH")
    parser.add_argument("--one-way-ms", type=float, required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    coroutine = serve(args.upstream, args.one_way_ms / 1000, args.port)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)


if __name__ == "__main__":
    main()
