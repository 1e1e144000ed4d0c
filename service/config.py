"""Settings: read once from the environment and a `.env` file, validated, immutable.

Precedence: a real environment variable wins over the same key in `.env`; keys are matched
case-insensitively (the notebook's `db_host` and `DB_HOST` are the same key); an empty value counts
as unset. Each setting's type, bounds and default are written once, in `Settings`, and checked by
`msgspec.convert`; a bad value raises `SettingsError`, one line naming the key, never the password.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_type_hints

import msgspec
from dotenv import dotenv_values
from msgspec import Meta
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

T = TypeVar("T")
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
ChannelBinding = Literal["disable", "prefer", "require"]
PoolerMode = Literal["none", "transaction", "transaction-unprepared"]
Seconds = Annotated[float, Meta(le=86_400)]  # a bound that also rules out "inf"
# libpq's words for a boolean, beyond msgspec's true/false/1/0.
BOOLEAN_WORDS = {"yes": "true", "on": "true", "no": "false", "off": "false"}
# The API_TOKENS values the examples show (.env.example, k8s/overlays/*/secret.env.example): a
# file copied and not edited must not serve writes to whoever has read this repository.
PLACEHOLDER_TOKENS = frozenset(
    {"replace-me-with-a-long-random-token", "replace-with-a-long-random-token"}
)
# Estimated bits a token must carry (token_bits): 2**64 guesses are out of reach over HTTP.
MIN_TOKEN_BITS = 64
RANDOM_RECIPE = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
# How much longer than the server's statement_timeout the client waits for an answer, and a
# request may hold a pooled connection (service.db's lease deadline).
CLIENT_TIMEOUT_MARGIN_SECONDS = 1.0
# MAX_IN_FLIGHT's default per pooled connection: far above the queue that admission keeps, so
# that only a flood faster than an admission interval meets it.
IN_FLIGHT_PER_CONNECTION = 32


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What the service reads from its environment: the key is the field's name in capitals."""

    # Where PostgreSQL is (None: the embedded one); with the next four, from DATABASE_URL or db_*.
    database_url: URL | None = None
    # libpq's sslmode, translated for asyncpg when the engine is built (None: asyncpg's default).
    db_sslmode: SslMode | None = None
    # CA bundle for verify-ca / verify-full; "system" means the operating system's store.
    db_sslrootcert: str | None = None
    # Neon adds channel_binding=require; asyncpg cannot bind channels, so it is reported, not used.
    db_channel_binding: ChannelBinding | None = None
    # Sent to the server so the connection shows up by name in pg_stat_activity.
    db_application_name: str = "playing-with-neon-service"
    # Connections kept open per process.
    db_pool_size: Annotated[int, Meta(ge=1)] = 10
    # Extra connections under bursts, each closed after its request: raise db_pool_size instead.
    db_max_overflow: Annotated[int, Meta(ge=0)] = 0
    # Seconds a request waits for a free connection (and for a new one to connect) before a 503.
    db_pool_timeout: Annotated[Seconds, Meta(ge=0.1)] = 5.0
    # Seconds after which a pooled connection is replaced (managed poolers close idle ones).
    db_pool_recycle: Annotated[int, Meta(ge=1)] = 1800
    # Seconds unused after which a pooled connection is replaced: below Neon's 5-minute idle drop.
    db_pool_idle_timeout: Annotated[Seconds, Meta(ge=1.0)] = 240.0
    # Server-side limit for one statement in milliseconds; 0 disables it.
    db_statement_timeout_ms: Annotated[int, Meta(ge=0)] = 5000
    # What sits between the service and PostgreSQL: "none" (a direct connection);
    # "transaction", a transaction-mode pooler that keeps prepared statements (PgBouncer >= 1.21
    # with max_prepared_statements > 0, Neon's -pooler hosts); "transaction-unprepared", one
    # that does not (PgBouncer < 1.21, pgcat or odyssey without it): no statement reuse.
    db_pooler: PoolerMode = "none"
    # The old name of DB_POOLER=transaction-unprepared, still accepted.
    db_pgbouncer: bool = False
    # Milliseconds a session of ours may sit idle inside a transaction before the server ends it
    # (and its locks): a frozen or cut-off pod cannot hold a key or a row for ever; 0 disables.
    db_idle_in_transaction_timeout_ms: Annotated[int, Meta(ge=0)] = 5000
    # The server's TCP keepalives on our connections (seconds idle, seconds between probes,
    # probes lost): a peer gone silent is found dead after idle + interval x count; 0: the OS's.
    db_tcp_keepalives_idle: Annotated[int, Meta(ge=0, le=86_400)] = 30
    db_tcp_keepalives_interval: Annotated[int, Meta(ge=0, le=3600)] = 10
    db_tcp_keepalives_count: Annotated[int, Meta(ge=0, le=100)] = 3
    # A read replica for GET /items (None: every read on the primary); with the next four, from
    # DATABASE_READ_URL or db_read_host, normalised as DATABASE_URL is.
    database_read_url: URL | None = None
    db_read_sslmode: SslMode | None = None
    db_read_sslrootcert: str | None = None
    db_read_channel_binding: ChannelBinding | None = None
    db_read_application_name: str | None = None
    # Connections kept open per process to the read replica (its overflow: DB_MAX_OVERFLOW).
    db_read_pool_size: Annotated[int, Meta(ge=1)] = 10
    # Milliseconds a read with a Consistency-Token waits for the replica before the primary.
    read_consistency_wait_ms: Annotated[int, Meta(ge=0, le=60_000)] = 200
    # Replay lag in milliseconds beyond which reads go to the primary until the replica catches up.
    read_max_lag_ms: Annotated[int, Meta(ge=0)] = 5000
    # Bearer tokens accepted for writes (comma-separated in API_TOKENS); load_settings refuses
    # the examples' placeholder and guessable ones (token_bits).
    api_tokens: tuple[Annotated[str, Meta(min_length=16)], ...] = field(default=(), repr=False)
    # Writes open to anyone; must be asked for explicitly.
    auth_disabled: bool = False
    # Most rows one POST or PATCH may carry.
    max_batch: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    # Largest request body accepted, in bytes; larger ones get 413.
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 1024 * 1024
    # Seconds an Idempotency-Key's stored answer is replayed; expired ones are deleted.
    idempotency_ttl_seconds: Annotated[int, Meta(ge=1, le=10**9)] = 86400
    # Address and port uvicorn binds to.
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 8000
    # Seconds between SIGTERM and the start of the drain, while /readyz already answers 503.
    shutdown_delay_seconds: Annotated[Seconds, Meta(ge=0.0)] = 2.0
    # uvicorn worker processes.
    workers: Annotated[int, Meta(ge=1, le=64)] = 1
    # Accepted in any case.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "json": one JSON object per line, for log collectors; "console": plain text for people.
    log_format: Literal["json", "console"] = "json"
    # One access line per request ("all"), only for answers >= 400 ("errors"), or none ("off").
    access_log: Literal["all", "errors", "off"] = "all"
    # Spans over OTLP/HTTP (service.tracing), configured by the OpenTelemetry SDK's own OTEL_*
    # variables: not a key of its own, but what `tracing_configured` finds in the environment.
    tracing: bool = False
    # A Server-Timing header (database and total milliseconds) on the /items answers.
    server_timing: bool = False
    # Milliseconds of queue delay for a database connection that admission keeps a standing
    # queue to: the excess is refused with 503 once no request got a connection within it for
    # ADMISSION_INTERVAL_MS (service.admission); 0 turns this shedding off.
    admission_target_ms: Annotated[int, Meta(ge=0, le=60_000)] = 10
    # Milliseconds the queue delay must stay above the target before requests are refused:
    # bursts that drain within it are absorbed. At least ADMISSION_TARGET_MS.
    admission_interval_ms: Annotated[int, Meta(ge=1, le=60_000)] = 100
    # Milliseconds a refused request is held before its 503 is sent, so a client that sends
    # again at once is refused at most this often per connection, not in a busy loop. (1.5 s:
    # at 1 s, 1,024 such clients took a sixth of the core from the answers, at 1.5 s a tenth;
    # the longest hold, 1.725 s, stays below a 2 s client timeout.)
    admission_refusal_delay_ms: Annotated[int, Meta(ge=0, le=10_000)] = 1500
    # Admitted requests to /items in progress at once per process, the excess refused whatever
    # the queue delay (the last resort against a flood); 0: see in_flight_limit.
    max_in_flight: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    # Data folder of the embedded development database.
    embedded_db_dir: Path = Path(".data/postgres")

    @property
    def in_flight_limit(self) -> int:
        """MAX_IN_FLIGHT, or its default derived from the pool."""
        return self.max_in_flight or IN_FLIGHT_PER_CONNECTION * (
            self.db_pool_size + self.db_max_overflow
        )

    @property
    def pooler(self) -> PoolerMode:
        """DB_POOLER, with DB_PGBOUNCER=true read as its old name for transaction-unprepared."""
        return "transaction-unprepared" if self.db_pgbouncer else self.db_pooler

    @property
    def behind_pooler(self) -> bool:
        """A transaction-mode pooler is in between: it refuses startup parameters such as
        statement_timeout, so the client enforces the statement timeout."""
        return self.pooler != "none"

    @property
    def prepares_per_transaction(self) -> bool:
        """The pooler cannot carry a prepared statement from one transaction to the next: every
        statement is prepared afresh and run inside a transaction of its own."""
        return self.pooler == "transaction-unprepared"

    @property
    def uses_embedded_database(self) -> bool:
        """True when no database is configured and the embedded one will be started."""
        return self.database_url is None


@dataclass(frozen=True, kw_only=True)
class NotebookKeys:
    """The notebook's keys for the database, instead of DATABASE_URL: the key is the name."""

    db_host: str | None = None
    db_username: str | None = None
    db_password: str | None = field(default=None, repr=False)  # as-is, not percent-encoded
    db_name: str | None = None
    db_port: Annotated[int, Meta(ge=1, le=65535)] = 5432
    db_sslmode: SslMode | None = None
    # The read replica's host; the other keys as for the primary.
    db_read_host: str | None = None


class UrlQuery(msgspec.Struct):
    """DATABASE_URL's libpq query keys, which asyncpg rejects: each becomes Settings' db_<key>."""

    sslmode: SslMode | None = None
    sslrootcert: str | None = None
    channel_binding: ChannelBinding | None = None
    application_name: str | None = None


# Query keys asyncpg takes as they are, so they stay in the URL.
PASSTHROUGH_QUERY_KEYS = ("host", "port")
URL_FIELDS = {
    *("database_url", "database_read_url"),
    *(f"db_{key}" for key in UrlQuery.__struct_fields__),
    *(f"db_read_{key}" for key in UrlQuery.__struct_fields__),
}
ENVIRONMENT_FIELDS = {f.name for f in fields(Settings)} - URL_FIELDS - {"tracing"}
NOTEBOOK_KEYS = {f.name for f in fields(NotebookKeys)}


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
) -> Settings:
    """Build validated settings from `environ` (default: the process environment) over `.env`."""
    sources: list[Mapping[str, str | None]] = [os.environ if environ is None else environ]
    if env_file is not None and Path(env_file).is_file():
        sources.insert(0, dotenv_values(env_file))
    merged = {key.lower(): (value or "").strip() for src in sources for key, value in src.items()}
    env = {key: value for key, value in merged.items() if value}
    values: dict[str, Any] = {k: v for k, v in env.items() if k in ENVIRONMENT_FIELDS}
    values["api_tokens"] = [t.strip() for t in values.get("api_tokens", "").split(",") if t.strip()]
    if "log_level" in values:
        values["log_level"] = values["log_level"].upper()
    for name in ("auth_disabled", "db_pgbouncer", "server_timing"):
        if name in values:
            values[name] = BOOLEAN_WORDS.get(values[name].lower(), values[name])
    if values.get("db_pgbouncer") == "true" and values.get("db_pooler", "none") not in (
        "none",
        "transaction-unprepared",
    ):
        raise SettingsError(
            "DB_PGBOUNCER",
            f"true is the old name of DB_POOLER=transaction-unprepared, which contradicts "
            f"DB_POOLER={values['db_pooler']}: remove DB_PGBOUNCER",
        )
    values.update(_database_fields(env))
    values.update(_read_database_fields(env))
    values["tracing"] = tracing_configured(os.environ if environ is None else environ)
    settings = _convert(values, Settings, str.upper)
    _check_tokens(settings.api_tokens)
    _check_consistency_wait(settings)
    _check_admission(settings)
    return settings


def tracing_configured(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces, in the OpenTelemetry SDK's own terms: an OTLP
    endpoint (OTEL_EXPORTER_OTLP_ENDPOINT or its _TRACES_ form) or OTEL_TRACES_EXPORTER=otlp;
    OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none keeps it off.

    Only the process environment counts, not `.env`: the SDK reads its settings from there.
    """

    def get(key: str) -> str:
        return (environ.get(key) or "").strip()

    if get("OTEL_SDK_DISABLED").lower() == "true":
        return False
    exporters = {name.strip().lower() for name in get("OTEL_TRACES_EXPORTER").split(",")} - {""}
    if exporters - {"otlp", "none"}:
        raise SettingsError(
            "OTEL_TRACES_EXPORTER", "must be otlp or none: the one exporter installed is OTLP"
        )
    wanted = (
        "otlp" in exporters
        if exporters
        else bool(get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    )
    # The traces' own protocol wins over the general one, as in the SDK.
    key = next(
        (
            k
            for k in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
            if get(k)
        ),
        None,
    )
    if wanted and key is not None and get(key) != "http/protobuf":
        raise SettingsError(key, "must be http/protobuf: the exporter installed is OTLP over HTTP")
    return wanted


def token_bits(token: str) -> float:
    """A token's entropy in bits, estimated as its length times that of its own characters.

    Repeats and small alphabets score low (aaaa…: 0, passwordpassword: 44, 1234567890123456: 52);
    a random token scores somewhat below its real entropy (token_hex(16), 128 bits: about 116;
    token_urlsafe(16), 128 bits: about 92, never below 64 in 300 000 draws; token_urlsafe(32):
    about 208). Words a person picks can score well, which is why the error says how to make one.
    """
    counts = Counter(token).values()
    return -sum(n * math.log2(n / len(token)) for n in counts)


def _check_consistency_wait(settings: Settings) -> None:
    """Refuse a consistency wait that the lease deadline would cut short.

    A read with a Consistency-Token holds its replica connection while it waits, and a lease
    past the deadline has its connection aborted: the read would fail over and the healthy
    replica be taken for broken.
    """
    timeout_ms = settings.db_statement_timeout_ms
    deadline_ms = timeout_ms + CLIENT_TIMEOUT_MARGIN_SECONDS * 1000
    if timeout_ms and settings.read_consistency_wait_ms >= deadline_ms:
        raise SettingsError(
            "READ_CONSISTENCY_WAIT_MS",
            f"{settings.read_consistency_wait_ms} must be below DB_STATEMENT_TIMEOUT_MS + "
            f"{CLIENT_TIMEOUT_MARGIN_SECONDS * 1000:.0f} ({deadline_ms:.0f}), the longest a read "
            "may hold a connection; lower it or raise DB_STATEMENT_TIMEOUT_MS",
        )


def _check_admission(settings: Settings) -> None:
    """Refuse an admission target that could never act: one at or beyond the pool's own timeout
    (a request is answered 503 by the pool first), or longer than the interval it must hold."""
    target_ms = settings.admission_target_ms
    if target_ms >= settings.db_pool_timeout * 1000:
        raise SettingsError(
            "ADMISSION_TARGET_MS",
            f"{target_ms} must be below DB_POOL_TIMEOUT ({settings.db_pool_timeout:g} s), the "
            "longest a request waits for a connection anyway; lower it",
        )
    if target_ms > settings.admission_interval_ms:
        raise SettingsError(
            "ADMISSION_TARGET_MS",
            f"{target_ms} must be at most ADMISSION_INTERVAL_MS "
            f"({settings.admission_interval_ms}): the queue delay must stay above the target "
            "for an interval before requests are refused; raise the interval too",
        )


def check_writes_are_protected(settings: Settings) -> None:
    """Refuse to serve a configured database with open writes unless that was asked for.

    Only serving needs this: `migrate` and `seed` accept no requests.
    """
    if not settings.api_tokens and not settings.auth_disabled and settings.database_url is not None:
        raise SettingsError(
            "API_TOKENS",
            "is empty, so writes would be open to anyone; set API_TOKENS "
            "(comma-separated bearer tokens) or AUTH_DISABLED=true explicitly",
        )


def _check_tokens(tokens: tuple[str, ...]) -> None:
    """Refuse the examples' placeholder and tokens easy to guess; the token is never shown."""
    for entry, token in enumerate(tokens, start=1):
        if token in PLACEHOLDER_TOKENS:
            problem = "is the examples' placeholder, known to anyone who has read them"
        elif (bits := token_bits(token)) < MIN_TOKEN_BITS:
            problem = f"is too easy to guess (about {bits:.0f} bits, {MIN_TOKEN_BITS} needed)"
        else:
            continue
        raise SettingsError("API_TOKENS", f"entry {entry} {problem}; make one with {RANDOM_RECIPE}")


def read_replica_settings(settings: Settings) -> Settings | None:
    """The settings of the read replica's connections, or None when no replica is configured.

    The same settings with the replica's URL, TLS and pool size, so its engine is built as the
    primary's is.
    """
    if settings.database_read_url is None:
        return None
    return replace(
        settings,
        database_url=settings.database_read_url,
        db_sslmode=settings.db_read_sslmode,
        db_sslrootcert=settings.db_read_sslrootcert,
        db_channel_binding=settings.db_read_channel_binding,
        db_application_name=settings.db_read_application_name or settings.db_application_name,
        db_pool_size=settings.db_read_pool_size,
        database_read_url=None,
    )


def normalise_database_url(raw: str, key: str = "DATABASE_URL") -> dict[str, object]:
    """Turn any URL people paste (postgres://, postgresql://…?sslmode=require) into asyncpg form.

    Returns the Settings fields it determines; libpq-only query keys are lifted out of the URL
    because SQLAlchemy hands every query key to `asyncpg.connect`, which rejects them.
    """
    try:
        url = make_url(raw)
    except ArgumentError:
        url = None
    except ValueError:  # SQLAlchemy's own int() of the port
        raise SettingsError(key, "has a port that is not a number (host:5432)") from None
    if url is not None and url.port is not None and not 1 <= url.port <= 65535:
        raise SettingsError(key, f"has port {url.port}, outside 1..65535")
    if url is None or url.get_backend_name() not in ("postgres", "postgresql"):
        problem = f"not {url.drivername}://" if url else "not a URL"
        raise SettingsError(key, f"must be postgresql://user:password@host/db, {problem}")
    if not url.database:
        raise SettingsError(key, "names no database (…/dbname)")
    accepted = (*UrlQuery.__struct_fields__, *PASSTHROUGH_QUERY_KEYS)
    if unknown := sorted(set(url.query) - set(accepted)):
        problem = f"unsupported query parameter {unknown[0]!r} (accepted: {', '.join(accepted)})"
        raise SettingsError(key, problem)
    kept = {key: value for key, value in url.query.items() if key in PASSTHROUGH_QUERY_KEYS}
    # A repeated key counts once, with its last value, as in libpq.
    lifted = {
        k: v[-1] if isinstance(v, tuple) else v for k, v in url.query.items() if k not in kept
    }
    query = _convert(lifted, UrlQuery, lambda name: f"{key} {name}")
    fields = {f"db_{k}": v for k, v in msgspec.structs.asdict(query).items() if v is not None}
    return {"database_url": url.set(drivername="postgresql+asyncpg", query=kept), **fields}


def describe_database(url: URL) -> str:
    """Host, port and database name for logs: never the user's password."""
    host = url.host or str(url.query.get("host", "local socket"))
    port = f":{url.port}" if url.port else ""
    return f"{host}{port}/{url.database}"


def _database_fields(env: Mapping[str, str]) -> dict[str, object]:
    """The database's Settings fields, from DATABASE_URL or the notebook's keys (not both)."""
    given = sorted(key for key in env if key in NOTEBOOK_KEYS - {"db_read_host"})
    if "database_url" in env:
        if given:
            raise SettingsError("DATABASE_URL", f"set either DATABASE_URL or {given[0]}…, not both")
        return normalise_database_url(env["database_url"])
    if not given:
        return {}
    if missing := [key for key in ("db_host", "db_username", "db_name") if key not in given]:
        raise SettingsError(missing[0], f"is required when {given[0]} is set")
    keys = _convert({key: env[key] for key in given}, NotebookKeys, str)
    url = URL.create(
        "postgresql+asyncpg",
        username=keys.db_username,
        password=keys.db_password,
        host=keys.db_host,
        port=keys.db_port,
        database=keys.db_name,
    )
    return {"database_url": url, "db_sslmode": keys.db_sslmode}


def _read_database_fields(env: Mapping[str, str]) -> dict[str, object]:
    """The read replica's Settings fields, from DATABASE_READ_URL or db_read_host (not both)."""
    if "database_read_url" in env:
        if "db_read_host" in env:
            raise SettingsError("DATABASE_READ_URL", "set either it or db_read_host, not both")
        fields = normalise_database_url(env["database_read_url"], "DATABASE_READ_URL")
        return {
            key.replace("database_", "database_read_").replace("db_", "db_read_"): value
            for key, value in fields.items()
        }
    if "db_read_host" not in env:
        return {}
    primary = _database_fields(env)
    if "db_host" not in env:
        raise SettingsError("db_read_host", "is for the notebook's keys: set db_host and the rest")
    url = primary["database_url"]
    assert isinstance(url, URL)  # noqa: S101 (built from the notebook's keys above)
    return {
        "database_read_url": url.set(host=env["db_read_host"]),
        "db_read_sslmode": primary["db_sslmode"],
    }


def _convert(values: Mapping[str, Any], type_: type[T], key_of: Callable[[str], str]) -> T:
    """`msgspec.convert` from strings, its error turned into one line naming the key."""
    try:
        # dec_hook builds the one type msgspec does not know, Path, from its string.
        return msgspec.convert(values, type_, strict=False, dec_hook=lambda cls, v: cls(v))
    except msgspec.ValidationError as error:
        # "Expected `int` >= 1 - at `$.db_pool_size`", "… - at `$.api_tokens[1]`"
        problem, _, where = str(error).partition(" - at `$.")
        name, _, index = where.rstrip("`]").partition("[")
        if problem.startswith("Invalid enum value"):
            problem = "must be one of " + ", ".join(_choices(type_, name))
        problem = problem[0].lower() + problem[1:].partition(", got `")[0]
        value = values.get(name)
        if isinstance(value, str):
            problem += f"; got {value!r}"
        elif index:  # a token, which is never shown
            problem += f" (entry {int(index) + 1})"
        raise SettingsError(key_of(name), problem) from None


def _choices(type_: type, name: str) -> list[str]:
    """The strings a Literal field, or an optional one, accepts."""
    hint = get_type_hints(type_)[name]
    return [c for arg in get_args(hint) for c in get_args(arg) or (arg,) if isinstance(c, str)]
