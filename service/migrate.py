"""Schema migrations: Alembic, configured in code so no alembic.ini has to travel with the image."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from service.config import Settings


class MigrationRefused(RuntimeError):
    """A migration will not change what it found: one line that says what, and what to do."""


def alembic_config(settings: Settings) -> Config:
    """An Alembic config whose env.py connects with the service's own settings."""
    config = Config()
    config.set_main_option("script_location", "service:migrations")
    config.attributes["settings"] = settings
    return config


def upgrade_to_head(settings: Settings) -> None:
    """Apply every migration not yet applied; safe to run again."""
    command.upgrade(alembic_config(settings), "head")
