"""retired training fields: cache_implementation and generation_backend did nothing; gone

Stored job configs are validated again by the worker, which refuses unknown fields, so a job
queued before this release would fail. This drops the two fields from every stored config.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 23:40:00
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Each with the one value that was ever accepted and run (what a downgrade puts back).
RETIRED = {"cache_implementation": "dynamic", "generation_backend": "transformers"}

jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("config", sa.JSON))


def _rewrite(change) -> None:
    connection = op.get_bind()
    for job_id, config in connection.execute(sa.select(jobs.c.id, jobs.c.config)).all():
        training = (config or {}).get("training")
        if isinstance(training, dict):
            new = change(dict(training))
            if new != training:
                connection.execute(
                    jobs.update().where(jobs.c.id == job_id).values(config={**config, "training": new})
                )


def upgrade() -> None:
    def drop(training: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in training.items() if k not in RETIRED}

    _rewrite(drop)


def downgrade() -> None:
    def restore(training: dict[str, Any]) -> dict[str, Any]:
        return {**RETIRED, **training}

    _rewrite(restore)
