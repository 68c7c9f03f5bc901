"""Job state changes made by workers, each a conditional UPDATE fenced by the attempt number.

A worker owns a job only while the row says `attempt == its attempt` and the job is running or
cancelling; every write checks that, so a worker that lost the job cannot overwrite the state
written by the one that took over.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.tables import Job, JobEvent, JobStatus, utcnow

OWNED = (JobStatus.RUNNING, JobStatus.CANCELLING)


class LostJob(Exception):
    """The job is no longer this worker's: cancelled meanwhile, or claimed by another attempt."""


def claim_job(session: Session, job_id: str, worker_id: str, lease_seconds: int) -> int | None:
    """Move a queued job to running and return the new attempt number; None if nothing to claim."""
    now = utcnow()
    attempt = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.RUNNING,
            attempt=Job.attempt + 1,
            worker_id=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=now,
        )
        .returning(Job.attempt)
    ).scalar_one_or_none()
    return attempt


def _owned(job_id: str, attempt: int):
    return (Job.id == job_id, Job.attempt == attempt, Job.status.in_(OWNED))


def renew_lease(session: Session, job_id: str, attempt: int, lease_seconds: int) -> str:
    """Extend the lease; returns the job's status (cancelling means: stop at the next step)."""
    status = session.execute(
        update(Job)
        .where(*_owned(job_id, attempt))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .returning(Job.status)
    ).scalar_one_or_none()
    if status is None:
        raise LostJob(job_id)
    return status


def update_job(session: Session, job_id: str, attempt: int, **values: Any) -> None:
    """Write fields of an owned job, or raise LostJob."""
    if not session.execute(update(Job).where(*_owned(job_id, attempt)).values(**values)).rowcount:
        raise LostJob(job_id)


def assert_owned(session: Session, job_id: str, attempt: int) -> None:
    """Lock an owned job's row for this transaction's other writes, or raise LostJob."""
    if session.scalar(select(Job.id).where(*_owned(job_id, attempt)).with_for_update()) is None:
        raise LostJob(job_id)


def finish_job(
    session: Session,
    job_id: str,
    attempt: int,
    status: JobStatus,
    error: dict[str, str] | None = None,
    **values: Any,
) -> None:
    update_job(
        session,
        job_id,
        attempt,
        status=status,
        error=error,
        finished_at=utcnow(),
        lease_expires_at=None,
        **values,
    )


def cancel_requested(session: Session, job_id: str) -> bool:
    return session.scalar(select(Job.status).where(Job.id == job_id)) == JobStatus.CANCELLING


def add_event(
    session: Session, job_id: str, message: str, level: str = "info", data: dict | None = None
) -> None:
    session.add(JobEvent(job_id=job_id, level=level, message=message, data=data))
