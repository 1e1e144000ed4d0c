"""What tracing costs (issue 20): the service with tracing off, on at 1 % and at 100 % sampling.

With tracing on, spans go over OTLP/HTTP to a receiver in the benchmark's own process
(tests/otlp_receiver.py: decodes every export and counts its spans), configured as an operator
would: OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_TRACES_SAMPLER=parentbased_traceidratio and its _ARG.
wrk's requests carry no traceparent, so each one is a root sampled at the ratio. The three
servers take turns, each freshly started, the order rotated every round, and each reports the
read and the batch load; the ratios are to the tracing-off server of the same round.

Run alone with `.venv/bin/python bench/run.py --only-tracing` (about 4 minutes at 3 rounds);
`make bench` runs these rounds after the others.
"""

from __future__ import annotations

import http.client
import statistics
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

# The receiver is the tests' own, from the repository's root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.otlp_receiver import OtlpReceiver

# (key, label, sampling ratio or None for tracing off)
MODES: tuple[tuple[str, str, float | None], ...] = (
    ("off", "tracing off (as shipped)", None),
    ("1pct", "tracing on, 1 % of traces sampled", 0.01),
    ("100pct", "tracing on, every trace sampled", 1.0),
)
WORKLOADS = ("read", "batch")
# Every request to /items is a server span and one statement span (a read, or a batch's one
# UPDATE): the spans a fully sampled server should export per request.
SPANS_PER_REQUEST = 2

StartServer = Callable[[str, str, tuple[tuple[str, str], ...]], AbstractContextManager[Any]]
Measure = Callable[[Any, str, int], dict[str, Any]]


def tracing_environment(endpoint: str, ratio: float | None) -> tuple[tuple[str, str], ...]:
    """The service's settings for one mode: none for tracing off."""
    if ratio is None:
        return ()
    return (
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", str(ratio)),
    )


def items_requests_served(port: int) -> int:
    """Requests to /items the server has answered so far, from its own metrics (one worker)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        body = connection.getresponse().read().decode()
    finally:
        connection.close()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in body.splitlines()
        if line.startswith("http_requests_total{") and 'route="/items' in line
    )


def measure_tracing(rounds: int, start: StartServer, measure: Measure) -> list[dict[str, Any]]:
    """`rounds` rounds of the three modes; one row per (round, mode, workload), as `measure`
    gives it, with the mode and the spans the server exported per /items request."""
    rows: list[dict[str, Any]] = []
    if rounds <= 0:
        return rows
    with OtlpReceiver(keep_spans=False) as receiver:
        for number in range(1, rounds + 1):
            shift = (number - 1) % len(MODES)
            for key, label, ratio in MODES[shift:] + MODES[:shift]:
                env = tracing_environment(receiver.endpoint, ratio)
                spans_before = receiver.span_count
                with start(f"tracing-{key}", label, env) as server:
                    measured = [measure(server, workload, number) for workload in WORKLOADS]
                    served = items_requests_served(server.port)
                # Stopped: the exporter has sent what it still held (the SDK flushes at shutdown).
                spans = receiver.span_count - spans_before
                for row in measured:
                    row.update(
                        mode=key,
                        spans_per_request=spans / max(served, 1),
                        cpu_ms=row["cpu_cores"]["server"] / row["rps"] * 1000,
                    )
                    rows.append(row)
                    print(
                        f"tracing {number} {key:6} {row['workload']:5} {row['rps']:8.0f} req/s "
                        f"p99 {row['p99_ms']:6.1f} ms errors {row['errors']} "
                        f"spans/request {row['spans_per_request']:.3f}",
                        flush=True,
                    )
    return rows


def _paired_ratio(rows: list[dict[str, Any]], mode: str, workload: str, metric: str) -> float:
    """Median over rounds of `mode` divided by tracing off, measured in the same round."""
    ratios = []
    for number in sorted({r["round"] for r in rows}):
        pair = {
            r["mode"]: r[metric] for r in rows if r["round"] == number and r["workload"] == workload
        }
        if mode in pair and pair.get("off"):
            ratios.append(pair[mode] / pair["off"])
    return statistics.median(ratios) if ratios else float("nan")


def tracing_table(rows: list[dict[str, Any]]) -> list[str]:
    """The Markdown section's table and the verdict on the aim (reads at 1 %: >= 0.97)."""
    if not rows:
        return ["(not run)"]
    lines = [
        "| workload | server | req/s (median) | ÷ tracing off (paired) | p50 ms | p99 ms "
        "| server CPU per request (ms) | ÷ tracing off (paired) | errors "
        "| spans exported per request |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for workload in WORKLOADS:
        for key, label, ratio in MODES:
            runs = [r for r in rows if r["mode"] == key and r["workload"] == workload]
            if not runs:
                continue

            def median(metric: str, runs: list[dict[str, Any]] = runs) -> float:
                return float(statistics.median(r[metric] for r in runs))

            expected = "" if ratio is None else f" (expected {ratio * SPANS_PER_REQUEST:g})"
            lines.append(
                f"| {workload} | {label} | {median('rps'):,.0f} "
                f"| {_paired_ratio(rows, key, workload, 'rps'):.3f} "
                f"| {median('p50_ms'):.1f} | {median('p99_ms'):.1f} | {median('cpu_ms'):.3f} "
                f"| {_paired_ratio(rows, key, workload, 'cpu_ms'):.3f} "
                f"| {sum(r['errors'] for r in runs)} of {sum(r['requests'] for r in runs):,} "
                f"| {median('spans_per_request'):.3f}{expected} |"
            )
    fewer = 1 - _paired_ratio(rows, "1pct", "read", "rps")
    more_cpu = _paired_ratio(rows, "1pct", "read", "cpu_ms") - 1
    lines += [
        "",
        f"Reads at 1 % sampling, paired by round: {fewer:.1%} fewer requests/s and {more_cpu:.1%} "
        "more server CPU per request than with tracing off (the aim: at most 3 % of the "
        "throughput; one worker is CPU-bound, so its CPU per request is the steadier measure "
        "on a shared machine).",
    ]
    return lines


def tracing_section(rows: list[dict[str, Any]], rounds: int, seconds: int) -> list[str]:
    """The report's section: what was run, then the table."""
    return [
        "## Tracing",
        "",
        f"The service (1 worker) with tracing off, and on with 1 % and 100 % of traces sampled, "
        f"exporting over OTLP/HTTP to a receiver on loopback that decodes every span "
        f"(bench/tracing.py); {rounds} rounds of {seconds} s per workload, order rotated, "
        "medians. Spans per request counts what reached the receiver per request to /items "
        f"({SPANS_PER_REQUEST} when every trace is kept: the request and its statement).",
        "",
        *tracing_table(rows),
        "",
    ]
