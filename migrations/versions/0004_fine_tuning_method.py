"""fine-tuning method: the OpenAI `method` a job was created with, auto values resolved

Jobs created through /v1/fine_tuning/jobs show it back as they were asked for; older jobs have
none and show one made from their config.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 10:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("fine_tuning_method", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "fine_tuning_method")
