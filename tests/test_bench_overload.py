"""bench/overload.py's bookkeeping: the run order, and what each case is compared with."""

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from overload import Case, bracketed, overload_table, plan, reference_of

READ_1X = Case("read", 1, "at-once")
READ_16 = Case("read", 16, "at-once")
READ_16_POLITE = Case("read", 16, "retry-after")
BATCH_1X = Case("batch", 1, "at-once")


def row(case: Case, position: int, answered_rps: float, p99_ms: float = 10.0) -> dict[str, Any]:
    """A measured run as measure() leaves it, with only what the bookkeeping reads."""
    return {
        "round": 1,
        "case": case,
        "position": position,
        "connections": 64 * case.multiple,
        "answered_rps": answered_rps,
        "refused_rps": 0.0,
        "answered": answered_rps * 10,
        "refused": 0,
        "p50_ms": p99_ms / 2,
        "p99_ms": p99_ms,
        "timeouts": 0,
        "warmup_timeouts": 0,
        "errors": 0,
        "server_cpu_seconds": 10.0,
        "server_cores": 1.0,
        "wrk_cores": 0.1,
        "database_cores": 0.3,
        "other_cores": 0.0,
    }


def test_each_overload_case_runs_between_two_1x_runs_of_its_workload() -> None:
    shipped = plan()["shipped"]
    order = bracketed(shipped)
    for workload in ("read", "batch"):
        runs = [case for case in order if case.workload == workload]
        reference = Case(workload, 1, "at-once")
        assert runs[0::2] == [reference] * (len(runs) // 2 + 1)
        assert reference not in runs[1::2]
        assert sorted(runs[1::2], key=str) == sorted(
            (c for c in shipped if c.workload == workload and c.multiple > 1), key=str
        )
    # The same 1x run is added even when a selection (BENCH_OVERLOAD_ONLY) left it out.
    assert bracketed([READ_16]) == [READ_1X, READ_16, READ_1X]


def test_a_case_is_compared_with_the_mean_of_the_1x_runs_around_it() -> None:
    rows = [
        row(READ_1X, 0, 2000.0, p99_ms=40.0),
        row(READ_16, 1, 1800.0, p99_ms=60.0),
        row(READ_1X, 2, 1600.0, p99_ms=20.0),
        row(READ_16_POLITE, 3, 700.0),
        row(READ_1X, 4, 800.0),
    ]
    first = reference_of(rows, rows[1])
    assert (first["answered_rps"], first["p99_ms"]) == (1800.0, 30.0)
    assert reference_of(rows, rows[3])["answered_rps"] == 1200.0
    # The table's ratios are those: 1,800 / 1,800 met, 700 / 1,200 missed.
    table = "\n".join(overload_table(rows, 64))
    assert "| 1.00 |" in table and "| 0.58 |" in table
    verdicts = [
        line.rsplit("|", 2)[1].strip() for line in table.splitlines() if "as shipped" in line
    ]
    assert verdicts == ["", "met", "**missed**"]


def test_other_servers_cases_are_compared_with_the_rounds_median_1x_run() -> None:
    queued = Case("read", 16, "at-once", "queue-all")
    rows = [
        row(READ_1X, 0, 1000.0),
        row(READ_1X, 1, 3000.0),
        row(READ_1X, 2, 2000.0),
        row(BATCH_1X, 3, 500.0),
        row(queued, 4, 1500.0),
    ]
    assert reference_of(rows, rows[4])["answered_rps"] == 2000.0
