"""`make load`: run tests/load/locustfile.py headless and judge the result.

Without LOAD_HOST: start the service as shipped (`python -m service`) on a new embedded database
seeded with LOAD_ROWS demo rows, on a free loopback port, with a bearer token made for this run;
load it; stop it again by its PID. With LOAD_HOST=https://…: load that deployment instead (seed
it first with `python -m service seed --rows LOAD_ROWS`; LOAD_API_TOKEN is its write token).

Locust runs from its own virtualenv (.venv-load, from requirements-load.lock) because it pins
gevent and friends. The CSV files and locust's HTML report land in load-report/. Exits 1 when any
request failed or the aggregated p95 is over LOAD_P95_MS, 2 when the run itself went wrong.

Environment: LOAD_USERS (50), LOAD_SPAWN_RATE (10 users/s), LOAD_DURATION (60 s), LOAD_P95_MS
(500), LOAD_ROWS (10000), LOAD_HOST, LOAD_API_TOKEN.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import venv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "tests" / "load" / "locustfile.py"
LOCK = ROOT / "requirements-load.lock"
LOAD_VENV = ROOT / ".venv-load"
LOAD_STAMP = LOAD_VENV / ".installed"
REPORT = ROOT / "load-report"
# Git-ignored (.data/), and apart from `make run`'s database, which the load test must not touch.
DB_DIR = ROOT / ".data" / "load-postgres"
STARTUP_SECONDS = 90
# SIGTERM starts a short readiness drain, then uvicorn finishes in-flight requests.
SHUTDOWN_SECONDS = 60


class LoadError(Exception):
    """The run could not be carried out (as opposed to a run whose figures failed)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run, read from the environment."""

    users: int
    spawn_rate: int
    seconds: int
    p95_limit_ms: int
    rows: int
    host: str


def stop_process(process: subprocess.Popen[Any], timeout: float = 30.0) -> int:
    """SIGTERM by its PID, SIGKILL after `timeout`; returns its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def setting(name: str, default: int) -> int:
    """A positive whole number from the environment."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise LoadError(f"{name} must be a whole number; got {raw!r}") from None
    if value < 1:
        raise LoadError(f"{name} must be at least 1; got {value}")
    return value


def ensure_locust() -> Path:
    """.venv-load/bin/locust, (re)installed from the lock when the stamp is older than it."""
    locust = LOAD_VENV / "bin" / "locust"
    if LOAD_STAMP.exists() and LOAD_STAMP.stat().st_mtime >= LOCK.stat().st_mtime:
        return locust
    print(f"installing locust into {LOAD_VENV.name} from {LOCK.name}", flush=True)
    if not (LOAD_VENV / "bin" / "python").exists():
        venv.create(LOAD_VENV, with_pip=True)
    pip = [str(LOAD_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--require-hashes", "--no-deps", "-r", str(LOCK)], check=True)
    LOAD_STAMP.touch()
    return locust


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def service_environment(token: str, port: int, **settings: str) -> dict[str, str]:
    """The shipped defaults, an embedded database of the load test's own, one token.

    The database keys are set empty on purpose: an environment value wins over `.env`, and an
    empty one counts as unset, so a developer's `.env` pointing at a real database is never
    seeded (which truncates) or loaded. `settings` (e.g. DATABASE_URL) go over all of it.
    """
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "XDG_RUNTIME_DIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    database_keys = ("DATABASE_URL", "DB_HOST", "DB_USERNAME", "DB_PASSWORD", "DB_NAME")
    env.update(dict.fromkeys(database_keys, ""))
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "EMBEDDED_DB_DIR": str(DB_DIR),
            "API_TOKENS": token,
            "HOST": "127.0.0.1",
            "PORT": str(port),
        }
    )
    env.update(settings)
    return env


def fresh_database_dir() -> None:
    """Remove the previous run's database, unless a PostgreSQL still runs in it."""
    pid_file = DB_DIR / "postmaster.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().split()[0])
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, 0)
            raise LoadError(
                f"a PostgreSQL (pid {pid}) from an earlier run still uses {DB_DIR}; stop it first"
            )
    shutil.rmtree(DB_DIR, ignore_errors=True)


def wait_until_ready(process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    """Block until /readyz answers 200, or raise with the end of the service's log."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LoadError(f"the service exited with {process.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{base_url}/readyz", timeout=2) as answer:  # noqa: S310
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise LoadError(f"the service was not ready within {STARTUP_SECONDS} s:\n{tail(log)}")


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def local_service(rows: int) -> Iterator[tuple[str, str]]:
    """Seed and start `python -m service`; yields (base URL, token); stops it by its PID."""
    token = secrets.token_urlsafe(32)
    port = free_port()
    env = service_environment(token, port)
    fresh_database_dir()
    log = REPORT / "service.log"
    command = [sys.executable, "-m", "service"]
    print(f"seeding {rows} rows into a new embedded database", flush=True)
    # cwd is the report folder, where no `.env` of the developer's is read.
    seeded = subprocess.run(
        [*command, "seed", "--rows", str(rows), "--force"],
        cwd=REPORT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if seeded.returncode != 0:
        raise LoadError(f"seeding failed:\n{seeded.stderr}")
    base_url = f"http://127.0.0.1:{port}"
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=REPORT, env=env, stdout=log_file, stderr=log_file)
    print(f"service started (pid {process.pid}) on {base_url}; log in {log}", flush=True)
    try:
        wait_until_ready(process, base_url, log)
        yield base_url, token
    finally:
        status = stop_process(process, SHUTDOWN_SECONDS)
        print(f"service stopped (exit status {status})", flush=True)


def read_plan() -> Plan:
    """The plan from LOAD_* variables, validated."""
    host = os.environ.get("LOAD_HOST", "").strip().rstrip("/")
    if host and urllib.parse.urlsplit(host).scheme not in ("http", "https"):
        raise LoadError(f"LOAD_HOST must be an http:// or https:// URL; got {host!r}")
    return Plan(
        users=setting("LOAD_USERS", 50),
        spawn_rate=setting("LOAD_SPAWN_RATE", 10),
        seconds=setting("LOAD_DURATION", 60),
        p95_limit_ms=setting("LOAD_P95_MS", 500),
        rows=setting("LOAD_ROWS", 10_000),
        host=host,
    )


def run_locust(locust: Path, plan: Plan, host: str, token: str) -> int:
    """Locust headless for the planned time against `host`; returns its exit status."""
    for old in REPORT.glob("locust_*.csv"):
        old.unlink()
    env = {
        **os.environ,
        "LOAD_API_TOKEN": token,
        "LOAD_ROWS": str(plan.rows),
        "LOAD_P95_MS": str(plan.p95_limit_ms),
    }
    command = [
        str(locust),
        "--locustfile", str(LOCUSTFILE),
        "--host", host,
        "--headless",
        "--users", str(plan.users),
        "--spawn-rate", str(plan.spawn_rate),
        "--run-time", f"{plan.seconds}s",
        # Users finish the task they are in (a POST then its DELETEs) before the run ends.
        "--stop-timeout", "10",
        "--csv", str(REPORT / "locust"),
        "--html", str(REPORT / "report.html"),
        "--only-summary",
    ]  # fmt: skip
    print(
        f"locust: {plan.users} users (+{plan.spawn_rate}/s) for {plan.seconds} s against {host}",
        flush=True,
    )
    finished = subprocess.run(command, env=env, timeout=plan.seconds + 120, check=False)
    return finished.returncode


def aggregated_row() -> dict[str, str]:
    """The "Aggregated" row of locust_stats.csv."""
    with (REPORT / "locust_stats.csv").open(newline="") as stats:
        for row in csv.DictReader(stats):
            if row["Name"] == "Aggregated":
                return row
    raise LoadError("locust_stats.csv has no Aggregated row")


def judge(locust_status: int, p95_limit: int) -> int:
    """Print the figures; 0 when nothing failed and p95 is within the limit, else 1."""
    row = aggregated_row()
    requests, failures = int(row["Request Count"]), int(row["Failure Count"])
    p95 = float(row["95%"]) if requests else float("nan")
    print(
        f"\nrequests {requests}, failures {failures}, median {row['Median Response Time']} ms, "
        f"p95 {row['95%']} ms, p99 {row['99%']} ms, {float(row['Requests/s']):.1f} requests/s"
    )
    print(f"report: {REPORT / 'report.html'}")
    problems = []
    if requests == 0:
        problems.append("no request was made")
    if failures:
        problems.append(f"{failures} requests failed (see {REPORT / 'locust_failures.csv'})")
    if p95 > p95_limit:
        problems.append(f"p95 {p95:.0f} ms is over LOAD_P95_MS={p95_limit}")
    if locust_status != 0 and not problems:
        # The CSV is a snapshot taken every second; locust's status also counts the last second.
        problems.append(
            f"locust exited with {locust_status}: a request failed, a task raised, or p95 was "
            "over the limit at the very end (see its output above)"
        )
    for problem in problems:
        print(f"FAILED: {problem}")
    if not problems:
        print(f"PASSED: no failures, p95 within {p95_limit} ms")
    return 1 if problems else 0


def main() -> int:
    """Run the load test as the environment says; returns the exit status."""
    try:
        plan = read_plan()
        REPORT.mkdir(exist_ok=True)
        locust = ensure_locust()
        if plan.host:
            status = run_locust(locust, plan, plan.host, os.environ.get("LOAD_API_TOKEN", ""))
        else:
            with local_service(plan.rows) as (base_url, token):
                status = run_locust(locust, plan, base_url, token)
        return judge(status, plan.p95_limit_ms)
    except (LoadError, subprocess.SubprocessError, OSError) as exc:
        print(f"load test error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
