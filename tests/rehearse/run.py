"""`make rehearse`: a rolling update under load, in the shape of k8s/, on one machine.

Three `python -m service` processes behind HAProxy (round robin, health-checking `/readyz` as a
Service does with readiness), PostgreSQL behind PgBouncer in transaction mode
(DB_POOLER=transaction; the 1.24.1 of tests/build-pgbouncer.sh, as Neon's poolers, else Debian's
1.18, on which the service falls back to transaction-unprepared by itself),
and locust distributed (a master, two workers) running tests/rehearse/locustfile.py: the load of
tests/load with clients that retry once on a 503 or a dropped connection. Partway through, each
process in turn is replaced as a Deployment with maxUnavailable 0 does it: a new process starts,
must be ready and seen UP by HAProxy, and only then does the old one get SIGTERM, fail readiness,
drain and exit.

Then it counts: requests, failures a client saw (after its one retry), duplicate rows, written rows
or values that an acknowledged write put there and that are gone, p99 before and during the roll,
and PostgreSQL connections against the budget. The report is load-report/rehearsal.md (and .json).
Exits 1 when a client saw a failure, an acknowledged write was lost, a duplicate row exists (a
retried POST carries its Idempotency-Key, so the service must not insert it twice), the connection
budget was exceeded or a process did not exit 0; 2 when the rehearsal itself could not be run.

Environment: REHEARSE_DURATION (40 s of load, the roll inside), REHEARSE_USERS (20). Every process
is started here and ended by its PID; the whole run is
bounded by a hard timeout of REHEARSE_DURATION + 180 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg

from tests.conftest import asyncpg_dsn
from tests.faults.support import (
    LEGACY_PGBOUNCER,
    ControlledPostgres,
    PgBouncer,
    modern_pgbouncer,
    psql,
)
from tests.load.run import (
    REPORT,
    ROOT,
    LoadError,
    ensure_locust,
    free_port,
    service_environment,
    setting,
    stop_process,
    tail,
    wait_until_ready,
)

LOCUSTFILE = ROOT / "tests" / "rehearse" / "locustfile.py"
WORK = REPORT / "rehearsal"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
ROWS = 10_000
REPLICAS = 3
# One surge process at a time, as maxSurge 1 and maxUnavailable 0 allow.
PEAK_PROCESSES = REPLICAS + 1
POOL_SIZE = 4
# Each process holds its pool plus the readiness probe's own connection (README: budgeting).
CONNECTIONS_PER_PROCESS = POOL_SIZE + 1
# Server connections PgBouncer may open: enough that no client connection ever queues in it.
PGBOUNCER_POOL = PEAK_PROCESSES * CONNECTIONS_PER_PROCESS
LOCUST_WORKERS = 2
SPAWN_RATE = 10
# Seconds of the run after the ramp-up and before the roll, for the "before" p99, and after it.
BEFORE_SECONDS = 10
AFTER_SECONDS = 10
# How much longer than REHEARSE_DURATION the load may run while a slow roll finishes.
ROLL_SLACK_SECONDS = 60
# The drain as shipped: readiness fails for SHUTDOWN_DELAY_SECONDS (2), then in-flight requests
# finish (up to 20 s), then the pool closes.
EXIT_SECONDS = 30
SAMPLE_SECONDS = 1.0
# Failed health checks after which HAProxy takes a server out.
CHECK_FALL = 2
DATABASE = "postgres"


class RehearsalError(LoadError):
    """The rehearsal could not be carried out."""


@dataclasses.dataclass
class Slot:
    """One of HAProxy's pre-declared servers (s1..s6) and the port a service process gets."""

    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclasses.dataclass
class Replica:
    """A running `python -m service` in its slot."""

    slot: Slot
    process: subprocess.Popen[bytes]
    log: Path


class HAProxy:
    """HAProxy in the foreground with a generated config, driven through its admin socket."""

    def __init__(self, port: int, slots: list[Slot], socket_path: Path) -> None:
        self.socket_path = socket_path
        self.port = port
        config = WORK / "haproxy.cfg"
        # Every slot is health-checked from the start, so a process that starts listening in a
        # spare slot gets traffic once its /readyz answers 200, as a pod joins the Service's
        # endpoints when it is ready; `disable server` takes a finished slot out.
        servers = [f"    server {slot.name} 127.0.0.1:{slot.port} check" for slot in slots]
        config.write_text(
            "\n".join(
                [
                    "global",
                    f"    stats socket {self.socket_path} mode 600 level admin",
                    "    maxconn 4000",
                    "defaults",
                    "    mode http",
                    "    timeout connect 2s",
                    "    timeout client 75s",
                    "    timeout server 30s",
                    "    timeout http-keep-alive 75s",
                    "    timeout check 2s",
                    "frontend api",
                    f"    bind 127.0.0.1:{port}",
                    "    default_backend service",
                    "backend service",
                    "    balance roundrobin",
                    "    option httpchk GET /readyz",
                    "    http-check expect status 200",
                    # Down after 2 failed checks 0.5 s apart: well within the 2 s the service
                    # keeps serving after SIGTERM before it drains.
                    f"    default-server inter 500ms fall {CHECK_FALL} rise 1",
                    *servers,
                    "",
                ]
            )
        )
        self.log = WORK / "haproxy.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 15
        while not self.socket_path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RehearsalError(f"haproxy did not start:\n{tail(self.log)}")
            time.sleep(0.05)

    def command(self, line: str) -> str:
        """One runtime API command; its answer."""
        with socket.socket(socket.AF_UNIX) as admin:
            admin.settimeout(5)
            admin.connect(str(self.socket_path))
            admin.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := admin.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """Server name → its row of `show stat` (status, chkdown, …)."""
        text = self.command("show stat").lstrip("# ")
        return {
            row["svname"]: row
            for row in csv.DictReader(io.StringIO(text))
            if row["pxname"] == "service" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def statuses(self) -> dict[str, str]:
        """Server name → HAProxy's status of it (UP, DOWN, MAINT, "UP 1/2", …)."""
        return {name: row["status"] for name, row in self.servers().items()}

    def failed_checks(self) -> dict[str, int]:
        """Server name → health checks it failed while UP (HAProxy's `chkfail`)."""
        return {name: int(row["chkfail"] or 0) for name, row in self.servers().items()}

    def requests_served(self) -> int:
        """Requests the frontend has received so far."""
        text = self.command("show stat").lstrip("# ")
        for row in csv.DictReader(io.StringIO(text)):
            if row["pxname"] == "api" and row["svname"] == "FRONTEND":
                return int(row["req_tot"] or 0)
        return 0

    def wait_for(self, server: str, wanted: tuple[str, ...], timeout: float = 20.0) -> float:
        """Block until `server`'s status is one of `wanted`; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.statuses().get(server) in wanted:
                return time.monotonic() - started
            time.sleep(0.05)
        raise RehearsalError(f"haproxy never saw {server} {'/'.join(wanted)}: {self.statuses()}")


@dataclasses.dataclass
class Budget:
    """Highest connection counts seen by the sampler, from PgBouncer's and PostgreSQL's side."""

    samples: int = 0
    clients: int = 0
    clients_waiting: int = 0
    servers: int = 0
    servers_active: int = 0
    postgres_backends: int = 0
    postgres_active: int = 0


def sample_connections(
    postgres: ControlledPostgres, bouncer: PgBouncer, stop: threading.Event, budget: Budget
) -> None:
    """Every second until `stop`: SHOW POOLS on PgBouncer and pg_stat_activity on PostgreSQL."""
    backends = (
        "SELECT count(*) AS open, count(*) FILTER (WHERE state <> 'idle') AS active "
        "FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )
    while not stop.wait(SAMPLE_SECONDS):
        try:
            pools = psql(bouncer.port, "pgbouncer", postgres.password, "SHOW POOLS")
            (server_side,) = psql(postgres.port, DATABASE, postgres.password, backends)
        except (subprocess.SubprocessError, ValueError):
            continue  # a sample lost on a busy machine; the next one counts
        ours = [row for row in pools if row["database"] == DATABASE]
        waiting = sum(int(row["cl_waiting"]) for row in ours)
        active = sum(int(row["sv_active"]) for row in ours)
        servers = sum(
            int(row[key])
            for row in ours
            for key in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
        )
        budget.samples += 1
        budget.clients = max(budget.clients, sum(int(r["cl_active"]) for r in ours) + waiting)
        budget.clients_waiting = max(budget.clients_waiting, waiting)
        budget.servers = max(budget.servers, servers)
        budget.servers_active = max(budget.servers_active, active)
        budget.postgres_backends = max(budget.postgres_backends, int(server_side["open"]))
        budget.postgres_active = max(budget.postgres_active, int(server_side["active"]))


class Rehearsal:
    """The processes of one rehearsal, and what happened to them."""

    def __init__(self, users: int, seconds: int) -> None:
        self.users = users
        self.seconds = seconds
        self.token = secrets.token_urlsafe(32)
        self.events: list[tuple[float, str]] = []
        self.started = time.time()
        self.steps: list[dict[str, Any]] = []
        self.processes: list[subprocess.Popen[Any]] = []

    def note(self, text: str) -> None:
        """Print `text` with the seconds since the start, and keep it for the report."""
        self.events.append((time.time(), text))
        print(f"[{time.time() - self.started:5.1f} s] {text}", flush=True)

    def start_replica(self, slot: Slot, database_url: str) -> Replica:
        """`python -m service` on the slot's port, through PgBouncer, with the rehearsal's pool."""
        env = service_environment(
            self.token,
            slot.port,
            DATABASE_URL=database_url,
            DB_POOLER="transaction",
            DB_POOL_SIZE=str(POOL_SIZE),
            DB_MAX_OVERFLOW="0",
        )
        log = WORK / f"service-{slot.name}.log"
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "service"],
                cwd=WORK,
                env=env,
                stdout=log_file,
                stderr=log_file,
            )
        self.processes.append(process)
        return Replica(slot, process, log)

    def roll(self, haproxy: HAProxy, replicas: list[Replica], spares: list[Slot], url: str) -> None:
        """Replace each replica in turn: new one ready and UP, then SIGTERM the old one."""
        for number, (old, slot) in enumerate(zip(list(replicas), spares, strict=True), 1):
            step: dict[str, Any] = {"old": old.slot.name, "new": slot.name}
            started = time.monotonic()
            new = self.start_replica(slot, url)
            self.note(f"roll {number}/{REPLICAS}: {slot.name} started (pid {new.process.pid})")
            wait_until_ready(new.process, slot.url, new.log)
            step["new_ready_s"] = round(time.monotonic() - started, 2)
            haproxy.wait_for(slot.name, ("UP",))
            step["new_up_s"] = round(time.monotonic() - started, 2)
            self.note(
                f"roll {number}/{REPLICAS}: {slot.name} UP in haproxy; SIGTERM {old.slot.name}"
            )
            terminated = time.monotonic()
            old.process.send_signal(signal.SIGTERM)
            step["old_down_s"] = round(haproxy.wait_for(old.slot.name, ("DOWN",)), 2)
            try:
                step["old_exit_status"] = old.process.wait(timeout=EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                step["old_exit_status"] = stop_process(old.process, 1)
            step["old_exit_s"] = round(time.monotonic() - terminated, 2)
            haproxy.command(f"disable server service/{old.slot.name}")
            self.note(
                f"roll {number}/{REPLICAS}: {old.slot.name} DOWN after {step['old_down_s']} s, "
                f"exited {step['old_exit_status']} after {step['old_exit_s']} s"
            )
            replicas[replicas.index(old)] = new
            self.steps.append(step)

    def run_locust(self, locust: Path, host: str, ledger_dir: Path) -> list[subprocess.Popen[Any]]:
        """Start two workers and a headless master; returns [master, worker, worker]."""
        master_port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "LOAD_API_TOKEN": self.token,
            "LOAD_ROWS": str(ROWS),
            "LOAD_P95_MS": "",
            "REHEARSE_LEDGER_DIR": str(ledger_dir),
            "REHEARSE_ID_SLOTS": str(2 * self.users),
            "REHEARSE_WORKERS": str(LOCUST_WORKERS),
        }
        master = [
            str(locust), "--locustfile", str(LOCUSTFILE), "--host", host,
            "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(master_port),
            "--expect-workers", str(LOCUST_WORKERS), "--headless",
            "--users", str(self.users), "--spawn-rate", str(SPAWN_RATE),
            # An upper bound only: the rehearsal stops the load (SIGINT) once the roll is done
            # and the load has run its REHEARSE_DURATION, however long a busy machine took
            # to start the new processes.
            "--run-time", f"{self.seconds + ROLL_SLACK_SECONDS}s", "--stop-timeout", "10",
            "--csv", str(REPORT / "rehearsal"), "--html", str(REPORT / "rehearsal.html"),
            "--only-summary",
        ]  # fmt: skip
        worker = [
            str(locust), "--locustfile", str(LOCUSTFILE), "--worker",
            "--master-host", "127.0.0.1", "--master-port", str(master_port),
        ]  # fmt: skip
        started = [subprocess.Popen(master, env=env, cwd=WORK)]
        for number in range(LOCUST_WORKERS):
            with (WORK / f"locust-worker-{number}.log").open("wb") as log:
                started.append(subprocess.Popen(worker, env=env, cwd=WORK, stdout=log, stderr=log))
        self.processes.extend(started)
        return started


def percentile(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def read_ledgers(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(request records, write records) of every worker, each worker's in its own order."""
    requests: list[dict[str, Any]] = []
    writes: list[dict[str, Any]] = []
    for path in sorted(folder.glob("ledger-*.jsonl")):
        for line in path.read_text().splitlines():
            if not line.endswith("}"):
                continue  # a line cut short by a killed worker
            entry = json.loads(line)
            (requests if "request" in entry else writes).append(entry)
    return requests, writes


async def read_back(
    database: str, names: set[str], ids: set[int]
) -> tuple[dict[str, int], dict[int, float]]:
    """Rows per rehearsal name and the value of each PATCHed id, read directly from PostgreSQL."""
    connection = await asyncpg.connect(database)
    try:
        named = await connection.fetch(
            "SELECT name, count(*) AS n FROM playing_with_neon WHERE name LIKE 'rh-%' GROUP BY name"
        )
        values = await connection.fetch(
            "SELECT id, value::float8 AS value FROM playing_with_neon WHERE id = ANY($1::int[])",
            sorted(ids),
        )
    finally:
        await connection.close()
    counts = {row["name"]: row["n"] for row in named}
    return {name: counts.get(name, 0) for name in names | set(counts)}, {
        row["id"]: row["value"] for row in values
    }


def check_writes(writes: list[dict[str, Any]], database: str) -> dict[str, Any]:
    """Duplicates, and acknowledged POST rows or PATCH values that are not in the table."""
    acked_names = [n for w in writes if "post" in w and w["ack"] for n in w["post"]]
    unacked_names = [n for w in writes if "post" in w and not w["ack"] for n in w["post"]]
    # Per id, in the owner's order: the last acknowledged value, or one a later unacknowledged
    # PATCH may have put there (it may have committed without its answer arriving).
    allowed: dict[int, list[float]] = {}
    for write in writes:
        for item_id, value in write.get("patch", []):
            if write["ack"]:
                allowed[item_id] = [value]
            elif item_id in allowed:
                allowed[item_id].append(value)
    rows, values = asyncio.run(read_back(database, set(acked_names + unacked_names), set(allowed)))
    # The column is `real`: a value sent with 2 decimals comes back within 0.005 of itself.
    lost_patches = [
        item_id
        for item_id, candidates in allowed.items()
        if not any(abs(values.get(item_id, math.inf) - v) < 0.005 for v in candidates)
    ]
    return {
        "posts_acknowledged": sum(1 for w in writes if "post" in w and w["ack"]),
        "posts_unacknowledged": sum(1 for w in writes if "post" in w and not w["ack"]),
        "patches_acknowledged": sum(1 for w in writes if "patch" in w and w["ack"]),
        "patches_unacknowledged": sum(1 for w in writes if "patch" in w and not w["ack"]),
        "rows_acknowledged": len(acked_names),
        "duplicated_names": sum(1 for n in rows.values() if n > 1),
        "extra_rows": sum(n - 1 for n in rows.values() if n > 1),
        "lost_rows": sum(1 for n in acked_names if rows.get(n, 0) == 0),
        "unacknowledged_rows_present": sum(1 for n in unacked_names if rows.get(n, 0) > 0),
        "patched_ids_checked": len(allowed),
        "lost_values": len(lost_patches),
    }


def latency(requests: list[dict[str, Any]], since: float, until: float) -> dict[str, Any]:
    """Count, p50 and p99 of the requests that ended in [since, until)."""
    times = [r["ms"] for r in requests if since <= r["end"] < until]
    p50, p99 = percentile(times, 0.50), percentile(times, 0.99)
    return {
        "requests": len(times),
        "p50_ms": None if p50 is None else round(p50, 1),
        "p99_ms": None if p99 is None else round(p99, 1),
    }


def main_rehearsal(users: int, seconds: int) -> dict[str, Any]:
    """Set everything up, load it, roll it, count; returns the report's figures."""
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    ledger_dir = WORK / "ledgers"
    ledger_dir.mkdir()
    locust = ensure_locust()
    rehearsal = Rehearsal(users, seconds)
    # A short folder for the admin socket: a unix socket's path must fit in 107 bytes.
    socket_dir = Path(tempfile.mkdtemp(prefix="rehearse-"))
    postgres = ControlledPostgres.create()
    bouncer: PgBouncer | None = None
    stop_sampling = threading.Event()
    try:
        rehearsal.note(f"PostgreSQL on 127.0.0.1:{postgres.port}")
        direct = postgres.url(DATABASE).render_as_string(hide_password=False)
        for args in (("migrate",), ("seed", "--rows", str(ROWS), "--force")):
            env = service_environment(rehearsal.token, 1, DATABASE_URL=direct)
            done = subprocess.run(
                [sys.executable, "-m", "service", *args],
                cwd=WORK, env=env, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise RehearsalError(f"`{' '.join(args)}` failed:\n{done.stderr}")
        binary = modern_pgbouncer()
        if binary is None:
            binary = LEGACY_PGBOUNCER
            rehearsal.note(
                "no PgBouncer >= 1.21 (bash tests/build-pgbouncer.sh, or PGBOUNCER_MODERN): "
                f"Debian's {binary} instead"
            )
        bouncer = PgBouncer.start(postgres, binary, pool_size=PGBOUNCER_POOL)
        pooled = bouncer.url(postgres, DATABASE).render_as_string(hide_password=False)
        slots = [Slot(f"s{n}", free_port()) for n in range(1, 2 * REPLICAS + 1)]
        haproxy = HAProxy(free_port(), slots, socket_dir / "admin.sock")
        rehearsal.processes.append(haproxy.process)
        host = f"http://127.0.0.1:{haproxy.port}"
        rehearsal.note(
            f"PgBouncer {bouncer.version_text} on :{bouncer.port} (pool {PGBOUNCER_POOL}); "
            f"HAProxy on {host}"
        )
        replicas = [rehearsal.start_replica(slot, pooled) for slot in slots[:REPLICAS]]
        for replica in replicas:
            wait_until_ready(replica.process, replica.slot.url, replica.log)
            haproxy.wait_for(replica.slot.name, ("UP",))
        rehearsal.note(f"{REPLICAS} replicas ready and UP: {', '.join(s.name for s in slots[:3])}")
        budget = Budget()
        sampler = threading.Thread(
            target=sample_connections, args=(postgres, bouncer, stop_sampling, budget), daemon=True
        )
        sampler.start()
        master, *workers = rehearsal.run_locust(locust, host, ledger_dir)
        deadline = time.monotonic() + 60
        while haproxy.requests_served() == 0:
            if master.poll() is not None or time.monotonic() > deadline:
                raise RehearsalError("locust sent no request (see its output above)")
            time.sleep(0.1)
        load_started = time.time()
        failed_checks_before = haproxy.failed_checks()
        rehearsal.note(f"load started: {users} users (+{SPAWN_RATE}/s) for {seconds} s")
        ramp = users / SPAWN_RATE + 1
        time.sleep(ramp + BEFORE_SECONDS)
        roll_started = time.time()
        rehearsal.roll(haproxy, replicas, slots[REPLICAS:], pooled)
        roll_ended = time.time()
        if master.poll() is not None:
            raise RehearsalError("the load ended before the roll did: raise REHEARSE_DURATION")
        rehearsal.note("roll done; load goes on to its end")
        time.sleep(max(load_started + seconds, roll_ended + AFTER_SECONDS) - time.time())
        master.send_signal(signal.SIGINT)  # locust writes its reports, then exits
        locust_status = master.wait(timeout=60)
        # A leaving process fails CHECK_FALL checks on purpose; any other failed check is a
        # process in service whose /readyz said 503.
        rolled = {step["old"] for step in rehearsal.steps}
        readiness_failures = sum(
            max(0, count - failed_checks_before[name] - CHECK_FALL * (name in rolled))
            for name, count in haproxy.failed_checks().items()
        )
        for worker in workers:
            stop_process(worker, timeout=15)
        load_ended = time.time()
        stop_sampling.set()
        sampler.join(timeout=10)
        rehearsal.note(f"load ended (locust exit status {locust_status})")
        requests, writes = read_ledgers(ledger_dir)
        retried = sum(1 for r in requests if r["request"].endswith("(retried)"))
        failed = sum(1 for r in requests if not r["ok"] and not r["request"].endswith("(retried)"))
        figures: dict[str, Any] = {
            "command": "make rehearse",
            "users": users,
            "seconds": seconds,
            "replicas": REPLICAS,
            "pgbouncer_version": bouncer.version_text,
            "requests": len(requests),
            "retried_first_tries": retried,
            "client_visible_failures": failed,
            "readiness_failures": readiness_failures,
            "latency": {
                "before_roll": latency(requests, load_started + ramp, roll_started),
                "during_roll": latency(requests, roll_started, roll_ended),
                "after_roll": latency(requests, roll_ended, load_ended + 1),
            },
            "roll_seconds": round(roll_ended - roll_started, 1),
            "roll": rehearsal.steps,
            "writes": check_writes(writes, asyncpg_dsn(postgres.url(DATABASE))),
            "connections": {
                "pool_size_per_process": POOL_SIZE,
                "connections_per_process": CONNECTIONS_PER_PROCESS,
                "peak_processes": PEAK_PROCESSES,
                "client_budget": PEAK_PROCESSES * CONNECTIONS_PER_PROCESS,
                "pgbouncer_pool": PGBOUNCER_POOL,
                **dataclasses.asdict(budget),
            },
            "locust_exit_status": locust_status,
            "timeline": [[round(at - rehearsal.started, 1), text] for at, text in rehearsal.events],
        }
        return figures
    finally:
        stop_sampling.set()
        # SIGTERM to all first, so their drains overlap, then wait for each.
        for process in rehearsal.processes:
            if process.poll() is None:
                process.terminate()
        for process in rehearsal.processes:
            stop_process(process)
        if bouncer is not None:
            bouncer.stop()
        postgres.destroy()
        shutil.rmtree(socket_dir, ignore_errors=True)


def problems_in(figures: dict[str, Any]) -> list[str]:
    """What makes the rehearsal fail, in words; empty when it passed."""
    writes, connections = figures["writes"], figures["connections"]
    problems = []
    if figures["requests"] == 0:
        problems.append("no request was made")
    if figures["client_visible_failures"]:
        problems.append(f"{figures['client_visible_failures']} requests failed after their retry")
    if writes["lost_rows"] or writes["lost_values"]:
        problems.append(
            f"acknowledged writes lost: {writes['lost_rows']} rows, {writes['lost_values']} values"
        )
    if writes["duplicated_names"]:
        problems.append(f"{writes['duplicated_names']} POSTed rows exist more than once")
    if connections["client_budget"] > connections["pgbouncer_pool"]:
        problems.append("the planned connections exceed PgBouncer's pool")
    if connections["clients"] > connections["client_budget"]:
        problems.append(
            f"{connections['clients']} client connections at PgBouncer, over the budget of "
            f"{connections['client_budget']}"
        )
    if connections["servers"] > connections["pgbouncer_pool"]:
        problems.append(f"{connections['servers']} server connections, over PgBouncer's pool")
    if connections["samples"] == 0:
        problems.append("no connection sample was taken")
    for step in figures["roll"]:
        if step["old_exit_status"] != 0:
            problems.append(f"{step['old']} exited with {step['old_exit_status']}, not 0")
    return problems


def markdown(figures: dict[str, Any], problems: list[str]) -> str:
    """load-report/rehearsal.md."""
    writes, connections, latency_ = figures["writes"], figures["connections"], figures["latency"]
    lines = [
        "# Rolling update rehearsal",
        "",
        f"`{figures['command']}`: {figures['replicas']} service processes behind HAProxy, "
        f"PgBouncer {figures['pgbouncer_version']} (transaction mode) in front of PostgreSQL, "
        f"locust distributed (1 master, 2 workers), {figures['users']} users for "
        f"{figures['seconds']} s; each process replaced in turn (maxUnavailable 0) during "
        f"{figures['roll_seconds']} s.",
        "",
        "| figure | value | goal |",
        "| --- | --- | --- |",
        f"| requests (every try) | {figures['requests']} | |",
        f"| first tries answered 503 or 502 or not at all, retried once | "
        f"{figures['retried_first_tries']} | |",
        f"| client-visible failures (after the retry) | {figures['client_visible_failures']} | 0 |",
        f"| failed readiness checks of processes not leaving | "
        f"{figures['readiness_failures']} | 0 |",
        f"| POSTs acknowledged (rows) | {writes['posts_acknowledged']} "
        f"({writes['rows_acknowledged']}) | |",
        f"| PATCHes acknowledged | {writes['patches_acknowledged']} | |",
        f"| duplicate rows (names more than once) | {writes['duplicated_names']} | 0 |",
        f"| acknowledged rows lost | {writes['lost_rows']} | 0 |",
        f"| acknowledged values lost (of {writes['patched_ids_checked']} PATCHed ids) | "
        f"{writes['lost_values']} | 0 |",
        f"| unacknowledged writes (POST, PATCH) | {writes['posts_unacknowledged']}, "
        f"{writes['patches_unacknowledged']} | |",
    ]
    for window, label in (
        ("before_roll", "before"),
        ("during_roll", "during"),
        ("after_roll", "after"),
    ):
        figures_ = latency_[window]
        lines.append(
            f"| p50 / p99 {label} the roll ({figures_['requests']} requests) | "
            f"{figures_['p50_ms']} / {figures_['p99_ms']} ms | |"
        )
    lines += [
        f"| client connections at PgBouncer, max | {connections['clients']} | "
        f"≤ {connections['peak_processes']} processes x ({connections['pool_size_per_process']} "
        f"pool + 1 probe) = {connections['client_budget']} |",
        f"| clients waiting in PgBouncer (for a free or a new server connection), max | "
        f"{connections['clients_waiting']} | |",
        f"| PostgreSQL connections open (in use), max | {connections['servers']} "
        f"({connections['servers_active']}) | ≤ PgBouncer's pool {connections['pgbouncer_pool']} |",
        f"| pg_stat_activity client backends (active), max | {connections['postgres_backends']} "
        f"({connections['postgres_active']}) | |",
        "",
        "| step | new ready | new UP in HAProxy | old DOWN in HAProxy after SIGTERM | old exited "
        "| exit status |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for step in figures["roll"]:
        lines.append(
            f"| {step['old']} → {step['new']} | {step['new_ready_s']} s | {step['new_up_s']} s | "
            f"{step['old_down_s']} s | {step['old_exit_s']} s | {step['old_exit_status']} |"
        )
    lines += ["", "PASSED" if not problems else "FAILED: " + "; ".join(problems), ""]
    return "\n".join(lines)


@contextlib.contextmanager
def hard_timeout(seconds: int) -> Iterator[None]:
    """Raise RehearsalError in the main thread after `seconds`, so every process gets stopped."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise RehearsalError(f"the rehearsal ran past its hard timeout of {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def main() -> int:
    """Run the rehearsal; returns the exit status."""
    try:
        users = setting("REHEARSE_USERS", 20)
        seconds = setting("REHEARSE_DURATION", 40)
        REPORT.mkdir(exist_ok=True)
        with hard_timeout(seconds + ROLL_SLACK_SECONDS + 120):
            figures = main_rehearsal(users, seconds)
    except (LoadError, subprocess.SubprocessError, OSError) as exc:
        print(f"rehearsal error: {exc}", file=sys.stderr)
        return 2
    problems = problems_in(figures)
    figures["problems"] = problems
    (REPORT / "rehearsal.json").write_text(json.dumps(figures, indent=2) + "\n")
    report = markdown(figures, problems)
    (REPORT / "rehearsal.md").write_text(report)
    print("\n" + report)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
