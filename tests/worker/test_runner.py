"""How an attempt ends, run in this process against PostgreSQL, Redis and local storage: only
InvalidInput blames the user; any other error, a ValueError from deep inside training included,
is retried within the attempt limit."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

import core.trainer
from core.data import DatasetError, DatasetReport, LineError
from service.db import make_engine, make_sessionmaker
from service.queue import make_celery
from service.storage import open_storage
from tests.conftest import ApiClient
from tests.service.test_end_to_end import JOBS, addition_lines, all_events, attempt_of, job_body
from worker import shutdown
from worker.runner import JobRun, WorkerServices, run_job


@pytest.fixture
def services(pg_settings):
    engine = make_engine(pg_settings.database_url, idle_in_transaction_seconds=pg_settings.lease_seconds)
    storage = open_storage(pg_settings.storage_url)
    yield WorkerServices(pg_settings, make_sessionmaker(engine), storage, make_celery(pg_settings))
    engine.dispose()


def failing_at_step_two(monkeypatch, error: Exception) -> None:
    """group_advantages runs once per prompt (2 per step): its third call is in step 2."""
    calls, real = [], core.trainer.group_advantages

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(core.trainer, "group_advantages", flaky)


def new_job(api: ApiClient) -> str:
    file_id = api.upload(addition_lines()).json()["id"]
    created = api.http.post(JOBS, json=job_body(file_id, steps=3))
    assert created.status_code == 200, created.text
    return created.json()["id"]


def events(api: ApiClient, job_id: str) -> list[str]:
    return [e["message"] for e in all_events(api.http, job_id)]


@pytest.mark.parametrize(
    "error",
    [
        ValueError("cannot reshape tensor of 0 elements"),
        json.JSONDecodeError("Expecting value", "", 0),  # a ValueError too
    ],
    ids=["ValueError", "JSONDecodeError"],
)
def test_a_stray_value_error_inside_training_is_retried_not_blamed_on_the_user(
    api, services, monkeypatch, error
):
    job_id = new_job(api)
    failing_at_step_two(monkeypatch, error)
    run_job(job_id, services)

    job = api.http.get(f"{JOBS}/{job_id}").json()
    assert (job["status"], attempt_of(api, job_id), job["error"]) == ("queued", 1, None)
    retried = [e for e in events(api, job_id) if e.startswith("attempt 1 failed")]
    assert retried == [f"attempt 1 failed (1 of 3 allowed): {type(error).__name__}: {error}; queued again"]

    run_job(job_id, services)  # the next attempt resumes from the checkpoint of step 1 and finishes
    job = api.http.get(f"{JOBS}/{job_id}").json()
    assert (job["status"], attempt_of(api, job_id)) == ("succeeded", 2)
    assert "resuming from the checkpoint of step 1" in events(api, job_id)


def test_what_the_user_must_fix_fails_the_job_at_once(api, services, monkeypatch):
    job_id = new_job(api)
    bad_line = DatasetReport(errors=[LineError(3, "prompt", "too long")], error_count=1)
    failing_at_step_two(monkeypatch, DatasetError("data", bad_line))
    run_job(job_id, services)

    job = api.http.get(f"{JOBS}/{job_id}").json()
    assert (job["status"], attempt_of(api, job_id), job["error"]["code"]) == ("failed", 1, "invalid_input")
    assert job["error"]["message"] == "data: invalid dataset\n  - line 3, field 'prompt': too long"


def test_a_worker_that_wakes_up_past_its_lease_still_retries_a_lost_connection(services):
    # A worker frozen inside commit() (SIGSTOP, a paused VM) wakes up long after it began, to a
    # connection the database ended. It must try once more, to learn that its job was taken over.
    run = JobRun(
        dataclasses.replace(services, settings=services.settings.model_copy(update={"lease_seconds": 1})),
        "job_x",
        1,
    )
    calls = []

    def work(_session):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.2)  # frozen past the lease
            raise OperationalError("COMMIT", {}, Exception("terminating connection"))
        return "retried"

    assert run.commit(work) == "retried" and len(calls) == 2

    def duplicate(_session):
        calls.append(1)
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    with pytest.raises(IntegrityError):  # not a lost connection: raised at once, not retried
        run.commit(duplicate)
    assert len(calls) == 3


def test_a_failing_rank_fails_the_attempt_with_its_error(api, services, monkeypatch):
    """An error raised in the ranks is the attempt's: what the user must fix fails the job at once."""
    # As where the API holds no tokenizer (compose): the prompts are first counted by the ranks.
    monkeypatch.setattr("api.jobs.check_prompt_lengths", lambda *args, **kwargs: None)
    two = dataclasses.replace(services, settings=services.settings.model_copy(update={"train_processes": 2}))
    file_id = api.upload(addition_lines()).json()["id"]
    body = job_body(file_id, steps=3, max_prompt_tokens=4)  # the ranks find every prompt too long
    job_id = api.http.post(JOBS, json=body).json()["id"]
    run_job(job_id, two)
    job = api.http.get(f"{JOBS}/{job_id}").json()
    assert (job["status"], attempt_of(api, job_id), job["error"]["code"]) == ("failed", 1, "invalid_input")
    assert "over training.max_prompt_tokens=4" in job["error"]["message"]


def test_two_ranks_train_a_job_and_sigterm_stops_them_at_a_checkpoint_to_resume(api, services):
    """PREFIX_RFT_TRAIN_PROCESSES=2: torchrun's ranks (gloo on CPU) train the job, rank 0 alone
    reporting. SIGTERM to the worker (here: its flag) reaches the ranks as a stop request: rank 0
    checkpoints, the job goes back to the queue, and the next attempt resumes from there."""
    two = dataclasses.replace(services, settings=services.settings.model_copy(update={"train_processes": 2}))
    file_id = api.upload(addition_lines()).json()["id"]
    # Enough steps that the stop (polled every 0.1 s here and 0.2 s by the runner) lands before the
    # last one on a fast machine too: 5 once ran to the end first.
    steps = 30
    job_id = api.http.post(JOBS, json=job_body(file_id, steps=steps, checkpoint_every=100)).json()["id"]

    def terminate_after_the_first_step() -> None:
        deadline = time.monotonic() + 120
        while api.http.get(f"{JOBS}/{job_id}").json()["step"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        shutdown.requested.set()

    signal_thread = threading.Thread(target=terminate_after_the_first_step)
    signal_thread.start()
    try:
        run_job(job_id, two)
    finally:
        signal_thread.join()
        shutdown.requested.clear()
    job = api.http.get(f"{JOBS}/{job_id}").json()
    stopped_at = job["step"]
    assert job["status"] == "queued" and 1 <= stopped_at < steps, events(api, job_id)
    released = f"released for another worker: worker shutting down; checkpoint at step {stopped_at}"
    assert released in events(api, job_id)

    run_job(job_id, two)
    job = api.http.get(f"{JOBS}/{job_id}").json()
    assert (job["status"], job["step"], attempt_of(api, job_id)) == ("succeeded", steps, 2)
    assert f"resuming from the checkpoint of step {stopped_at}" in events(api, job_id)
    metrics = api.http.get(f"{JOBS}/{job_id}/metrics", params={"kind": "train"}).json()["data"]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))  # once each: only rank 0 reports
    checkpoints = api.http.get(f"{JOBS}/{job_id}/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [stopped_at]  # every 100 steps, and the stop
    assert api.http.get(f"{JOBS}/{job_id}/adapter").status_code == 200
    assert any(e.startswith(f"succeeded after {steps} steps") for e in events(api, job_id))
