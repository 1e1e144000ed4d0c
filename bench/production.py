"""`make bench`'s production path: PgBouncer in transaction mode, and a database 1 or 4 ms away.

Neon's `-pooler` hosts are PgBouncer in transaction mode, and a pod reaches its database over a
network, not over loopback. This section of the benchmark measures both, with one worker and
the run's pool size (10), in interleaved rounds of its own (order rotated, each server freshly
started, wrk as in the main rounds):

- loopback: the service direct to PostgreSQL (DB_POOLER=none) and through PgBouncer 1.24.1
  (transaction mode, max_prepared_statements = 200) in DB_POOLER=transaction and
  DB_POOLER=transaction-unprepared; the baseline direct and through the same PgBouncer (with
  its prepared statements, its fastest way there);
- each round-trip time of `--production-rtts` (1 and 4 ms): the same three through PgBouncer,
  with bench/delay.py's delaying proxy (a process of its own, its CPU a column of its own)
  between the servers and PgBouncer, half the round trip each way: the network between a pod
  and a managed pooler.

Before the rounds, round trips per request are counted on the wire by bench/pgwire.py between
each server and what it connects to (reads, batches, and `Idempotency-Key` writes, fresh and
replayed). For every round-trip time the report sets req/s next to the Little's-law bound of a
pool: `pool size / (round trips x RTT + database time)`, where the database time per request is
what the delaying proxy saw (from forwarding a request to the first byte of its answer), under
the same load.

Called by bench/run.py, which hands in itself as `bench` (Server, wrk, CPU accounting); alone:
`.venv/bin/python bench/run.py --only-production` rewrites only this section of the report.
"""

# A benchmark starts the programs it measures (S603, S607); the token is a fixed test value.
# ruff: noqa: S603, S607

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote, urlsplit

from delay import DelayProxy
from pgwire import WireCounter

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SECTION_BEGIN = "<!-- production path: begin (bench/production.py) -->"
SECTION_END = "<!-- production path: end -->"
PGBOUNCER_VERSION = "1.24.1"  # what tests/build-pgbouncer.sh builds
PREPARED_STATEMENTS_SINCE = (1, 21)  # PgBouncer's first max_prepared_statements
SYSTEM_USER = "pgserver"  # PgBouncer will not run as root; pgserver's user runs PostgreSQL too
WORKLOADS = ("read", "batch")
PLURAL = {"read": "reads", "batch": "batches"}
KEYED_WRITES = 50  # sequential Idempotency-Key writes counted, each then replayed once


@dataclass(frozen=True)
class Settings:
    """This section's command-line options."""

    only: bool  # --only-production: just this section, rewritten in place in the report
    rounds: int
    seconds: int
    rtts_ms: tuple[float, ...]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This section's options, on bench/run.py's command line."""
    env = os.environ.get
    parser.add_argument(
        "--only-production",
        action="store_true",
        help="run only the production-path section (PgBouncer, round-trip times) and rewrite "
        "only that section of the report",
    )
    parser.add_argument(
        "--production-rounds",
        type=int,
        default=int(env("BENCH_PRODUCTION_ROUNDS", "3")),
        help="rounds of the production-path section (0: none)",
    )
    parser.add_argument(
        "--production-seconds",
        type=int,
        default=int(env("BENCH_PRODUCTION_SECONDS", "6")),
        help="seconds of each measured wrk run in that section",
    )
    parser.add_argument(
        "--production-rtts",
        default=env("BENCH_PRODUCTION_RTTS", "1,4"),
        help="comma-separated database round-trip times in ms, made by bench/delay.py",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    rtts = tuple(float(x) for x in args.production_rtts.split(",") if x.strip())
    return Settings(args.only_production, args.production_rounds, args.production_seconds, rtts)


# --------------------------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class Setup:
    """One server, one way to the database, one round-trip time."""

    key: str
    server: str  # a key of SERVERS
    pooled: bool  # through PgBouncer
    rtt_ms: float  # 0: loopback, no delaying proxy
    target: Any  # bench.Target


# (label, kind, DB_POOLER)
SERVERS = {
    "service": ("service, DB_POOLER=transaction", "service", "transaction"),
    "unprepared": (
        "service, DB_POOLER=transaction-unprepared",
        "service",
        "transaction-unprepared",
    ),
    "direct": ("service, DB_POOLER=none", "service", "none"),
    "baseline": ("baseline (bare ASGI + asyncpg)", "baseline", None),
    # What one worker of the service's stack does with nothing of the service's own
    # (bench/stack_floor.py): where it, too, falls short of a target, so does the stack.
    "floor": ("stack floor (Litestar + AsyncSession, nothing else)", "stack-floor", None),
}


def plan(bench: ModuleType, rtts_ms: tuple[float, ...]) -> list[Setup]:
    """Every setup of the section, in the order they run: what is compared runs side by side
    (the service through PgBouncer between its direct row and the baseline the same way)."""
    wanted = [("direct", False, 0.0), ("service", True, 0.0), ("baseline", True, 0.0),
              ("baseline", False, 0.0), ("unprepared", True, 0.0),
              ("floor", True, 0.0)]  # fmt: skip
    for rtt in rtts_ms:
        wanted += [("service", True, rtt), ("baseline", True, rtt), ("unprepared", True, rtt),
                   ("floor", True, rtt)]  # fmt: skip
    setups = []
    for server, pooled, rtt in wanted:
        label, kind, pooler = SERVERS[server]
        key = f"{server}-{'pgbouncer' if pooled else 'direct'}-{rtt:g}ms"
        env = (("DB_POOLER", pooler),) if pooler else ()
        where = "through PgBouncer" if pooled else "direct"
        delayed = f", RTT {rtt:g} ms" if rtt else ""
        target = bench.Target(key, f"{label}, {where}{delayed}", kind, 1, env=env)
        setups.append(Setup(key, server, pooled, rtt, target))
    return setups


# --------------------------------------------------------------------------------------------
# PgBouncer


def find_pgbouncer() -> str | None:
    """A PgBouncer >= 1.21: $PGBOUNCER_MODERN, else tests/build-pgbouncer.sh's (built once,
    cached outside the clone), else the system's if it is recent enough."""
    candidates = [os.environ.get("PGBOUNCER_MODERN")]
    built = subprocess.run(
        ["bash", str(REPO / "tests" / "build-pgbouncer.sh")],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if built.returncode == 0:
        candidates.append(built.stdout.strip().splitlines()[-1])
    else:
        print(f"tests/build-pgbouncer.sh failed:\n{built.stderr[-2000:]}", flush=True)
    candidates.append(shutil.which("pgbouncer"))
    for binary in candidates:
        if binary and os.access(binary, os.X_OK):
            with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
                if pgbouncer_version(binary) >= PREPARED_STATEMENTS_SINCE:
                    return binary
    return None


def pgbouncer_version(binary: str) -> tuple[int, ...]:
    """(1, 24, 1) for a binary whose --version says "PgBouncer 1.24.1"."""
    first = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.splitlines()[0]
    return tuple(int(part) for part in first.split()[1].split("."))


class PgBouncer:
    """PgBouncer in transaction mode on 127.0.0.1, in front of the run's PostgreSQL.

    As Neon's poolers run it: transaction mode, max_prepared_statements = 200 (the default
    since 1.24). Its own pool is larger than any one server's, so it never queues them.
    """

    def __init__(self, binary: str, database: Any, pool_size: int) -> None:
        self.binary = binary
        self.version = ".".join(map(str, pgbouncer_version(binary)))
        self.root = Path(tempfile.mkdtemp(prefix="bench-pgbouncer-"))
        self.port = free_port()
        host, port, socket_dir = database.upstream()
        parts = urlsplit(database.url)
        user, password = unquote(parts.username or "postgres"), unquote(parts.password or "")
        upstream = f"host={socket_dir or host or '127.0.0.1'} port={port or 5432}"
        # Loopback only: clients are trusted when the database trusts them (the embedded one's
        # unix socket); else PgBouncer checks and uses the password, as the fault tests do.
        (self.root / "userlist.txt").write_text(f'"{user}" "{password}"\n')
        self.settings = {
            "pool_mode": "transaction",
            "max_prepared_statements": "200",
            "default_pool_size": str(max(20, 2 * pool_size)),
            "max_client_conn": "500",
            "auth_type": "plain" if password else "trust",
        }
        lines = [
            "[databases]",
            f"* = {upstream}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            f"auth_file = {self.root / 'userlist.txt'}",
            *(f"{name} = {value}" for name, value in self.settings.items()),
            "log_connections = 0",
            "log_disconnections = 0",
            f"logfile = {self.root / 'pgbouncer.log'}",
            "",
        ]
        (self.root / "pgbouncer.ini").write_text("\n".join(lines))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PgBouncer:
        program = self.root / "pgbouncer"  # a copy the system user can reach
        shutil.copy2(self.binary, program)
        user = SYSTEM_USER if os.geteuid() == 0 else None
        if user is not None:  # PgBouncer refuses to run as root
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, user)
            for name in ("userlist.txt", "pgbouncer.ini"):
                (self.root / name).chmod(0o600)
        with (self.root / "stderr.log").open("wb") as stderr:
            self.process = subprocess.Popen(
                [str(program), str(self.root / "pgbouncer.ini")],
                user=user, cwd=self.root, stdout=subprocess.DEVNULL, stderr=stderr,
            )  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if accepts(self.port):
                return self
            time.sleep(0.1)
        log = "\n".join(p.read_text() for p in self.root.glob("*.log"))
        self.stop()
        raise RuntimeError(f"PgBouncer did not start:\n{log}")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self) -> None:
        """Stop it by its own PID and remove its folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


# --------------------------------------------------------------------------------------------
# The way to the database of each setup


class Network:
    """PgBouncer and one delaying proxy per round-trip time, started once for the section;
    `url(setup)` is where a setup's server connects, `parties(setup)` the processes whose CPU
    is counted apart."""

    def __init__(
        self, database: Any, pgbouncer: PgBouncer, rtts_ms: tuple[float, ...], logs: Path
    ) -> None:
        self.database = database
        self.logs = logs
        self.pgbouncer = pgbouncer
        self.rtts_ms = rtts_ms
        self.delays: dict[float, DelayProxy] = {}

    def __enter__(self) -> Network:
        self.pgbouncer.start()
        for rtt in self.rtts_ms:
            proxy = DelayProxy(
                f"tcp:127.0.0.1:{self.pgbouncer.port}", rtt / 2, self.logs / f"delay-{rtt:g}ms.log"
            )
            proxy.start()
            self.delays[rtt] = proxy
        return self

    def __exit__(self, *exc: object) -> None:
        for proxy in self.delays.values():
            proxy.stop()
        self.pgbouncer.stop()

    def port(self, setup: Setup) -> int | None:
        """The port a setup's server connects to; None: PostgreSQL itself, as the main rounds."""
        if setup.rtt_ms:
            return self.delays[setup.rtt_ms].port
        return self.pgbouncer.port if setup.pooled else None

    def url(self, setup: Setup) -> str:
        port = self.port(setup)
        return self.database.url if port is None else self.database.proxied_url(port)

    def upstream(self, setup: Setup) -> tuple[str | None, int | None, str | None]:
        """For the counting proxy: (host, port, socket dir) of what the server connects to."""
        port = self.port(setup)
        return self.database.upstream() if port is None else ("127.0.0.1", port, None)

    def parties(self, setup: Setup) -> dict[str, int | None]:
        delay = self.delays.get(setup.rtt_ms)
        return {
            "pgbouncer": self.pgbouncer.pid if setup.pooled else None,
            "delay": delay.pid if delay else None,
        }


# --------------------------------------------------------------------------------------------
# Round trips on the wire


def request(
    port: int, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


Call = tuple[str, str, bytes | None, dict[str, str]]  # method, path, body, headers


def count_round_trips(
    bench: ModuleType, options: Any, network: Network, setups: list[Setup]
) -> dict[str, Any]:
    """Round trips and statements per request of each loopback setup, counted on the wire
    between its server and what it connects to: 200 reads, 100 batches, and for the service
    KEYED_WRITES Idempotency-Key batches with a new key, then each of them sent again."""
    headers = {"Authorization": f"Bearer {bench.TOKEN}", "Content-Type": "application/json"}
    rng = random.Random(2)  # noqa: S311 (load, not a secret)
    counted: dict[str, Any] = {}
    for setup in setups:
        if setup.rtt_ms:
            continue  # the same protocol as at loopback, only slower
        reads: list[Call] = [("GET", bench.read_path(rng), None, headers) for _ in range(200)]
        batches: list[Call] = [
            ("PATCH", "/items", bench.batch_body(rng), headers) for _ in range(100)
        ]
        phases = {"read": reads, "batch": batches}
        if setup.target.kind == "service":
            prefix = f"bench-count-{setup.key}-{time.time_ns()}"
            keyed: list[Call] = [
                (
                    "PATCH",
                    "/items",
                    bench.batch_body(rng),
                    {**headers, "Idempotency-Key": f"{prefix}-{i}"},
                )
                for i in range(KEYED_WRITES)
            ]
            phases.update(keyed=keyed, replayed=keyed)
        warm_up: list[Call] = [
            c for pair in zip(reads[:10], batches[:10], strict=True) for c in pair
        ]
        counted[setup.key] = count_setup(bench, options, network, setup, warm_up, phases)
        print(
            f"round trips {setup.key}: "
            + ", ".join(f"{name} {c.get('round trip', 0):g}"
                        for name, c in counted[setup.key].items() if name in phases),
            flush=True,
        )  # fmt: skip
    return counted


def count_setup(
    bench: ModuleType, options: Any, network: Network, setup: Setup, warm_up: list[Call],
    phases: dict[str, list[Call]],
) -> dict[str, Any]:  # fmt: skip
    """One setup's server behind a counting proxy: counts per request of each phase."""
    proxy = WireCounter(*network.upstream(setup))
    url = network.database.proxied_url(proxy.start())
    statuses: collections.Counter[str] = collections.Counter()
    result: dict[str, Any] = {}
    try:
        with bench.Server(setup.target, url, options, "production-count") as server:
            for method, path, body, extra in warm_up:  # the statement caches
                request(server.port, method, path, body, extra)
            for name, calls in phases.items():
                start = proxy.snapshot()
                for method, path, body, extra in calls:
                    status, answer, _ = request(server.port, method, path, body, extra)
                    replayed = " replayed" if answer.get("Idempotent-Replayed") == "true" else ""
                    statuses[f"{name} {status}{replayed}"] += 1
                result[name] = bench.per_request(proxy.snapshot() - start, len(calls))
    finally:
        proxy.stop()
    return {**result, "statuses": dict(statuses)}


# --------------------------------------------------------------------------------------------
# Rounds


def measure(
    bench: ModuleType,
    options: Any,
    seconds: int,
    server: Any,
    database: Any,
    workload: str,
    parties: dict[str, int | None],
    delay: DelayProxy | None,
) -> dict[str, Any]:
    """Warm up, then one measured wrk run, with the CPU of every party and the delaying
    proxy's counts around it."""
    bench.run_wrk(options, workload, server.port, options.warmup)
    wait_until_idle(bench, server)
    timings_before = bench.service_timings(server)
    pids = {"server": server.pid, "postgres": database.postmaster_pid, **parties}
    delay_before = delay.stats() if delay else None
    started = time.monotonic()
    load_before, machine_before = bench.children_cpu_seconds(), bench.machine_busy_ticks()
    ticks_before = {name: bench.tree_ticks(pid) for name, pid in pids.items()}
    result = bench.run_wrk(options, workload, server.port, seconds)
    ticks_after = {name: bench.tree_ticks(pid) for name, pid in pids.items()}
    load_after, machine_after = bench.children_cpu_seconds(), bench.machine_busy_ticks()
    wall = time.monotonic() - started
    delay_after = delay.stats() if delay else None
    timings_after = bench.service_timings(server)

    clock = bench.CLOCK_TICKS
    cores: dict[str, float | None] = {"wrk": (load_after - load_before) / wall}
    for name, pid in pids.items():
        cores[name] = (ticks_after[name] - ticks_before[name]) / clock / wall if pid else None
    busy = (machine_after - machine_before) / clock / wall
    cores["other"] = max(busy - sum(v for v in cores.values() if v), 0.0)
    requests = result["requests"]
    row: dict[str, Any] = {
        "workload": workload,
        "requests": requests,
        # Answered with 2xx: the errors (none, normally) are not throughput.
        "rps": (requests - result["status_errors"]) / (result["duration_us"] / 1e6),
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "errors": sum(
            result[k]
            for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
        ),
        "cpu_cores": cores,
        "inside": None,
        "delay": None,
    }
    if timings_before and timings_after:
        delta = {k: timings_after[k] - timings_before.get(k, 0.0) for k in timings_after}
        answered = max(delta.get("http_request_duration_seconds_count", 0.0), 1.0)
        checkouts = delta.get("db_pool_wait_seconds_count", 0.0)
        row["inside"] = {
            "app_ms": delta.get("http_request_duration_seconds_sum", 0.0) / answered * 1000,
            "pool_wait_ms": delta.get("db_pool_wait_seconds_sum", 0.0) / checkouts * 1000
            if checkouts
            else None,
        }
    if delay_before is not None and delay_after is not None:
        d = {k: delay_after[k] - delay_before[k] for k in delay_after}
        row["delay"] = {
            # The far side's time per request: PgBouncer, PostgreSQL and loopback.
            "database_ms": d["answer_seconds"] / max(requests, 1) * 1000,
            "answers_per_request": d["answers"] / max(requests, 1),
            # The server's own time per round trip with the connection idle at its end.
            "client_ms": d["client_seconds"] / max(d["client_turns"], 1) * 1000,
            "late_ms": d["late_seconds"] / max(d["chunks"], 1) * 1000,
            "late_max_ms": delay_after["late_max_seconds"] * 1000,
        }
    return row


def wait_until_idle(bench: ModuleType, server: Any) -> None:
    """Until the requests of the wrk run that just ended are answered (10 s at most).

    wrk closes its connections at the end of a run, but the server still answers the requests
    they had sent, while the next run's connections arrive: at a few ms per request that
    overlap is long enough for the service's in-flight limit (8 per pooled connection) to shed
    the newcomers, and for the baseline to start with a queue.
    """
    if server.target.kind != "service":
        time.sleep(0.5)  # the baseline has no gauge; 64 requests take < 0.2 s at 400 req/s
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, body = bench.http_request(server.port, "GET", "/metrics")
        gauge = [line for line in body.decode().splitlines()
                 if line.startswith("http_requests_in_flight ")]  # fmt: skip
        if status != 200 or not gauge or float(gauge[0].split()[1]) <= 1:  # this scrape
            return
        time.sleep(0.05)


def run_rounds(
    bench: ModuleType, options: Any, database: Any, network: Network, setups: list[Setup],
    settings: Settings,
) -> list[dict[str, Any]]:  # fmt: skip
    rows: list[dict[str, Any]] = []
    for number in range(1, settings.rounds + 1):
        shift = (number - 1) * 4 % len(setups)  # a different setup first each round
        for setup in setups[shift:] + setups[:shift]:
            delay = network.delays.get(setup.rtt_ms)
            with bench.Server(setup.target, network.url(setup), options, "production") as server:
                for workload in WORKLOADS:
                    row = measure(
                        bench, options, settings.seconds, server, database, workload,
                        network.parties(setup), delay,
                    )  # fmt: skip
                    row.update(round=number, setup=setup.key)
                    rows.append(row)
                    print(
                        f"production {number} {setup.key:28} {workload:5} {row['rps']:8.0f} "
                        f"req/s p50 {row['p50_ms']:6.1f} ms p99 {row['p99_ms']:6.1f} ms "
                        f"errors {row['errors']}",
                        flush=True,
                    )
    return rows


def setup_records(setups: list[Setup]) -> list[dict[str, Any]]:
    """The setups as the raw results keep them (JSON, read back by `Summary`)."""
    return [
        {"key": s.key, "label": s.target.label, "server": s.server, "pooled": s.pooled,
         "rtt_ms": s.rtt_ms}
        for s in setups
    ]  # fmt: skip


def run(bench: ModuleType, options: Any, database: Any) -> dict[str, Any]:
    """The whole section: PgBouncer, the proxies, round trips, rounds. Its raw results."""
    settings: Settings = options.production
    binary = find_pgbouncer()
    if binary is None:
        return {"error": "no PgBouncer >= 1.21 (tests/build-pgbouncer.sh could not build one)"}
    setups = plan(bench, settings.rtts_ms)
    pool = options.pool_size or 10
    pgbouncer = PgBouncer(binary, database, pool)
    with Network(database, pgbouncer, settings.rtts_ms, bench.WORK) as network:
        print(
            f"production path: PgBouncer {network.pgbouncer.version} on port "
            f"{network.pgbouncer.port}, delaying proxies for RTT "
            + ", ".join(f"{rtt:g} ms" for rtt in settings.rtts_ms),
            flush=True,
        )
        counted = count_round_trips(bench, options, network, setups)
        rows = run_rounds(bench, options, database, network, setups, settings)
        return {
            "pgbouncer": network.pgbouncer.version,
            "pgbouncer_settings": network.pgbouncer.settings,
            "pool": pool,
            "setups": setup_records(setups),
            "round_trips": counted,
            "rows": rows,
            "settings": {
                "rounds": settings.rounds,
                "seconds": settings.seconds,
                "rtts_ms": list(settings.rtts_ms),
                "warmup": options.warmup,
                "connections": options.connections,
                "threads": options.threads,
            },
        }


# --------------------------------------------------------------------------------------------
# Report


def fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


class Summary:
    """Medians across rounds, and ratios paired within each round."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.setups = {s["key"]: s for s in raw["setups"]}
        self.rows = raw["rows"]
        self.pool = raw["pool"]

    def other_cores(self) -> float | None:
        values = [r["cpu_cores"]["other"] for r in self.rows]
        return statistics.median(values) if values else None

    def other_range(self) -> str:
        values = [r["cpu_cores"]["other"] for r in self.rows] or [0.0]
        return f"{min(values):.2f} to {max(values):.2f}"

    def runs(self, key: str, workload: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["setup"] == key and r["workload"] == workload]

    def median(self, key: str, workload: str, pick: Any) -> float | None:
        values = [v for r in self.runs(key, workload) if (v := pick(r)) is not None]
        return statistics.median(values) if values else None

    def rps(self, key: str, workload: str) -> float | None:
        return self.median(key, workload, lambda r: r["rps"])

    def per_core(self, key: str, workload: str) -> float | None:
        """req/s per core of the server's own CPU: what one worker with a core could do."""
        return self.median(
            key,
            workload,
            lambda r: r["rps"] / r["cpu_cores"]["server"] if r["cpu_cores"]["server"] else None,
        )

    def paired(self, key: str, other: str, workload: str) -> float | None:
        """Median over rounds of key's req/s divided by other's, measured in the same round."""
        mine = {r["round"]: r["rps"] for r in self.runs(key, workload)}
        theirs = {r["round"]: r["rps"] for r in self.runs(other, workload)}
        ratios = [mine[n] / theirs[n] for n in mine if theirs.get(n)]
        return statistics.median(ratios) if ratios else None

    def round_trips(self, key: str, workload: str) -> float | None:
        """Counted on the wire at loopback; the same setup at any round-trip time."""
        setup = self.setups[key]
        loopback = next(
            k for k, s in self.setups.items()
            if s["server"] == setup["server"] and s["pooled"] == setup["pooled"]
            and not s["rtt_ms"]
        )  # fmt: skip
        counts = self.raw["round_trips"].get(loopback, {}).get(workload)
        return counts.get("round trip") if counts else None

    def bound(self, key: str, workload: str) -> float | None:
        """Little's law for the pool: pool / (round trips x RTT delivered + database time)."""
        rtt = self.setups[key]["rtt_ms"]
        trips = self.round_trips(key, workload)
        if not rtt or trips is None:
            return None

        def per_round(row: dict[str, Any]) -> float | None:
            delay = row["delay"]
            if delay is None:
                return None
            delivered_ms = rtt + 2 * delay["late_ms"]
            return self.pool / ((trips * delivered_ms + delay["database_ms"]) / 1000)

        return self.median(key, workload, per_round)

    def of_bound(self, key: str, workload: str) -> float | None:
        """Median over rounds of req/s divided by that round's bound."""
        return self.median(key, workload, self.round_bound)

    def round_bound(self, row: dict[str, Any]) -> float | None:
        """One round's req/s divided by its own bound."""
        delay, trips = row["delay"], self.round_trips(row["setup"], row["workload"])
        if delay is None or trips is None:
            return None
        delivered_ms = self.setups[row["setup"]]["rtt_ms"] + 2 * delay["late_ms"]
        bound = self.pool / ((trips * delivered_ms + delay["database_ms"]) / 1000)
        return float(row["rps"] / bound)


def key_of(server: str, pooled: bool, rtt: float) -> str:
    return f"{server}-{'pgbouncer' if pooled else 'direct'}-{rtt:g}ms"


def command_line(raw: dict[str, Any], only: bool) -> str:
    s = raw["settings"]
    flags = (
        f"--production-rounds {s['rounds']} --production-seconds {s['seconds']} "
        f"--production-rtts {','.join(f'{r:g}' for r in s['rtts_ms'])}"
    )
    if only:
        return f"`.venv/bin/python bench/run.py --only-production {flags}`"
    return f"`make bench` (`.venv/bin/python bench/run.py`, this section with {flags})"


def report(raw: dict[str, Any], only: bool, when: str) -> list[str]:
    """The section's Markdown, between its markers."""
    title = "## The production path: PgBouncer, and a database 1 ms or 4 ms away"
    lines = [SECTION_BEGIN, "", title, ""]
    if "error" in raw:
        return [*lines, f"Not measured: {raw['error']}.", "", SECTION_END]
    summary = Summary(raw)
    s = raw["settings"]
    pgb = raw["pgbouncer_settings"]
    lines += [
        f"Written by {command_line(raw, only)} at {when}. One worker, pool {raw['pool']}, "
        f"{s['rounds']} interleaved rounds (order rotated, each server freshly started), wrk "
        f"`-t{s['threads']} -c{s['connections']} -d{s['seconds']}s` after a {s['warmup']} s "
        f"warm-up; medians, and ratios as the median of the ratios within each round. "
        f"PgBouncer {raw['pgbouncer']} (`pool_mode = {pgb['pool_mode']}`, "
        f"`max_prepared_statements = {pgb['max_prepared_statements']}`, `default_pool_size = "
        f"{pgb['default_pool_size']}`) on 127.0.0.1 in front of the same PostgreSQL. Round-trip "
        "times come from bench/delay.py, a delaying proxy (a process of its own, uvloop, "
        "timerfd) between the server and PgBouncer that holds every chunk half the RTT in "
        "each direction. Other work on this shared machine took a median of "
        f"{fmt(summary.other_cores(), 2)} cores during these measured runs (range "
        f"{summary.other_range()}): compare the ratios, measured side by side.",
        "",
        "### Through PgBouncer, on loopback",
        "",
        "| workload | server | way to PostgreSQL | req/s | p50 ms | p99 ms | errors "
        "| ÷ the same server direct | ÷ the baseline the same way | round trips per request "
        "| CPU: server / PgBouncer / PostgreSQL (cores) |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    loopback = [
        ("direct", False), ("baseline", False), ("service", True), ("unprepared", True),
        ("baseline", True), ("floor", True),
    ]  # fmt: skip
    for workload in WORKLOADS:
        for server, pooled in loopback:
            key = key_of(server, pooled, 0)
            lines.append(row_line(summary, key, workload, pooled))
    lines += ["", *round_trip_lines(raw), ""]
    for rtt in s["rtts_ms"]:
        lines += rtt_lines(summary, rtt)
    lines += [*target_lines(summary, s["rtts_ms"]), "", *round_lines(summary), "", SECTION_END]
    return lines


def cpu(row_runs: list[dict[str, Any]], part: str) -> float | None:
    values = [r["cpu_cores"][part] for r in row_runs if r["cpu_cores"].get(part) is not None]
    return statistics.median(values) if values else None


def row_line(summary: Summary, key: str, workload: str, pooled: bool) -> str:
    runs = summary.runs(key, workload)
    if not runs:
        return f"| {workload} | {key} | not run |"
    setup = summary.setups[key]
    label = SERVERS[setup["server"]][0]
    base = key_of("baseline", pooled, setup["rtt_ms"])
    # The same server's direct row: the baseline's own, the service's in DB_POOLER=none (the
    # stack floor runs through PgBouncer only).
    direct = key_of("baseline" if setup["server"] == "baseline" else "direct", False, 0)
    of_direct = (
        "1" if key == direct
        else "n/a" if setup["server"] == "floor"
        else fmt(summary.paired(key, direct, workload), 2)
    )  # fmt: skip
    of_base = "1" if setup["server"] == "baseline" else fmt(summary.paired(key, base, workload), 2)
    trips = summary.round_trips(key, workload)
    parts = " / ".join(fmt(cpu(runs, p), 2) for p in ("server", "pgbouncer", "postgres"))
    return (
        f"| {workload} | {label} | {'PgBouncer' if pooled else 'direct'} "
        f"| {fmt(summary.rps(key, workload))} "
        f"| {fmt(summary.median(key, workload, lambda r: r['p50_ms']), 1)} "
        f"| {fmt(summary.median(key, workload, lambda r: r['p99_ms']), 1)} "
        f"| {sum(r['errors'] for r in runs)} of {sum(r['requests'] for r in runs):,} "
        f"| {of_direct} | {of_base} | {fmt(trips, 2) if trips is not None else 'n/a'} | {parts} |"
    )


def round_trip_lines(raw: dict[str, Any]) -> list[str]:
    counted = raw["round_trips"]
    lines = [
        "Round trips per request, counted on the wire (bench/pgwire.py between the server and "
        "PostgreSQL or PgBouncer; sequential requests after a warm-up: 200 reads, 100 batches, "
        f"{KEYED_WRITES} PATCH batches with a new `Idempotency-Key` each, then the same "
        f"{KEYED_WRITES} sent again and answered from the stored answer). Statements per "
        "request by kind, and parses per request, in brackets:",
        "",
        "| server | way to PostgreSQL | read | batch | keyed PATCH, new key | keyed PATCH, "
        "replayed | answers |",
        "|---|---|--:|--:|--:|--:|---|",
    ]
    for setup in raw["setups"]:
        key = setup["key"]
        if setup["rtt_ms"] or key not in counted:
            continue

        def cell(name: str, counts: dict[str, Any] = counted[key]) -> str:
            c = counts.get(name)
            if c is None:
                return "-"
            kinds = ", ".join(
                f"{k.split(' ', 1)[1]} {v:g}"
                for k, v in c.items()
                if k.startswith(("query ", "execute "))
            )
            return f"{c.get('round trip', 0):g} ({kinds}; parses {c.get('parse', 0):g})"

        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(counted[key]["statuses"].items()))
        lines.append(
            f"| {SERVERS[setup['server']][0]} | {'PgBouncer' if setup['pooled'] else 'direct'} "
            f"| {cell('read')} | {cell('batch')} | {cell('keyed')} | {cell('replayed')} "
            f"| {statuses} |"
        )
    return lines


def rtt_lines(summary: Summary, rtt: float) -> list[str]:
    lines = [
        f"### Through PgBouncer, database round trip {rtt:g} ms",
        "",
        "The bound is Little's law for a pool of "
        f"{summary.pool}: `pool / (round trips x RTT + database time)`, with the RTT as the "
        "proxy delivered it (nominal plus its measured lateness each way) and the database "
        "time per request as the proxy measured it under this load (from forwarding a request "
        "to the first byte of its answer: PgBouncer, PostgreSQL and loopback). The server's "
        "turn is what the bound leaves out: per round trip, the time from an answer written to "
        "the server to the next request on that connection (the server reading the answer, "
        "handing the connection to the next request, which sends its statement). One core's "
        "worth is the other limit: the same server's req/s per core of its own CPU through "
        "PgBouncer on loopback, what one worker could do with a core to itself.",
        "",
        "| workload | server | req/s | Little's-law bound | ÷ bound | one core's worth "
        "| ÷ baseline | round trips "
        "| database ms per request | server's turn ms | p50 ms | p99 ms | errors "
        "| CPU: server / PgBouncer / PostgreSQL (cores) | delaying proxy CPU (cores) "
        "| proxy lateness, mean / max ms |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|---|",
    ]
    for workload in WORKLOADS:
        for server in ("service", "unprepared", "baseline", "floor"):
            key = key_of(server, True, rtt)
            runs = summary.runs(key, workload)
            if not runs:
                continue
            base = key_of("baseline", True, rtt)
            of_base = "1" if server == "baseline" else fmt(summary.paired(key, base, workload), 2)
            trips = summary.round_trips(key, workload)
            parts = " / ".join(fmt(cpu(runs, p), 2) for p in ("server", "pgbouncer", "postgres"))

            def delay(part: str, runs: list[dict[str, Any]] = runs) -> float | None:
                values = [r["delay"][part] for r in runs if r["delay"]]
                return statistics.median(values) if values else None

            late_max = max((r["delay"]["late_max_ms"] for r in runs if r["delay"]), default=None)
            lines.append(
                f"| {workload} | {SERVERS[server][0]} | {fmt(summary.rps(key, workload))} "
                f"| {fmt(summary.bound(key, workload))} "
                f"| {fmt(summary.of_bound(key, workload), 2)} "
                f"| {fmt(summary.per_core(key_of(server, True, 0), workload))} | {of_base} "
                f"| {fmt(trips, 2) if trips is not None else 'n/a'} "
                f"| {fmt(delay('database_ms'), 2)} | {fmt(delay('client_ms'), 2)} "
                f"| {fmt(summary.median(key, workload, lambda r: r['p50_ms']), 1)} "
                f"| {fmt(summary.median(key, workload, lambda r: r['p99_ms']), 1)} "
                f"| {sum(r['errors'] for r in runs)} of {sum(r['requests'] for r in runs):,} "
                f"| {parts} | {fmt(cpu(runs, 'delay'), 2)} "
                f"| {fmt(delay('late_ms'), 3)} / {fmt(late_max, 1)} |"
            )
    return [*lines, ""]


def round_lines(summary: Summary) -> list[str]:
    """Every round of the RTT rows, with the other load on the machine while it ran."""
    lines = [
        "Every round at a round-trip time, with the CPU that other work on the machine took "
        "meanwhile (the turn grows with it):",
        "",
        "| round | RTT | workload | server | req/s | ÷ bound | server's turn ms "
        "| server CPU | other work on the machine (cores) |",
        "|--:|--:|---|---|--:|--:|--:|--:|--:|",
    ]
    for row in sorted(summary.rows, key=lambda r: (r["round"], r["setup"], r["workload"])):
        setup = summary.setups[row["setup"]]
        if not setup["rtt_ms"] or row["delay"] is None:
            continue
        ratio = summary.round_bound(row)
        lines.append(
            f"| {row['round']} | {setup['rtt_ms']:g} ms | {row['workload']} "
            f"| {SERVERS[setup['server']][0]} | {fmt(row['rps'])} | {fmt(ratio, 2)} "
            f"| {fmt(row['delay']['client_ms'], 2)} | {fmt(row['cpu_cores']['server'], 2)} "
            f"| {fmt(row['cpu_cores']['other'], 2)} |"
        )
    return lines


def target_lines(summary: Summary, rtts_ms: list[float]) -> list[str]:
    """Issue 16's targets, each with its figure from this run and whether it was met."""
    checks: list[tuple[str, float | None, float]] = []
    direct = key_of("direct", False, 0)
    fast = key_of("service", True, 0)
    for workload in WORKLOADS:
        checks.append(
            (f"{PLURAL[workload]} through PgBouncer (fast) ÷ the service direct",
             summary.paired(fast, direct, workload), 0.9)
        )  # fmt: skip
        trips = summary.round_trips(fast, workload)
        checks.append((f"round trips per {workload} through PgBouncer (fast), at most", trips, 1))
    for rtt in rtts_ms:
        key, base = key_of("service", True, rtt), key_of("baseline", True, rtt)
        for workload in WORKLOADS:
            checks.append(
                (f"{PLURAL[workload]} at RTT {rtt:g} ms ÷ Little's-law bound",
                 summary.of_bound(key, workload), 0.85)
            )  # fmt: skip
            checks.append(
                (f"{PLURAL[workload]} at RTT {rtt:g} ms ÷ the baseline",
                 summary.paired(key, base, workload), 0.9)
            )  # fmt: skip
    lines = ["Targets (issue 16), the service in DB_POOLER=transaction:", ""]
    for name, value, goal in checks:
        at_most = name.endswith("at most")
        if value is None:
            verdict = "not measured"
        else:
            met = value <= goal if at_most else value >= goal
            verdict = "met" if met else "**missed**"
        sign = "≤" if at_most else "≥"
        name = name.removesuffix(", at most")
        lines.append(f"- {name}: {fmt(value, 2)} ({sign} {goal:g}: {verdict})")
    return lines


def write_only_section(output: Path, lines: list[str], analysis_marker: str) -> None:
    """Replace this section in an existing report (or put it before the hand-written part)."""
    text = output.read_text() if output.exists() else ""
    section = "\n".join(lines)
    if SECTION_BEGIN in text and SECTION_END in text:
        before, rest = text.split(SECTION_BEGIN, 1)
        after = rest.split(SECTION_END, 1)[1]
        text = before + section + after
    elif analysis_marker in text:
        before, after = text.split(analysis_marker, 1)
        text = before + section + "\n\n" + analysis_marker + after
    else:
        text = text + "\n" + section + "\n"
    output.write_text(text)


def main_only(bench: ModuleType, options: Any, database: Any) -> int:
    """--only-production: this section alone, written into the report in place."""
    import datetime

    started = datetime.datetime.now(datetime.UTC)
    raw = run(bench, options, database)
    (bench.WORK / "last-production.json").write_text(json.dumps(raw, indent=1, default=str))
    lines = report(raw, only=True, when=f"{started:%Y-%m-%d %H:%M} UTC")
    write_only_section(options.output, lines, bench.ANALYSIS_MARKER)
    print("\n".join(lines))
    print(f"\nwritten to {options.output}")
    return 0
