"""`make image-check`: build the image, run it as k8s/base runs its pods, and check what it does.

Against a PostgreSQL of its own (pgserver's binaries on a free loopback port, as the fault tests
start one; never the machine's own), with the two roles of k8s/roles.sql:
- `migrate` as the Job runs it (as the migrator), then `seed`, both exit 0;
- `serve` as the Deployment runs it (as the row-only service role): /readyz 200 (the time from
  the container's start is a figure), the notebook's read (GET /items?min_value=23, compared with
  the same query over a connection of its own), a write refused without a token and done with
  one (read back the same way), the image's HEALTHCHECK (`podman healthcheck run`);
- RSS idle, and under `make load`'s locust run pointed at the container (LOAD_HOST);
- SIGTERM to PID 1 while a request waits on a row lock: /readyz turns 503, the request is
  answered 200 once the lock goes, and the process exits 0 within the grace period less preStop;
- every container, as `podman diff` shows, changed nothing but what podman itself makes for any
  container (a container of the same shape running `true`); /tmp is a tmpfs and not in the diff.

Prints a table of checks and one of figures, keeps the containers' logs in
load-report/image-check/, and exits 1 if any check failed (2 if the run itself could not be set
up). Environment: IMAGE, IMAGE_CHECK_SKIP_BUILD=1 (check an image built already), LOAD_USERS (10),
LOAD_DURATION (20 s), LOAD_P95_MS (500).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from deploy import image as image_build
from tests.conftest import asyncpg_dsn, free_port
from tests.faults.support import ControlledPostgres
from tests.image.pod import CONFIG_ENV, Podman, PodShape, pod_shape, tree_rss_bytes, wait_for_exit

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "load-report" / "image-check"
ROLES_SQL = ROOT / "k8s" / "roles.sql"
DATABASE = "playing_with_neon"
MIGRATOR, SERVICE = "playing_with_neon_migrator", "playing_with_neon_service"
SEED_ROWS = 2000
NOTEBOOK_MIN_VALUE = 23
STARTUP_SECONDS = 60
# RSS "idle" is read this long after the last request.
IDLE_SECONDS = 2
IMAGE = os.environ.get("IMAGE", "").strip() or image_build.DEFAULT_IMAGE
# The lock the drained request waits on is released this long after SIGTERM: past the
# service's SHUTDOWN_DELAY_SECONDS (2 s), so the request is in flight while uvicorn drains, and
# well within the ConfigMap's DB_STATEMENT_TIMEOUT_MS (5 s), which would answer it 503.
LOCK_RELEASE_AFTER_SIGTERM_SECONDS = 3.0


@dataclasses.dataclass
class Report:
    """The checks passed or failed, and the figures measured, in the order they were made."""

    checks: list[tuple[str, bool, str]] = dataclasses.field(default_factory=list)
    figures: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name}{': ' + detail if detail else ''}", flush=True)
        return ok

    def figure(self, name: str, value: str) -> None:
        self.figures.append((name, value))
        print(f"      {name}: {value}", flush=True)

    @property
    def failed(self) -> int:
        return sum(not ok for _, ok, _ in self.checks)

    def table(self) -> str:
        lines = ["| check | result | detail |", "| --- | --- | --- |"]
        lines += [f"| {n} | {'PASS' if ok else 'FAIL'} | {d} |" for n, ok, d in self.checks]
        lines += ["", "| figure | value |", "| --- | --- |"]
        lines += [f"| {name} | {value} |" for name, value in self.figures]
        return "\n".join(lines)


def megabytes(size: int) -> str:
    return f"{size / 1e6:.0f} MB"


def compressed_size(podman: Podman, image: str) -> int:
    """The image as `podman save` writes it, gzip-compressed as registries store layers."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    total = 0
    with subprocess.Popen(
        ["podman", "save", "--format", "docker-archive", image],
        env=podman.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as save:
        assert save.stdout is not None
        while chunk := save.stdout.read(1 << 20):
            total += len(compressor.compress(chunk))
    return total + len(compressor.flush())


def healthcheck_command(podman: Podman, image: str) -> list[str]:
    """The image's HEALTHCHECK command, exec form (["CMD", program, args...]) without "CMD"."""
    test = json.loads(podman.inspect(image, "{{json .HealthCheck.Test}}") or "null") or []
    return list(test[1:]) if test[:1] == ["CMD"] else []


def check_healthcheck(report: Report, podman: Podman, name: str) -> None:
    """The HEALTHCHECK as podman runs it, and its command failing where nothing listens."""
    health = podman.run("healthcheck", "run", name)
    report.check("the image's HEALTHCHECK passes", health.returncode == 0, health.stdout.strip())
    command = healthcheck_command(podman, IMAGE)
    elsewhere = podman.run("exec", "--env", f"PORT={free_port()}", name, *command)
    report.check(
        "the same command fails with nothing on its port",
        bool(command) and elsewhere.returncode != 0,
        f"exit {elsewhere.returncode}",
    )


def check_image(report: Report, podman: Podman, image: str, shape: PodShape) -> None:
    """The image's own settings, and that the build left none of its mounts behind."""
    size = int(podman.inspect(image, "{{.Size}}"))
    compressed = compressed_size(podman, image)
    report.figure("image size", f"{megabytes(size)} ({megabytes(compressed)} gzip-compressed)")
    user = podman.inspect(image, "{{.Config.User}}")
    report.check("image runs as the pod's UID:GID", user == f"{shape.user}:{shape.group}", user)
    healthcheck = healthcheck_command(podman, image)
    report.check("image has its HEALTHCHECK", "/healthz" in " ".join(healthcheck))
    leftovers = podman.run(
        "run", "--rm", "--user", "0", "--network", "none", "--no-healthcheck",
        "--entrypoint", "python", image, "-c",
        "import glob; print(' '.join(glob.glob('/root/.config') + glob.glob('/root/*.pem')"
        " + glob.glob('/etc/pip.conf') + glob.glob('/etc/xdg/pip')))",
    ).stdout.strip()  # fmt: skip
    report.check("no build-time pip.conf or CA bundle in the image", not leftovers, leftovers)


async def prepare_database(postgres: ControlledPostgres) -> dict[str, str]:
    """Database `playing_with_neon` with k8s/roles.sql's two roles; their URLs by role."""
    admin = await asyncpg.connect(asyncpg_dsn(postgres.url()))
    try:
        await admin.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await admin.close()
    passwords = {role: secrets.token_hex(16) for role in (MIGRATOR, SERVICE)}
    owner = await asyncpg.connect(asyncpg_dsn(postgres.url(DATABASE)))
    try:
        await owner.execute(ROLES_SQL.read_text())
        for role, password in passwords.items():
            await owner.execute(f"ALTER ROLE {role} PASSWORD '{password}'")
    finally:
        await owner.close()
    return {
        role: f"postgresql://{role}:{password}@127.0.0.1:{postgres.port}/{DATABASE}"
        for role, password in passwords.items()
    }


async def query(postgres: ControlledPostgres, sql: str, *args: Any) -> list[asyncpg.Record]:
    """`sql` over a connection of its own, as the database's superuser."""
    connection = await asyncpg.connect(asyncpg_dsn(postgres.url(DATABASE)))
    try:
        return list(await connection.fetch(sql, *args))
    finally:
        await connection.close()


def check_unchanged(report: Report, podman: Podman, name: str, baseline: set[str]) -> None:
    """`podman diff` shows nothing beyond what podman makes for every container."""
    extra = sorted(podman.changed_paths(name) - baseline)
    report.check(f"{name}: nothing written outside /tmp", not extra, " ".join(extra[:8]))


def run_to_completion(
    report: Report, podman: Podman, name: str, shape: PodShape, env: dict[str, str], *args: str
) -> bool:
    """A Job-like container: runs `args`, must exit 0."""
    started = time.monotonic()
    done = podman.start(name, shape, env, "--no-healthcheck", IMAGE, *args)
    podman.save_logs(name)
    seconds = time.monotonic() - started
    detail = f"exit {done.returncode} in {seconds:.1f} s"
    if done.returncode:
        detail += f"; {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    return report.check(f"{name}: `{' '.join(args)}`", done.returncode == 0, detail)


def wait_until_ready(base_url: str, give_up: float) -> float | None:
    """Poll /readyz until it answers 200; the wall-clock time it did, or None."""
    with httpx.Client(base_url=base_url, timeout=1.0) as http:
        while time.monotonic() < give_up:
            with contextlib.suppress(httpx.HTTPError):
                if http.get("/readyz").status_code == 200:
                    return time.time()
            time.sleep(0.02)
    return None


def check_api(report: Report, postgres: ControlledPostgres, base_url: str, token: str) -> None:
    """The notebook's read and write, through the API, each compared with the database."""
    with httpx.Client(base_url=base_url, timeout=10.0) as http:
        report.check("GET /healthz 200", http.get("/healthz").status_code == 200)
        page = http.get("/items", params={"min_value": NOTEBOOK_MIN_VALUE, "limit": 1000})
        expected = asyncio.run(
            query(
                postgres,
                "SELECT id FROM playing_with_neon WHERE value > $1 ORDER BY id LIMIT 1000",
                NOTEBOOK_MIN_VALUE,
            )
        )
        ids = [item["id"] for item in page.json()["items"]] if page.status_code == 200 else []
        report.check(
            f"GET /items?min_value={NOTEBOOK_MIN_VALUE}: the rows SQL finds",
            page.status_code == 200 and bool(ids) and ids == [row["id"] for row in expected],
            f"{page.status_code}, {len(ids)} rows",
        )
        batch = [{"id": 5, "value": 11.0}, {"id": 6, "value": 15.99}]
        refused = http.patch("/items", json=batch)
        report.check("PATCH /items without a token: 401", refused.status_code == 401)
        written = http.patch("/items", json=batch, headers={"Authorization": f"Bearer {token}"})
        rows = asyncio.run(
            query(postgres, "SELECT id, value FROM playing_with_neon WHERE id = ANY($1)", [5, 6])
        )
        stored = {row["id"]: round(row["value"], 2) for row in rows}
        report.check(
            "PATCH /items with a token: 200, rows changed",
            written.status_code == 200
            and written.json() == {"updated": 2}
            and stored == {5: 11.0, 6: 15.99},
            f"{written.status_code} {written.text[:60]}",
        )


@contextlib.contextmanager
def sampling_rss(pid: int, every: float = 0.25) -> Iterator[list[int]]:
    """RSS samples of `pid`'s process tree, taken in a thread while the block runs."""
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every):
            samples.append(tree_rss_bytes(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        stop.set()
        sampler.join()


def run_load(report: Report, base_url: str, token: str, pid: int) -> None:
    """tests/load/run.py (what `make load` runs) against the container; RSS sampled meanwhile."""
    env = {
        **os.environ,
        "LOAD_HOST": base_url,
        "LOAD_API_TOKEN": token,
        "LOAD_ROWS": str(SEED_ROWS),
        "LOAD_USERS": os.environ.get("LOAD_USERS", "10"),
        "LOAD_DURATION": os.environ.get("LOAD_DURATION", "20"),
        "LOAD_P95_MS": os.environ.get("LOAD_P95_MS", "500"),
    }
    log = REPORT / "load.log"
    with sampling_rss(pid) as samples, log.open("w") as output:
        done = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "load" / "run.py")],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=int(env["LOAD_DURATION"]) + 300,
            check=False,
        )
    summary = [line for line in log.read_text().splitlines() if line.startswith("requests ")]
    report.check(
        f"make load ({env['LOAD_USERS']} users, {env['LOAD_DURATION']} s): no failure",
        done.returncode == 0,
        summary[-1] if summary else f"exit {done.returncode}, see {log}",
    )
    if samples:
        ordered = sorted(samples)
        report.figure(
            "RSS under load",
            f"median {megabytes(ordered[len(ordered) // 2])}, peak {megabytes(ordered[-1])}",
        )


async def hold_row_lock(
    postgres: ControlledPostgres, row_id: int, locked: threading.Event, release: threading.Event
) -> None:
    """Keep `row_id` locked FOR UPDATE until `release` is set."""
    connection = await asyncpg.connect(asyncpg_dsn(postgres.url(DATABASE)))
    try:
        async with connection.transaction():
            await connection.execute(
                "SELECT 1 FROM playing_with_neon WHERE id = $1 FOR UPDATE", row_id
            )
            locked.set()
            await asyncio.to_thread(release.wait, 60)
    finally:
        await connection.close()


def waiting_on_lock(postgres: ControlledPostgres) -> bool:
    """Whether some session of the service role waits for a row lock."""
    rows = asyncio.run(
        query(
            postgres,
            "SELECT 1 FROM pg_stat_activity WHERE usename = $1 AND wait_event_type = 'Lock'",
            SERVICE,
        )
    )
    return bool(rows)


def check_drain(
    report: Report,
    podman: Podman,
    postgres: ControlledPostgres,
    name: str,
    shape: PodShape,
    base_url: str,
    token: str,
) -> None:
    """SIGTERM while a PATCH waits on a row lock: readiness fails, the PATCH lands, exit 0."""
    locked, release = threading.Event(), threading.Event()
    locker = threading.Thread(
        target=lambda: asyncio.run(hold_row_lock(postgres, 7, locked, release)), daemon=True
    )
    locker.start()
    if not report.check("a row of the table is locked FOR UPDATE", locked.wait(10)):
        return
    answer: dict[str, Any] = {}

    def patch() -> None:
        with httpx.Client(base_url=base_url, timeout=30.0) as http:
            try:
                response = http.patch(
                    "/items",
                    json=[{"id": 7, "value": 77.0}],
                    headers={"Authorization": f"Bearer {token}"},
                )
                answer["status"] = response.status_code
                answer["at"] = time.time()
            except httpx.HTTPError as exc:
                answer["error"] = f"{type(exc).__name__}: {exc}"

    request = threading.Thread(target=patch, daemon=True)
    request.start()
    in_flight = wait_for(lambda: waiting_on_lock(postgres), 10)
    report.check("a PATCH is in flight, waiting on a row lock", in_flight)
    budget = shape.grace_seconds - shape.pre_stop_seconds
    signalled = time.time()
    podman.run("kill", "--signal", "TERM", name)
    readiness: list[int | str] = []

    def unready() -> bool:
        try:
            readiness.append(httpx.get(f"{base_url}/readyz", timeout=0.5).status_code)
        except httpx.HTTPError as exc:
            readiness.append(type(exc).__name__)
        return readiness[-1] == 503

    # Within the 2 s the service keeps serving after SIGTERM (SHUTDOWN_DELAY_SECONDS).
    report.check("after SIGTERM: /readyz 503", wait_for(unready, 1.5), str(readiness[-1]))
    time.sleep(max(0.0, signalled + LOCK_RELEASE_AFTER_SIGTERM_SECONDS - time.time()))
    release.set()
    request.join(30)
    locker.join(10)
    after = answer.get("at", signalled) - signalled
    report.check(
        "the in-flight PATCH is answered 200 during the drain",
        answer.get("status") == 200 and after > 0,
        f"{answer.get('status', answer.get('error'))} at +{after:.1f} s",
    )
    status = wait_for_exit(podman, name, max(0.0, signalled + budget - time.time()))
    finished = int(podman.inspect(name, "{{.State.FinishedAt.UnixNano}}")) / 1e9
    seconds = (finished if status is not None else time.time()) - signalled
    if status is None:
        podman.run("kill", "--signal", "KILL", name)  # what the kubelet does at the deadline
    report.check(
        f"exit 0 within the grace period ({shape.grace_seconds} s less {shape.pre_stop_seconds} s "
        "preStop)",
        status == 0,
        f"exit {status} after {seconds:.1f} s",
    )
    released = f"the lock released at +{LOCK_RELEASE_AFTER_SIGTERM_SECONDS:.0f} s"
    report.figure("SIGTERM to exit", f"{seconds:.1f} s ({released})")


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def check_serve(
    report: Report,
    podman: Podman,
    postgres: ControlledPostgres,
    urls: dict[str, str],
    baseline: set[str],
) -> None:
    """The Deployment's container, from start to drained exit."""
    shape = pod_shape("deployment.yaml", "api")
    token = secrets.token_urlsafe(32)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    name = "image-check-serve"
    env = {"DATABASE_URL": urls[SERVICE], "API_TOKENS": token, "PORT": str(port)}
    started = podman.start(name, shape, env, IMAGE, *shape.args, detach=True)
    failure = "" if started.returncode == 0 else started.stderr.strip()[-300:]
    if not report.check("serve: container starts", started.returncode == 0, failure):
        return
    ready_at = wait_until_ready(base_url, time.monotonic() + STARTUP_SECONDS)
    started_at = int(podman.inspect(name, "{{.State.StartedAt.UnixNano}}")) / 1e9
    if not report.check("serve: /readyz 200", ready_at is not None):
        podman.save_logs(name)
        return
    assert ready_at is not None
    report.figure("container start to first /readyz 200", f"{ready_at - started_at:.2f} s")
    check_api(report, postgres, base_url, token)
    check_healthcheck(report, podman, name)
    pid = int(podman.inspect(name, "{{.State.Pid}}"))
    time.sleep(IDLE_SECONDS)
    report.figure("RSS idle", megabytes(tree_rss_bytes(pid)))
    compare_host_process(report, urls)
    run_load(report, base_url, token, pid)
    check_drain(report, podman, postgres, name, shape, base_url, token)
    podman.save_logs(name)
    check_unchanged(report, podman, name, baseline)


def config_env() -> dict[str, str]:
    """The ConfigMap's keys and values, from k8s/base/config.env."""
    settings = {}
    for line in CONFIG_ENV.read_text().splitlines():
        key, equals, value = line.partition("=")
        if equals and not key.startswith("#"):
            settings[key.strip()] = value.strip()
    return settings


def compare_host_process(report: Report, urls: dict[str, str]) -> None:
    """The same `serve` from .venv outside any container, measured the same way, beside it."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        **config_env(),
        "DATABASE_URL": urls[SERVICE],
        "API_TOKENS": secrets.token_urlsafe(32),
        "HOST": "127.0.0.1",
        "PORT": str(port),
    }
    with (REPORT / "host-serve.log").open("w") as log:
        started_at = time.time()
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            ready_at = wait_until_ready(base_url, time.monotonic() + STARTUP_SECONDS)
            if ready_at is None:
                report.figure("outside a container", f"not ready in {STARTUP_SECONDS} s")
                return
            httpx.get(f"{base_url}/items", params={"min_value": NOTEBOOK_MIN_VALUE}, timeout=10)
            time.sleep(IDLE_SECONDS)
            python = f"Python {sys.version_info.major}.{sys.version_info.minor}"
            report.figure(
                f"outside a container (.venv, {python}): start to ready, RSS idle",
                f"{ready_at - started_at:.2f} s, {megabytes(tree_rss_bytes(process.pid))}",
            )
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def baseline_changes(podman: Podman, shape: PodShape) -> set[str]:
    """What podman itself changes in a container of this shape that runs nothing (`true`)."""
    name = "image-check-baseline"
    podman.start(name, shape, {}, "--no-healthcheck", "--entrypoint", "true", IMAGE)
    return podman.changed_paths(name)


def run_checks(report: Report, podman: Podman) -> None:
    """Every check, on a PostgreSQL of its own that is removed afterwards."""
    check_image(report, podman, IMAGE, pod_shape("deployment.yaml", "api"))
    job = pod_shape("migrate-job.yaml", "migrate")
    postgres = ControlledPostgres.create()
    try:
        urls = asyncio.run(prepare_database(postgres))
        baseline = baseline_changes(podman, job)
        migrator = {"DATABASE_URL": urls[MIGRATOR]}
        if not run_to_completion(report, podman, "image-check-migrate", job, migrator, *job.args):
            return
        check_unchanged(report, podman, "image-check-migrate", baseline)
        seed = ("seed", "--rows", str(SEED_ROWS))
        if not run_to_completion(report, podman, "image-check-seed", job, migrator, *seed):
            return
        try:
            check_serve(report, podman, postgres, urls, baseline)
        except (httpx.HTTPError, ValueError, KeyError) as exc:  # an answer not as promised
            report.check("serve: every check ran", False, f"{type(exc).__name__}: {exc}")
    finally:
        podman.remove_all()
        postgres.destroy()


def main() -> int:
    """`make image-check`; returns the exit status."""
    REPORT.mkdir(parents=True, exist_ok=True)
    report = Report()
    try:
        if os.environ.get("IMAGE_CHECK_SKIP_BUILD") == "1":
            env = image_build.engine_environment("podman")
        else:
            started = time.monotonic()
            program, env = image_build.build(IMAGE)
            if program != "podman":
                raise image_build.ImageError("the check runs containers with podman only")
            report.figure("build (make image)", f"{time.monotonic() - started:.0f} s")
        run_checks(report, Podman(env, REPORT))
    except (image_build.ImageError, subprocess.SubprocessError, OSError, RuntimeError) as exc:
        print(f"image-check could not run: {exc}", file=sys.stderr)
        return 2
    table = report.table()
    (REPORT / "report.md").write_text(table + "\n")
    print(f"\n{table}\n\n{len(report.checks) - report.failed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
