"""What the fault tests drive: a PostgreSQL and a PgBouncer they stop and start, and a load.

The PostgreSQL is the pgserver package's own binaries, run in a temporary folder on a free
loopback port, so a test can stop it without touching any other database on the machine. As root,
PostgreSQL (and PgBouncer) refuse to run, so both run as pgserver's system user, as pgserver does.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import URL

from tests.conftest import asyncpg_dsn, free_port, run_service

SYSTEM_USER = "pgserver"
# Debian bookworm's PgBouncer 1.18: no tracking of protocol-level prepared statements.
LEGACY_PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
# The one tests/build-pgbouncer.sh builds (trixie's 1.24.1), as Neon's poolers run it: it tracks
# prepared statements (>= 1.21). Named by PGBOUNCER_MODERN, else found in that script's cache.
MODERN_PGBOUNCER_VERSION = "1.24.1"
# The first version with max_prepared_statements.
PREPARED_STATEMENTS_SINCE = (1, 21)


def modern_pgbouncer() -> str | None:
    """The PgBouncer >= 1.21 binary: $PGBOUNCER_MODERN, else tests/build-pgbouncer.sh's cache."""
    named = os.environ.get("PGBOUNCER_MODERN")
    if named:
        return named if os.access(named, os.X_OK) else None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    binary = cache / "playing-with-neon" / f"pgbouncer-{MODERN_PGBOUNCER_VERSION}" / "pgbouncer"
    return str(binary) if os.access(binary, os.X_OK) else None


def pgbouncer_version(binary: str) -> tuple[int, ...]:
    """The version `binary --version` names on its first line ("PgBouncer 1.24.1")."""
    first_line = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.splitlines()[0]
    name, _, version = first_line.partition(" ")
    if name != "PgBouncer":
        raise RuntimeError(f"{binary} --version says {first_line!r}")
    return tuple(int(part) for part in version.split("."))


HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def run_as() -> str | None:
    """The system user the database processes run as: pgserver's when we are root."""
    return SYSTEM_USER if os.geteuid() == 0 else None


def _prepare_system_user(folder: Path) -> None:
    """As root, make pgserver's user exist, reach the binaries, and own `folder`."""
    if run_as() is None:
        return
    import pwd

    from pgserver._commands import POSTGRES_BIN_PATH
    from pgserver.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(SYSTEM_USER)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    ensure_folder_permissions(POSTGRES_BIN_PATH, 0o555)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o444)
    ensure_prefix_permissions(folder)
    entry = pwd.getpwnam(SYSTEM_USER)
    os.chown(folder, entry.pw_uid, entry.pw_gid)


def _give(path: Path) -> None:
    if run_as() is not None:
        import pwd

        entry = pwd.getpwnam(SYSTEM_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def tls_capable_bin_dir() -> Path | None:
    """The newest Debian PostgreSQL server's binaries, if installed.

    pgserver's PostgreSQL is built without OpenSSL ("SSL is not supported by this build"), so a
    server that speaks TLS has to come from the system (Debian: apt-get install postgresql).
    """
    servers = Path("/usr/lib/postgresql").glob("*/bin/postgres")
    versions = [(int(p.parents[1].name), p.parent) for p in servers if p.parents[1].name.isdigit()]
    return max(versions)[1] if versions else None


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            probe.settimeout(0.5)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclasses.dataclass(frozen=True)
class ServerCertificate:
    """What a TLS server needs: its certificate chain and private key, as PEM."""

    chain_pem: bytes
    key_pem: bytes


@dataclasses.dataclass
class ControlledPostgres:
    """A PostgreSQL of the test's own on 127.0.0.1:port; password auth over TCP."""

    root: Path
    port: int
    password: str
    # Where initdb, pg_ctl and postgres are: pgserver's own, unless the test needs others.
    bin_dir: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    @classmethod
    def create(
        cls, password: str | None = None, tls: ServerCertificate | None = None
    ) -> ControlledPostgres:
        """initdb in a new temporary folder and start the server.

        With `tls`, the server accepts only SCRAM over TLS, with that certificate, and runs
        from the system's PostgreSQL binaries (see `tls_capable_bin_dir`).
        """
        from pgserver._commands import POSTGRES_BIN_PATH

        bin_dir = POSTGRES_BIN_PATH
        if tls is not None:
            bin_dir = tls_capable_bin_dir() or POSTGRES_BIN_PATH
        # Short and outside the root user's home: the system user must reach it, and the unix
        # socket PostgreSQL also opens there must fit in 107 bytes.
        root = Path(tempfile.mkdtemp(prefix="faults-pg-"))
        _prepare_system_user(root)
        password = password or f"pg-{secrets.token_hex(12)}"
        server = cls(root=root, port=free_port(), password=password, bin_dir=bin_dir)
        password_file = root / "password"
        password_file.write_text(server.password + "\n")
        _give(password_file)
        server._run(
            server.bin_dir / "initdb",
            [
                *("-D", str(server.data_dir), "-U", "postgres", "--encoding=UTF8", "--no-sync"),
                *("--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={password_file}"),
            ],
        )
        password_file.unlink()
        if tls is not None:
            server._require_tls(tls)
        server.start()
        return server

    def create_replica(self) -> ControlledPostgres:
        """A streaming replica of this (running) server: pg_basebackup -R, started hot standby.

        The copy is taken over this server's unix socket, where initdb's pg_hba.conf trusts
        replication connections; the replica then streams from that socket, and accepts the
        same password over TCP on a port of its own.
        """
        root = Path(tempfile.mkdtemp(prefix="faults-replica-"))
        _prepare_system_user(root)
        replica = dataclasses.replace(self, root=root, port=free_port())
        replica._run(
            self.bin_dir / "pg_basebackup",
            [
                *("-h", str(self.root), "-p", str(self.port), "-U", "postgres"),
                *("-D", str(replica.data_dir), "-R", "--checkpoint=fast", "--no-sync"),
            ],
        )
        replica.start()
        return replica

    def url(
        self, database: str = "postgres", password: str | None = None, host: str = "127.0.0.1"
    ) -> URL:
        """The asyncpg URL of `database`, with the real password unless another is given."""
        return URL.create(
            "postgresql+asyncpg",
            username="postgres",
            password=self.password if password is None else password,
            host=host,
            port=self.port,
            database=database,
        )

    def _require_tls(self, tls: ServerCertificate) -> None:
        """ssl=on with `tls`, and a pg_hba.conf with nothing but SCRAM over TLS (`hostssl`)."""
        certificate = self.root / "server.crt"
        key = self.root / "server.key"
        certificate.write_bytes(tls.chain_pem)
        # PostgreSQL refuses a key file that its user does not own or that others can read.
        key.touch(mode=0o600)
        key.write_bytes(tls.key_pem)
        for path in (certificate, key):
            _give(path)
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\nssl = on\n"
                f"ssl_cert_file = '{certificate}'\n"
                f"ssl_key_file = '{key}'\n"
                "password_encryption = 'scram-sha-256'\n"
            )
        (self.data_dir / "pg_hba.conf").write_text(
            "hostssl all all 127.0.0.1/32 scram-sha-256\nhostssl all all ::1/128 scram-sha-256\n"
        )

    def start(self) -> float:
        """Start the server and wait until it accepts connections; returns the seconds taken."""
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.root} -c max_connections=300"
            " -c fsync=off -c full_page_writes=off -c log_min_messages=warning"
        )
        started = time.monotonic()
        self._run(
            self.bin_dir / "pg_ctl",
            [
                *("-D", str(self.data_dir), "-l", str(self.log_path), "-o", options),
                *("-w", "-t", "30", "start"),
            ],
        )
        return time.monotonic() - started

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop: `fast` ends every session cleanly, `immediate` is a crash."""
        self._run(
            self.bin_dir / "pg_ctl",
            ["-D", str(self.data_dir), "-m", mode, "-w", "-t", "30", "stop"],
        )

    def is_running(self) -> bool:
        status = subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "status"],
            user=run_as(),
            cwd=self.root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        return status.returncode == 0

    def destroy(self) -> None:
        """Stop the server if it runs and remove its folder."""
        if self.is_running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, program: Path, args: list[str]) -> None:
        # pg_ctl's output goes to a file, not a pipe: the server it starts would inherit the pipe
        # and keep it open, and reading it would then never end.
        output = self.root / "pg_ctl.out"
        with output.open("a") as out:
            result = subprocess.run(
                [str(program), *args],
                user=run_as(),
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
                timeout=60,
            )
        if result.returncode != 0:
            log = self.log_path.read_text() if self.log_path.exists() else ""
            raise RuntimeError(
                f"{program.name} {' '.join(args)} failed:\n{output.read_text()}\n{log}"
            )


@dataclasses.dataclass
class PgBouncer:
    """A pgbouncer in transaction mode on 127.0.0.1:port, in front of a test server."""

    root: Path
    port: int
    process: subprocess.Popen[bytes]
    # From `pgbouncer --version`, e.g. (1, 24, 1).
    version: tuple[int, ...]

    @property
    def log_path(self) -> Path:
        return self.root / "pgbouncer.log"

    @classmethod
    def start(
        cls,
        postgres: ControlledPostgres,
        binary: str = LEGACY_PGBOUNCER,
        pool_size: int = 4,
        upstream_port: int | None = None,
    ) -> PgBouncer:
        """Write its ini and user list into a temporary folder and start `binary` in the
        foreground; a PgBouncer >= 1.21 tracks up to 200 prepared statements per connection.

        It connects to `postgres`, or with `upstream_port` to whatever listens there (a load
        balancer in front of servers that share `postgres`' password).
        """
        version = pgbouncer_version(binary)
        root = Path(tempfile.mkdtemp(prefix="faults-pgb-"))
        _prepare_system_user(root)
        # A copy in the folder: the system user may not reach the binary where it was built
        # (a root user's cache).
        program = root / "pgbouncer"
        shutil.copy2(binary, program)
        port = free_port()
        # 200 is the default since 1.24 (and Neon's); 1.21 to 1.23 default to 0, off. 1.18
        # refuses the unknown setting.
        tracking = version >= PREPARED_STATEMENTS_SINCE
        (root / "userlist.txt").write_text(f'"postgres" "{postgres.password}"\n')
        (root / "pgbouncer.ini").write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host=127.0.0.1 port={upstream_port or postgres.port}",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {port}",
                    "unix_socket_dir =",
                    # Clients send the password in clear over loopback; PgBouncer then logs in
                    # to PostgreSQL with SCRAM using the password from the user list.
                    "auth_type = plain",
                    f"auth_file = {root / 'userlist.txt'}",
                    "pool_mode = transaction",
                    f"default_pool_size = {pool_size}",
                    *(["max_prepared_statements = 200"] if tracking else []),
                    # So a test can read SHOW POOLS on the admin console (database `pgbouncer`).
                    "admin_users = postgres",
                    "max_client_conn = 500",
                    f"logfile = {root / 'pgbouncer.log'}",
                    f"pidfile = {root / 'pgbouncer.pid'}",
                    "",
                ]
            )
        )
        for name in ("userlist.txt", "pgbouncer.ini"):
            (root / name).chmod(0o600)
            _give(root / name)
        # PgBouncer refuses to run as root ("should not run as root"), hence the system user.
        with (root / "stderr.log").open("wb") as stderr:
            process = subprocess.Popen(
                [str(program), str(root / "pgbouncer.ini")],
                user=run_as(),
                cwd=root,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        bouncer = cls(root=root, port=port, process=process, version=version)
        try:
            wait_for_port(port)
        except TimeoutError:
            bouncer.stop()
            raise RuntimeError(f"pgbouncer did not start:\n{bouncer.log()}") from None
        return bouncer

    @property
    def version_text(self) -> str:
        """The version as PgBouncer writes it: "1.24.1"."""
        return ".".join(map(str, self.version))

    def url(self, postgres: ControlledPostgres, database: str) -> URL:
        """The service's URL for `database` through this pooler."""
        return postgres.url(database).set(port=self.port)

    def show(self, postgres: ControlledPostgres, what: str) -> list[dict[str, str]]:
        """Rows of `SHOW <what>` on the admin console (database `pgbouncer`)."""
        return psql(self.port, "pgbouncer", postgres.password, f"SHOW {what}")

    def log(self) -> str:
        parts = [p.read_text() for p in (self.log_path, self.root / "stderr.log") if p.exists()]
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the pooler (by its own PID) and remove its folder."""
        _end(self.process)
        shutil.rmtree(self.root, ignore_errors=True)


def _end(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a process we started, by its PID; SIGKILL it if it has not exited in 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclasses.dataclass
class TcpBalancer:
    """Debian's HAProxy in TCP mode on 127.0.0.1:port, round robin over servers' ports.

    As an RDS reader endpoint or a Kubernetes `-ro` Service does: each new connection goes to the
    next server, and stays with it for its life.
    """

    root: Path
    port: int
    process: subprocess.Popen[bytes]

    @classmethod
    def start(cls, upstream_ports: list[int]) -> TcpBalancer:
        """Write its config into a temporary folder and start it in the foreground."""
        root = Path(tempfile.mkdtemp(prefix="faults-haproxy-"))
        port = free_port()
        servers = [f"    server s{n} 127.0.0.1:{p}" for n, p in enumerate(upstream_ports, 1)]
        (root / "haproxy.cfg").write_text(
            "\n".join(
                [
                    "defaults",
                    "    mode tcp",
                    "    timeout connect 2s",
                    "    timeout client 120s",
                    "    timeout server 120s",
                    "frontend readers",
                    f"    bind 127.0.0.1:{port}",
                    "    default_backend replicas",
                    "backend replicas",
                    "    balance roundrobin",
                    *servers,
                    "",
                ]
            )
        )
        with (root / "haproxy.log").open("wb") as log:
            process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(root / "haproxy.cfg")],
                cwd=root,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        balancer = cls(root=root, port=port, process=process)
        try:
            wait_for_port(port)
        except TimeoutError:
            balancer.stop()
            raise RuntimeError(f"haproxy did not start:\n{balancer.log()}") from None
        return balancer

    def log(self) -> str:
        path = self.root / "haproxy.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        """Stop HAProxy (by its own PID) and remove its folder."""
        _end(self.process)
        shutil.rmtree(self.root, ignore_errors=True)


def psql(port: int, database: str, password: str, sql: str) -> list[dict[str, str]]:
    """Rows of `sql` via pgserver's psql: the simple query protocol PgBouncer's console needs
    (asyncpg reads results only over the extended one)."""
    from pgserver._commands import POSTGRES_BIN_PATH

    result = subprocess.run(
        [
            *(str(POSTGRES_BIN_PATH / "psql"), "-X", "--csv", "-h", "127.0.0.1", "-p", str(port)),
            *("-U", "postgres", "-d", database, "-c", sql),
        ],
        env={**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "3"},
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return list(csv.DictReader(io.StringIO(result.stdout)))


class TcpProxy:
    """A TCP proxy to PostgreSQL that the test controls, for faults of the network between.

    `silent`: forwarding stops, nothing is closed (a NAT or firewall dropping packets).
    `cut_open_connections()`: each connection open now is closed the moment its client next
    sends something, which is never forwarded (a reset arriving mid-request); connections opened
    afterwards work.
    `silent_from`: bytes that, once a client sends them, make its connection silent from that
    message on (which is not forwarded): the network fails at a chosen statement.
    `delay`: seconds each answer of the server is held before it is forwarded (a database that
    far away: every round trip, and so every statement, takes at least that long).
    """

    def __init__(self, upstream_port: int, delay: float = 0.0) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.delay = delay
        self.silent = False
        self.silent_from: bytes | None = None
        self.server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._doomed: set[asyncio.StreamWriter] = set()
        self._silenced: set[asyncio.StreamWriter] = set()

    def cut_open_connections(self) -> None:
        self._doomed |= self._open

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: bool,
        server_w: asyncio.StreamWriter,
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if client and writer in self._doomed:
                    break
                if client and self.silent_from is not None and self.silent_from in data:
                    self._silenced.add(server_w)
                if not client and self.delay:
                    await asyncio.sleep(self.delay)
                if not self.silent and server_w not in self._silenced:
                    writer.write(data)
                    await writer.drain()
        writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._open.add(server_w)
        try:
            # Closing the server side on a cut ends the other pipe too, which closes the client.
            await asyncio.gather(
                self._pipe(client_r, server_w, client=True, server_w=server_w),
                self._pipe(server_r, client_w, client=False, server_w=server_w),
            )
        finally:
            self._open.discard(server_w)
            self._doomed.discard(server_w)
            self._silenced.discard(server_w)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[TcpProxy]:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        try:
            yield self
        finally:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)


async def seed_rows(database: URL, count: int, value: float = 0.0) -> None:
    """Replace the table's rows by ids 1..count named row-<id>, all holding `value`."""
    connection = await asyncpg.connect(asyncpg_dsn(database))
    try:
        await connection.execute("TRUNCATE playing_with_neon")
        await connection.execute(
            "INSERT INTO playing_with_neon (id, name, value) "
            "SELECT g, 'row-' || g, $2 FROM generate_series(1, $1::int) AS g",
            count,
            value,
        )
        await connection.execute(
            "SELECT setval(pg_get_serial_sequence('playing_with_neon', 'id'), $1::int + 1, false)",
            count,
        )
    finally:
        await connection.close()


async def fetch_values(database: URL) -> dict[int, float]:
    """id → value of every row, read through a connection of the test's own."""
    connection = await asyncpg.connect(asyncpg_dsn(database))
    try:
        rows = await connection.fetch("SELECT id, value FROM playing_with_neon ORDER BY id")
    finally:
        await connection.close()
    return {row["id"]: row["value"] for row in rows}


@dataclasses.dataclass
class Outcome:
    """One request of a load: when it started, how long it took, what came back."""

    label: str
    started: float
    elapsed: float
    status: int | None
    retry_after: str | None = None
    content_type: str = ""
    body: str = ""
    error: str = ""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def problem_json(self) -> bool:
        return self.content_type.startswith("application/problem+json")


async def send(
    client: httpx.AsyncClient, label: str, method: str, path: str, **kwargs: Any
) -> Outcome:
    """One request; a transport error or client timeout becomes an Outcome with no status."""
    started = time.monotonic()
    try:
        response = await client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        return Outcome(label, started, time.monotonic() - started, None, error=type(exc).__name__)
    return Outcome(
        label,
        started,
        time.monotonic() - started,
        response.status_code,
        response.headers.get("retry-after"),
        response.headers.get("content-type", ""),
        response.text,
        headers=dict(response.headers),
    )


async def run_until(
    stop: asyncio.Event,
    workers: int,
    one_request: Callable[[int, int], Awaitable[Outcome]],
    max_requests_per_worker: int,
    pause: float = 0.0,
) -> list[Outcome]:
    """`workers` loops, each sending one request after another until `stop` or its cap."""
    outcomes: list[Outcome] = []

    async def worker(number: int) -> None:
        for sequence in range(max_requests_per_worker):
            if stop.is_set():
                return
            outcomes.append(await one_request(number, sequence))
            if pause:
                await asyncio.sleep(pause)

    await asyncio.gather(*(worker(n) for n in range(workers)))
    return outcomes


# How long a load runs at most before the service is killed, if the wanted answers are late.
KILL_AFTER_SECONDS = 5.0


async def kill_during_load(
    env: dict[str, str],
    tmp_path: Path,
    workers: int,
    one_request: Callable[[httpx.AsyncClient], Awaitable[Outcome]],
    enough: Callable[[], bool],
) -> list[Outcome]:
    """Start the service, send `one_request` from `workers` loops, and SIGKILL the service once
    `enough()` holds after an answer (or after KILL_AFTER_SECONDS); the outcomes of all."""
    enough_now = asyncio.Event()
    with run_service(env, tmp_path) as service:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:

            async def request(worker: int, sequence: int) -> Outcome:
                outcome = await one_request(client)
                if enough():
                    enough_now.set()
                return outcome

            stop = asyncio.Event()
            load = asyncio.create_task(run_until(stop, workers, request, 100))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(enough_now.wait(), KILL_AFTER_SECONDS)
            # No await between the kill and `stop`: no request starts after the kill.
            os.kill(service.process.pid, signal.SIGKILL)
            stop.set()
            outcomes = await load
            service.process.wait(timeout=10)
    assert service.process.returncode == -signal.SIGKILL
    return outcomes


async def backends_gone(database: URL) -> None:
    """Wait (15 s at most) until PostgreSQL has ended every session the killed service left."""
    connection = await asyncpg.connect(asyncpg_dsn(database))
    try:
        for _ in range(150):
            if not await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'playing-with-neon-service'"
            ):
                return
            await asyncio.sleep(0.1)
    finally:
        await connection.close()
    raise AssertionError("the killed service's sessions never ended")


@contextlib.contextmanager
def primary_with_replica() -> Iterator[tuple[ControlledPostgres, ControlledPostgres]]:
    """A primary of its own and a streaming replica of it, both destroyed afterwards."""
    primary = ControlledPostgres.create()
    try:
        replica = primary.create_replica()
        try:
            yield primary, replica
        finally:
            replica.destroy()
    finally:
        primary.destroy()
