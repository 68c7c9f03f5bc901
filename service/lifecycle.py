"""Job state changes, each a conditional UPDATE fenced by the attempt number.

A worker owns a job only while the row says `attempt == its attempt` and the job is running,
cancelling or pausing; every write checks that, so a worker that lost the job cannot overwrite the state
written by the one that took over. The database is the source of truth: the broker's messages
only say "look at job X", and the reaper (service/reaper.py) re-queues what a lost worker held.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.tables import Job, JobEvent, JobMetric, JobStatus, utcnow
from service.webhooks import enqueue_job_ended

OWNED = (JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.PAUSING)
# What a user asked of a running job, which its worker carries out at the next step.
STOP_REQUESTS = (JobStatus.CANCELLING, JobStatus.PAUSING)


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
        trained_tokens=trained_tokens(session, job_id),
        **values,
    )
    enqueue_job_ended(session, job_id, status)


def trained_tokens(session: Session, job_id: str) -> int:
    """The tokens of every training step (its `trained_tokens`; a step re-run after a resume counts once)."""
    rows = session.scalars(
        select(JobMetric.values).where(JobMetric.job_id == job_id, JobMetric.kind == "train")
    )
    return int(sum(values.get("trained_tokens") or 0 for values in rows))


def release_job(session: Session, job_id: str, attempt: int, reason: str) -> None:
    """Give an owned job back to the queue, not counted as a failure (the worker is shutting down).

    The caller sends the job's message after the commit; it resumes from its last checkpoint."""
    status = session.scalar(select(Job.status).where(*_owned(job_id, attempt)))
    if status is None:
        raise LostJob(job_id)
    if status == JobStatus.CANCELLING:  # the user asked to stop: there is nothing to give back
        update_job(
            session, job_id, attempt, status=JobStatus.CANCELLED, finished_at=utcnow(), lease_expires_at=None
        )
        add_event(session, job_id, f"cancelled ({reason})")
        enqueue_job_ended(session, job_id, JobStatus.CANCELLED)
        return
    if status == JobStatus.PAUSING:  # the user asked to pause: it waits for resume, not a worker
        update_job(session, job_id, attempt, **_paused())
        add_event(session, job_id, f"paused ({reason})")
        return
    update_job(session, job_id, attempt, **_requeued())
    add_event(session, job_id, f"released for another worker: {reason}")


def retry_or_fail(
    session: Session, job_id: str, attempt: int, error: dict[str, str], max_attempts: int
) -> JobStatus:
    """An owned job's attempt failed: queue it again, or fail it once it had max_attempts failures.

    Returns the job's new status; the caller sends the job's message after the commit if queued."""
    job = session.scalar(select(Job).where(*_owned(job_id, attempt)).with_for_update())
    if job is None:
        raise LostJob(job_id)
    return _after_failure(session, job, error, max_attempts)


def _after_failure(session: Session, job: Job, error: dict[str, str], max_attempts: int) -> JobStatus:
    failures = job.failures + 1
    finished = {"finished_at": utcnow(), "lease_expires_at": None}
    if job.status == JobStatus.CANCELLING:
        values = {"status": JobStatus.CANCELLED, **finished}
        message = f"cancelled; the attempt had ended with: {error['message']}"
    elif job.status == JobStatus.PAUSING and failures < max_attempts:
        values = _paused()
        message = f"paused; the attempt had ended with: {error['message']}"
    elif failures >= max_attempts:
        error = {
            "code": error["code"],
            "message": f"gave up after {failures} failed attempt(s); the last: {error['message']}",
        }
        values = {"status": JobStatus.FAILED, "error": error, **finished}
        message = f"failed: {error['message']}"
    else:
        values = _requeued()
        message = (
            f"attempt {job.attempt} failed ({failures} of {max_attempts} allowed): {error['message']}; "
            "queued again"
        )
    update_job(session, job.id, job.attempt, failures=failures, **values)
    level = "error" if values["status"] == JobStatus.FAILED else "warning"
    add_event(session, job.id, message[:4000], level=level)
    enqueue_job_ended(session, job.id, values["status"])  # only an ended job's status has an event
    return values["status"]


def pause_finished(session: Session, job_id: str, attempt: int, step: int) -> None:
    """The worker stopped a pausing job at a step, its checkpoint stored: now it waits for resume."""
    update_job(session, job_id, attempt, step=step, **_paused())
    add_event(session, job_id, f"paused at step {step}; resume continues from its checkpoint")


def _paused() -> dict[str, Any]:
    return {"status": JobStatus.PAUSED, "worker_id": None, "lease_expires_at": None}


def _requeued() -> dict[str, Any]:
    # The caller sends the message right after the commit (service.queue.dispatch_job).
    return {
        "status": JobStatus.QUEUED,
        "worker_id": None,
        "lease_expires_at": None,
        "dispatched_at": utcnow(),
    }


def reap_expired_leases(session: Session, now: datetime, max_attempts: int) -> list[tuple[str, JobStatus]]:
    """Jobs whose worker stopped renewing its lease (killed, frozen, cut off): queue or fail them.

    Each job is locked and re-checked, so concurrent reapers (one per API process) act once."""
    expired = session.scalars(
        select(Job)
        .where(Job.status.in_(OWNED), Job.lease_expires_at < now)
        .order_by(Job.lease_expires_at)
        .limit(100)
        .with_for_update(skip_locked=True)
    ).all()
    error = {
        "code": "worker_lost",
        "message": "the worker stopped renewing its lease (killed, out of memory or cut off)",
    }
    return [(job.id, _after_failure(session, job, error, max_attempts)) for job in expired]


def undispatched_jobs(session: Session, now: datetime, redispatch_after: timedelta) -> list[str]:
    """Queued jobs whose message was never sent or may be lost (a broker restarted without its data).

    Marks them dispatched now, so only one reaper sends each; a duplicate message is harmless
    (the claim is conditional)."""
    stale = (Job.dispatched_at.is_(None)) | (Job.dispatched_at < now - redispatch_after)
    ids = session.scalars(
        select(Job.id)
        .where(Job.status == JobStatus.QUEUED, stale)
        .limit(1000)
        .with_for_update(skip_locked=True)
    ).all()
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids)).values(dispatched_at=now))
    return list(ids)


def mark_undispatched(session: Session, job_id: str) -> None:
    """Sending the message failed: the reaper's next round sends it."""
    session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED).values(dispatched_at=None)
    )


def stop_requested(session: Session, job_id: str) -> bool:
    """Cancel or pause was asked for: the worker stops at the next step."""
    return session.scalar(select(Job.status).where(Job.id == job_id)) in STOP_REQUESTS


def request_stop(session: Session, job: Job, target: JobStatus) -> bool:
    """Move a job the user cancels or pauses on to `target`, conditionally (the worker may have moved
    it since it was read); False when it changed meanwhile."""
    values: dict[str, Any] = {"status": target}
    if target == JobStatus.CANCELLED:
        values |= {"finished_at": utcnow()}
    moved = bool(
        session.execute(
            update(Job).where(Job.id == job.id, Job.status == job.status).values(**values)
        ).rowcount
    )
    if moved:
        enqueue_job_ended(session, job.id, target)  # cancelled at once: an ended job
    return moved


def resume_job(session: Session, job: Job) -> bool:
    """A paused job back to the queue (the caller sends its message after the commit)."""
    moved = session.execute(
        update(Job).where(Job.id == job.id, Job.status == JobStatus.PAUSED).values(**_requeued())
    ).rowcount
    if moved:
        add_event(session, job.id, "resumed: queued to continue from its last checkpoint")
    return bool(moved)


def add_event(
    session: Session,
    job_id: str,
    message: str,
    level: str = "info",
    data: dict | None = None,
    type: str = "message",
) -> None:
    # Under the job's row lock to the commit: a job's events then commit in the order of their
    # ids, so an event stream that reads on from the last id it sent misses none (PostgreSQL
    # hands out ids before commits, which could otherwise land out of order).
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
    session.add(JobEvent(job_id=job_id, level=level, type=type, message=message, data=data))
    session.flush()
