"""Settings parsing: the URLs and keys people paste, precedence, validation, password masking."""

from __future__ import annotations

import re
import secrets
import ssl
from pathlib import Path

import pytest
from sqlalchemy.pool import NullPool

from service.config import (
    Settings,
    SettingsError,
    check_writes_are_protected,
    describe_database,
    load_settings,
    read_replica_settings,
)
from service.db import engine_options, ssl_connect_arg
from tests.conftest import PROJECT_ROOT, TOKEN

TOKENS = {"API_TOKENS": TOKEN}


def settings_from(env: dict[str, str], env_file: Path | None = None) -> Settings:
    return load_settings(environ={**TOKENS, **env}, env_file=env_file)


def test_neon_url_is_normalised_for_asyncpg() -> None:
    settings = settings_from(
        {
            "DATABASE_URL": "postgresql://alex:AbC123dEf@ep-cool-darkness-123456.us-east-2"
            ".aws.neon.tech/dbname?sslmode=require&channel_binding=require"
        }
    )
    url = settings.database_url
    assert url is not None
    assert url.drivername == "postgresql+asyncpg"
    assert url.host == "ep-cool-darkness-123456.us-east-2.aws.neon.tech"
    assert url.username == "alex" and url.password == "AbC123dEf"
    assert url.database == "dbname"
    # asyncpg.connect rejects sslmode and channel_binding as keywords: they leave the URL.
    assert dict(url.query) == {}
    assert settings.db_sslmode == "require"
    assert settings.db_channel_binding == "require"
    assert engine_options(settings)["connect_args"]["ssl"] == "require"


@pytest.mark.parametrize(
    "raw",
    [
        "postgres://u:p@db.example.com:6543/app",
        "postgresql://u:p@db.example.com:6543/app",
        "postgresql+asyncpg://u:p@db.example.com:6543/app",
        "postgresql+psycopg://u:p@db.example.com:6543/app",
    ],
)
def test_every_postgres_url_form_becomes_asyncpg(raw: str) -> None:
    url = settings_from({"DATABASE_URL": raw}).database_url
    assert url is not None
    assert (url.drivername, url.host, url.port, url.database) == (
        "postgresql+asyncpg",
        "db.example.com",
        6543,
        "app",
    )


@pytest.mark.parametrize(
    ("sslmode", "expected"),
    [("disable", False), ("allow", "allow"), ("prefer", "prefer"), ("require", "require")],
)
def test_sslmode_is_translated(sslmode: str, expected: object) -> None:
    assert ssl_connect_arg(sslmode, None) == expected


def test_verify_full_builds_a_verifying_context() -> None:
    context = ssl_connect_arg("verify-full", None)
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname is True
    assert context.verify_mode == ssl.CERT_REQUIRED
    context = ssl_connect_arg("verify-ca", "system")
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname is False
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_sslrootcert_is_read_from_the_url(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    settings = settings_from(
        {"DATABASE_URL": f"postgresql://u:p@h/db?sslmode=verify-full&sslrootcert={missing}"}
    )
    assert settings.db_sslrootcert == str(missing)
    with pytest.raises(FileNotFoundError):
        engine_options(settings)  # the CA file is really opened, not ignored


def test_notebook_keys_build_the_url_with_special_characters_in_the_password() -> None:
    password = "p@ss:w/rd?#%"
    settings = load_settings(
        environ={
            "db_username": "neondb_owner",
            "db_password": password,
            "db_host": "ep-x.eu-central-1.aws.neon.tech",
            "db_name": "neondb",
            "db_sslmode": "require",
            **TOKENS,
        },
        env_file=None,
    )
    url = settings.database_url
    assert url is not None
    assert url.password == password
    assert url.username == "neondb_owner" and url.database == "neondb" and url.port == 5432
    assert settings.db_sslmode == "require"
    # The rendered URL must round-trip: that is what asyncpg receives.
    from sqlalchemy.engine import make_url

    assert make_url(url.render_as_string(hide_password=False)).password == password


def test_notebook_keys_accept_upper_case() -> None:
    settings = settings_from(
        {"DB_USERNAME": "u", "DB_PASSWORD": "x", "DB_HOST": "h", "DB_NAME": "d", "DB_PORT": "6432"}
    )
    assert settings.database_url is not None and settings.database_url.port == 6432


def test_environment_wins_over_dotenv(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "DATABASE_URL=postgresql://u:p@from-dotenv/db\nDB_POOL_SIZE=3\nMAX_BATCH=7\n"
    )
    settings = settings_from({"MAX_BATCH": "9"}, env_file=env_file)
    assert settings.database_url is not None and settings.database_url.host == "from-dotenv"
    assert settings.db_pool_size == 3  # only in .env
    assert settings.max_batch == 9  # in both: the environment wins


def test_password_never_in_repr_or_str() -> None:
    secret = "Sup3r-Secret-Pa55"
    settings = settings_from({"DATABASE_URL": f"postgresql://u:{secret}@h/db"})
    assert secret not in repr(settings)
    assert secret not in str(settings)
    assert TOKEN not in repr(settings)
    assert settings.database_url is not None
    assert secret not in describe_database(settings.database_url)


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"DB_POOL_SIZE": "ten"}, "DB_POOL_SIZE"),
        ({"DB_POOL_SIZE": "0"}, "DB_POOL_SIZE"),
        ({"DB_MAX_OVERFLOW": "-1"}, "DB_MAX_OVERFLOW"),
        ({"DB_POOL_TIMEOUT": "soon"}, "DB_POOL_TIMEOUT"),
        ({"DB_POOL_TIMEOUT": "inf"}, "DB_POOL_TIMEOUT"),
        ({"DB_STATEMENT_TIMEOUT_MS": "1.5"}, "DB_STATEMENT_TIMEOUT_MS"),
        ({"DB_PGBOUNCER": "maybe"}, "DB_PGBOUNCER"),
        ({"PORT": "70000"}, "PORT"),
        ({"MAX_BATCH": "0"}, "MAX_BATCH"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"ACCESS_LOG": "some"}, "ACCESS_LOG"),
        ({"MAX_IN_FLIGHT": "-1"}, "MAX_IN_FLIGHT"),
        ({"SERVER_TIMING": "sometimes"}, "SERVER_TIMING"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        ({"MAX_IN_FLIGHT": "many"}, "MAX_IN_FLIGHT"),
        ({"ADMISSION_TARGET_MS": "-1"}, "ADMISSION_TARGET_MS"),
        ({"ADMISSION_TARGET_MS": "2.5"}, "ADMISSION_TARGET_MS"),
        ({"ADMISSION_TARGET_MS": "150"}, "ADMISSION_TARGET_MS"),  # past the interval
        ({"ADMISSION_TARGET_MS": "100", "DB_POOL_TIMEOUT": "0.1"}, "ADMISSION_TARGET_MS"),
        ({"ADMISSION_INTERVAL_MS": "0"}, "ADMISSION_INTERVAL_MS"),
        ({"ADMISSION_REFUSAL_DELAY_MS": "20000"}, "ADMISSION_REFUSAL_DELAY_MS"),
        ({"DB_POOL_IDLE_TIMEOUT": "0.5"}, "DB_POOL_IDLE_TIMEOUT"),
        ({"API_TOKENS": "short"}, "API_TOKENS"),
        ({"DATABASE_URL": "mysql://u:p@h/db"}, "DATABASE_URL"),
        ({"DATABASE_URL": "not a url"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://u:p@h/"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://u:p@h:/db"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://u:p@h:abc/db"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://u:p@h:99999/db"}, "DATABASE_URL"),
        ({"DATABASE_READ_URL": "postgresql://u:p@[::1/db"}, "DATABASE_READ_URL"),
        ({"DATABASE_URL": "postgresql://u:p@h/db?sslmode=sometimes"}, "DATABASE_URL sslmode"),
        ({"DATABASE_URL": "postgresql://u:p@h/db?frobnicate=1"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://u:p@h/db", "db_host": "h"}, "DATABASE_URL"),
        ({"db_host": "h", "db_name": "d"}, "db_username"),
        ({"db_username": "u"}, "db_host"),
        ({"db_host": "h", "db_username": "u", "db_name": "d", "db_sslmode": "x"}, "db_sslmode"),
        ({"db_host": "h", "db_username": "u", "db_name": "d", "db_port": "0"}, "db_port"),
        (
            {"DATABASE_URL": "postgresql://u:p@h/db?channel_binding=x"},
            "DATABASE_URL channel_binding",
        ),
    ],
)
def test_bad_setting_names_its_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(SettingsError) as raised:
        settings_from(env)
    assert raised.value.key == key
    assert str(raised.value).startswith(f"{key}: ")


def test_bad_url_error_does_not_echo_the_password() -> None:
    with pytest.raises(SettingsError) as raised:
        settings_from({"DATABASE_URL": "mysql://u:Hunter2Hunter2@h/db"})
    assert "Hunter2Hunter2" not in str(raised.value)


def example_tokens() -> list[str]:
    """Every API_TOKENS value the repository's examples show (.env.example, k8s, README, docs)."""
    files = [PROJECT_ROOT / ".env.example", PROJECT_ROOT / "README.md"]
    files += sorted((PROJECT_ROOT / "docs").glob("*.md"))
    files += sorted((PROJECT_ROOT / "k8s").rglob("*.example"))
    found = re.findall(r"API_TOKENS=([^\s`'\"]+)", "".join(f.read_text() for f in files))
    return sorted({token for value in found for token in value.split(",")})


@pytest.mark.parametrize(
    "token",
    [*example_tokens(), "aaaaaaaaaaaaaaaaaaaa", "1234567890123456", "passwordpassword"],
)
def test_placeholder_or_guessable_token_is_refused(token: str) -> None:
    with pytest.raises(SettingsError) as raised:
        settings_from({"API_TOKENS": f"{TOKEN},{token}"})
    message = str(raised.value)
    assert raised.value.key == "API_TOKENS"
    assert message.startswith("API_TOKENS: entry 2 ") and "\n" not in message
    assert 'python -c "import secrets; print(secrets.token_urlsafe(32))"' in message
    assert token not in message


def test_the_examples_show_a_token_to_replace() -> None:
    assert "replace-me-with-a-long-random-token" in example_tokens()


def test_random_tokens_are_accepted() -> None:
    tokens = [secrets.token_urlsafe(32) for _ in range(500)]
    tokens += [secrets.token_hex(16) for _ in range(500)]
    assert settings_from({"API_TOKENS": ",".join(tokens)}).api_tokens == tuple(tokens)


def test_configured_database_without_tokens_refuses_to_serve() -> None:
    settings = load_settings(environ={"DATABASE_URL": "postgresql://u:p@h/db"}, env_file=None)
    with pytest.raises(SettingsError) as raised:
        check_writes_are_protected(settings)  # migrate and seed need no tokens
    assert raised.value.key == "API_TOKENS"
    settings = load_settings(
        environ={"DATABASE_URL": "postgresql://u:p@h/db", "AUTH_DISABLED": "true"}, env_file=None
    )
    check_writes_are_protected(settings)
    assert settings.auth_disabled


def test_in_flight_limit_follows_the_pool_unless_set() -> None:
    assert settings_from({}).in_flight_limit == 320
    assert settings_from({"DB_POOL_SIZE": "4", "DB_MAX_OVERFLOW": "1"}).in_flight_limit == 160
    assert settings_from({"MAX_IN_FLIGHT": "7"}).in_flight_limit == 7
    assert settings_from({"ACCESS_LOG": "errors"}).access_log == "errors"


def test_admission_settings_default_and_can_be_turned_off() -> None:
    settings = settings_from({})
    assert (settings.admission_target_ms, settings.admission_interval_ms) == (10, 100)
    assert settings.admission_refusal_delay_ms == 1500
    settings = settings_from({"ADMISSION_TARGET_MS": "0", "ADMISSION_REFUSAL_DELAY_MS": "0"})
    assert (settings.admission_target_ms, settings.admission_refusal_delay_ms) == (0, 0)
    assert settings_from({"ADMISSION_TARGET_MS": "500", "ADMISSION_INTERVAL_MS": "500"})


def test_nothing_configured_means_the_embedded_database() -> None:
    settings = load_settings(environ={}, env_file=None)
    assert settings.uses_embedded_database
    assert settings.api_tokens == ()


def test_pgbouncer_mode_disables_statement_reuse() -> None:
    settings = settings_from({"DATABASE_URL": "postgresql://u:p@h/db", "DB_PGBOUNCER": "true"})
    connect_args = engine_options(settings)["connect_args"]
    assert connect_args["statement_cache_size"] == 0
    assert connect_args["prepared_statement_cache_size"] == 0
    names = {connect_args["prepared_statement_name_func"]() for _ in range(3)}
    assert len(names) == 3
    assert "statement_timeout" not in connect_args["server_settings"]
    assert connect_args["command_timeout"] == 5.0


def test_statement_timeout_goes_to_the_server() -> None:
    settings = settings_from(
        {"DATABASE_URL": "postgresql://u:p@h/db", "DB_STATEMENT_TIMEOUT_MS": "250"}
    )
    options = engine_options(settings)
    assert options["connect_args"]["server_settings"]["statement_timeout"] == "250"
    # ...and the client waits a little longer, for when no answer can come at all.
    assert options["connect_args"]["command_timeout"] == 1.25
    assert "pool_pre_ping" not in options and options["poolclass"] is NullPool


def test_read_url_is_normalised_like_the_primary_one() -> None:
    settings = settings_from(
        {
            "DATABASE_URL": "postgresql://u:p@ep-primary.neon.tech/app?sslmode=require",
            "DATABASE_READ_URL": "postgres://u:p@ep-read.neon.tech/app?sslmode=verify-full"
            "&application_name=reads",
            "DB_READ_POOL_SIZE": "3",
        }
    )
    replica = read_replica_settings(settings)
    assert replica is not None and replica.database_url is not None
    assert replica.database_url.drivername == "postgresql+asyncpg"
    assert replica.database_url.host == "ep-read.neon.tech"
    assert dict(replica.database_url.query) == {}
    assert (replica.db_sslmode, replica.db_pool_size) == ("verify-full", 3)
    assert replica.db_application_name == "reads"
    # The primary keeps its own.
    assert settings.db_sslmode == "require"
    assert (
        settings.database_url is not None and settings.database_url.host == "ep-primary.neon.tech"
    )


def test_no_read_url_means_no_replica() -> None:
    settings = settings_from({"DATABASE_URL": "postgresql://u:p@h/app"})
    assert read_replica_settings(settings) is None
    assert (settings.read_consistency_wait_ms, settings.read_max_lag_ms) == (200, 5000)


def test_notebook_read_host_sits_beside_the_other_keys() -> None:
    settings = settings_from(
        {
            "db_username": "u",
            "db_password": "p@ss",
            "db_host": "primary",
            "db_name": "d",
            "db_sslmode": "require",
            "db_read_host": "replica",
        }
    )
    replica = read_replica_settings(settings)
    assert replica is not None and replica.database_url is not None
    assert (replica.database_url.host, replica.database_url.password) == ("replica", "p@ss")
    assert replica.db_sslmode == "require"


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"DATABASE_READ_URL": "mysql://u:p@h/d"}, "DATABASE_READ_URL"),
        (
            {"DATABASE_READ_URL": "postgresql://u:p@h/d?sslmode=sometimes"},
            "DATABASE_READ_URL sslmode",
        ),
        ({"DATABASE_URL": "postgresql://u:p@h/d", "db_read_host": "r"}, "db_read_host"),
        ({"READ_CONSISTENCY_WAIT_MS": "-1"}, "READ_CONSISTENCY_WAIT_MS"),
    ],
)
def test_bad_read_setting_names_its_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(SettingsError) as error:
        settings_from(env)
    assert error.value.key == key


@pytest.mark.parametrize(
    ("env", "refused"),
    [
        ({"READ_CONSISTENCY_WAIT_MS": "6000"}, True),  # the default 5000 ms timeout + 1 s
        ({"READ_CONSISTENCY_WAIT_MS": "5999"}, False),
        ({"READ_CONSISTENCY_WAIT_MS": "2000", "DB_STATEMENT_TIMEOUT_MS": "500"}, True),
        ({"READ_CONSISTENCY_WAIT_MS": "60000", "DB_STATEMENT_TIMEOUT_MS": "0"}, False),
    ],
)
def test_a_consistency_wait_past_the_lease_deadline_is_refused(
    env: dict[str, str], refused: bool
) -> None:
    # A token read holds its replica connection while it waits; a lease is aborted at the
    # deadline, and the replica then taken for broken.
    if not refused:
        assert settings_from(env).read_consistency_wait_ms == int(env["READ_CONSISTENCY_WAIT_MS"])
        return
    with pytest.raises(SettingsError) as error:
        settings_from(env)
    assert error.value.key == "READ_CONSISTENCY_WAIT_MS"
    message = str(error.value)
    assert "\n" not in message and "DB_STATEMENT_TIMEOUT_MS" in message


@pytest.mark.parametrize(
    ("env", "traced"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "items"}, False),  # naming the service exports nothing yet
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),  # to the SDK's default, localhost:4318
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        # The traces' own protocol wins over the general one; gRPC is refused only if used.
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            True,
        ),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, False),
    ],
)
def test_tracing_is_on_when_the_environment_configures_an_otlp_exporter(
    env: dict[str, str], traced: bool
) -> None:
    assert settings_from(env).tracing is traced


def test_otlp_settings_in_dotenv_do_not_turn_tracing_on(tmp_path: Path) -> None:
    # The SDK reads OTEL_* from the process environment only; tracing follows what it will see.
    dotenv = tmp_path / ".env"
    dotenv.write_text("OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318\nSERVER_TIMING=yes\n")
    settings = settings_from({}, env_file=dotenv)
    assert settings.tracing is False and settings.server_timing is True
    assert settings_from({"TRACING": "true"}).tracing is False  # not a key of its own
