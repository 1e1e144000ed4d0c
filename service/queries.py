"""Every SQL statement the service sends, as bound `text()` constants.

`value` is read back as double precision and written through a double precision parameter,
so the same statements serve a table whose `value` column is `real` or `numeric`. Statements
that return rows declare their columns (`.columns(...)`), so SQLAlchemy builds the result's
metadata once per statement instead of once per execution.
"""

from sqlalchemy import ARRAY, Boolean, Float, Integer, LargeBinary, String, column, text

# The columns of a row, as the SELECTs and INSERT … RETURNING below give them.
ITEM_COLUMNS = (column("id", Integer), column("name", String), column("value", Float))

SELECT_ITEMS_ABOVE_VALUE = text(
    "SELECT id, name, value::float8 AS value FROM playing_with_neon "
    "WHERE value > CAST(:value AS float8) AND id > :after_id ORDER BY id LIMIT :limit"
).columns(*ITEM_COLUMNS)

SELECT_ITEMS = text(
    "SELECT id, name, value::float8 AS value FROM playing_with_neon "
    "WHERE id > :after_id ORDER BY id LIMIT :limit"
).columns(*ITEM_COLUMNS)

SELECT_ITEM = text(
    "SELECT id, name, value::float8 AS value FROM playing_with_neon WHERE id = :id"
).columns(*ITEM_COLUMNS)

# The whole batch in one statement, so one round trip and all or nothing even in autocommit
# mode: the rows are locked in ascending id order first (a MATERIALIZED CTE: no plan can reorder
# the locks), so two overlapping batches queue behind each other instead of deadlocking; the
# UPDATE runs only if every id was found. It answers one row: the ids that were not found, in
# ascending order (empty when the batch was applied).
UPDATE_ITEM_VALUES = text(
    "WITH locked AS MATERIALIZED ("
    "SELECT id FROM playing_with_neon WHERE id = ANY(CAST(:ids AS int4[])) ORDER BY id FOR UPDATE"
    "), updated AS ("
    "UPDATE playing_with_neon AS item SET value = batch.value "
    "FROM unnest(CAST(:ids AS int4[]), CAST(:values AS float8[])) AS batch(id, value) "
    "WHERE item.id = batch.id "
    "AND (SELECT count(*) FROM locked) = cardinality(CAST(:ids AS int4[]))"
    ") SELECT ARRAY(SELECT unnest(CAST(:ids AS int4[])) EXCEPT SELECT id FROM locked ORDER BY 1)"
    " AS missing_ids"
).columns(column("missing_ids", ARRAY(Integer)))

# One statement for the whole batch; ORDER BY keeps the generated ids in the order given.
INSERT_ITEMS = text(
    "INSERT INTO playing_with_neon (name, value) "
    "SELECT name, value FROM unnest(CAST(:names AS text[]), CAST(:values AS float8[])) "
    "WITH ORDINALITY AS batch(name, value, position) ORDER BY position "
    "RETURNING id, name, value::float8 AS value"
).columns(*ITEM_COLUMNS)

DELETE_ITEM = text("DELETE FROM playing_with_neon WHERE id = :id RETURNING id").columns(
    column("id", Integer)
)

SELECT_ONE = text("SELECT 1")

# Behind a pooler, at start-up: does the server know the statement we prepared by another name?
# A pooler that carries prepared statements across server connections (PgBouncer >= 1.21)
# renames them (PGBOUNCER_<n>); one that does not passes asyncpg's own names (__asyncpg_…). The
# statement finds itself by the marker in its own text.
SELECT_STATEMENT_RENAMED = text(
    "SELECT coalesce(bool_or(left(name, 9) <> '__asyncpg'), false) AS renamed "
    "FROM pg_prepared_statements WHERE statement LIKE '%service pooler check%'"
).columns(column("renamed", Boolean))

# Proves the table is there (migrations applied) without reading a row.
SELECT_NOTHING = text("SELECT 1 FROM playing_with_neon LIMIT 0")

# Idempotent writes (service/idempotency.py) run these around the write in one transaction. On
# the autocommit request engine the transaction is begun and committed by hand.
BEGIN = text("BEGIN")
COMMIT = text("COMMIT")

# Held until the transaction ends; `try` answers at once instead of waiting. For a key: is a
# request with this key in flight? For the expiry: is another pod deleting expired keys?
TRY_LOCK = text("SELECT pg_try_advisory_xact_lock(:lock_id) AS locked").columns(
    column("locked", Boolean)
)

# A separate statement from the lock: each statement takes a new snapshot, so this one sees an
# answer committed by the request that held the lock just before us.
SELECT_IDEMPOTENT_ANSWER = text(
    "SELECT fingerprint, status, body FROM idempotency_keys "
    "WHERE token_digest = :token_digest AND key = :key "
    "AND created_at > now() - CAST(:ttl_seconds AS int4) * interval '1 second'"
).columns(
    column("fingerprint", LargeBinary), column("status", Integer), column("body", LargeBinary)
)

# Runs only when no live answer exists; a conflict is an expired row not yet deleted.
INSERT_IDEMPOTENT_ANSWER = text(
    "INSERT INTO idempotency_keys (token_digest, key, fingerprint, status, body) "
    "VALUES (:token_digest, :key, :fingerprint, :status, :body) "
    "ON CONFLICT (token_digest, key) DO UPDATE SET fingerprint = excluded.fingerprint, "
    "status = excluded.status, body = excluded.body, created_at = excluded.created_at"
)

# A bounded batch; rows a request is rewriting right now are skipped, never waited for.
DELETE_EXPIRED_KEYS = text(
    "WITH deleted AS (DELETE FROM idempotency_keys WHERE (token_digest, key) IN ("
    "SELECT token_digest, key FROM idempotency_keys "
    "WHERE created_at <= now() - CAST(:ttl_seconds AS int4) * interval '1 second' "
    "ORDER BY created_at LIMIT :batch FOR UPDATE SKIP LOCKED) RETURNING 1"
    ") SELECT count(*) AS deleted FROM deleted"
).columns(column("deleted", Integer))

# The primary's WAL position as a number: after a commit, at or past the commit's record.
SELECT_WAL_POSITION = text("SELECT CAST(pg_current_wal_lsn() - '0/0' AS int8)")

# How far a replica has replayed the primary's WAL; on a server that is not a replica (a read
# URL naming a primary, or a promoted replica), its own position: it has everything it wrote.
SELECT_REPLAYED_POSITION = text(
    "SELECT CAST(COALESCE(pg_last_wal_replay_lsn(), pg_current_wal_lsn()) - '0/0' AS int8)"
)
