"""The reaper and the fenced lifecycle on a real PostgreSQL and Redis, without a worker process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from migrations import upgrade_to_head
from service.db import connection_lost, make_engine, make_sessionmaker, transaction
from service.lifecycle import LostJob, claim_job, release_job, retry_or_fail, update_job
from service.queue import dispatch_job, make_celery
from service.reaper import Reaper, reap_once
from service.tables import IdempotencyKey, Job, JobEvent, JobStatus, Project, utcnow
from tests.conftest import free_port, temporary_database


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A database of this module's own: the reaper acts on every job it can see."""
    with temporary_database() as url:
        upgrade_to_head(url)
        yield url


@pytest.fixture
def settings(make_settings, database, redis_url):
    return make_settings(database_url=database, broker_url=redis_url, max_attempts=3, lease_seconds=60)


@pytest.fixture
def sessions(settings):
    engine = make_engine(settings.database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def celery(settings):
    return make_celery(settings)


@pytest.fixture
def queued_messages(redis_url) -> Iterator[callable]:
    client = redis.Redis.from_url(redis_url)
    client.delete("celery")

    def messages_for(job_id: str) -> int:
        return sum(job_id.encode() in raw for raw in client.lrange("celery", 0, -1))

    yield messages_for
    client.delete("celery")
    client.close()


def new_job(sessions, **values) -> str:
    with transaction(sessions) as session:
        project = Project(name=f"p-{time.monotonic_ns()}")
        session.add(project)
        session.flush()
        job = Job(
            project_id=project.id,
            status=JobStatus.QUEUED,
            model="tiny-random",
            method="prefix_rft",
            config={},
            seed=1,
            total_steps=10,
            dispatched_at=utcnow(),
            **values,
        )
        session.add(job)
    return job.id


def running_job(sessions, lease_left: float, **values) -> tuple[str, int]:
    job_id = new_job(sessions, **values)
    with transaction(sessions) as session:
        attempt = claim_job(session, job_id, "w1", lease_seconds=60)
        update_job(session, job_id, attempt, lease_expires_at=utcnow() + timedelta(seconds=lease_left))
    return job_id, attempt


def job(sessions, job_id: str) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def events(sessions, job_id: str) -> list[str]:
    with sessions() as session:
        return list(
            session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
        )


def test_an_expired_lease_is_requeued_and_its_message_sent(settings, sessions, celery, queued_messages):
    job_id, attempt = running_job(sessions, lease_left=-1)
    report = reap_once(settings, sessions, celery)
    assert report.requeued == [job_id] and report.dispatched == [job_id]
    row = job(sessions, job_id)
    assert (row.status, row.failures, row.worker_id, row.lease_expires_at) == (
        JobStatus.QUEUED,
        1,
        None,
        None,
    )
    assert row.dispatched_at is not None
    assert queued_messages(job_id) == 1
    assert "the worker stopped renewing its lease" in events(sessions, job_id)[-1]
    # The lost worker's late writes are refused, and the next claim fences with a new attempt.
    with pytest.raises(LostJob), transaction(sessions) as session:
        update_job(session, job_id, attempt, step=5)
    with transaction(sessions) as session:
        assert claim_job(session, job_id, "w2", 60) == attempt + 1


def test_a_live_lease_is_left_alone(settings, sessions, celery):
    job_id, _ = running_job(sessions, lease_left=30)
    report = reap_once(settings, sessions, celery)
    assert job_id not in report.requeued + report.failed
    assert job(sessions, job_id).status == JobStatus.RUNNING


def test_a_worker_frozen_inside_a_transaction_loses_its_locks_with_its_lease(settings, sessions, celery):
    # A worker stopped (SIGSTOP, a paused VM) between an UPDATE and its COMMIT holds the job's row
    # lock, and the reaper skips locked rows. The worker's engine makes PostgreSQL end such a session.
    job_id, attempt = running_job(sessions, lease_left=-1)
    frozen_engine = make_engine(settings.database_url, idle_in_transaction_seconds=1)
    frozen = make_sessionmaker(frozen_engine)()
    update_job(frozen, job_id, attempt, step=3)  # the row is locked until this transaction ends
    try:
        assert reap_once(settings, sessions, celery).requeued == []  # skipped while locked
        time.sleep(1.5)
        assert reap_once(settings, sessions, celery).requeued == [job_id]
        # Woken up, the worker fails to commit with an error it retries on a new connection
        # (JobRun.commit), where the fence refuses it.
        with pytest.raises(DBAPIError) as caught:
            frozen.commit()
        assert connection_lost(caught.value)
    finally:
        frozen_engine.dispose()
    assert job(sessions, job_id).step == 0  # the frozen worker's write never landed


def test_the_last_allowed_failure_fails_the_job_with_the_error(settings, sessions, celery):
    job_id, _ = running_job(sessions, lease_left=-1, failures=2)
    assert reap_once(settings, sessions, celery).failed == [job_id]
    row = job(sessions, job_id)
    assert row.status == JobStatus.FAILED and row.failures == 3 and row.finished_at is not None
    assert row.error["code"] == "worker_lost"
    assert row.error["message"].startswith("gave up after 3 failed attempt(s); the last: the worker stopped")


def test_a_lost_job_being_cancelled_ends_cancelled(settings, sessions, celery):
    job_id, attempt = running_job(sessions, lease_left=-1)
    with transaction(sessions) as session:
        update_job(session, job_id, attempt, status=JobStatus.CANCELLING)
    assert reap_once(settings, sessions, celery).cancelled == [job_id]
    assert job(sessions, job_id).status == JobStatus.CANCELLED


def test_a_lost_job_being_paused_ends_paused_and_is_not_requeued(settings, sessions, celery):
    job_id, attempt = running_job(sessions, lease_left=-1)
    with transaction(sessions) as session:
        update_job(session, job_id, attempt, status=JobStatus.PAUSING)
    report = reap_once(settings, sessions, celery)
    assert report.paused == [job_id] and job_id not in report.requeued + report.dispatched
    row = job(sessions, job_id)
    assert row.status == JobStatus.PAUSED and row.worker_id is None and row.finished_at is None
    assert reap_once(settings, sessions, celery).paused == []  # a paused job holds no lease


def test_a_training_error_is_retried_then_fails_with_the_last_error(sessions):
    job_id = new_job(sessions)
    for n in (1, 2, 3):
        with transaction(sessions) as session:
            attempt = claim_job(session, job_id, "w", 60)
            error = {"code": "training_error", "message": f"RuntimeError: boom {n}"}
            status = retry_or_fail(session, job_id, attempt, error, max_attempts=3)
        assert status == (JobStatus.FAILED if n == 3 else JobStatus.QUEUED)
    row = job(sessions, job_id)
    assert row.attempt == 3 and row.failures == 3
    assert row.error == {
        "code": "training_error",
        "message": "gave up after 3 failed attempt(s); the last: RuntimeError: boom 3",
    }
    assert sum("failed (" in e for e in events(sessions, job_id)) == 2


def test_a_release_is_not_a_failure(sessions):
    job_id, attempt = running_job(sessions, lease_left=30)
    with transaction(sessions) as session:
        release_job(session, job_id, attempt, "worker shutting down")
    row = job(sessions, job_id)
    assert (row.status, row.failures, row.worker_id) == (JobStatus.QUEUED, 0, None)
    assert events(sessions, job_id)[-1] == "released for another worker: worker shutting down"


def test_concurrent_reapers_act_once_per_job(settings, sessions, celery, queued_messages):
    jobs = [running_job(sessions, lease_left=-1)[0] for _ in range(6)]
    reports = []
    threads = [
        threading.Thread(target=lambda: reports.append(reap_once(settings, sessions, celery)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    requeued = [j for r in reports for j in r.requeued if j in jobs]
    assert sorted(requeued) == sorted(jobs)  # each exactly once
    for job_id in jobs:
        assert job(sessions, job_id).failures == 1
        assert queued_messages(job_id) == 1


def test_a_message_the_broker_refused_is_sent_by_the_reaper(
    settings, sessions, celery, queued_messages, make_settings
):
    job_id = new_job(sessions)
    dead_broker = make_celery(make_settings(broker_url=f"redis://127.0.0.1:{free_port()}/0"))
    started = time.monotonic()
    assert dispatch_job(dead_broker, sessions, job_id) is False
    assert time.monotonic() - started < 30
    assert job(sessions, job_id).dispatched_at is None and queued_messages(job_id) == 0
    assert job_id in reap_once(settings, sessions, celery).dispatched
    assert queued_messages(job_id) == 1
    # Sent once: the next round leaves it until redispatch_seconds pass.
    assert job_id not in reap_once(settings, sessions, celery).dispatched


def test_a_message_lost_with_the_broker_is_sent_again(settings, sessions, celery, queued_messages):
    job_id = new_job(sessions)
    later = utcnow() + timedelta(seconds=settings.redispatch_seconds + 1)
    assert job_id in reap_once(settings, sessions, celery, now=later).dispatched
    assert queued_messages(job_id) == 1


def test_idempotency_keys_are_forgotten_after_their_retention(settings, sessions, celery):
    job_id = new_job(sessions)
    with transaction(sessions) as session:
        project_id = session.get(Job, job_id).project_id
        for key, age in (("old", settings.idempotency_hours + 1), ("recent", settings.idempotency_hours - 1)):
            session.add(
                IdempotencyKey(
                    project_id=project_id,
                    operation="create_job",
                    key=key,
                    request_sha256="0" * 64,
                    status_code=201,
                    response={},
                    created_at=utcnow() - timedelta(hours=age),
                )
            )
    reap_once(settings, sessions, celery)
    with sessions() as session:
        kept = session.scalars(
            select(IdempotencyKey.key).where(IdempotencyKey.project_id == project_id)
        ).all()
    assert kept == ["recent"]


def test_the_reaper_thread_keeps_going_through_failures(make_settings, sessions, celery, settings):
    """A round that fails (here: no database) is logged and the next round runs."""
    broken = make_settings(
        database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none", reaper_seconds=0.05
    )
    broken_sessions = make_sessionmaker(make_engine(broken.database_url))
    reaper = Reaper(broken, broken_sessions, celery)
    reaper.start()
    time.sleep(0.3)
    assert reaper._thread.is_alive()
    reaper.stop()
    assert not reaper._thread.is_alive()
    # And a working one re-queues an expired job without being asked.
    job_id, _ = running_job(sessions, lease_left=-1)
    reaper = Reaper(settings.model_copy(update={"reaper_seconds": 0.1}), sessions, celery)
    reaper.start()
    try:
        deadline = time.monotonic() + 10
        while job(sessions, job_id).status != JobStatus.QUEUED and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        reaper.stop()
    assert job(sessions, job_id).status == JobStatus.QUEUED
