"""The Celery app as the API and the worker both see it. The API only sends tasks by name.

The database, not the broker, owns job state: a task carries a job id, and the worker claims
the job with a conditional update, so a second delivery of the same message does nothing.
"""

from __future__ import annotations

from celery import Celery

from service.settings import Settings

RUN_JOB = "prefix_rft.run_job"


def make_celery(settings: Settings) -> Celery:
    app = Celery("prefix_rft", broker=settings.broker_url)
    app.conf.update(
        # Acknowledge after the task ran, and take one message at a time: a training job holds
        # its worker for hours, and a prefetched message would wait behind it.
        task_acks_late=True,
        worker_prefetch_multiplier=1,
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
        for sub in ("queue", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        app.conf.broker_transport_options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
        }
    return app


def enqueue_job(celery: Celery, job_id: str) -> None:
    celery.send_task(RUN_JOB, args=[job_id])
