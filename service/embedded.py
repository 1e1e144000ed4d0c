"""The embedded development database: a real PostgreSQL (pgserver) in a folder of the project."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url

log = logging.getLogger("service.embedded")


class EmbeddedDatabase:
    """A running pgserver instance; it stops when the last process using it exits."""

    def __init__(self, server: Any, url: URL, created: bool) -> None:
        self.server = server
        self.url = url
        # True when this start initialised the data folder, so demo rows belong in it.
        self.created = created


def start_embedded_database(data_dir: Path) -> EmbeddedDatabase:
    """Start (initialising on first use) PostgreSQL in `data_dir`, listening on a unix socket."""
    data_dir = data_dir.resolve()
    created = not (data_dir / "PG_VERSION").exists()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # pgserver keeps a lock file in the runtime dir and warns (at import) when
        # XDG_RUNTIME_DIR is unset; /tmp, its fallback, serves as well.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        try:
            from pgserver.postgres_server import get_server
        except ImportError:
            raise RuntimeError(
                "no database is configured and the embedded one is not installed: set "
                "DATABASE_URL, or install the 'embedded' extra (make run does)"
            ) from None
        server = get_server(data_dir, cleanup_mode="stop")
    # get_uri() is postgresql://postgres:@/postgres?host=<socket dir>; no password is involved.
    url = make_url(server.get_uri()).set(drivername="postgresql+asyncpg", password=None)
    log.info("embedded PostgreSQL %s in %s", "created" if created else "started", data_dir)
    return EmbeddedDatabase(server, url, created)


class EmbeddedReplica:
    """A streaming replica of the embedded database, in a folder beside it; `stop()` ends it."""

    def __init__(self, data_dir: Path, url: URL, run_as: str | None) -> None:
        self.data_dir = data_dir
        self.url = url
        self.run_as = run_as

    def stop(self) -> None:
        """Stop the replica's server (fast shutdown), if it still runs."""
        if (self.data_dir / "postmaster.pid").exists():
            _pg_ctl(self.data_dir, self.run_as, "-m", "fast", "-w", "stop")


def start_embedded_replica(primary: EmbeddedDatabase, data_dir: Path) -> EmbeddedReplica:
    """A fresh streaming replica of `primary` in `data_dir` (pg_basebackup -R), started.

    It is copied anew at every start, so it never holds anything the primary does not; it
    listens on a unix socket in its own folder, like the primary.
    """
    from pgserver._commands import POSTGRES_BIN_PATH

    data_dir = data_dir.resolve()
    run_as: str | None = primary.server.system_user
    if (data_dir / "postmaster.pid").exists():
        _pg_ctl(data_dir, run_as, "-m", "immediate", "-w", "stop", check=False)
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(mode=0o700, parents=True)
    if run_as is not None:
        shutil.chown(data_dir, run_as, run_as)
    socket_dir = str(primary.url.query["host"])
    _run(
        [
            str(POSTGRES_BIN_PATH / "pg_basebackup"),
            *("-h", socket_dir, "-U", "postgres", "-D", str(data_dir)),
            *("-R", "--checkpoint=fast"),
        ],
        run_as,
    )
    # The primary's socket lives in its data folder, so the copy holds its lock file: a stale
    # lock that would stop the replica from opening its own socket there.
    for lock in data_dir.glob(".s.PGSQL.*"):
        lock.unlink()
    options = f"-h '' -k {data_dir}"
    log_file = str(data_dir / "replica.log")
    _pg_ctl(data_dir, run_as, "-o", options, "-l", log_file, "-w", "-t", "60", "start")
    url = URL.create("postgresql+asyncpg", username="postgres", database="postgres").set(
        query={"host": str(data_dir)}
    )
    log.info("embedded streaming replica started in %s", data_dir)
    return EmbeddedReplica(data_dir, url, run_as)


def _pg_ctl(data_dir: Path, run_as: str | None, *args: str, check: bool = True) -> None:
    from pgserver._commands import POSTGRES_BIN_PATH

    _run([str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(data_dir), *args], run_as, check)


def _run(command: list[str], run_as: str | None, check: bool = True) -> None:
    # Output to a file, not a pipe: a server that pg_ctl starts would inherit and hold the pipe.
    with tempfile.TemporaryFile() as output:
        result = subprocess.run(  # noqa: S603 (our own arguments, no shell)
            command,
            user=run_as,
            cwd=tempfile.gettempdir(),  # somewhere the system user may be
            stdout=output,
            stderr=subprocess.STDOUT,
            check=False,
            timeout=120,
        )
        if check and result.returncode != 0:
            output.seek(0)
            text = output.read().decode(errors="replace").strip()
            raise RuntimeError(f"{Path(command[0]).name} failed: {text}")
