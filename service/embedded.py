"""The embedded development database: a real PostgreSQL (pgserver) in a folder of the project."""

from __future__ import annotations

import logging
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
