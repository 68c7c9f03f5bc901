"""The Celery app as the API and the worker both see it. The API only sends tasks by name.

The database, not the broker, owns job state: a task carries a job id, and the worker claims
the job with a conditional update, so a second delivery of the same message does nothing.
"""

from __future__ import annotations

import logging

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from service.db import transaction
from service.lifecycle import mark_undispatched
from service.settings import Settings

log = logging.getLogger(__name__)

RUN_JOB = "prefix_rft.run_job"


def make_celery(settings: Settings) -> Celery:
    app = Celery("prefix_rft", broker=settings.broker_url)
    app.conf.update(
        # Acknowledge after the task ran, and take one message at a time: a training job holds
        # its worker for hours, and a prefetched message would wait behind it.
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        # Not task_reject_on_worker_lost: a message whose worker died is acked and dropped, and the
        # reaper re-queues the job from the database, counting the attempt, so a job that kills its
        # worker every time fails after max_attempts instead of looping forever.
        # A fresh child per job returns all of a job's memory (CUDA included) to the system.
        worker_max_tasks_per_child=1,
        # Results live in the database; the broker only dispatches.
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if settings.broker_url.startswith("redis"):
        # Redis re-delivers an unacknowledged message after the visibility timeout. Jobs run for
        # hours, so make it longer than any job; a re-delivery would find the job claimed anyway.
        app.conf.broker_transport_options = {"visibility_timeout": 7 * 24 * 3600}
    elif settings.broker_url.startswith("filesystem"):
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        app.conf.broker_transport_options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            # Exchange tables; kombu's default is a `control` folder in the working directory.
            "control_folder": str(folder / "control"),
        }
    return app


def dispatch_job(celery: Celery, sessions: sessionmaker[Session], job_id: str) -> bool:
    """Send a committed, queued job's message. If the broker is away, the job stays queued and
    the reaper sends it later: an accepted job is never lost to a broker outage."""
    try:
        celery.send_task(RUN_JOB, args=[job_id])
        return True
    except Exception as exc:  # kombu raises several kinds of connection errors
        log.warning(
            "job %s: the broker did not take its message (%s); the reaper will resend it", job_id, exc
        )
        try:
            with transaction(sessions) as session:
                mark_undispatched(session, job_id)
        except Exception:  # then redispatch_seconds after its last dispatch time
            log.warning("job %s: could not mark it undispatched", job_id, exc_info=True)
        return False
