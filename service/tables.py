"""The service's tables. Every resource row carries its project; ids are prefixed and sortable."""

from __future__ import annotations

import enum
import secrets
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base

# SQLite only auto-increments an INTEGER PRIMARY KEY.
AutoId = BigInteger().with_variant(Integer(), "sqlite")


def new_id(prefix: str) -> str:
    """`job_0195a1b2c3d4e5f6a7b8c9d0`: a millisecond timestamp then randomness, so ids sort by creation.
    OpenAI's kinds take its separator: `file-0195a1b2c3d4e5f6a7b8c9d0`."""
    separator = "-" if prefix in OPENAI_ID_PREFIXES else "_"
    return f"{prefix}{separator}{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


OPENAI_ID_PREFIXES = frozenset({"file", "ftjob", "ftevent"})


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobStatus(enum.StrEnum):
    VALIDATING = "validating"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    PAUSING = "pausing"  # running until its next step, where it checkpoints and stops
    PAUSED = "paused"  # resumes from its last checkpoint when asked
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
# A job in these states may still read its files: they cannot be deleted.
ACTIVE_STATUSES = (
    JobStatus.VALIDATING,
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.CANCELLING,
    JobStatus.PAUSING,
    JobStatus.PAUSED,
)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("proj"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the key; the key is shown once
    display_prefix: Mapped[str] = mapped_column(String(16))  # enough to recognise a key in a list
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


TRAINING_PURPOSE, RESULTS_PURPOSE = "fine-tune", "fine-tune-results"


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("file"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(500))
    lines: Mapped[int] = mapped_column(Integer)
    examples: Mapped[int] = mapped_column(Integer)
    with_demonstration: Mapped[int] = mapped_column(Integer)
    # How many examples carry each extra field: a job checks its reward's fields against this.
    field_counts: Mapped[dict[str, int]] = mapped_column(JSON)
    # `fine-tune`: an uploaded JSONL; `fine-tune-results`: a finished job's step metrics (CSV).
    purpose: Mapped[str] = mapped_column(
        String(32), default=TRAINING_PURPOSE, server_default=TRAINING_PURPOSE
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RewardSpecRecord(Base):
    """Named reward specs saved through the retired /v1/rewards. Nothing writes them now (a job
    carries its grader in its config); kept so that a deployment upgrading loses none of them."""

    __tablename__ = "reward_specs"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("rw"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # a validated core.rewards.RewardSpec
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ftjob"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(20), index=True)
    model: Mapped[str] = mapped_column(String(500))
    method: Mapped[str] = mapped_column(String(20))
    # The validated core.config.TrainConfig as JSON, data paths and output dir left for the worker.
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    # A dataset cannot be deleted while an active job uses it; finished jobs keep a null reference.
    training_dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), index=True
    )
    validation_dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), index=True
    )
    # The saved reward a job made through the retired /v1/jobs named; its spec is in `config` too.
    reward_spec_id: Mapped[str | None] = mapped_column(ForeignKey("reward_specs.id", ondelete="SET NULL"))
    # The step metrics CSV a succeeded job leaves (OpenAI's `result_files`).
    result_file_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    suffix: Mapped[str | None] = mapped_column(String(64))
    user_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    # OpenAI's `method` as /v1/fine_tuning/jobs was asked for it, "auto" resolved: shown back as is.
    fine_tuning_method: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer)
    total_steps: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer, default=0)
    # The attempt number fences writes: a worker may only write while its attempt is current.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts that ended badly (worker lost, training error); at settings.max_attempts the job fails.
    # A graceful release (worker shutting down) is an attempt but not a failure.
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When the job's message was last sent to the broker: the reaper re-sends a lost one.
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[dict[str, str] | None] = mapped_column(JSON)  # {"code", "message"} when failed
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300))
    # Prompt and completion tokens of every training step, written when the job finishes.
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class JobEvent(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    level: Mapped[str] = mapped_column(String(10))
    # `metrics`: a training step's or an evaluation's numbers in `data` (`split` says which).
    type: Mapped[str] = mapped_column(String(10), default="message", server_default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobMetric(Base):
    """One row per training step (`kind` train) or evaluation (`kind` eval, step 0 = before training)."""

    __tablename__ = "job_metrics"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(10), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobSample(Base):
    __tablename__ = "job_samples"
    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


def fine_tuned_model_name(job: Job) -> str:
    """What a job's adapter is called once it succeeds: `ft:<base>:<suffix>:<job id>`."""
    return f"ft:{job.model}:{job.suffix or ''}:{job.id}"


def checkpoint_model_name(job: Job, step: int) -> str:
    """A checkpoint's model name, as OpenAI's: the job's model name and `:ckpt-step-<n>`."""
    return f"{fine_tuned_model_name(job)}{CHECKPOINT_MARK}{step}"


CHECKPOINT_MARK = ":ckpt-step-"


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)
    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(500))
    bytes: Mapped[int] = mapped_column(BigInteger)
    # The archive's digest: the model server checks it before serving the checkpoint's adapter.
    sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Artifact(Base):
    """The trained adapter: exactly one per succeeded job (the unique job_id says so)."""

    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("art"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    storage_key: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IdempotencyKey(Base):
    """The first response to a create request carrying an `Idempotency-Key`, replayed on retries."""

    __tablename__ = "idempotency_keys"
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    operation: Mapped[str] = mapped_column(String(40), primary_key=True)  # e.g. "create_job"
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))  # the same key with another body is refused
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class WebhookEndpoint(Base):
    """Where a project wants to hear that its jobs ended (service/webhooks.py)."""

    __tablename__ = "webhook_endpoints"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("whep"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    description: Mapped[str] = mapped_column(String(500), default="")
    events: Mapped[list[str]] = mapped_column(JSON)  # event types it is sent
    # `whsec_<base64>`, shown once when made; kept to sign every delivery (Standard Webhooks).
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookDelivery(Base):
    """One event for one endpoint: the outbox row, written in the transaction that ended the job,
    sent and retried by the API processes until the endpoint answers 2xx."""

    __tablename__ = "webhook_deliveries"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("msg"))  # webhook-id
    endpoint_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True
    )
    event_type: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)  # the exact bytes signed and sent, on every attempt
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
