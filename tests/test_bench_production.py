"""bench/production.py's plan and report: which servers run where, and the figures drawn from
their runs (the Little's-law bound, one core's worth, ratios paired within rounds)."""

import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from production import SERVERS, key_of, plan, report, setup_records


@dataclass(frozen=True)
class Target:
    """bench/run.py's Target, with only what plan() fills in."""

    key: str
    label: str
    kind: str
    workers: int = 1
    env: tuple[tuple[str, str], ...] = ()


BENCH = SimpleNamespace(Target=Target)
POOL = 10
# req/s of each server, the same in every round and workload, and its server CPU (cores).
RPS = {
    "direct": 3000.0,
    "service": 2800.0,
    "unprepared": 1400.0,
    "baseline": 6000.0,
    "floor": 2000.0,
}
SERVER_CORES = {"direct": 1.0, "service": 1.0, "unprepared": 0.9, "baseline": 0.75, "floor": 1.0}


def raw_run(rtts_ms: tuple[float, ...], rounds: int = 2) -> dict[str, Any]:
    """What run() returns, for servers that do RPS[server] with the database DATABASE_MS away
    from the delaying proxy, which delivers every chunk 0.05 ms late."""
    setups = plan(BENCH, rtts_ms)
    rows = []
    for number in range(1, rounds + 1):
        for setup in setups:
            for workload in ("read", "batch"):
                rtt = setup.rtt_ms
                rows.append(
                    {
                        "round": number,
                        "setup": setup.key,
                        "workload": workload,
                        # Halved at an RTT: the proxy's rows differ from the loopback rows.
                        "rps": RPS[setup.server] / (2 if rtt else 1),
                        "requests": 1000,
                        "p50_ms": 10.0,
                        "p99_ms": 20.0,
                        "errors": 0,
                        "cpu_cores": {
                            "server": SERVER_CORES[setup.server],
                            "pgbouncer": 0.1 if setup.pooled else None,
                            "postgres": 0.3,
                            "delay": 0.15 if rtt else None,
                            "other": 0.0,
                        },
                        "delay": {
                            "database_ms": 0.5,
                            "client_ms": 0.7,
                            "late_ms": 0.05,
                            "late_max_ms": 2.0,
                        }
                        if rtt
                        else None,
                    }
                )
    trips = {"round trip": 1.0, "query SELECT": 1.0, "parse": 0.0}
    return {
        "pgbouncer": "1.24.1",
        "pgbouncer_settings": {
            "pool_mode": "transaction",
            "max_prepared_statements": 200,
            "default_pool_size": 20,
        },
        "pool": POOL,
        "setups": setup_records(setups),
        "round_trips": {
            s.key: {"read": trips, "batch": trips, "statuses": {"read 200": 200}}
            for s in setups
            if not s.rtt_ms
        },
        "rows": rows,
        "settings": {
            "rounds": rounds,
            "seconds": 6,
            "rtts_ms": list(rtts_ms),
            "warmup": 2,
            "connections": 64,
            "threads": 1,
        },
    }


def test_the_stack_floor_runs_through_pgbouncer_on_loopback_and_at_every_rtt() -> None:
    setups = plan(BENCH, (1.0, 4.0))
    floor = [(s.pooled, s.rtt_ms) for s in setups if s.server == "floor"]
    assert floor == [(True, 0.0), (True, 1.0), (True, 4.0)]
    kinds = {s.server: s.target.kind for s in setups}
    assert kinds["floor"] == "stack-floor"  # bench/run.py starts bench/stack_floor.py for it
    assert kinds["baseline"] == "baseline" and kinds["service"] == "service"
    # Every server of the RTT rows has its loopback row through PgBouncer: its round trips and
    # its one core's worth come from there.
    loopback = {(s.server, s.pooled) for s in setups if not s.rtt_ms}
    assert {(s.server, True) for s in setups if s.rtt_ms} <= loopback
    assert len({s.key for s in setups}) == len(setups)


def test_the_report_gives_the_floor_its_bound_its_core_and_its_ratio_to_the_baseline() -> None:
    lines = report(raw_run((1.0,)), only=True, when="now")
    label = SERVERS["floor"][0]
    loopback = next(line for line in lines if line.startswith(f"| read | {label} | PgBouncer"))
    cells = [c.strip() for c in loopback.strip("|").split("|")]
    # No direct row of its own: "÷ the same server direct" is n/a, not the service's figure.
    assert cells[7] == "n/a"
    assert cells[8] == f"{RPS['floor'] / RPS['baseline']:.2f}"
    at_rtt = [line for line in lines if line.startswith(f"| read | {label} | ")]
    rtt_row = next(line for line in at_rtt if "PgBouncer" not in line)
    cells = [c.strip() for c in rtt_row.strip("|").split("|")]
    # pool / (round trips x (RTT + lateness both ways) + database time) = 10 / 1.6 ms
    bound = POOL / ((1 * (1.0 + 2 * 0.05) + 0.5) / 1000)
    assert cells[2] == f"{RPS['floor'] / 2:,.0f}"
    assert cells[3] == f"{bound:,.0f}"
    assert cells[4] == f"{RPS['floor'] / 2 / bound:.2f}"
    assert cells[5] == f"{RPS['floor'] / SERVER_CORES['floor']:,.0f}"  # one core's worth
    assert cells[6] == f"{RPS['floor'] / RPS['baseline']:.2f}"


def test_the_targets_are_the_services_in_the_fast_mode() -> None:
    lines = report(raw_run((1.0,)), only=True, when="now")
    targets = [line for line in lines if line.startswith("- ")]
    fast_over_direct = RPS["service"] / RPS["direct"]
    assert f"- reads through PgBouncer (fast) ÷ the service direct: {fast_over_direct:.2f}" in (
        line.split(" (≥")[0] for line in targets
    )
    rtt_ratio = next(t for t in targets if t.startswith("- reads at RTT 1 ms ÷ the baseline"))
    assert f": {RPS['service'] / RPS['baseline']:.2f} (" in rtt_ratio
    assert key_of("floor", True, 1.0) not in "\n".join(targets)
