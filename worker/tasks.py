"""Celery tasks: thin, they take ids and call domain code (worker.runner)."""

from __future__ import annotations

from service.queue import RUN_JOB
from worker.celery_app import app
from worker.runner import run_job as run_job_now


@app.task(name=RUN_JOB)
def run_job(job_id: str) -> None:
    run_job_now(job_id)
