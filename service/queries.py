"""Every SQL statement the service sends, as bound `text()` constants.

`value` is read back as double precision and written through a double precision parameter,
so the same statements serve a table whose `value` column is `real` or `numeric`.
"""

from sqlalchemy import text

SELECT_ITEMS_ABOVE_VALUE = text(
    "SELECT id, name, value::float8 AS value FROM playing_with_neon "
    "WHERE value > CAST(:value AS float8) AND id > :after_id ORDER BY id LIMIT :limit"
)

SELECT_ITEMS = text(
    "SELECT id, name, value::float8 AS value FROM playing_with_neon "
    "WHERE id > :after_id ORDER BY id LIMIT :limit"
)

SELECT_ITEM = text("SELECT id, name, value::float8 AS value FROM playing_with_neon WHERE id = :id")

# The whole batch in one statement, so one round trip and all or nothing even in autocommit
# mode: the rows are locked in ascending id order first (a MATERIALIZED CTE: no plan can reorder
# the locks), so two overlapping batches queue behind each other instead of deadlocking; the
# UPDATE runs only if every id was found; the locked ids tell which are missing.
UPDATE_ITEM_VALUES = text(
    "WITH locked AS MATERIALIZED ("
    "SELECT id FROM playing_with_neon WHERE id = ANY(CAST(:ids AS int4[])) ORDER BY id FOR UPDATE"
    "), updated AS ("
    "UPDATE playing_with_neon AS item SET value = batch.value "
    "FROM unnest(CAST(:ids AS int4[]), CAST(:values AS float8[])) AS batch(id, value) "
    "WHERE item.id = batch.id "
    "AND (SELECT count(*) FROM locked) = cardinality(CAST(:ids AS int4[]))"
    ") SELECT id FROM locked"
)

# One statement for the whole batch; ORDER BY keeps the generated ids in the order given.
INSERT_ITEMS = text(
    "INSERT INTO playing_with_neon (name, value) "
    "SELECT name, value FROM unnest(CAST(:names AS text[]), CAST(:values AS float8[])) "
    "WITH ORDINALITY AS batch(name, value, position) ORDER BY position "
    "RETURNING id, name, value::float8 AS value"
)

DELETE_ITEM = text("DELETE FROM playing_with_neon WHERE id = :id RETURNING id")

SELECT_ONE = text("SELECT 1")
