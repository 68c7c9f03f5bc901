"""The reaper: what keeps "every accepted job ends in a terminal state" true when processes die.

Every few seconds it
- re-queues jobs whose worker stopped renewing its lease (or fails them after max_attempts),
- sends the message of queued jobs whose message was never sent or may be lost with a broker,
- forgets Idempotency-Keys past their retention.

It runs in every API process (the one component both deployments always run), as a daemon
thread. Running several is safe: each job is locked and re-checked before it is touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from service.db import transaction
from service.lifecycle import reap_expired_leases, undispatched_jobs
from service.periodic import Periodic
from service.queue import dispatch_job
from service.settings import Settings
from service.tables import IdempotencyKey, JobStatus, utcnow

log = logging.getLogger(__name__)


@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)  # lost while pausing: they wait for resume
    dispatched: list[str] = field(default_factory=list)
    forgotten_keys: int = 0


def reap_once(
    settings: Settings, sessions: sessionmaker[Session], celery: Celery, now: datetime | None = None
) -> ReapReport:
    now = now or utcnow()
    report = ReapReport()
    with transaction(sessions) as session:
        for job_id, status in reap_expired_leases(session, now, settings.max_attempts):
            {
                JobStatus.QUEUED: report.requeued,
                JobStatus.FAILED: report.failed,
                JobStatus.CANCELLED: report.cancelled,
                JobStatus.PAUSED: report.paused,
            }[status].append(job_id)
    with transaction(sessions) as session:
        to_send = report.requeued + undispatched_jobs(
            session, now, timedelta(seconds=settings.redispatch_seconds)
        )
    report.dispatched = [job_id for job_id in to_send if dispatch_job(celery, sessions, job_id)]
    with transaction(sessions) as session:
        cutoff = now - timedelta(hours=settings.idempotency_hours)
        report.forgotten_keys = session.execute(
            delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff)
        ).rowcount
    for name in ("requeued", "failed", "cancelled", "paused", "dispatched"):
        if ids := getattr(report, name):
            log.info("reaper: %s %s", name, ", ".join(ids))
    return report


class Reaper(Periodic):
    """reap_once every settings.reaper_seconds in a daemon thread, until stop()."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], celery: Celery):
        super().__init__("reaper", settings.reaper_seconds, lambda: reap_once(settings, sessions, celery))
