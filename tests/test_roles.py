"""k8s/roles.sql: migrations as the migrator role, the whole API as the row-only service role."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
from sqlalchemy.engine import URL

from service.config import Settings
from service.migrate import upgrade_to_head
from tests.conftest import (
    AUTH,
    PROJECT_ROOT,
    TOKEN,
    asyncpg_dsn,
    concurrent_client,
    fresh_database,
)

ROLES_SQL = (PROJECT_ROOT / "k8s" / "roles.sql").read_text()
MIGRATOR, SERVICE = "playing_with_neon_migrator", "playing_with_neon_service"
# What only the tables' owner may do: the service role must be refused each one.
REFUSED = [
    "DROP TABLE playing_with_neon",
    "CREATE TABLE intruder (id int)",
    "ALTER TABLE playing_with_neon ADD COLUMN intruder int",
    "TRUNCATE idempotency_keys",
    "UPDATE alembic_version SET version_num = '0001'",
    "CREATE INDEX intruder ON playing_with_neon (name)",
]


@dataclass
class Roles:
    """A database whose owner is not a superuser (as on Neon), after k8s/roles.sql."""

    owner: URL
    migrator: URL
    service: URL


async def execute(url: URL, sql: str) -> None:
    """Run `sql` (one or more statements) over a connection of its own."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def fetch(url: URL, sql: str) -> object:
    """The first value `sql` answers, over a connection of its own."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return await connection.fetchval(sql)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def database_with_roles(server: URL, migrate_first: bool) -> AsyncIterator[Roles]:
    """A fresh database owned by a CREATEROLE role that runs k8s/roles.sql.

    `migrate_first`: the owner had migrated the database before the roles existed (an
    existing deployment). Role names are cluster-wide, so each run gets names of its own.
    """
    suffix = uuid.uuid4().hex[:8]
    names = {name: f"{name}_{suffix}" for name in ("owner", MIGRATOR, SERVICE)}
    passwords = {name: secrets.token_hex(12) for name in names}
    try:
        async with fresh_database(server, prefix="roles") as admin:
            urls = {
                name: admin.set(username=role, password=passwords[name])
                for name, role in names.items()
            }
            await execute(
                admin,
                f"CREATE ROLE {names['owner']} LOGIN CREATEROLE PASSWORD '{passwords['owner']}';"
                f'ALTER DATABASE "{admin.database}" OWNER TO {names["owner"]}',
            )
            if migrate_first:
                await migrate(urls["owner"])
            script = ROLES_SQL.replace(MIGRATOR, names[MIGRATOR]).replace(SERVICE, names[SERVICE])
            await execute(urls["owner"], script)
            await execute(urls["owner"], script)  # running it again changes nothing
            await execute(
                urls["owner"],
                f"ALTER ROLE {names[MIGRATOR]} PASSWORD '{passwords[MIGRATOR]}';"
                f"ALTER ROLE {names[SERVICE]} PASSWORD '{passwords[SERVICE]}'",
            )
            yield Roles(urls["owner"], urls[MIGRATOR], urls[SERVICE])
    finally:
        roles = ", ".join(names.values())
        await execute(server, f"DROP ROLE IF EXISTS {roles}")


async def migrate(url: URL) -> None:
    """`python -m service migrate`, as the role in `url`."""
    await asyncio.to_thread(upgrade_to_head, Settings(database_url=url, auth_disabled=True))


@pytest.mark.parametrize("migrate_first", [False, True], ids=["new", "migrated before"])
async def test_the_service_role_serves_everything_and_alters_nothing(
    server_url: URL, migrate_first: bool
) -> None:
    async with database_with_roles(server_url, migrate_first) as roles:
        await migrate(roles.migrator)
        # The database as its own replica: writes then read the WAL position for their token.
        settings = Settings(
            database_url=roles.service,
            database_read_url=roles.service,
            api_tokens=(TOKEN,),
            idempotency_ttl_seconds=1,
        )
        async with concurrent_client(settings) as client:
            assert (await client.get("/readyz")).status_code == 200
            created = await client.post("/items", json=[{"name": "a", "value": 1.0}], headers=AUTH)
            assert created.status_code == 201, created.text
            assert "consistency-token" in created.headers
            item_id = created.json()["items"][0]["id"]
            keyed = {**AUTH, "Idempotency-Key": "roles-test"}
            patches = [
                await client.patch("/items", json=[{"id": item_id, "value": 2.0}], headers=keyed)
                for _ in range(2)
            ]
            assert [p.status_code for p in patches] == [200, 200], patches[0].text
            assert patches[1].headers["idempotent-replayed"] == "true"
            assert (await client.get(f"/items/{item_id}")).json()["value"] == 2.0
            assert (await client.get("/items", params={"min_value": 1})).status_code == 200
            assert (await client.delete(f"/items/{item_id}", headers=AUTH)).status_code == 204
            # With a TTL of 1 s the service's own expiry deletes the key within a second or two.
            for _ in range(100):
                if not await fetch(roles.owner, "SELECT count(*) FROM idempotency_keys"):
                    break
                await asyncio.sleep(0.1)
        assert await fetch(roles.owner, "SELECT count(*) FROM idempotency_keys") == 0
        for statement in REFUSED:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await execute(roles.service, statement)
        await migrate(roles.migrator)  # migrating again, as the owner of everything, is fine


async def test_a_write_whose_position_is_refused_answers_without_a_token(
    server_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    async with database_with_roles(server_url, migrate_first=False) as roles:
        await migrate(roles.migrator)
        # pg_catalog is per database: this revokes it here only (from a non-superuser, as a
        # cautious administrator might).
        await execute(
            server_url.set(database=roles.owner.database),
            "REVOKE EXECUTE ON FUNCTION pg_current_wal_lsn() FROM PUBLIC",
        )
        settings = Settings(
            database_url=roles.service, database_read_url=roles.service, api_tokens=(TOKEN,)
        )
        async with concurrent_client(settings) as client:
            caplog.clear()
            created = await client.post("/items", json=[{"name": "a", "value": 1.0}], headers=AUTH)
    assert created.status_code == 201, created.text
    assert "consistency-token" not in created.headers
    lines = [r.getMessage() for r in caplog.records if "WAL position" in r.getMessage()]
    assert lines, [r.getMessage() for r in caplog.records]
    assert all(r.exc_info is None for r in caplog.records if "WAL position" in r.getMessage())
    assert "permission denied" not in lines[0] and "pg_current_wal_lsn" not in lines[0], lines[0]
    assert "the database role lacks a privilege" in lines[0], lines[0]
