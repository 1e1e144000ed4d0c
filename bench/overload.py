"""`make bench`'s overload section: the service past its capacity, against clients of two kinds.

Reads and batches, one worker with a pool of DB_POOL_SIZE (10), at 1, 4 and 16 times the
connections of the main rounds (-c64): the 1x run is each round's reference, measured on the same
server as the overload runs. Two kinds of client: plain wrk, which sends the next request as soon
as an answer arrives (as most HTTP clients and many retrying proxies do), and clients that wait
out a 503's Retry-After (bench/overload.lua's `delay()`). One more server per round queues
everything (no admission, no in-flight limit), to show what admission buys.

Each answer is timed against its own request (bench/overload.lua tags requests with an
X-Request-ID that the service echoes), so the percentiles are those of the answered requests
alone, whatever the refusals cost. wrk runs with `--timeout 2s`: a request unanswered after 2 s
counts as a client timeout.

Run by bench/run.py (`make bench`, or `bench/run.py --only-overload` for this section alone).
"""

# A benchmark starts the programs it measures (S603).
# ruff: noqa: S603

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

BENCH = Path(__file__).resolve().parent
SCRIPT = BENCH / "overload.lua"
MULTIPLES = (1, 4, 16)
CLIENTS = {
    "at-once": "resend at once (plain wrk)",
    "retry-after": "wait out Retry-After",
}
WRK_TIMEOUT_SECONDS = 2
# The service as shipped, and the same service queueing everything (no shedding at all).
SHIPPED: tuple[tuple[str, str], ...] = ()
QUEUE_ALL = (("ADMISSION_TARGET_MS", "0"), ("MAX_IN_FLIGHT", "1000000"))
# Targets (issue 17), against the same round's 1x run.
MIN_ANSWERED_RATIO = 0.85
MAX_P99_RATIO = {"retry-after": 2.0, "at-once": 4.0}


class RunningServer(Protocol):
    """What a round needs of a server bench/run.py started."""

    port: int

    @property
    def pid(self) -> int: ...


# bench/run.py's servers: a context manager running the service with these extra settings.
StartServer = Callable[[tuple[tuple[str, str], ...], str], AbstractContextManager[RunningServer]]


@dataclass(frozen=True)
class Case:
    """One measured wrk run of a round."""

    workload: str  # "read" or "batch"
    multiple: int  # connections, in multiples of the main rounds' (-c64)
    clients: str  # a key of CLIENTS
    server: str = "shipped"  # or "queue-all"


def plan() -> tuple[list[Case], list[Case]]:
    """The cases on the shipped service, and those on the service that queues everything."""
    shipped = [Case(workload, 1, "at-once") for workload in ("read", "batch")]
    shipped += [
        Case(workload, multiple, clients)
        for workload in ("read", "batch")
        for multiple in MULTIPLES[1:]
        for clients in CLIENTS
    ]
    queue_all = [Case("read", multiple, "at-once", "queue-all") for multiple in MULTIPLES[1:]]
    return shipped, queue_all


@dataclass(frozen=True)
class Settings:
    """The parts of bench/run.py's options this section uses."""

    rounds: int
    seconds: int
    warmup: int
    connections: int
    threads: int
    env: dict[str, str]  # wrk's environment: the token, the rows, the batch size


def run_wrk(
    settings: Settings, case: Case, port: int, seconds: int, connections: int
) -> dict[str, Any]:
    """One wrk run of `case`; the numbers of bench/overload.lua's BENCH_RESULT line."""
    env = dict(
        settings.env,
        BENCH_WORKLOAD=case.workload,
        BENCH_HONOUR_RETRY_AFTER="1" if case.clients == "retry-after" else "0",
    )
    command = [
        "wrk", f"-t{settings.threads}", f"-c{connections}", f"-d{seconds}s",
        "--timeout", f"{WRK_TIMEOUT_SECONDS}s", "-s", str(SCRIPT), f"http://127.0.0.1:{port}",
    ]  # fmt: skip
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=seconds + 60, check=True
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_RESULT "))
            return result
    raise RuntimeError(f"wrk printed no result:\n{done.stdout}\n{done.stderr}")


def measure(
    settings: Settings,
    case: Case,
    server: RunningServer,
    cpu_seconds: Callable[[int], float],
    number: int,
) -> dict[str, Any]:
    """Warm up, then one measured run of `case`, with the server's CPU time around it."""
    connections = settings.connections * case.multiple
    run_wrk(settings, case, server.port, settings.warmup, connections)
    started, cpu_before = time.monotonic(), cpu_seconds(server.pid)
    result = run_wrk(settings, case, server.port, settings.seconds, connections)
    cpu = cpu_seconds(server.pid) - cpu_before
    wall = time.monotonic() - started
    seconds = result["duration_us"] / 1e6
    return {
        "round": number,
        "case": case,
        "connections": connections,
        "answered_rps": result["answered"] / seconds,
        "refused_rps": result["refused"] / seconds,
        "answered": result["answered"],
        "refused": result["refused"],
        "p50_ms": result["answered_p50_us"] / 1000,
        "p99_ms": result["answered_p99_us"] / 1000,
        "max_ms": result["answered_max_us"] / 1000,
        "refused_p50_ms": result["refused_p50_us"] / 1000,
        "timeouts": result["timeouts"],
        # Socket errors, and answers that are neither an answer nor a refusal.
        "errors": result["connect_errors"]
        + result["read_errors"]
        + result["write_errors"]
        + result["other"],
        "server_cpu_seconds": cpu,
        "server_cores": cpu / wall,
    }


def run_overload(
    settings: Settings, start: StartServer, cpu_seconds: Callable[[int], float]
) -> list[dict[str, Any]]:
    """Every round: one fresh server as shipped for all its cases (order rotated each round),
    then one that queues everything."""
    shipped, queue_all = plan()
    rows: list[dict[str, Any]] = []
    for number in range(1, settings.rounds + 1):
        shift = (number - 1) * 3 % len(shipped)
        for env, cases in ((SHIPPED, shipped[shift:] + shipped[:shift]), (QUEUE_ALL, queue_all)):
            with start(env, f"overload-{number}") as server:
                for case in cases:
                    row = measure(settings, case, server, cpu_seconds, number)
                    rows.append(row)
                    print(
                        f"overload {number} {case.server:9} {case.workload:5} "
                        f"-c{row['connections']:<5} {case.clients:11} "
                        f"{row['answered_rps']:6.0f} answered/s {row['refused_rps']:6.0f} "
                        f"refused/s p50 {row['p50_ms']:6.1f} p99 {row['p99_ms']:6.1f} ms "
                        f"timeouts {row['timeouts']} errors {row['errors']} "
                        f"cpu {row['server_cores']:.2f}",
                        flush=True,
                    )
    return rows


def median(rows: Iterable[dict[str, Any]], key: str) -> float:
    return float(statistics.median(row[key] for row in rows))


def cpu_per_refusal_us(row: dict[str, Any], reference: dict[str, Any]) -> float | None:
    """The server's CPU time per refusal, in microseconds: what it spent beyond the answers,
    each costing what one did in the same round's 1x run, divided by the refusals."""
    if row["refused"] < 100 or not reference["answered"]:
        return None
    per_answer = reference["server_cpu_seconds"] / reference["answered"]
    spare = row["server_cpu_seconds"] - row["answered"] * per_answer
    return max(spare, 0.0) / row["refused"] * 1e6


def fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def overload_table(rows: list[dict[str, Any]], connections: int) -> list[str]:
    """One line per case, medians across rounds, ratios to the same rounds' 1x runs."""
    if not rows:
        return ["(not run)"]
    shipped, queue_all = plan()
    lines = [
        "| workload | server | clients | connections | answered/s | ÷ 1x | refused/s "
        "| p50 ms | p99 ms | p99 ÷ 1x | client timeouts | errors | server CPU (cores) "
        "| CPU per refusal (µs) | targets |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for case in shipped + queue_all:
        runs = [r for r in rows if r["case"] == case]
        if not runs:
            continue
        references = {
            r["round"]: r
            for r in rows
            if r["case"] == Case(case.workload, 1, "at-once")
            and r["round"] in {run["round"] for run in runs}
        }
        answered_ratio = statistics.median(
            r["answered_rps"] / references[r["round"]]["answered_rps"] for r in runs
        )
        p99_ratio = statistics.median(r["p99_ms"] / references[r["round"]]["p99_ms"] for r in runs)
        per_refusal = [
            value
            for r in runs
            if (value := cpu_per_refusal_us(r, references[r["round"]])) is not None
        ]
        timeouts = sum(r["timeouts"] for r in runs)
        verdict = ""
        if case.multiple > 1 and case.server == "shipped":
            met = (
                answered_ratio >= MIN_ANSWERED_RATIO
                and timeouts == 0
                and p99_ratio <= MAX_P99_RATIO[case.clients]
            )
            verdict = "met" if met else "**missed**"
        lines.append(
            f"| {case.workload} | {'as shipped' if case.server == 'shipped' else 'queue all'} "
            f"| {CLIENTS[case.clients]} | {connections * case.multiple} "
            f"| {fmt(median(runs, 'answered_rps'))} | {answered_ratio:.2f} "
            f"| {fmt(median(runs, 'refused_rps'))} | {fmt(median(runs, 'p50_ms'), 1)} "
            f"| {fmt(median(runs, 'p99_ms'), 1)} | {p99_ratio:.2f} | {timeouts} "
            f"| {sum(r['errors'] for r in runs)} | {fmt(median(runs, 'server_cores'), 2)} "
            f"| {fmt(statistics.median(per_refusal) if per_refusal else None, 1)} | {verdict} |"
        )
    return lines


def overload_section(rows: list[dict[str, Any]], settings: Settings, pool_size: int) -> list[str]:
    """The report's "## Overload" section."""
    rounds = len({r["round"] for r in rows})
    return [
        "## Overload",
        "",
        f"Reads and batches against one worker with a pool of {pool_size}, at 1, 4 and 16 times "
        f"-c{settings.connections}, {rounds} rounds (each a freshly started server running every "
        f"case, order rotated; wrk `-t{settings.threads} --timeout {WRK_TIMEOUT_SECONDS}s`, "
        f"{settings.warmup} s warm-up, {settings.seconds} s measured), medians. Ratios are to "
        "the same round's 1x run (plain wrk). Percentiles are those of the answered requests "
        "alone, each timed against its own request (bench/overload.lua). CPU per refusal: the "
        "server's CPU time beyond what the answers cost at 1x, per refusal. Targets (issue 17): "
        f"answered/s at least {MIN_ANSWERED_RATIO} times 1x, no client timeout, p99 at most "
        f"{MAX_P99_RATIO['retry-after']:g} times 1x for clients that wait out Retry-After and "
        f'{MAX_P99_RATIO["at-once"]:g} times for clients that resend at once. "queue all" is '
        "the "
        "same service with ADMISSION_TARGET_MS=0 and MAX_IN_FLIGHT=1000000.",
        "",
        *overload_table(rows, settings.connections),
        "",
    ]


def replace_section(path: Path, section: list[str]) -> None:
    """Put `section` in place of the report's section of the same title (or append it)."""
    title = section[0]
    text = path.read_text() if path.exists() else ""
    lines = text.split("\n")
    if title in lines:
        begin = lines.index(title)
        end = next(
            (i for i in range(begin + 1, len(lines)) if lines[i].startswith(("## ", "<!--"))),
            len(lines),
        )
        lines[begin:end] = section
    else:
        lines += ["", *section]
    path.write_text("\n".join(lines))
