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

# Locks the batch's rows in ascending id order before any is changed, so two overlapping
# batches queue behind each other instead of deadlocking, and tells which ids do not exist.
LOCK_ITEMS_FOR_UPDATE = text(
    "SELECT id FROM playing_with_neon WHERE id = ANY(CAST(:ids AS int4[])) ORDER BY id FOR UPDATE"
)

UPDATE_ITEM_VALUE = text(
    "UPDATE playing_with_neon SET value = CAST(:value AS float8) WHERE id = :id"
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
