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
# ascending order (empty when the batch was applied). `{gate}` is empty here; the keyed form
# below runs the same statement only when it may write.
_UPDATE_ITEM_VALUES_CTES = (
    "locked AS MATERIALIZED ("
    "SELECT id FROM playing_with_neon WHERE id = ANY(CAST(:ids AS int4[])) {gate} "
    "ORDER BY id FOR UPDATE"
    "), updated AS ("
    "UPDATE playing_with_neon AS item SET value = batch.value "
    "FROM unnest(CAST(:ids AS int4[]), CAST(:values AS float8[])) AS batch(id, value) "
    "WHERE item.id = batch.id "
    "AND (SELECT count(*) FROM locked) = cardinality(CAST(:ids AS int4[]))"
    ")"
)
_MISSING_IDS = "ARRAY(SELECT unnest(CAST(:ids AS int4[])) EXCEPT SELECT id FROM locked ORDER BY 1)"
UPDATE_ITEM_VALUES = text(
    f"WITH {_UPDATE_ITEM_VALUES_CTES.format(gate='')} SELECT {_MISSING_IDS} AS missing_ids"
).columns(column("missing_ids", ARRAY(Integer)))

# One statement for the whole batch; ORDER BY keeps the generated ids in the order given.
_INSERT_ITEMS = (
    "INSERT INTO playing_with_neon (name, value) "
    "SELECT name, value FROM unnest(CAST(:names AS text[]), CAST(:values AS float8[])) "
    "WITH ORDINALITY AS batch(name, value, position) {gate} ORDER BY position "
    "RETURNING id, name, value::float8 AS value"
)
INSERT_ITEMS = text(_INSERT_ITEMS.format(gate="")).columns(*ITEM_COLUMNS)

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

# The expiry (service/idempotency.py) runs in one transaction, begun and committed by hand on the
# autocommit request engine.
BEGIN = text("BEGIN")
COMMIT = text("COMMIT")

# Held until the transaction ends; `try` answers at once instead of waiting: is another pod
# deleting expired keys?
TRY_LOCK = text("SELECT pg_try_advisory_xact_lock(:lock_id) AS locked").columns(
    column("locked", Boolean)
)


def _write_once(write_ctes: str, answer: str) -> str:
    """A write with an Idempotency-Key as one statement, so one round trip: claim the key, look
    up its stored answer, and only if there is none, write and store the write's rows with it.

    `claim` takes the key's advisory lock for the statement's transaction (`try`: a request with
    the same key in flight is answered 409 at once, not waited for). `prior` is the live stored
    answer, if any. `go` holds a row when this request may write: `write_ctes` are gated on it,
    and `answer` (a query over them) gives the rows the write answers, stored as JSON (`json`,
    not `jsonb`: the numbers keep the text PostgreSQL wrote, so a replay decodes the same floats).

    A statement's snapshot is taken before it takes the lock, so an answer committed by the
    request that held the lock just before can be invisible to `prior`; the INSERT still finds
    it (a unique index sees every committed row), overwrites only an expired one, and otherwise
    `guard` fails the whole statement, write included, with KEY_STORED_CONCURRENTLY: the caller
    sends it again, and its new snapshot replays that answer.
    """
    # Composed only of this module's constants, never of input: the values are bound parameters.
    return (
        "WITH claim AS MATERIALIZED ("  # noqa: S608
        "SELECT pg_try_advisory_xact_lock(CAST(:lock_id AS int8)) AS locked"
        "), prior AS MATERIALIZED ("
        "SELECT fingerprint, status, body, result FROM idempotency_keys "
        "WHERE (SELECT locked FROM claim) AND token_digest = CAST(:token_digest AS bytea) "
        "AND key = CAST(:key AS text) "
        "AND created_at > now() - CAST(:ttl_seconds AS int4) * interval '1 second'"
        "), go AS MATERIALIZED ("
        "SELECT FROM claim WHERE locked AND NOT EXISTS (SELECT FROM prior)"
        f"), {write_ctes}, answer AS MATERIALIZED ({answer}"
        "), stored AS ("
        "INSERT INTO idempotency_keys (token_digest, key, fingerprint, result) "
        "SELECT CAST(:token_digest AS bytea), CAST(:key AS text), CAST(:fingerprint AS bytea), "
        "(SELECT json_agg(answer.answer_row) FROM answer) FROM go "
        "ON CONFLICT (token_digest, key) DO UPDATE SET fingerprint = excluded.fingerprint, "
        "status = NULL, body = NULL, result = excluded.result, created_at = excluded.created_at "
        "WHERE idempotency_keys.created_at "
        "<= now() - CAST(:ttl_seconds AS int4) * interval '1 second' "
        "RETURNING 1"
        ") SELECT (SELECT locked FROM claim) AS locked, "
        "prior.fingerprint, prior.status, prior.body, CAST(prior.result AS text) AS stored, "
        "CAST((SELECT json_agg(answer.answer_row) FROM answer) AS text) AS result, "
        "CAST(CASE WHEN EXISTS (SELECT FROM go) AND NOT EXISTS (SELECT FROM stored) "
        f"THEN '{KEY_STORED_CONCURRENTLY}' ELSE '0' END AS int4) AS guard "
        "FROM claim LEFT JOIN prior ON true"
    )


# The marker of `_write_once`'s guard, in the error PostgreSQL raises with it.
KEY_STORED_CONCURRENTLY = "idempotency key stored concurrently"
_WRITE_ONCE_COLUMNS = (
    column("locked", Boolean),
    column("fingerprint", LargeBinary),
    column("status", Integer),
    column("body", LargeBinary),
    column("stored", String),
    column("result", String),
    column("guard", Integer),
)
_GATE = "AND EXISTS (SELECT FROM go)"

# UPDATE_ITEM_VALUES with an Idempotency-Key; its stored rows: [[missing ids]].
UPDATE_ITEM_VALUES_ONCE = text(
    _write_once(
        _UPDATE_ITEM_VALUES_CTES.format(gate=_GATE),
        f"SELECT json_build_array({_MISSING_IDS}) AS answer_row FROM go",  # noqa: S608
    )
).columns(*_WRITE_ONCE_COLUMNS)

# INSERT_ITEMS with an Idempotency-Key; its stored rows: [[id, name, value], …].
INSERT_ITEMS_ONCE = text(
    _write_once(
        f"inserted AS ({_INSERT_ITEMS.format(gate='WHERE EXISTS (SELECT FROM go)')})",
        "SELECT json_build_array(id, name, value) AS answer_row FROM inserted",
    )
).columns(*_WRITE_ONCE_COLUMNS)

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
