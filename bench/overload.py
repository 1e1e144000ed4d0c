"""`make bench`'s overload section: the service past its capacity, against clients of two kinds.

Reads and batches, one worker with a pool of DB_POOL_SIZE (10), at 1, 4 and 16 times the
connections of the main rounds (-c64): each overload run of the server as shipped runs between two
1x runs of its workload on the same server, its reference. Two kinds of client: plain wrk, which
sends the next request as soon as an answer arrives (as most HTTP clients and many retrying
proxies do), and clients that wait out a 503's Retry-After (bench/overload.lua's `delay()`).
One more server per round queues everything (no admission, no in-flight limit), to show what
admission buys.

Each answer is timed against its own request (bench/overload.lua tags requests with an
X-Request-ID that the service echoes), so the percentiles are those of the answered requests
alone, whatever the refusals cost. A client timeout is a request answered after 2 s or not at all
(wrk runs with `--timeout 2s`, but its own count is of connections whose last request began 2 s
ago, which takes a client waiting out a Retry-After for a timed-out request).

Run by bench/run.py (`make bench`, or `bench/run.py --only-overload` for this section alone).
"""

# A benchmark starts the programs it measures (S603).
# ruff: noqa: S603

from __future__ import annotations

import json
import os
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
# The service as shipped; the same service queueing everything (no shedding at all); and the
# same service refusing at once (refusals not held): clients that resend at once then loop on
# refusals, which dominate its CPU, so that what one costs can be read off.
SERVERS: dict[str, tuple[tuple[str, str], ...]] = {
    "shipped": (),
    "queue-all": (("ADMISSION_TARGET_MS", "0"), ("MAX_IN_FLIGHT", "1000000")),
    "unheld": (("ADMISSION_REFUSAL_DELAY_MS", "0"),),
}
LABELS = {"shipped": "as shipped", "queue-all": "queue all", "unheld": "refusals not held"}
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
    server: str = "shipped"  # a key of SERVERS

    @property
    def name(self) -> str:
        return f"{self.workload}-{self.multiple}-{self.clients}-{self.server}"


def plan() -> dict[str, list[Case]]:
    """The cases of a round, by the server they run on."""
    shipped = [Case(workload, 1, "at-once") for workload in ("read", "batch")]
    shipped += [
        Case(workload, multiple, clients)
        for workload in ("read", "batch")
        for multiple in MULTIPLES[1:]
        for clients in CLIENTS
    ]
    return {
        "shipped": shipped,
        "queue-all": [Case("read", multiple, "at-once", "queue-all") for multiple in MULTIPLES[1:]],
        "unheld": [Case("read", MULTIPLES[-1], "at-once", "unheld")],
    }


@dataclass(frozen=True)
class Settings:
    """The parts of bench/run.py's options this section uses."""

    rounds: int
    seconds: int
    warmup: int
    connections: int
    threads: int
    env: dict[str, str]  # wrk's environment: the token, the rows, the batch size
    # Settings for the shipped server beyond its defaults, to try others: BENCH_OVERLOAD_SETTINGS
    # ("ADMISSION_TARGET_MS=30,ADMISSION_INTERVAL_MS=200").
    shipped_env: tuple[tuple[str, str], ...] = ()
    only: tuple[str, ...] = ()  # BENCH_OVERLOAD_ONLY: case names to run ("read-4-at-once", …)


@dataclass(frozen=True)
class CpuClocks:
    """bench/run.py's CPU clocks: a process tree's CPU seconds so far, and the whole machine's
    busy seconds; with PostgreSQL's postmaster, whose tree's share is reported."""

    of_tree: Callable[[int], float]
    machine: Callable[[], float]
    database_pid: int | None


def measure(
    settings: Settings,
    case: Case,
    server: RunningServer,
    clocks: CpuClocks,
    number: int,
) -> dict[str, Any]:
    """One wrk run of `case`: the warm-up, then the measured seconds on the same connections,
    with the CPU time of the server, wrk, PostgreSQL and the rest of the machine over the
    measured seconds (on two cores the four share, the server's figures depend on the others')."""
    connections = settings.connections * case.multiple
    env = dict(
        settings.env,
        BENCH_WORKLOAD=case.workload,
        BENCH_HONOUR_RETRY_AFTER="1" if case.clients == "retry-after" else "0",
        BENCH_WARMUP_SECONDS=str(settings.warmup),
        BENCH_TIMEOUT_SECONDS=str(WRK_TIMEOUT_SECONDS),
    )
    seconds = settings.warmup + settings.seconds
    command = [
        "wrk", f"-t{settings.threads}", f"-c{connections}", f"-d{seconds}s",
        "--timeout", f"{WRK_TIMEOUT_SECONDS}s", "-s", str(SCRIPT), f"http://127.0.0.1:{server.port}",
    ]  # fmt: skip
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as load:
        time.sleep(settings.warmup)
        started, before = time.monotonic(), cpu_readings(clocks, server.pid, load.pid)
        time.sleep(settings.seconds)
        after = cpu_readings(clocks, server.pid, load.pid)
        wall = time.monotonic() - started
        output, _ = load.communicate(timeout=60)
    if load.returncode:
        raise RuntimeError(f"wrk failed ({load.returncode}):\n{output}")
    result = next(
        json.loads(line.removeprefix("BENCH_RESULT "))
        for line in output.splitlines()
        if line.startswith("BENCH_RESULT ")
    )
    seconds = result["duration_us"] / 1e6 - settings.warmup
    cpu, wrk_cpu, database_cpu, machine_cpu = (b - a for a, b in zip(before, after, strict=True))
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
        "refused_max_ms": result["refused_max_us"] / 1000,
        # Requests answered after the timeout or not at all (bench/overload.lua), not wrk's own
        # count, which takes a connection waiting out a Retry-After for a timed-out request.
        "timeouts": result["client_timeouts"],
        "wrk_timeouts": result["timeouts"],
        # The same, of requests sent in the warm-up: the arrival of every connection at once.
        "warmup_timeouts": result["warmup_client_timeouts"],
        # Socket errors, and answers that are neither an answer nor a refusal.
        "errors": result["connect_errors"]
        + result["read_errors"]
        + result["write_errors"]
        + result["other"],
        "server_cpu_seconds": cpu,
        "server_cores": cpu / wall,
        "wrk_cores": wrk_cpu / wall,
        "database_cores": database_cpu / wall,
        "other_cores": max(machine_cpu - cpu - wrk_cpu - database_cpu, 0.0) / wall,
    }


def cpu_readings(clocks: CpuClocks, server_pid: int, wrk_pid: int) -> tuple[float, ...]:
    """CPU seconds so far: the server's, wrk's, PostgreSQL's and the machine's busy seconds."""
    database = clocks.of_tree(clocks.database_pid) if clocks.database_pid is not None else 0.0
    return (clocks.of_tree(server_pid), clocks.of_tree(wrk_pid), database, clocks.machine())


def bracketed(cases: list[Case]) -> list[Case]:
    """The shipped server's run order: each workload's overload cases, each between two 1x runs
    of that workload, [1x, a, 1x, b, 1x, …, 1x]. On a shared machine whose speed drifts by a
    fifth within minutes, a case is compared with the 1x runs just before and after it, not with
    one 1x run minutes away."""
    order: list[Case] = []
    for workload in dict.fromkeys(case.workload for case in cases):
        reference = Case(workload, 1, "at-once")
        overloads = [c for c in cases if c.workload == workload and c != reference]
        order.append(reference)
        for case in overloads:
            order += [case, reference]
    return order


def run_overload(settings: Settings, start: StartServer, clocks: CpuClocks) -> list[dict[str, Any]]:
    """Every round: one fresh server as shipped for all its cases (order rotated each round,
    each case between two 1x runs), then one for each other server's."""
    rows: list[dict[str, Any]] = []
    for number in range(1, settings.rounds + 1):
        for server_key, planned in plan().items():
            cases = [c for c in planned if not settings.only or c.name in settings.only]
            if not cases:
                continue
            shift = (number - 1) * 3 % len(cases)
            cases = cases[shift:] + cases[:shift]
            if server_key == "shipped":
                cases = bracketed(cases)
            env = SERVERS[server_key] + (settings.shipped_env if server_key == "shipped" else ())
            with start(env, f"overload-{number}-{server_key}") as server:
                for case in cases:
                    row = measure(settings, case, server, clocks, number)
                    row["position"] = len(rows)
                    rows.append(row)
                    print(
                        f"overload {number} {case.server:9} {case.workload:5} "
                        f"-c{row['connections']:<5} {case.clients:11} "
                        f"{row['answered_rps']:6.0f} answered/s {row['refused_rps']:6.0f} "
                        f"refused/s p50 {row['p50_ms']:6.1f} p99 {row['p99_ms']:6.1f} ms "
                        f"timeouts {row['timeouts']} (wrk {row['wrk_timeouts']}, "
                        f"warm-up {row['warmup_timeouts']}) "
                        f"errors {row['errors']} "
                        f"cpu server {row['server_cores']:.2f} wrk {row['wrk_cores']:.2f} "
                        f"pg {row['database_cores']:.2f} other {row['other_cores']:.2f}",
                        flush=True,
                    )
    return rows


def median(rows: Iterable[dict[str, Any]], key: str) -> float:
    return float(statistics.median(row[key] for row in rows))


def cpu_per_refusal_us(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> float | None:
    """The server's CPU time per refusal in `runs`, in microseconds: what it spent beyond its
    answers (each costing what one did in the 1x runs it is compared with), divided by its
    refusals; the median over rounds. Where refusals are held this takes in whatever else the
    overload cost (more connections, a machine shared with more of wrk's work)."""
    costs = []
    for row in runs:
        if not row["refused"]:
            continue
        reference = reference_of(rows, row)
        per_answer = reference["server_cpu_seconds"] / max(reference["answered"], 1)
        spare = row["server_cpu_seconds"] - row["answered"] * per_answer
        costs.append(max(spare, 0.0) / row["refused"] * 1e6)
    return statistics.median(costs) if costs else None


def efficiency(row: dict[str, Any]) -> float:
    """Answers per second per core of the server's CPU."""
    return float(row["answered_rps"] / max(row["server_cores"], 1e-9))


def reference_of(rows: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any]:
    """What the 1x runs of the same workload in the same round measured: the two just before
    and after a case of the shipped server (bracketed), the median of the round's for the other
    servers' cases (run on servers of their own), the run itself for a 1x run."""
    case = Case(row["case"].workload, 1, "at-once")
    if row["case"] == case:
        return row
    references = [r for r in rows if r["case"] == case and r["round"] == row["round"]]
    if row["case"].server == "shipped":
        neighbours = [r for r in references if abs(r["position"] - row["position"]) == 1]
        references = neighbours or references
    else:
        references = sorted(references, key=lambda r: r["answered_rps"])
        references = [references[(len(references) - 1) // 2], references[len(references) // 2]]
    keys = ("answered_rps", "p99_ms", "answered", "server_cpu_seconds", "server_cores")
    return {key: statistics.fmean(r[key] for r in references) for key in keys}


def fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def overload_table(rows: list[dict[str, Any]], connections: int) -> list[str]:
    """One line per case, medians across rounds, ratios to the 1x runs around each case."""
    if not rows:
        return ["(not run)"]
    per_refusal = cpu_per_refusal_us(rows, [r for r in rows if r["case"].server == "unheld"])
    lines = [
        "| workload | server | clients | connections | answered/s | ÷ 1x | refused/s "
        "| p50 ms | p99 ms | p99 ÷ 1x | client timeouts | errors | server CPU (cores) "
        "| answered per server core ÷ 1x | server CPU per refusal (µs) "
        "| CPU wrk / PostgreSQL / other (cores) | targets |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for case in [case for cases in plan().values() for case in cases]:
        runs = [r for r in rows if r["case"] == case]
        if not runs:
            continue
        compared = [(r, reference_of(rows, r)) for r in runs]
        answered_ratio = statistics.median(
            r["answered_rps"] / ref["answered_rps"] for r, ref in compared
        )
        p99_ratio = statistics.median(r["p99_ms"] / ref["p99_ms"] for r, ref in compared)
        # Answers per second of the server's CPU, against 1x: what the overload itself costs,
        # whatever share of the cores the server got (on a machine shared with other work).
        per_core_ratio = statistics.median(efficiency(r) / efficiency(ref) for r, ref in compared)
        timeouts = sum(r["timeouts"] for r in runs)
        refusal_us = cpu_per_refusal_us(rows, runs)
        verdict = ""
        if case.multiple > 1 and case.server == "shipped":
            met = (
                answered_ratio >= MIN_ANSWERED_RATIO
                and timeouts == 0
                and p99_ratio <= MAX_P99_RATIO[case.clients]
            )
            verdict = "met" if met else "**missed**"
        lines.append(
            f"| {case.workload} | {LABELS[case.server]} | {CLIENTS[case.clients]} "
            f"| {connections * case.multiple} | {fmt(median(runs, 'answered_rps'))} "
            f"| {answered_ratio:.2f} | {fmt(median(runs, 'refused_rps'))} "
            f"| {fmt(median(runs, 'p50_ms'), 1)} | {fmt(median(runs, 'p99_ms'), 1)} "
            f"| {p99_ratio:.2f} | {timeouts} | {sum(r['errors'] for r in runs)} "
            f"| {fmt(median(runs, 'server_cores'), 2)} | {per_core_ratio:.2f} "
            f"| {fmt(refusal_us)} | {median(runs, 'wrk_cores'):.2f} / "
            f"{median(runs, 'database_cores'):.2f} / {median(runs, 'other_cores'):.2f} "
            f"| {verdict} |"
        )
    lines += [
        "",
        "Server CPU per refusal: what the server spent beyond its answers (each costing what "
        "one did in the 1x runs the case is compared with), per refusal. Where refusals are "
        "not held they take most of the CPU, and that figure is what a refusal alone costs: "
        f"{fmt(per_refusal, 0)} µs; where they are held it takes in whatever else the overload "
        "cost (more connections, and wrk's work on the same two cores).",
    ]
    return lines


def overload_section(rows: list[dict[str, Any]], settings: Settings, pool_size: int) -> list[str]:
    """The report's "## Overload" section."""
    rounds = len({r["round"] for r in rows})
    tried = ", ".join(f"{key}={value}" for key, value in settings.shipped_env)
    return [
        "## Overload",
        "",
        f"Reads and batches against one worker with a pool of {pool_size}, at 1, 4 and 16 times "
        f"-c{settings.connections}, {rounds} rounds (each a freshly started server per kind of "
        f"server, running its cases in an order rotated every round; wrk `-t{settings.threads} "
        f"--timeout {WRK_TIMEOUT_SECONDS}s`, {settings.warmup} s of warm-up then "
        f"{settings.seconds} s measured on the same connections: the requests sent after the "
        "warm-up, so the steady state and not their arrival all at once), medians. Each case "
        "of the server as shipped runs between two 1x runs of its workload on the same server, "
        "and its ratios are to their mean (the speed of this shared machine drifts by a fifth "
        "within minutes); the other servers' ratios are to the median of the round's 1x runs. "
        "Percentiles are those of the answered requests alone, each timed against its own "
        "request (bench/overload.lua); a client timeout is a request answered after "
        f"{WRK_TIMEOUT_SECONDS} s or not at all (wrk's own count takes a connection waiting out a "
        "Retry-After for one). Targets (issue 17): answered/s at least "
        f"{MIN_ANSWERED_RATIO} times 1x, no client timeout, p99 at most "
        f"{MAX_P99_RATIO['retry-after']:g} times 1x for clients that wait out Retry-After and "
        f'{MAX_P99_RATIO["at-once"]:g} times for clients that resend at once. "queue all" is '
        'the same service with ADMISSION_TARGET_MS=0 and MAX_IN_FLIGHT=1000000; "refusals not '
        'held" with ADMISSION_REFUSAL_DELAY_MS=0.'
        + (f" The shipped server ran with {tried} (BENCH_OVERLOAD_SETTINGS)." if tried else ""),
        "",
        *overload_table(rows, settings.connections),
        "",
        "Requests sent in the warm-ups and answered after "
        f"{WRK_TIMEOUT_SECONDS} s or not at all (the arrival of every connection at once, not "
        f"counted above): {warmup_timeouts(rows, shipped=True)} to the server as shipped, "
        f"{warmup_timeouts(rows, shipped=False)} to the others.",
        "",
    ]


def warmup_timeouts(rows: list[dict[str, Any]], *, shipped: bool) -> int:
    return sum(r["warmup_timeouts"] for r in rows if (r["case"].server == "shipped") == shipped)


def settings_from_environment(
    rounds: int, seconds: int, warmup: int, connections: int, threads: int, env: dict[str, str]
) -> Settings:
    """The section's settings, with BENCH_OVERLOAD_SETTINGS and BENCH_OVERLOAD_ONLY if set."""
    extra = os.environ.get("BENCH_OVERLOAD_SETTINGS", "")
    shipped_env = tuple(
        (key.strip(), value.strip())
        for key, _, value in (pair.partition("=") for pair in extra.split(","))
        if key.strip()
    )
    only = tuple(c.strip() for c in os.environ.get("BENCH_OVERLOAD_ONLY", "").split(",") if c)
    return Settings(rounds, seconds, warmup, connections, threads, env, shipped_env, only)


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
