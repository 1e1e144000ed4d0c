"""Keep a keyed write's rows with its key: the claim, write and answer are one statement.

The answer's status and body are now made from the stored rows (`result`, JSON) when a retry is
replayed, as they were when the write first ran; rows stored before this revision keep their
status and body.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """`result` for the rows of a write; status and body only for answers stored before."""
    op.execute(
        "ALTER TABLE idempotency_keys ADD COLUMN result json, "
        "ALTER COLUMN status DROP NOT NULL, ALTER COLUMN body DROP NOT NULL, "
        "ADD CONSTRAINT idempotency_keys_answer CHECK ("
        "result IS NOT NULL OR (status IS NOT NULL AND body IS NOT NULL))"
    )


def downgrade() -> None:
    """Back to status and body only: the answers stored as rows are forgotten (their writes
    stay done; a retry after the downgrade would apply them again)."""
    op.execute("DELETE FROM idempotency_keys WHERE body IS NULL")
    op.execute(
        "ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_answer, "
        "DROP COLUMN result, ALTER COLUMN status SET NOT NULL, ALTER COLUMN body SET NOT NULL"
    )
