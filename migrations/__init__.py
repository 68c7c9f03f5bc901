"""Alembic migrations of the service database, and how to run them from code.

`prefix-rft init` and `prefix-rft serve` call `upgrade_to_head`; `alembic upgrade head` (with
alembic.ini) runs the same scripts.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade_to_head(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")
