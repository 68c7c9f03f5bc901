"""Migrations: an empty database upgrades to head, and head matches the models (`alembic check`)."""

from __future__ import annotations

from alembic import command

from migrations import alembic_config, upgrade_to_head


def test_an_empty_postgresql_upgrades_to_head_and_matches_the_models(migrated_postgres):
    command.check(alembic_config(migrated_postgres))  # raises when autogenerate finds a difference


def test_an_empty_sqlite_upgrades_to_head_and_matches_the_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'service.db'}"
    upgrade_to_head(url)
    command.check(alembic_config(url))
    upgrade_to_head(url)  # idempotent: a second start finds nothing to do
