"""What an Idempotency-Key costs: the batch load with and without one, side by side.

A short companion to `make bench` (bench/run.py, whose database, servers and wrk runs it reuses):
one PostgreSQL with 10,000 rows, the service with 1 worker freshly started each round, then the
batch workload (bench/batch.lua: PATCH of 50 random ids, 64 connections) without the header and
with a new Idempotency-Key on every request (BENCH_IDEMPOTENCY_KEYS=1), in alternating order.
With `--before DIR` (a checkout whose DIR/service/ predates the feature) the same plain batch
load also runs against that service, to show that requests without the header did not get
slower. Prints a Markdown table of medians across rounds.

    .venv/bin/python bench/idempotency.py --rounds 3 --seconds 10 [--before DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import run
from run import SERVICE_1, WORK, Database, Options, Server, Target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--before", type=Path, help="a checkout from before the feature")
    args = parser.parse_args()
    options = Options(
        targets=(SERVICE_1,),
        output=run.RESULTS,
        rounds=args.rounds,
        seconds=args.seconds,
        warmup=2,
        connections=64,
        threads=1,
        pool_size=None,
        profile=False,
        overload_rounds=0,
        overload_connections=256,
        database_url=None,
    )
    runs: list[tuple[Target, str]] = [(SERVICE_1, "plain"), (SERVICE_1, "keyed")]
    if args.before is not None:
        before = Target("before", "service before the feature, 1 worker", "service", 1, args.before)
        runs.append((before, "plain"))
    WORK.mkdir(parents=True, exist_ok=True)
    run.ensure_wrk()
    database = Database(None)
    run.prepare_database(database)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for number in range(1, args.rounds + 1):
        shift = number % len(runs)
        for target, mode in runs[shift:] + runs[:shift]:
            run.WRK_ENV["BENCH_IDEMPOTENCY_KEYS"] = "1" if mode == "keyed" else "0"
            with Server(target, database.url, options, "idempotency") as server:
                row = run.measure(options, server, database, "batch", number)
            results.setdefault((target.label, mode), []).append(row)
            print(
                f"round {number} {target.key:10} {mode:5} {row['rps']:8.0f} req/s "
                f"p50 {row['p50_ms']:6.1f} ms p99 {row['p99_ms']:6.1f} ms "
                f"server CPU {row['cpu_cores']['server']:.2f} errors {row['errors']}",
                flush=True,
            )
    print()
    print(table(results))
    return 0


def table(results: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    lines = [
        "| server | Idempotency-Key | req/s | p50 ms | p99 ms | server CPU per request"
        " | PostgreSQL CPU per request | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for (label, mode), rows in results.items():

        def median(pick: Any, rows: list[dict[str, Any]] = rows) -> float:
            return statistics.median(pick(row) for row in rows)

        rps = median(lambda r: r["rps"])
        server_ms = median(lambda r: r["cpu_cores"]["server"] / r["rps"] * 1000)
        postgres_ms = median(lambda r: (r["cpu_cores"]["postgres"] or 0.0) / r["rps"] * 1000)
        errors = sum(r["errors"] for r in rows)
        requests = sum(r["requests"] for r in rows)
        lines.append(
            f"| {label} | {'a new one per request' if mode == 'keyed' else 'none'} | {rps:,.0f}"
            f" | {median(lambda r: r['p50_ms']):.1f} | {median(lambda r: r['p99_ms']):.1f}"
            f" | {server_ms:.2f} ms | {postgres_ms:.2f} ms | {errors} of {requests:,} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
