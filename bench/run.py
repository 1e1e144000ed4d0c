"""`make bench`: the service as shipped against a bare asyncpg baseline, under wrk.

One run does, in this order, everything on 127.0.0.1 and everything bounded in time:

1. finds `wrk` (installing Debian's package when it is missing) and one real PostgreSQL:
   BENCH_DATABASE_URL if set, else an embedded PostgreSQL 16 (pgserver) in .data/bench-postgres;
   migrates it and seeds 10,000 rows with the service's own `python -m service seed --force`;
2. counts PostgreSQL round trips and statements per request by putting a counting
   wire-protocol proxy (bench/pgwire.py) between each server and the database, and checks that
   the service and the baseline answer the same read with the same rows;
3. runs interleaved rounds (service with 1 worker, service with 2, baseline; the order rotates
   every round), each server freshly started, each workload warmed up and then measured with
   `wrk -t1 -c64 --latency` (bench/read.lua, bench/batch.lua), sampling the CPU time of wrk,
   the server's process tree and PostgreSQL's process tree, and of the whole machine;
4. measures the production path (bench/production.py: PgBouncer 1.24.1 in both DB_POOLER modes,
   database round trips of 1 and 4 ms from bench/delay.py), in rounds of its own;
5. measures what tracing costs (bench/tracing.py: off, 1 % and 100 % sampled, exported to a
   local OTLP receiver; `--only-tracing` runs these rounds alone);
6. profiles the service (read and batch load) and the baseline (read load) with py-spy, if it is
   installed, and sorts the samples into components;
7. prints the medians and writes bench/RESULTS.md, keeping the hand-written analysis below the
   marker line.

Run with the service's virtual environment: `.venv/bin/python bench/run.py --help`.
"""

# A benchmark starts the programs it measures (S603, S607), and its random numbers are load,
# not secrets (S311); the token below is a fixed test value (S105).
# ruff: noqa: S603, S607, S311, S105

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import http.client
import importlib.metadata
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import asyncpg
import production
from overload import CpuClocks as OverloadCpuClocks
from overload import Settings as OverloadSettings
from overload import overload_section, replace_section, run_overload
from overload import settings_from_environment as overload_settings_from_environment
from pgwire import WireCounter
from profile_summary import summarise_profile
from tracing import measure_tracing, tracing_section

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = REPO / ".data" / "bench"  # logs, profiles, the servers' working directory (git-ignored)
EMBEDDED_DIR = REPO / ".data" / "bench-postgres"
RESULTS = BENCH / "RESULTS.md"
ANALYSIS_MARKER = "<!-- Everything below this line is written by hand; bench/run.py keeps it. -->"

ROWS = 10_000
MAX_VALUE = 1000.0  # the seeded values are in [0, 1000)
BATCH = 50
TOKEN = "bench-token-not-a-secret-0123456789"
# Every variable the service reads: cleared so the service runs on its defaults, whatever the
# calling shell has exported, except what the benchmark sets.
SERVICE_KEYS = (
    "DATABASE_URL", "DB_HOST", "DB_NAME", "DB_USERNAME", "DB_PASSWORD", "DB_PORT", "DB_SSLMODE",
    "DB_POOL_SIZE", "DB_MAX_OVERFLOW", "DB_POOL_TIMEOUT", "DB_POOL_RECYCLE", "DB_POOLER",
    "DB_STATEMENT_TIMEOUT_MS", "DB_PGBOUNCER", "API_TOKENS", "AUTH_DISABLED", "MAX_BATCH",
    "MAX_BODY_BYTES", "HOST", "PORT", "SHUTDOWN_DELAY_SECONDS", "WORKERS", "LOG_LEVEL",
    "LOG_FORMAT", "EMBEDDED_DB_DIR", "DATABASE_READ_URL", "DB_READ_HOST", "DB_READ_POOL_SIZE",
    "READ_CONSISTENCY_WAIT_MS", "READ_MAX_LAG_MS", "SERVER_TIMING",
)  # fmt: skip
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WORKLOADS = ("read", "batch")
ACCESS_STATUS = re.compile(r'"status":\s*(\d{3})')  # a status in a JSON access-log line
PROFILE_RATE = 100  # py-spy samples per second
SERVICE_HISTOGRAMS = (
    "http_request_duration_seconds_sum",
    "http_request_duration_seconds_count",
    "db_pool_wait_seconds_sum",
    "db_pool_wait_seconds_count",
)
READINESS_PATH = "/items?min_value=0&limit=1"  # both servers answer it once the pool is up


@dataclass(frozen=True)
class Target:
    """One server configuration under test."""

    key: str
    label: str
    kind: str  # "service" or "baseline"
    workers: int = 1
    root: Path = REPO  # where `service/` is imported from (a candidate copy for --candidate)
    env: tuple[tuple[str, str], ...] = ()  # settings of this target beyond the defaults
    reads_from_replica: bool = False  # DATABASE_READ_URL: the run's streaming replica


SERVICE_1 = Target("service-1", "service, 1 worker", "service", 1)
SERVICE_2 = Target("service-2", "service, 2 workers", "service", 2)
BASELINE = Target("baseline", "baseline (bare ASGI + asyncpg)", "baseline", 1)
# The same stack as the service written the plain documented way (bench/stack_floor.py): what a
# request costs before anything the service adds. Not in the default rounds: `--only` adds it.
STACK_FLOOR = Target(
    "stack-floor", "stack floor (Litestar + AsyncSession, nothing else)", "stack-floor", 1
)
# Reads on a streaming replica of the same PostgreSQL, on the same machine: what routing and the
# Consistency-Token cost, not what a replica on its own hardware would gain.
SERVICE_REPLICA = Target(
    "service-replica",
    "service, 1 worker, DATABASE_READ_URL (a streaming replica on the same machine)",
    "service",
    1,
    reads_from_replica=True,
)


@dataclass
class Options:
    """The command line, resolved."""

    targets: tuple[Target, ...]
    output: Path
    rounds: int
    seconds: int
    warmup: int
    connections: int
    threads: int
    pool_size: int | None
    profile: bool
    overload_rounds: int
    database_url: str | None
    keyed_rounds: int = 0
    tracing_rounds: int = 0
    only_tracing: bool = False  # the tracing rounds alone, reported in their own file
    only_overload: bool = False  # --only-overload: bench/overload.py's section alone
    replica_url: str | None = None  # set once the replica is up, for SERVICE_REPLICA
    # The embedded replica, started only for SERVICE_REPLICA's servers (None: an external one).
    replica: BenchReplica | None = None
    production: production.Settings | None = None  # bench/production.py's section


# --------------------------------------------------------------------------------------------
# Processes and CPU time


def proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, CPU ticks including reaped children, start time) of a live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return int(fields[1]), utime + stime + cutime + cstime, int(fields[19])


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants that are alive now."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat is not None:
                children[stat[0]].append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def process_ticks(root: int) -> dict[int, int]:
    """CPU ticks used so far by each live process of a tree."""
    return {pid: stat[1] for pid in process_tree(root) if (stat := proc_stat(pid)) is not None}


def tree_ticks(root: int | None) -> int:
    """CPU ticks used so far by a process tree (live members, plus children they reaped)."""
    if root is None:
        return 0
    return sum(stat[1] for pid in process_tree(root) if (stat := proc_stat(pid)) is not None)


def machine_busy_ticks() -> int:
    """Non-idle CPU ticks of the whole machine, all cores."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return user + nice + system + irq + softirq + steal


def children_cpu_seconds() -> float:
    """CPU seconds of this process's reaped children (wrk, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_request(
    port: int, method: str, path: str, body: bytes | None = None, timeout: float = 10
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class Server:
    """A server under test, started by us and stopped by us (by pid, never by name)."""

    def __init__(self, target: Target, database_url: str, options: Options, tag: str) -> None:
        self.target = target
        self.port = free_port()
        self.log_path = WORK / f"{target.key}-{tag}.log"
        # OpenTelemetry's own OTEL_* settings too: only the tracing rows trace.
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in SERVICE_KEYS and not k.startswith("OTEL_")
        }
        env.update(
            DATABASE_URL=database_url,
            API_TOKENS=TOKEN,
            PORT=str(self.port),
            PYTHONPATH=str(target.root),
        )
        if options.pool_size is not None:
            env["DB_POOL_SIZE"] = str(options.pool_size)
        env.update(target.env)
        if target.reads_from_replica:
            if options.replica_url is None:
                raise RuntimeError(f"{target.label}: no replica was started")
            env["DATABASE_READ_URL"] = options.replica_url
        if target.kind == "service":
            env["WORKERS"] = str(target.workers)
            self.argv = [sys.executable, "-m", "service"]
        else:
            self.argv = [sys.executable, str(BENCH / f"{target.kind.replace('-', '_')}.py")]
        self.env = env
        self.database_url = database_url
        self.replica_url = options.replica_url
        self.replica = options.replica
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.target.label} is not running")
        return self.process.pid

    def __enter__(self) -> Server:
        if self.replica is not None:
            # The embedded replica runs only while its own target runs: streaming (let alone
            # replaying) every other round's writes would take CPU from whatever is measured.
            if self.target.reads_from_replica:
                self.replica.start()
        elif self.replica_url is not None:
            # An external replica replays only while its own target runs, for the same reason.
            replay_on_replica(self.database_url, self.replica_url, self.target.reads_from_replica)
        with self.log_path.open("wb") as log:
            # The working directory holds no .env, so the service reads only what is set here.
            self.process = subprocess.Popen(
                self.argv, env=self.env, cwd=WORK, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.target.label} exited at start; see {self.log_path}")
            with contextlib.suppress(OSError):
                if http_request(self.port, "GET", READINESS_PATH, timeout=2)[0] == 200:
                    return self
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"{self.target.label} did not answer within 60 s; see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        try:
            self._stop()
        finally:
            if self.replica is not None and self.target.reads_from_replica:
                self.replica.stop()

    def _stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # Remember the tree (with start times, so a reused pid is never hit) before stopping it.
        tree = [(pid, stat[2]) for pid in process_tree(self.pid) if (stat := proc_stat(pid))]
        self.process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown, no drain delay
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        for pid, started in tree[1:]:
            stat = proc_stat(pid)
            if stat is not None and stat[2] == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# The database


class Database:
    """The one PostgreSQL of the run: BENCH_DATABASE_URL, or an embedded one we start."""

    def __init__(self, url: str | None) -> None:
        self.server: Any = None
        if url is None:
            EMBEDDED_DIR.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                # pgserver keeps a lock file in the runtime dir and warns when it is unset.
                warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
                from pgserver.postgres_server import get_server

                # "stop": pgserver stops this PostgreSQL when this process exits.
                self.server = get_server(EMBEDDED_DIR, cleanup_mode="stop")
            url = self.server.get_uri()
        self.url = url.replace("postgresql+asyncpg://", "postgresql://", 1)
        self.embedded = self.server is not None
        self.postmaster_pid: int | None = None
        self.version = "?"

    def inspect(self) -> None:
        """Find the server version, and the postmaster pid when it runs on this machine."""

        async def query() -> tuple[str, int | None]:
            connection = await asyncpg.connect(self.url, timeout=10)
            try:
                await connection.execute("VACUUM ANALYZE playing_with_neon")
                # A backend's parent is the postmaster (if it runs on this machine at all).
                stat = proc_stat(await connection.fetchval("SELECT pg_backend_pid()"))
                return await connection.fetchval("SHOW server_version"), stat and stat[0]
            finally:
                await connection.close()

        self.version, self.postmaster_pid = asyncio.run(query())

    def sessions_opened(self) -> int | None:
        """PostgreSQL sessions ever opened in this database (counts this query's own too)."""

        async def query() -> int:
            connection = await asyncpg.connect(self.url, timeout=10)
            try:
                return int(
                    await connection.fetchval(
                        "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
                    )
                )
            finally:
                await connection.close()

        try:
            return asyncio.run(query())
        except (OSError, asyncpg.PostgresError):
            return None

    def upstream(self) -> tuple[str | None, int | None, str | None]:
        """(host, port, unix socket dir) for the counting proxy."""
        parts = urlsplit(self.url)
        socket_dir = parse_qs(parts.query).get("host", [None])[0]
        if parts.hostname and parts.hostname.startswith("/"):
            socket_dir = parts.hostname
        return parts.hostname, parts.port, socket_dir

    def proxied_url(self, port: int) -> str:
        """The same database through the counting proxy on 127.0.0.1:`port`."""
        parts = urlsplit(self.url)
        user = quote(parts.username or "postgres", safe="")
        password = f":{quote(parts.password, safe='')}" if parts.password else ""
        return f"postgresql://{user}{password}@127.0.0.1:{port}{parts.path or '/postgres'}"


def prepare_database(database: Database) -> None:
    """Migrate and seed ROWS rows with the service's own commands."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_KEYS}
    env.update(DATABASE_URL=database.url, API_TOKENS=TOKEN, PYTHONPATH=str(REPO))
    for args in (["migrate"], ["seed", "--rows", str(ROWS), "--force"]):
        done = subprocess.run(
            [sys.executable, "-m", "service", *args],
            env=env,
            cwd=WORK,
            timeout=120,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"python -m service {' '.join(args)} failed:\n{done.stderr}")
    database.inspect()


# --------------------------------------------------------------------------------------------
# Load


def ensure_wrk() -> str:
    """The wrk binary; installs Debian's package when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk is missing: apt-get install -y wrk", flush=True)
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, check=False, timeout=300).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], check=True, timeout=300)
        subprocess.run(install, check=True, timeout=300)
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is still missing after apt-get install wrk")
    return found


def wrk_command(
    options: Options, workload: str, port: int, seconds: int, connections: int | None = None
) -> list[str]:
    return [
        "wrk",
        f"-t{options.threads}",
        f"-c{connections or options.connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(BENCH / f"{workload}.lua"),
        f"http://127.0.0.1:{port}",
    ]


WRK_ENV = dict(os.environ, BENCH_TOKEN=TOKEN, BENCH_ROWS=str(ROWS), BENCH_BATCH=str(BATCH))


def run_wrk(
    options: Options, workload: str, port: int, seconds: int, connections: int | None = None
) -> dict[str, Any]:
    """One wrk run; returns the numbers from the script's BENCH_RESULT line."""
    done = subprocess.run(
        wrk_command(options, workload, port, seconds, connections),
        env=WRK_ENV,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_RESULT "))
            return result
    raise RuntimeError(f"wrk printed no result:\n{done.stdout}\n{done.stderr}")


def service_timings(server: Server) -> dict[str, float] | None:
    """Sums and counts of the service's own request-duration and pool-wait histograms.

    Only with one worker: with more, each scrape reaches one worker at random.
    """
    if server.target.kind != "service" or server.target.workers != 1:
        return None
    status, body = http_request(server.port, "GET", "/metrics")
    if status != 200:
        return None
    totals: dict[str, float] = collections.defaultdict(float)
    for line in body.decode().splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in SERVICE_HISTOGRAMS:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return dict(totals)


def measure(
    options: Options, server: Server, database: Database, workload: str, round_number: int
) -> dict[str, Any]:
    """Warm up, then one measured wrk run with the CPU time of every party around it."""
    run_wrk(options, workload, server.port, options.warmup)
    timings_before = service_timings(server)
    sessions_before = database.sessions_opened()
    started = time.monotonic()
    processes_before = process_ticks(server.pid)
    before = (
        children_cpu_seconds(),
        tree_ticks(server.pid),
        tree_ticks(database.postmaster_pid),
        machine_busy_ticks(),
    )
    result = run_wrk(options, workload, server.port, options.seconds)
    after = (
        children_cpu_seconds(),
        tree_ticks(server.pid),
        tree_ticks(database.postmaster_pid),
        machine_busy_ticks(),
    )
    processes_after = process_ticks(server.pid)
    wall = time.monotonic() - started
    # The busiest processes of the server's tree are its workers (uvicorn's supervisor and
    # multiprocessing's helper idle): their split shows whether one worker is the bottleneck.
    per_process = sorted(
        (
            (ticks - processes_before.get(pid, 0)) / CLOCK_TICKS / wall
            for pid, ticks in processes_after.items()
        ),
        reverse=True,
    )
    sessions_after = database.sessions_opened()
    timings_after = service_timings(server)
    inside = None
    if timings_before is not None and timings_after is not None:
        delta = {k: timings_after[k] - timings_before.get(k, 0.0) for k in timings_after}
        requests = max(delta.get("http_request_duration_seconds_count", 0.0), 1.0)
        checkouts = delta.get("db_pool_wait_seconds_count", 0.0)
        inside = {
            "app_ms": delta.get("http_request_duration_seconds_sum", 0.0) / requests * 1000,
            # None when the service observed no checkout (its histogram is not fed).
            "pool_wait_ms": delta.get("db_pool_wait_seconds_sum", 0.0) / checkouts * 1000
            if checkouts
            else None,
        }
    load, server_cpu, database_cpu, machine = (
        after[0] - before[0],
        (after[1] - before[1]) / CLOCK_TICKS,
        (after[2] - before[2]) / CLOCK_TICKS,
        (after[3] - before[3]) / CLOCK_TICKS,
    )
    seconds = result["duration_us"] / 1e6
    errors = sum(
        result[k]
        for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return {
        "round": round_number,
        "target": server.target.key,
        "workload": workload,
        "requests": result["requests"],
        "rps": result["requests"] / seconds,
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "mean_ms": result["mean_us"] / 1000,
        # Connections the server opened during the run (this harness's own query excluded).
        "new_connections": None
        if sessions_before is None or sessions_after is None
        else sessions_after - sessions_before - 1,
        "inside": inside,
        "errors": errors,
        "error_detail": {k: v for k, v in result.items() if k.endswith(("errors", "timeouts"))},
        "worker_cores": per_process[: server.target.workers],
        "cpu_cores": {
            "wrk": load / wall,
            "server": server_cpu / wall,
            "postgres": database_cpu / wall if database.postmaster_pid else None,
            "other": max(machine - load - server_cpu - database_cpu, 0.0) / wall,
        },
    }


def read_path(rng: random.Random) -> str:
    return f"/items?min_value={rng.random() * MAX_VALUE:.2f}&limit=20"


def batch_body(rng: random.Random) -> bytes:
    ids = rng.sample(range(1, ROWS + 1), BATCH)  # distinct, in random order
    entries = [{"id": i, "value": round(rng.random() * MAX_VALUE, 2)} for i in ids]
    return json.dumps(entries).encode()


# --------------------------------------------------------------------------------------------
# Round trips


def count_round_trips(database: Database, options: Options) -> dict[str, Any]:
    """Per request and per one-worker target: round trips and statements, counted on the wire."""
    reads, batches = 200, 100
    targets = [t for t in options.targets if t.workers == 1]
    host, port, socket_dir = database.upstream()
    counted: dict[str, Any] = {"targets": [t.key for t in targets]}
    proxies = {t.key: WireCounter(host, port, socket_dir) for t in targets}
    urls = {key: database.proxied_url(proxy.start()) for key, proxy in proxies.items()}
    try:
        with contextlib.ExitStack() as stack:
            servers = [
                stack.enter_context(Server(t, urls[t.key], options, "count")) for t in targets
            ]
            rng = random.Random(1)
            answers = [
                {json.dumps(json.loads(http_request(s.port, "GET", path)[1])) for s in servers}
                for path in [read_path(rng) for _ in range(50)]
            ]
            counted["same_answers"] = all(len(distinct) == 1 for distinct in answers)
            for server in servers:
                proxy = proxies[server.target.key]
                for _ in range(10):  # warm the statement caches
                    http_request(server.port, "GET", read_path(rng))
                    http_request(server.port, "PATCH", "/items", batch_body(rng))
                start = proxy.snapshot()
                statuses = collections.Counter(
                    http_request(server.port, "GET", read_path(rng))[0] for _ in range(reads)
                )
                middle = proxy.snapshot()
                statuses.update(
                    http_request(server.port, "PATCH", "/items", batch_body(rng))[0]
                    for _ in range(batches)
                )
                end = proxy.snapshot()
                counted[server.target.key] = {
                    "label": server.target.label,
                    "read": per_request(middle - start, reads),
                    "batch": per_request(end - middle, batches),
                    "statuses": dict(statuses),
                }
    finally:
        for proxy in proxies.values():
            proxy.stop()
    return counted


def per_request(delta: collections.Counter[str], requests: int) -> dict[str, float]:
    return {key: value / requests for key, value in sorted(delta.items())}


# --------------------------------------------------------------------------------------------
# Profiles


def find_py_spy() -> str | None:
    local = REPO / ".venv-bench" / "bin" / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def profile(
    options: Options, database: Database, target: Target, workload: str, py_spy: str
) -> dict[str, Any]:
    """py-spy samples of one server process under load, sorted into components."""
    raw = WORK / f"profile-{target.key}-{workload}.txt"
    seconds = options.seconds
    with Server(target, database.url, options, "profile") as server:
        run_wrk(options, workload, server.port, options.warmup)
        load = subprocess.Popen(
            wrk_command(options, workload, server.port, seconds + 3),
            env=WRK_ENV,
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(1)
            subprocess.run(
                [py_spy, "record", "--pid", str(server.pid), "--duration", str(seconds),
                 "--rate", str(PROFILE_RATE), "--format", "raw", "--threads",
                 "--output", str(raw)],
                check=True, timeout=seconds + 60,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            load.wait(timeout=seconds + 60)
    return summarise_profile(raw.read_text(), PROFILE_RATE, seconds)


# --------------------------------------------------------------------------------------------
# Report


def summarise(
    rounds: list[dict[str, Any]], targets: tuple[Target, ...]
) -> dict[tuple[str, str], dict[str, Any]]:
    """Medians across rounds for each (target, workload)."""
    summary: dict[tuple[str, str], dict[str, Any]] = {}
    for target in targets:
        for workload in WORKLOADS:
            runs = [r for r in rounds if r["target"] == target.key and r["workload"] == workload]
            if not runs:
                continue

            def median_cpu(part: str, runs: list[dict[str, Any]] = runs) -> float | None:
                values = [r["cpu_cores"][part] for r in runs if r["cpu_cores"][part] is not None]
                return statistics.median(values) if values else None

            summary[(target.key, workload)] = {
                "rps": statistics.median(r["rps"] for r in runs),
                "rps_all": [r["rps"] for r in runs],
                "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
                "requests": sum(r["requests"] for r in runs),
                "cpu": {part: median_cpu(part) for part in ("wrk", "server", "postgres", "other")},
                "worker_cores": [
                    statistics.median(values)
                    for values in zip(*(r["worker_cores"] for r in runs), strict=False)
                ],
                "mean_ms": statistics.median(r["mean_ms"] for r in runs),
                "new_connections": statistics.median(
                    r["new_connections"] for r in runs if r["new_connections"] is not None
                )
                if any(r["new_connections"] is not None for r in runs)
                else None,
                "inside": {
                    part: median_or_none(r["inside"][part] for r in runs)
                    for part in ("app_ms", "pool_wait_ms")
                }
                if all(r["inside"] for r in runs)
                else None,
                "rps_per_server_core": statistics.median(
                    r["rps"] / r["cpu_cores"]["server"] for r in runs if r["cpu_cores"]["server"]
                ),
            }
    return summary


def median_or_none(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def paired_ratio(rounds: list[dict[str, Any]], key: str, workload: str, metric: str) -> float:
    """Median over rounds of service/baseline measured in the same round."""
    ratios = []
    for number in sorted({r["round"] for r in rounds}):
        pair = {
            r["target"]: r[metric]
            for r in rounds
            if r["round"] == number and r["workload"] == workload
        }
        if key in pair and BASELINE.key in pair and pair[BASELINE.key]:
            ratios.append(pair[key] / pair[BASELINE.key])
    return statistics.median(ratios) if ratios else float("nan")


def fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def results_table(
    summary: dict[tuple[str, str], dict[str, Any]],
    rounds: list[dict[str, Any]],
    targets: tuple[Target, ...],
) -> list[str]:
    lines = [
        "| workload | server | req/s (median) | p50 ms | p99 ms | errors | req/s ÷ baseline "
        "| p99 ÷ baseline | server CPU (cores) | req/s per server core "
        "| server CPU per request (ms) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for workload in WORKLOADS:
        base = summary.get((BASELINE.key, workload))
        for target in targets:
            row = summary.get((target.key, workload))
            if row is None or base is None:
                continue
            if target is BASELINE:
                ratio = p99_ratio = "1"
            else:
                paired = paired_ratio(rounds, target.key, workload, "rps")
                ratio = f"{row['rps'] / base['rps']:.2f} ({paired:.2f})"
                p99_ratio = f"{row['p99_ms'] / base['p99_ms']:.2f}"
            lines.append(
                f"| {workload} | {target.label} | {fmt(row['rps'])} | {fmt(row['p50_ms'], 1)} "
                f"| {fmt(row['p99_ms'], 1)} | {row['errors']} of {row['requests']:,} | {ratio} "
                f"| {p99_ratio} | {fmt(row['cpu']['server'], 2)} "
                f"| {fmt(row['rps_per_server_core'])} "
                f"| {fmt(1000 / row['rps_per_server_core'], 2)} |"
            )
    return lines


def cpu_table(
    summary: dict[tuple[str, str], dict[str, Any]], targets: tuple[Target, ...]
) -> list[str]:
    lines = [
        "| workload | server | wrk | server | of which per worker | PostgreSQL "
        "| everything else on the machine | all | PostgreSQL connections opened per run |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for workload in WORKLOADS:
        for target in targets:
            row = summary.get((target.key, workload))
            if row is not None:
                cpu = row["cpu"]
                parts = [fmt(cpu["wrk"], 2), fmt(cpu["server"], 2)]
                parts.append(" / ".join(fmt(w, 2) for w in row["worker_cores"]) or "n/a")
                parts += [fmt(cpu["postgres"], 2), fmt(cpu["other"], 2)]
                known = [cpu[p] for p in ("wrk", "server", "postgres", "other") if cpu[p]]
                parts.append(fmt(sum(known), 2))
                opened = fmt(row["new_connections"])
                lines.append(f"| {workload} | {target.label} | {' | '.join(parts)} | {opened} |")
    return lines


def latency_table(
    summary: dict[tuple[str, str], dict[str, Any]], targets: tuple[Target, ...]
) -> list[str]:
    lines = [
        "| workload | server | mean latency seen by wrk | mean time inside the app | of which "
        "waiting for a pool connection | before the app (accept, parse, event-loop queue) |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for workload in WORKLOADS:
        for target in targets:
            row = summary.get((target.key, workload))
            if row is None or row["inside"] is None:
                continue
            inside = row["inside"]
            pool_wait = inside["pool_wait_ms"]
            lines.append(
                f"| {workload} | {target.label} | {row['mean_ms']:.1f} ms "
                f"| {inside['app_ms']:.1f} ms "
                f"| {'not measured' if pool_wait is None else f'{pool_wait:.1f} ms'} "
                f"| {row['mean_ms'] - inside['app_ms']:.1f} ms |"
            )
    return lines


def round_trip_table(counted: dict[str, Any]) -> list[str]:
    if "error" in counted:
        return [f"Not counted: {counted['error']}"]
    lines = [
        "| workload | server | round trips | statements executed, by kind | parses |",
        "|---|---|--:|---|--:|",
    ]
    for workload in WORKLOADS:
        for key in counted["targets"]:
            counts = counted[key][workload]
            kinds = ", ".join(
                f"{k.split(' ', 1)[1]} {v:g}"
                for k, v in counts.items()
                if k.startswith(("query ", "execute "))
            )
            lines.append(
                f"| {workload} | {counted[key]['label']} | {counts.get('round trip', 0):g} "
                f"| {kinds} | {counts.get('parse', 0):g} |"
            )
    return lines


def profile_section(profiles: dict[str, dict[str, Any]]) -> list[str]:
    if not profiles:
        return ["Not profiled (py-spy not installed: `make bench` installs it in .venv-bench)."]
    lines: list[str] = []
    for name, result in profiles.items():
        lines += [
            f"**{name}**: {result['samples']:,} samples of the event loop's thread at "
            f"{PROFILE_RATE} Hz; it was idle {result['idle_share']:.0%} of the time"
            + (
                f" ({result['other_thread_samples']:,} samples in other threads, such as the "
                "log writer, left out)"
                if result["other_thread_samples"]
                else ""
            )
            + ":",
            "",
            "| component | share of on-CPU samples |",
            "|---|--:|",
            *(f"| {c} | {share:.1%} |" for c, share in result["components"]),
            "",
            "Hottest functions (own time):",
            "",
            *(f"- {share:.1%} `{function}`" for function, share in result["top_functions"]),
            "",
        ]
    return lines


def machine_description(database: Database) -> list[str]:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    packages = ("litestar", "SQLAlchemy", "asyncpg", "uvicorn", "uvloop", "httptools", "msgspec")
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in packages)
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return [
        f"- Machine: {os.cpu_count()} cores ({model}), {memory_kb / 1024 / 1024:.0f} GiB, "
        f"{platform.system()} {platform.release()}; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end of the run.",
        f"- PostgreSQL {database.version} "
        f"({'embedded, pgserver' if database.embedded else 'BENCH_DATABASE_URL'}), "
        f"{ROWS:,} rows seeded by `python -m service seed --rows {ROWS} --force`.",
        f"- Python {platform.python_version()}; {versions}; "
        f"{(wrk_version.stdout or wrk_version.stderr).splitlines()[0].split(' Copyright')[0]}.",
    ]


def git_revision() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    changed = git("status", "--porcelain", "service")
    dirty = " with uncommitted changes in service/" if changed else ""
    return f"{git('rev-parse', '--short', 'HEAD')}{dirty}"


def measure_idempotency_keys(options: Options, database: Database) -> list[dict[str, Any]]:
    """The batch load with and without a new Idempotency-Key per request, alternating."""
    rows: list[dict[str, Any]] = []
    for number in range(1, options.keyed_rounds + 1):
        for mode in ("plain", "keyed") if number % 2 else ("keyed", "plain"):
            WRK_ENV["BENCH_IDEMPOTENCY_KEYS"] = "1" if mode == "keyed" else "0"
            try:
                with Server(SERVICE_1, database.url, options, f"keyed-{mode}") as server:
                    row = {**measure(options, server, database, "batch", number), "mode": mode}
            finally:
                WRK_ENV["BENCH_IDEMPOTENCY_KEYS"] = "0"
            row["failed_answers"] = failed_answers_in_log(server.log_path)
            rows.append(row)
            print(
                f"keyed {number} {mode:5} {row['rps']:8.0f} req/s p50 {row['p50_ms']:6.1f} ms "
                f"p99 {row['p99_ms']:6.1f} ms errors {row['errors']}",
                flush=True,
            )
    return rows


def failed_answers_in_log(log_path: Path) -> dict[int, int]:
    """How many answers of each status other than 2xx a server's access log holds (warm-up
    included): what wrk counts only as "non-2xx"."""
    found: collections.Counter[int] = collections.Counter()
    for line in log_path.read_text(errors="replace").splitlines():
        if (match := ACCESS_STATUS.search(line)) and not match.group(1).startswith("2"):
            found[int(match.group(1))] += 1
    return dict(sorted(found.items()))


def keyed_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(not run)"]
    lines = [
        "| Idempotency-Key | req/s | p50 ms | p99 ms | server CPU per request "
        "| PostgreSQL CPU per request | errors |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for mode, label in (("plain", "none"), ("keyed", "a new one per request")):
        runs = [r for r in rows if r["mode"] == mode]

        def median(
            pick: Callable[[dict[str, Any]], float], runs: list[dict[str, Any]] = runs
        ) -> float:
            return statistics.median(pick(r) for r in runs)

        server_ms = median(lambda r: r["cpu_cores"]["server"] / r["rps"] * 1000)
        postgres_ms = median(lambda r: (r["cpu_cores"]["postgres"] or 0.0) / r["rps"] * 1000)
        p50, p99 = median(lambda r: r["p50_ms"]), median(lambda r: r["p99_ms"])
        lines.append(
            f"| {label} | {fmt(median(lambda r: r['rps']))} | {fmt(p50, 1)} | {fmt(p99, 1)}"
            f" | {server_ms:.2f} ms | {postgres_ms:.2f} ms"
            f" | {sum(r['errors'] for r in runs)} of {sum(r['requests'] for r in runs):,} |"
        )
    plain, keyed = (
        statistics.median(r["rps"] for r in rows if r["mode"] == mode)
        for mode in ("plain", "keyed")
    )
    lines += ["", f"With a key: {keyed / plain:.2f} times the requests/s of the same load without."]
    for row in rows:
        if row["errors"]:
            kinds = ", ".join(f"{k} {v}" for k, v in row["error_detail"].items() if v)
            answers = ", ".join(f"{k}: {v}" for k, v in row["failed_answers"].items()) or "none"
            lines.append(
                f"Errors in round {row['round']} ({row['mode']}): {kinds}; answers other than"
                f" 2xx in the server's access log (warm-up included): {answers}."
            )
    return lines


def write_results(
    options: Options,
    database: Database,
    rounds: list[dict[str, Any]],
    overload: list[dict[str, Any]],
    keyed: list[dict[str, Any]],
    counted: dict[str, Any],
    profiles: dict[str, dict[str, Any]],
    started: datetime.datetime,
    elapsed: float,
    traced: list[dict[str, Any]],
    production_lines: list[str] | None = None,
) -> str:
    summary = summarise(rounds, options.targets)
    others = [r["cpu_cores"]["other"] for r in rounds] or [float("nan")]
    header = [
        "# Benchmark results",
        "",
        "Written by `make bench` (bench/run.py); the analysis at the end is written by hand.",
        "",
        f"- Run: {started:%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} minutes, service at commit "
        f"{git_revision()}.",
        f"- Command: `make bench` = `.venv/bin/python bench/run.py --rounds {options.rounds} "
        f"--seconds {options.seconds}`; wrk `-t{options.threads} -c{options.connections} "
        f"-d{options.seconds}s --latency --timeout 5s` after a {options.warmup} s warm-up, "
        f"each server freshly started every round, order rotated each round.",
        *machine_description(database),
        f"- Pool: {options.pool_size or 10} connections per process for both; the service's "
        "DB_MAX_OVERFLOW is left at its default, the baseline's pool is fixed (min = max).",
        f"- Noise: other work on this shared 2-core machine used a median of "
        f"{statistics.median(others):.2f} cores (range {min(others):.2f} to {max(others):.2f}) "
        f"during the measured runs; compare ratios from the same run, not absolute numbers "
        f"across runs.",
        "",
        "## Requests per second, latency, errors",
        "",
        f"Medians of {options.rounds} rounds. Ratios: median of the service divided by median "
        "of the baseline, and in brackets the median of the per-round ratios. Errors are "
        "socket errors, timeouts and non-2xx answers, summed over the rounds.",
        "",
        *results_table(summary, rounds, options.targets),
        "",
        f"The row {SERVICE_REPLICA.label!r} reads from a streaming replica of the same "
        "PostgreSQL on the same machine, so it shows what the read replica costs (a second "
        "pool, routing, the Consistency-Token's extra round trip on every write), not the "
        "speed-up a replica on hardware of its own gives.",
        "",
        "Targets (issue 8): reads at least 0.45 times the baseline's requests/s (aim 0.5), "
        "batches at least 0.75 times, p99 at most 2 times the baseline's (aim 1.5), zero "
        "errors, one round trip per read, a read's CPU in the service at most 0.5 ms (the "
        "last column).",
        "",
        *overload_report(options, overload),
        "## How the two cores were shared",
        "",
        "CPU time during the measured runs, in cores (CPU seconds per second of wall time), "
        "medians across rounds. The server column is the whole process tree (both workers "
        "with 2). PostgreSQL is the postmaster and all its backends. The last column is the "
        "growth of `pg_stat_database.sessions` over a measured run: connections a server "
        "opened while under load (a steady pool opens none).",
        "",
        *cpu_table(summary, options.targets),
        "",
        "## Where the service's latency goes (1 worker)",
        "",
        "From the service's own Prometheus histograms (`http_request_duration_seconds`, "
        "measured by its middleware, and `db_pool_wait_seconds`), scraped before and after "
        "each measured run; medians across rounds.",
        "",
        *latency_table(summary, options.targets),
        "",
        "## PostgreSQL round trips per request",
        "",
        "Counted on the wire by a proxy (bench/pgwire.py) between each server and PostgreSQL, "
        "over 200 sequential reads and 100 sequential batches after a warm-up: a round trip is "
        "one ReadyForQuery the client waits for; statements are simple queries and extended-"
        "protocol executions (asyncpg's executemany sends all 50 UPDATE executions in one "
        "pipeline, one round trip). pg_stat_statements does not ship with pgserver's build.",
        "",
        *round_trip_table(counted),
        "",
        (
            "Both servers returned the same rows for the same 50 random reads."
            if counted.get("same_answers")
            else "WARNING: the service and the baseline answered some reads differently."
        ),
        "",
        "## Idempotency-Key",
        "",
        "The batch load against the service (1 worker) without the header and with a new "
        "`Idempotency-Key` on every request (each one applied and its answer stored: BEGIN, "
        f"key lock, lookup, UPDATE, answer, COMMIT), alternating, {options.keyed_rounds} rounds, "
        "medians.",
        "",
        *keyed_table(keyed),
        "",
        *(production_lines or []),
        "",
        *tracing_section(traced, options.tracing_rounds, options.seconds),
        "## Profiles (py-spy)",
        "",
        *profile_section(profiles),
        "## All rounds",
        "",
        "| round | workload | server | req/s | p50 ms | p99 ms | errors "
        "| CPU wrk/server/PG/other |",
        "|--:|---|---|--:|--:|--:|--:|---|",
        *(
            f"| {r['round']} | {r['workload']} | {r['target']} | {fmt(r['rps'])} "
            f"| {fmt(r['p50_ms'], 1)} | {fmt(r['p99_ms'], 1)} | {r['errors']} | "
            + " / ".join(fmt(r["cpu_cores"][p], 2) for p in ("wrk", "server", "postgres", "other"))
            + " |"
            for r in rounds
        ),
        "",
    ]
    analysis = ""
    if options.output.exists():
        previous = options.output.read_text()
        if ANALYSIS_MARKER in previous:
            analysis = previous.split(ANALYSIS_MARKER, 1)[1]
    options.output.write_text("\n".join(header) + "\n" + ANALYSIS_MARKER + analysis)
    return "\n".join(
        [
            *results_table(summary, rounds, options.targets),
            "",
            *cpu_table(summary, options.targets),
            "",
            *round_trip_table(counted),
        ]
    )


# --------------------------------------------------------------------------------------------


def parse_options() -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    env = os.environ.get
    parser.add_argument("--rounds", type=int, default=int(env("BENCH_ROUNDS", "5")))
    parser.add_argument("--seconds", type=int, default=int(env("BENCH_SECONDS", "10")))
    parser.add_argument("--warmup", type=int, default=int(env("BENCH_WARMUP_SECONDS", "2")))
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    parser.add_argument(
        "--overload-rounds",
        type=int,
        default=int(env("BENCH_OVERLOAD_ROUNDS", "3")),
        help="rounds of bench/overload.py's section (0: none)",
    )
    parser.add_argument(
        "--only-overload",
        action="store_true",
        help="run only the overload section and replace it in --output",
    )
    parser.add_argument(
        "--keyed-rounds",
        type=int,
        default=int(env("BENCH_KEYED_ROUNDS", "2")),
        help="rounds of the batch load with and without an Idempotency-Key (0: none)",
    )
    parser.add_argument(
        "--tracing-rounds",
        type=int,
        default=int(env("BENCH_TRACING_ROUNDS", "3")),
        help="rounds of the service with tracing off, 1 %% and 100 %% sampled (0: none)",
    )
    parser.add_argument(
        "--only-tracing",
        action="store_true",
        help="run only the tracing rounds; the report goes to bench/RESULTS-tracing.md",
    )
    parser.add_argument(
        "--only",
        default="service-1,service-2,baseline,service-replica",
        help="comma-separated targets to run (service-1, service-2, baseline, service-replica, "
        "stack-floor)",
    )
    parser.add_argument(
        "--candidate",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a modified copy of the repository (DIR holds its service/): adds target NAME, "
        "that service with 1 worker, to every round; repeatable. For trying a change first.",
    )
    parser.add_argument("--output", type=Path, default=None, help="the Markdown report")
    production.add_arguments(parser)
    args = parser.parse_args()
    known = {t.key: t for t in (SERVICE_1, SERVICE_2, BASELINE, SERVICE_REPLICA, STACK_FLOOR)}
    try:
        targets = [known[key.strip()] for key in args.only.split(",") if key.strip()]
    except KeyError as exc:
        parser.error(f"unknown target {exc}")
    for candidate in args.candidate:
        name, _, root = candidate.partition("=")
        if not root or not (Path(root) / "service").is_dir():
            parser.error(f"--candidate {candidate}: expected NAME=DIR with DIR/service/")
        targets.append(Target(name, f"{name}, 1 worker", "service", 1, Path(root).resolve()))
    pool = env("DB_POOL_SIZE")
    return Options(
        targets=tuple(targets),
        output=(
            args.output or (BENCH / "RESULTS-tracing.md" if args.only_tracing else RESULTS)
        ).resolve(),
        rounds=args.rounds,
        seconds=args.seconds,
        warmup=args.warmup,
        connections=args.connections,
        threads=args.threads,
        pool_size=int(pool) if pool else None,
        profile=not args.no_profile,
        overload_rounds=args.overload_rounds,
        keyed_rounds=args.keyed_rounds,
        tracing_rounds=args.tracing_rounds,
        only_tracing=args.only_tracing,
        only_overload=args.only_overload,
        database_url=env("BENCH_DATABASE_URL") or None,
        production=production.settings_from(args),
    )


def overload_settings(options: Options) -> OverloadSettings:
    return overload_settings_from_environment(
        options.overload_rounds, options.seconds, options.warmup, options.connections,
        options.threads, WRK_ENV,
    )  # fmt: skip


def measure_overload(options: Options, database: Database) -> list[dict[str, Any]]:
    """bench/overload.py's rounds, on servers started as every other round's are."""

    def start(env: tuple[tuple[str, str], ...], tag: str) -> Server:
        return Server(Target(SERVICE_1.key, SERVICE_1.label, "service", 1, env=env),
                      database.url, options, tag)  # fmt: skip

    clocks = OverloadCpuClocks(
        of_tree=lambda pid: tree_ticks(pid) / CLOCK_TICKS,
        machine=lambda: machine_busy_ticks() / CLOCK_TICKS,
        database_pid=database.postmaster_pid,
    )
    return run_overload(overload_settings(options), start, clocks)


def overload_report(options: Options, rows: list[dict[str, Any]]) -> list[str]:
    return overload_section(rows, overload_settings(options), options.pool_size or 10)


def overload_only(options: Options, database: Database) -> int:
    """--only-overload: the overload section alone, put in place of the report's."""
    section = overload_report(options, measure_overload(options, database))
    replace_section(options.output, section)
    print("\n".join(section))
    print(f"\nthe overload section of {options.output} is replaced")
    return 0


def main() -> int:
    options = parse_options()
    started = datetime.datetime.now(datetime.UTC)
    clock = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)
    ensure_wrk()
    database = Database(options.database_url)
    where = f"embedded in {EMBEDDED_DIR}" if database.embedded else "BENCH_DATABASE_URL"
    print(f"PostgreSQL: {where}", flush=True)
    prepare_database(database)
    if options.production and options.production.only:
        return production.main_only(sys.modules[__name__], options, database)
    if options.only_overload:
        return overload_only(options, database)
    with contextlib.ExitStack() as cleanup:
        if any(t.reads_from_replica for t in options.targets):
            options.replica_url, options.replica = start_replica(database, cleanup)
        return run_everything(options, database, started, clock)


def replay_on_replica(primary_url: str, replica_url: str, replay: bool) -> None:
    """Pause the replica's WAL replay, or resume it and wait (60 s at most) until it caught up."""

    async def on_replica(query: str, *args: Any) -> Any:
        # A connection of its own each time, tried again on failure: replaying WAL that piled up
        # during a pause can end the replica's sessions ("conflict with recovery").
        for attempt in range(50):
            try:
                replica = await asyncpg.connect(replica_url, timeout=10)
                try:
                    return await replica.fetchval(query, *args)
                finally:
                    await replica.close()
            except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                    OSError):  # fmt: skip
                if attempt == 49:
                    raise
                await asyncio.sleep(0.2)
        return None

    async def switch() -> None:
        if not replay:
            await on_replica("SELECT pg_wal_replay_pause()")
            return
        await on_replica("SELECT pg_wal_replay_resume()")
        primary = await asyncpg.connect(primary_url, timeout=10)
        try:
            target = await primary.fetchval("SELECT pg_current_wal_lsn()")
        finally:
            await primary.close()
        for _ in range(300):
            if await on_replica("SELECT pg_last_wal_replay_lsn() >= $1", target):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("the bench's replica did not catch up within 60 s")

    asyncio.run(switch())


class BenchReplica:
    """A streaming replica of the embedded PostgreSQL (pg_basebackup -R, as `make run-replica`
    makes), copied afresh and started for each of SERVICE_REPLICA's servers, stopped after it.

    Left running through the other targets' rounds, its WAL receiver took 0.1 to 0.2 cores from
    every batch round, whoever was measured.
    """

    def __init__(self, database: Database) -> None:
        sys.path.insert(0, str(REPO))
        from sqlalchemy.engine import make_url

        from service.embedded import EmbeddedDatabase

        self.primary = EmbeddedDatabase(database.server, make_url(database.url), created=False)
        self.running: Any = None

    def start(self) -> str:
        """Copy and start the replica; its URL (the same at every start)."""
        from service.embedded import start_embedded_replica

        self.stop()
        self.running = start_embedded_replica(
            self.primary, REPO / ".data" / "bench-postgres-replica"
        )
        return str(self.running.url.set(drivername="postgresql").render_as_string())

    def stop(self) -> None:
        if self.running is not None:
            self.running.stop()
            self.running = None


def start_replica(
    database: Database, cleanup: contextlib.ExitStack
) -> tuple[str, BenchReplica | None]:
    """The read replica's URL: BENCH_DATABASE_READ_URL, or the embedded primary's streaming
    replica's, checked by one start and stopped until SERVICE_REPLICA's servers need it."""
    configured = os.environ.get("BENCH_DATABASE_READ_URL")
    if configured:
        return configured, None
    if not database.embedded:
        raise RuntimeError("service-replica: with BENCH_DATABASE_URL, set BENCH_DATABASE_READ_URL")
    replica = BenchReplica(database)
    cleanup.callback(replica.stop)
    url = replica.start()
    replica.stop()
    print("streaming replica checked; it runs only with service-replica", flush=True)
    return url, replica


def tracing_rounds(options: Options, database: Database) -> list[dict[str, Any]]:
    """bench/tracing.py's rounds, on servers started and measured as every other target's."""

    def start(key: str, label: str, env: tuple[tuple[str, str], ...]) -> Server:
        return Server(Target(key, label, "service", 1, env=env), database.url, options, "round")

    def measure_one(server: Server, workload: str, number: int) -> dict[str, Any]:
        return measure(options, server, database, workload, number)

    return measure_tracing(options.tracing_rounds, start, measure_one)


def run_tracing_alone(options: Options, database: Database, started: datetime.datetime) -> int:
    """`--only-tracing`: the tracing rounds, printed and written to their own report."""
    traced = tracing_rounds(options, database)
    (WORK / "last-tracing-run.json").write_text(json.dumps(traced, indent=1, default=str))
    section = tracing_section(traced, options.tracing_rounds, options.seconds)
    header = [
        "# Tracing cost",
        "",
        f"Written by `.venv/bin/python bench/run.py --only-tracing --tracing-rounds "
        f"{options.tracing_rounds} --seconds {options.seconds}` at {started:%Y-%m-%d %H:%M} UTC, "
        f"service at commit {git_revision()}; wrk `-t{options.threads} -c{options.connections}` "
        f"after a {options.warmup} s warm-up.",
        *machine_description(database),
        "",
    ]
    options.output.write_text("\n".join(header + section))
    print("\n".join(section))
    print(f"\nwritten to {options.output}")
    return 0


def run_everything(
    options: Options, database: Database, started: datetime.datetime, clock: float
) -> int:
    """Round trips, rounds, overload rounds and profiles; then the report."""
    if options.only_tracing:
        return run_tracing_alone(options, database, started)
    print("counting round trips through the wire proxy ...", flush=True)
    try:
        counted = count_round_trips(database, options)
    except (OSError, RuntimeError, asyncpg.PostgresError) as exc:
        counted = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"round trips not counted: {counted['error']}", flush=True)

    rounds: list[dict[str, Any]] = []
    for number in range(1, options.rounds + 1):
        shift = (number - 1) % len(options.targets)
        for target in options.targets[shift:] + options.targets[:shift]:
            with Server(target, database.url, options, "round") as server:
                for workload in WORKLOADS:
                    row = measure(options, server, database, workload, number)
                    rounds.append(row)
                    print(
                        f"round {number} {target.key:10} {workload:5} {row['rps']:8.0f} req/s "
                        f"p50 {row['p50_ms']:6.1f} ms p99 {row['p99_ms']:6.1f} ms "
                        f"errors {row['errors']}",
                        flush=True,
                    )

    overload = measure_overload(options, database) if SERVICE_1 in options.targets else []

    keyed = measure_idempotency_keys(options, database) if SERVICE_1 in options.targets else []
    traced = tracing_rounds(options, database)

    produced = None
    if options.production and options.production.rounds:
        produced = production.run(sys.modules[__name__], options, database)

    profiles: dict[str, dict[str, Any]] = {}
    py_spy = find_py_spy() if options.profile else None
    if py_spy:
        one_worker = [t for t in options.targets if t.workers == 1]
        plan = [(t, "read") for t in one_worker]
        plan += [(t, "batch") for t in one_worker if t.kind == "service"]
        for target, workload in plan:
            print(f"profiling {target.key} under the {workload} load ...", flush=True)
            profiles[f"{target.label}, {workload} workload"] = profile(
                options, database, target, workload, py_spy
            )

    raw = {
        "rounds": rounds,
        "overload": overload,
        "keyed": keyed,
        "tracing": traced,
        "round_trips": counted,
        "profiles": profiles,
        "production": produced,
    }
    (WORK / "last-run.json").write_text(json.dumps(raw, indent=1, default=str))
    table = write_results(
        options,
        database,
        rounds,
        overload,
        keyed,
        counted,
        profiles,
        started,
        time.monotonic() - clock,
        traced,
        production_lines=production.report(produced, False, f"{started:%Y-%m-%d %H:%M} UTC")
        if produced
        else None,
    )
    print()
    print(table)
    print(f"\nwritten to {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
