"""Settings: read once from the environment and a `.env` file, validated, immutable.

Precedence: a real environment variable wins over the same key in `.env`; keys are matched
case-insensitively (the seed's `db_host` and `DB_HOST` are the same key); an empty value counts
as unset. A bad value raises `SettingsError`, whose message names the key and never the password.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
CHANNEL_BINDINGS = ("disable", "prefer", "require")
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ACCESS_LOG_MODES = ("all", "errors", "off")
POSTGRES_DRIVERNAMES = (
    "postgres",
    "postgresql",
    "postgresql+asyncpg",
    "postgresql+psycopg",
    "postgresql+psycopg2",
    "postgresql+pg8000",
)
# Query keys libpq users paste that we translate ourselves, and the ones asyncpg takes as they are.
TRANSLATED_QUERY_KEYS = ("sslmode", "sslrootcert", "channel_binding", "application_name")
PASSTHROUGH_QUERY_KEYS = ("host", "port")
Getter = Callable[[str], "str | None"]
SEED_KEYS = ("DB_USERNAME", "DB_PASSWORD", "DB_HOST", "DB_NAME", "DB_PORT", "DB_SSLMODE")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the service reads from its environment."""

    # Where PostgreSQL is; None means "start the embedded development database".
    database_url: URL | None = None
    # libpq's sslmode, translated for asyncpg when the engine is built (None: asyncpg's default).
    db_sslmode: str | None = None
    # CA bundle for verify-ca / verify-full; "system" means the operating system's store.
    db_sslrootcert: str | None = None
    # Neon adds channel_binding=require; asyncpg cannot bind channels, so it is reported, not used.
    db_channel_binding: str | None = None
    # Sent to the server so the connection shows up by name in pg_stat_activity.
    db_application_name: str = "playing-with-neon-service"
    # Connections kept open per process.
    db_pool_size: int = 10
    # Extra connections allowed above db_pool_size under bursts. 0 by default: the pool closes
    # overflow connections as soon as its idle slots are full, which under steady load means a
    # connect and a disconnect every few requests (seen in the profile); a bigger pool is cheaper.
    db_max_overflow: int = 0
    # Seconds a request waits for a free connection (and for a new one to connect) before a 503.
    db_pool_timeout: float = 5.0
    # Seconds after which a pooled connection is replaced (managed poolers close idle ones).
    db_pool_recycle: int = 1800
    # Seconds a pooled connection may sit unused before it is replaced rather than used: below
    # the idle limit of the server or pooler (Neon drops idle connections after 5 minutes).
    db_pool_idle_timeout: float = 240.0
    # Server-side limit for one statement in milliseconds; 0 disables it.
    db_statement_timeout_ms: int = 5000
    # True behind a transaction-mode pooler (PgBouncer, Neon's -pooler hosts): no statement reuse.
    db_pgbouncer: bool = False
    # Bearer tokens accepted for writes.
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    # Writes open to anyone; must be asked for explicitly.
    auth_disabled: bool = False
    # Most rows one POST or PATCH may carry.
    max_batch: int = 1000
    # Largest request body accepted, in bytes; larger ones get 413.
    max_body_bytes: int = 1024 * 1024
    # Seconds an Idempotency-Key's stored answer is replayed; expired ones are deleted.
    idempotency_ttl_seconds: int = 86400
    # Address and port uvicorn binds to.
    host: str = "127.0.0.1"
    port: int = 8000
    # Seconds between SIGTERM and the start of the drain, while /readyz already answers 503.
    shutdown_delay_seconds: float = 2.0
    # uvicorn worker processes.
    workers: int = 1
    log_level: str = "INFO"
    # "json": one JSON object per line, for log collectors; "console": plain text for people.
    log_format: str = "json"
    # One access line per request ("all"), only for answers >= 400 ("errors"), or none ("off").
    access_log: str = "all"
    # Requests to /items in progress at once per process; the excess is answered 503 at once.
    # 0 means 8 per pooled connection (DB_POOL_SIZE + DB_MAX_OVERFLOW).
    max_in_flight: int = 0
    # Data folder of the embedded development database.
    embedded_db_dir: Path = Path(".data/postgres")

    @property
    def in_flight_limit(self) -> int:
        """MAX_IN_FLIGHT, or its default derived from the pool."""
        return self.max_in_flight or 8 * (self.db_pool_size + self.db_max_overflow)

    @property
    def uses_embedded_database(self) -> bool:
        """True when no database is configured and the embedded one will be started."""
        return self.database_url is None


def read_environment(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
) -> dict[str, str]:
    """Merge `.env` (underneath) with `environ` (default: os.environ); keys upper-cased."""
    merged: dict[str, str] = {}
    sources: list[Mapping[str, str | None]] = []
    if env_file is not None and Path(env_file).is_file():
        sources.append(dotenv_values(env_file))
    sources.append(os.environ if environ is None else environ)
    for source in sources:
        for key, value in source.items():
            merged[key.upper()] = value if value is not None else ""
    return merged


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
) -> Settings:
    """Build validated settings from `environ` (default: the process environment) over `.env`."""
    env = read_environment(environ, env_file)

    def get(key: str) -> str | None:
        value = env.get(key, "").strip()
        return value or None

    database = _database_settings(get)
    api_tokens = tuple(t.strip() for t in (get("API_TOKENS") or "").split(",") if t.strip())
    for token in api_tokens:
        if len(token) < 16:
            raise SettingsError("API_TOKENS", "every token must be at least 16 characters long")
    auth_disabled = _bool(get, "AUTH_DISABLED", False)
    settings = Settings(
        **database,  # type: ignore[arg-type]
        db_pool_size=_int(get, "DB_POOL_SIZE", 10, minimum=1),
        db_max_overflow=_int(get, "DB_MAX_OVERFLOW", 0, minimum=0),
        db_pool_timeout=_float(get, "DB_POOL_TIMEOUT", 5.0, minimum=0.1),
        db_pool_recycle=_int(get, "DB_POOL_RECYCLE", 1800, minimum=1),
        db_pool_idle_timeout=_float(get, "DB_POOL_IDLE_TIMEOUT", 240.0, minimum=1.0),
        db_statement_timeout_ms=_int(get, "DB_STATEMENT_TIMEOUT_MS", 5000, minimum=0),
        db_pgbouncer=_bool(get, "DB_PGBOUNCER", False),
        api_tokens=api_tokens,
        auth_disabled=auth_disabled,
        max_batch=_int(get, "MAX_BATCH", 1000, minimum=1, maximum=100_000),
        max_body_bytes=_int(get, "MAX_BODY_BYTES", 1024 * 1024, minimum=1024),
        idempotency_ttl_seconds=_int(
            get, "IDEMPOTENCY_TTL_SECONDS", 86400, minimum=1, maximum=10**9
        ),
        host=get("HOST") or "127.0.0.1",
        port=_int(get, "PORT", 8000, minimum=1, maximum=65535),
        shutdown_delay_seconds=_float(get, "SHUTDOWN_DELAY_SECONDS", 2.0, minimum=0.0),
        workers=_int(get, "WORKERS", 1, minimum=1, maximum=64),
        log_level=_choice(get, "LOG_LEVEL", "INFO", LOG_LEVELS, upper=True),
        log_format=_choice(get, "LOG_FORMAT", "json", LOG_FORMATS, upper=False),
        access_log=_choice(get, "ACCESS_LOG", "all", ACCESS_LOG_MODES, upper=False),
        max_in_flight=_int(get, "MAX_IN_FLIGHT", 0, minimum=0, maximum=1_000_000),
        embedded_db_dir=Path(get("EMBEDDED_DB_DIR") or ".data/postgres"),
    )
    return settings


def check_writes_are_protected(settings: Settings) -> None:
    """Refuse to serve a configured database with open writes unless that was asked for.

    Only serving needs this: `migrate` and `seed` accept no requests.
    """
    open_writes = not settings.api_tokens and not settings.auth_disabled
    if open_writes and not settings.uses_embedded_database:
        raise SettingsError(
            "API_TOKENS",
            "is empty, so writes would be open to anyone; set API_TOKENS "
            "(comma-separated bearer tokens) or AUTH_DISABLED=true explicitly",
        )


def normalise_database_url(raw: str) -> dict[str, object]:
    """Turn any URL people paste (postgres://, postgresql://…?sslmode=require) into asyncpg form.

    Returns the Settings fields it determines; libpq-only query keys are lifted out of the URL
    because SQLAlchemy hands every query key to `asyncpg.connect`, which rejects them.
    """
    try:
        url = make_url(raw)
    except ArgumentError:
        raise SettingsError(
            "DATABASE_URL", "is not a URL of the form postgresql://user:password@host/dbname"
        ) from None
    if url.drivername not in POSTGRES_DRIVERNAMES:
        raise SettingsError(
            "DATABASE_URL", f"must be a PostgreSQL URL (postgresql://…), not {url.drivername}://"
        )
    if not url.database:
        raise SettingsError("DATABASE_URL", "names no database (…/dbname)")
    query = dict(url.query)
    unknown = sorted(set(query) - set(TRANSLATED_QUERY_KEYS) - set(PASSTHROUGH_QUERY_KEYS))
    if unknown:
        accepted = ", ".join(TRANSLATED_QUERY_KEYS + PASSTHROUGH_QUERY_KEYS)
        raise SettingsError(
            "DATABASE_URL", f"unsupported query parameter {unknown[0]!r} (accepted: {accepted})"
        )
    fields: dict[str, object] = {}
    sslmode = _single(query.get("sslmode"))
    if sslmode is not None:
        fields["db_sslmode"] = _check_choice("DATABASE_URL sslmode", sslmode, SSL_MODES)
    sslrootcert = _single(query.get("sslrootcert"))
    if sslrootcert is not None:
        fields["db_sslrootcert"] = sslrootcert
    binding = _single(query.get("channel_binding"))
    if binding is not None:
        choice = _check_choice("DATABASE_URL channel_binding", binding, CHANNEL_BINDINGS)
        fields["db_channel_binding"] = choice
    name = _single(query.get("application_name"))
    if name is not None:
        fields["db_application_name"] = name
    kept = {k: v for k, v in query.items() if k in PASSTHROUGH_QUERY_KEYS}
    fields["database_url"] = url.set(drivername="postgresql+asyncpg", query=kept)
    return fields


def describe_database(url: URL) -> str:
    """Host, port and database name for logs: never the user's password."""
    host = url.host or str(url.query.get("host", "local socket"))
    port = f":{url.port}" if url.port else ""
    return f"{host}{port}/{url.database}"


def _database_settings(get: Getter) -> dict[str, object]:
    raw_url = get("DATABASE_URL")
    seed_host = get("DB_HOST")
    if raw_url and seed_host:
        raise SettingsError(
            "DATABASE_URL", "set either DATABASE_URL or db_host/db_name/…, not both"
        )
    if raw_url:
        return normalise_database_url(raw_url)
    if seed_host is None:
        stray = [k.lower() for k in SEED_KEYS if get(k) is not None]
        if stray:
            raise SettingsError("db_host", f"is required when {stray[0]} is set")
        return {}
    for key in ("DB_USERNAME", "DB_NAME"):
        if get(key) is None:
            raise SettingsError(key.lower(), "is required when db_host is set")
    url = URL.create(
        "postgresql+asyncpg",
        username=get("DB_USERNAME"),
        password=get("DB_PASSWORD"),
        host=seed_host,
        port=_int(get, "DB_PORT", 5432, minimum=1, maximum=65535),
        database=get("DB_NAME"),
    )
    fields: dict[str, object] = {"database_url": url}
    sslmode = get("DB_SSLMODE")
    if sslmode is not None:
        fields["db_sslmode"] = _check_choice("db_sslmode", sslmode, SSL_MODES)
    return fields


def _single(value: str | tuple[str, ...] | None) -> str | None:
    if isinstance(value, tuple):
        return value[-1] if value else None
    return value


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SettingsError(key, f"must be one of {', '.join(choices)}; got {value!r}")
    return value


def _choice(get: Getter, key: str, default: str, choices: tuple[str, ...], upper: bool) -> str:
    value = get(key)
    if value is None:
        return default
    return _check_choice(key, value.upper() if upper else value, choices)


def _int(get: Getter, key: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    value = get(key)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise SettingsError(key, f"must be a whole number; got {value!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise SettingsError(key, f"must be {bound}; got {number}")
    return number


def _float(get: Getter, key: str, default: float, *, minimum: float) -> float:
    value = get(key)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(key, f"must be a number of seconds; got {value!r}") from None
    if not number >= minimum or number == float("inf"):
        raise SettingsError(key, f"must be a finite number >= {minimum}; got {value!r}")
    return number


def _bool(get: Getter, key: str, default: bool) -> bool:
    value = get(key)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(key, f"must be true or false; got {value!r}")
