"""A hostile python grader in a real job: the job fails naming the grader, the worker keeps serving.

The API, a Celery worker process, PostgreSQL and Redis are the real ones; the grader runs in the
worker's reward sandbox with the deployment's default limits.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import ApiClient
from tests.service.test_end_to_end import JOBS, addition_lines, all_events, finished, job_body, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("sandbox_privileges"),
]

# Every sample meets another kind of hostility, none of which may hurt the worker.
HOSTILE = textwrap.dedent(
    """
    import os, socket
    calls = 0
    def reward(completion, example):
        global calls
        calls += 1
        if calls % 5 == 1:
            socket.create_connection(("127.0.0.1", 5432), timeout=2)  # the service's database
        if calls % 5 == 2:
            return open("/proc/1/environ").read()
        if calls % 5 == 3:
            return len(bytearray(10**11))  # memory
        if calls % 5 == 4:
            while True:
                os.fork()
        os._exit(3)  # the next sample gets a fresh sandbox
    """
)
GOOD = "def reward(completion, example):\n    return float(example['answer'] in completion)\n"


def python_grader(name: str, source: str) -> dict:
    return {"type": "python", "name": name, "source": source}


def test_a_hostile_grader_fails_its_job_by_name_and_the_worker_runs_the_next(pg_settings, start_worker):
    api = ApiClient(pg_settings)
    worker = start_worker(pg_settings)
    file_id = api.upload(addition_lines()).json()["id"]

    body = job_body(file_id, steps=5, grader=python_grader("hostile", HOSTILE))
    job_id = api.http.post(JOBS, json=body).json()["id"]
    job = wait_for(api.http, job_id, finished, worker=worker)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "invalid_input"
    message = job["error"]["message"]
    assert message.startswith("reward grader 'hostile' failed on more than 50% of the samples for 3 steps"), (
        message
    )
    assert job["step"] == 2  # steps 1 and 2 were recorded, step 3 failed
    metrics = api.http.get(f"{JOBS}/{job_id}/metrics", params={"kind": "train"}).json()["data"]
    assert [m["values"]["reward_errors"] for m in metrics] == [8, 8]  # every sample, counted
    events = all_events(api.http, job_id)  # newest first
    assert events[0]["level"] == "error" and "reward grader 'hostile'" in events[0]["message"]
    assert 'File "reward.py"' in events[0]["message"]  # the last error's traceback, trimmed
    warnings = [e for e in events if e["level"] == "warn" and e["message"].startswith("reward grader")]
    assert warnings and all(w["data"]["grader"] == "hostile" for w in warnings)
    assert any('File "reward.py"' in w["data"]["traceback"] for w in warnings)  # each kind of error, once

    # The same worker process is still serving: a job with a good python grader succeeds.
    body = job_body(file_id, steps=2, grader=python_grader("contains_answer", GOOD))
    next_id = api.http.post(JOBS, json=body).json()["id"]
    job = wait_for(api.http, next_id, finished, worker=worker)
    assert job["status"] == "succeeded", (job, worker.log()[-3000:])
    metrics = api.http.get(f"{JOBS}/{next_id}/metrics", params={"kind": "train"}).json()["data"]
    assert all(m["values"]["reward_errors"] == 0 and "reward/contains_answer" in m["values"] for m in metrics)
    assert worker.process.poll() is None
