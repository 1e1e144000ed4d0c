"""TLS end to end: a PostgreSQL that accepts nothing but SCRAM over TLS (`hostssl` only), with a
certificate from a CA made here, for a user whose password holds `@ : /`.

The ways people configure TLS (sslmode=require, Neon's URL as pasted, verify-full with the CA, the
notebook's db_* keys) each migrate a fresh database and serve it. A wrong CA, a host name the
certificate does not name, sslmode=disable, a wrong password, and sslmode=require against a server
without TLS are each refused by `migrate` and `seed` with one line naming the cause: no traceback,
no password.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import asyncpg
import httpx
import pytest
import trustme
from sqlalchemy.engine import URL

from tests.conftest import AUTH, asyncpg_dsn, fresh_database, run_cli, run_service
from tests.conftest import service_environment as environment
from tests.faults.report import record
from tests.faults.support import ControlledPostgres, ServerCertificate, tls_capable_bin_dir

pytestmark = pytest.mark.slow

PASSWORD = f"p@ss:w/rd-{secrets.token_hex(8)}"
WRONG_PASSWORD = f"wr@ng:pass/{secrets.token_hex(8)}"
# The certificate names this host only, so 127.0.0.1 is "a host name not in the certificate".
CERTIFIED_HOST = "localhost"


@dataclasses.dataclass(frozen=True)
class TlsServer:
    """The TLS-only PostgreSQL, the CA that signed its certificate, and a CA that did not."""

    postgres: ControlledPostgres
    ca_file: Path
    foreign_ca_file: Path

    def pasted_url(
        self,
        database: str,
        query: str,
        *,
        scheme: str = "postgresql",
        host: str = CERTIFIED_HOST,
        password: str = PASSWORD,
    ) -> str:
        """A URL as people paste it: the password percent-encoded, libpq's query keys."""
        userinfo = f"postgres:{quote(password, safe='')}"
        return f"{scheme}://{userinfo}@{host}:{self.postgres.port}/{database}?{query}"

    @property
    def admin_url(self) -> URL:
        return self.postgres.url(host=CERTIFIED_HOST).set(query={"sslmode": "require"})


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """A PostgreSQL that accepts only SCRAM over TLS, with a certificate for `localhost`."""
    if tls_capable_bin_dir() is None:
        pytest.skip(
            "needs a PostgreSQL server built with TLS (Debian: apt-get install postgresql); "
            "pgserver's is built without"
        )
    authority = trustme.CA()
    issued = authority.issue_cert(CERTIFIED_HOST)
    folder = tmp_path_factory.mktemp("tls")
    authority.cert_pem.write_to_path(str(folder / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(folder / "foreign-ca.pem"))
    certificate = ServerCertificate(
        chain_pem=b"".join(pem.bytes() for pem in issued.cert_chain_pems),
        key_pem=issued.private_key_pem.bytes(),
    )
    postgres = ControlledPostgres.create(password=PASSWORD, tls=certificate)
    try:
        yield TlsServer(postgres, folder / "ca.pem", folder / "foreign-ca.pem")
    finally:
        postgres.destroy()


def accepted_configuration(case: str, server: TlsServer, database: str) -> dict[str, str]:
    """The settings a user would write for `case` to reach `database`."""
    if case == "sslmode=require":
        return {"DATABASE_URL": server.pasted_url(database, "sslmode=require")}
    if case == "Neon's pasted URL":
        query = "sslmode=require&channel_binding=require"
        return {"DATABASE_URL": server.pasted_url(database, query, scheme="postgres")}
    if case == "verify-full + sslrootcert":
        query = f"sslmode=verify-full&sslrootcert={server.ca_file}"
        return {"DATABASE_URL": server.pasted_url(database, query)}
    if case == "db_* keys + db_sslmode":
        return {
            "db_host": CERTIFIED_HOST,
            "db_port": str(server.postgres.port),
            "db_username": "postgres",
            "db_password": PASSWORD,  # as-is: the notebook's keys take no percent-encoding
            "db_name": database,
            "db_sslmode": "require",
        }
    raise AssertionError(case)


ACCEPTED = (
    "sslmode=require",
    "Neon's pasted URL",
    "verify-full + sslrootcert",
    "db_* keys + db_sslmode",
)


@pytest.mark.parametrize("case", ACCEPTED)
async def test_tls_configuration_migrates_and_serves(
    tls_server: TlsServer, case: str, tmp_path: Path
) -> None:
    async with fresh_database(tls_server.admin_url, prefix="tls") as url:
        configuration = accepted_configuration(case, tls_server, url.database or "")
        env = environment(None, SHUTDOWN_DELAY_SECONDS="0", **configuration)
        migrated = await asyncio.to_thread(run_cli, env, tmp_path, "migrate")
        assert migrated.returncode == 0, migrated.stderr
        assert "migrations applied" in migrated.stderr
        with run_service(env, tmp_path) as service:
            async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as http:
                posted = {"name": f"over {case}", "value": 1.5}
                answers = [
                    await http.get("/readyz"),
                    await http.post("/items", json=[posted], headers=AUTH),
                    await http.get("/items"),
                ]
            statuses = [answer.status_code for answer in answers]
            assert statuses == [200, 201, 200], [answer.text for answer in answers]
            assert [item["name"] for item in answers[2].json()["items"]] == [f"over {case}"]
            admin = await asyncpg.connect(asyncpg_dsn(tls_server.admin_url))
            try:
                service_ssl = await admin.fetch(
                    "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
                    " WHERE a.datname = $1 AND a.application_name = 'playing-with-neon-service'",
                    url.database,
                )
            finally:
                await admin.close()
            assert service_ssl and all(row["ssl"] for row in service_ssl)
    output = migrated.stdout + migrated.stderr + service.log()
    assert "Traceback" not in output
    assert PASSWORD not in output and quote(PASSWORD, safe="") not in output
    if case == "Neon's pasted URL":
        assert "channel_binding=require is not enforced" in service.log()
    record(
        "TLS",
        "Accepted, on a PostgreSQL taking only SCRAM over TLS (hostssl), password with @ : /: "
        "sslmode=require; Neon's pasted postgres://…?sslmode=require&channel_binding=require; "
        "sslmode=verify-full with sslrootcert; db_* keys with db_sslmode=require",
        1,
        Counter(statuses),
        "migrate exit 0 on a fresh database; served: /readyz 200, a POST read back by GET "
        "/items, every service connection TLS (pg_stat_ssl); no traceback, no password in output",
    )


# (DATABASE_URL query, host, password) and the cause the one line must name.
REFUSED = {
    "wrong CA": (
        "sslmode=verify-full&sslrootcert={foreign_ca}",
        CERTIFIED_HOST,
        PASSWORD,
        "TLS certificate not accepted (unable to get local issuer certificate)",
    ),
    "host name not in the certificate": (
        "sslmode=verify-full&sslrootcert={ca}",
        "127.0.0.1",
        PASSWORD,
        "the TLS certificate is not valid for this host name",
    ),
    "sslmode=disable": (
        "sslmode=disable",
        CERTIFIED_HOST,
        PASSWORD,
        "the server accepts only TLS connections",
    ),
    "wrong password": (
        "sslmode=require",
        CERTIFIED_HOST,
        WRONG_PASSWORD,
        "password authentication failed",
    ),
}


def assert_one_line_refusal(result_stderr: str, result_stdout: str, where: str, cause: str) -> None:
    """Exactly `error: cannot use WHERE: CAUSE…`, and neither password anywhere."""
    lines = result_stderr.strip().splitlines()
    assert len(lines) == 1, result_stderr
    assert lines[0].startswith(f"error: cannot use {where}: {cause}"), lines[0]
    output = result_stderr + result_stdout
    assert "Traceback" not in output
    for secret in (PASSWORD, WRONG_PASSWORD):
        assert secret not in output and quote(secret, safe="") not in output


@pytest.mark.parametrize("command", [("migrate",), ("seed", "--rows", "5")])
@pytest.mark.parametrize("case", REFUSED)
def test_tls_refusal_is_one_line_naming_the_cause(
    tls_server: TlsServer, case: str, command: tuple[str, ...], tmp_path: Path
) -> None:
    query, host, password, cause = REFUSED[case]
    query = query.format(ca=tls_server.ca_file, foreign_ca=tls_server.foreign_ca_file)
    url = tls_server.pasted_url("postgres", query, host=host, password=password)
    result = run_cli(environment(None, DATABASE_URL=url, API_TOKENS=""), tmp_path, *command)
    assert result.returncode == 1, result.stderr
    where = f"{host}:{tls_server.postgres.port}/postgres"
    assert_one_line_refusal(result.stderr, result.stdout, where, cause)
    record_refusal()


def test_tls_asked_of_a_server_without_it_is_refused(
    controlled_postgres: ControlledPostgres, tmp_path: Path
) -> None:
    # The fault suite's own server: pgserver's PostgreSQL, built without TLS.
    url = controlled_postgres.url().set(drivername="postgresql", query={"sslmode": "require"})
    env = environment(url, API_TOKENS="")
    result = run_cli(env, tmp_path, "migrate")
    assert result.returncode == 1, result.stderr
    where = f"127.0.0.1:{controlled_postgres.port}/postgres"
    cause = "the server does not offer TLS, which sslmode asks for"
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: cannot use {where}: {cause}"], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert controlled_postgres.password not in result.stdout + result.stderr
    record_refusal()


def record_refusal() -> None:
    record(
        "TLS",
        "Refused by migrate and seed: a wrong CA, a host name not in the certificate "
        "(verify-full), sslmode=disable against hostssl only, a wrong password; sslmode=require "
        "against a server without TLS (migrate)",
        1,
        {"exit 1": 1},
        "one line each: 'error: cannot use HOST:PORT/DB: ' and the cause (certificate not "
        "accepted, not valid for this host name, server accepts only TLS, password "
        "authentication failed, server does not offer TLS); no traceback, no password",
    )
