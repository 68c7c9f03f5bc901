"""Migrations: an empty database upgrades to head, head matches the models (`alembic check`), and
data migrations rewrite what they must."""

from __future__ import annotations

from alembic import command
from sqlalchemy import insert, select

from core.config import parse_config
from migrations import alembic_config, upgrade_to_head
from service.db import make_engine, make_sessionmaker, transaction
from service.tables import Job, Project, utcnow


def test_an_empty_postgresql_upgrades_to_head_and_matches_the_models(migrated_postgres):
    command.check(alembic_config(migrated_postgres))  # raises when autogenerate finds a difference


def test_an_empty_sqlite_upgrades_to_head_and_matches_the_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'service.db'}"
    upgrade_to_head(url)
    command.check(alembic_config(url))
    upgrade_to_head(url)  # idempotent: a second start finds nothing to do


def test_stored_job_configs_lose_the_retired_training_fields(tmp_path):
    url = f"sqlite:///{tmp_path / 'service.db'}"
    command.upgrade(alembic_config(url), "0002")
    raw = {"model": "tiny-random", "method": "sft", "data": {"train": "train.jsonl"}}
    config = parse_config(raw).model_dump(mode="json")
    config["training"] |= {"cache_implementation": "dynamic", "generation_backend": "transformers"}
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    # Rows written and read column by column: the models are at head, the database is not.
    job_id = "job_000000000000000000000001"
    with transaction(sessions) as session:
        project = Project(name="p")
        session.add(project)
        session.flush()
        session.execute(
            insert(Job).values(
                id=job_id,
                project_id=project.id,
                status="queued",
                model="tiny-random",
                method="sft",
                config=config,
                seed=1,
                total_steps=100,
                step=0,
                attempt=0,
                failures=0,
                created_at=utcnow(),
            )
        )

    upgrade_to_head(url)
    with sessions() as session:
        stored = session.scalar(select(Job.config).where(Job.id == job_id))
    assert "cache_implementation" not in stored["training"] and "generation_backend" not in stored["training"]
    assert parse_config(stored) == parse_config(raw)  # what the worker reads back is valid again

    command.downgrade(alembic_config(url), "0002")
    with sessions() as session:
        assert session.scalar(select(Job.config).where(Job.id == job_id)) == config
    engine.dispose()
