"""Create idempotency_keys: the stored answers of writes sent with an Idempotency-Key.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """The table, keyed by the bearer token's SHA-256 digest (never the token) and the key."""
    op.execute(
        "CREATE TABLE idempotency_keys ("
        " token_digest bytea NOT NULL,"
        " key text NOT NULL,"
        " fingerprint bytea NOT NULL,"
        " status smallint NOT NULL,"
        " body bytea NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT now(),"
        " PRIMARY KEY (token_digest, key))"
    )
    # The expiry deletes the oldest rows first, in batches.
    op.execute("CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at)")


def downgrade() -> None:
    """Drop the table and every stored answer."""
    op.execute("DROP TABLE idempotency_keys")
