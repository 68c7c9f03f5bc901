"""event type, trained tokens and result files: what OpenAI's job events, jobs and files carry

`job_events.type` is `metrics` for the events a training step or an evaluation writes, `message`
otherwise (existing rows); `jobs.trained_tokens` is written when a job finishes (null before);
`datasets.purpose` tells uploads (`fine-tune`) from a succeeded job's metrics CSV
(`fine-tune-results`), which `jobs.result_file_id` names; `checkpoints.sha256` lets the model
server check a checkpoint's archive before it serves it (null for older checkpoints: not served).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 12:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job_events") as batch_op:
        batch_op.add_column(sa.Column("type", sa.String(length=10), nullable=False, server_default="message"))
    with op.batch_alter_table("datasets") as batch_op:
        batch_op.add_column(
            sa.Column("purpose", sa.String(length=32), nullable=False, server_default="fine-tune")
        )
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("trained_tokens", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("result_file_id", sa.String(length=40), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_jobs_result_file_id_datasets"),
            "datasets",
            ["result_file_id"],
            ["id"],
            ondelete="SET NULL",
        )
    op.add_column("checkpoints", sa.Column("sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("checkpoints", "sha256")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_jobs_result_file_id_datasets"), type_="foreignkey")
        batch_op.drop_column("result_file_id")
        batch_op.drop_column("trained_tokens")
    with op.batch_alter_table("datasets") as batch_op:
        batch_op.drop_column("purpose")
    with op.batch_alter_table("job_events") as batch_op:
        batch_op.drop_column("type")
