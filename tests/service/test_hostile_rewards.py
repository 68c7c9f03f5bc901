"""A hostile python grader in a real job: the job fails naming the grader, the worker keeps serving.

The API, a Celery worker process, PostgreSQL and Redis are the real ones; the grader runs in the
worker's reward sandbox with the deployment's default limits.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import ApiClient
from tests.service.test_end_to_end import addition_lines, finished, job_body, wait_for

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


def python_reward(name: str, source: str) -> dict:
    return {"graders": [{"type": "python", "name": name, "source": source}]}


def test_a_hostile_grader_fails_its_job_by_name_and_the_worker_runs_the_next(pg_settings, start_worker):
    api = ApiClient(pg_settings)
    worker = start_worker(pg_settings)
    dataset = api.upload(addition_lines()).json()

    body = job_body(dataset["id"], steps=5, reward=python_reward("hostile", HOSTILE))
    job_id = api.http.post("/v1/jobs", json=body).json()["id"]
    job = wait_for(api.http, job_id, finished, worker=worker)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "invalid_input"
    message = job["error"]["message"]
    assert message.startswith("reward grader 'hostile' failed on more than 50% of the samples for 3 steps"), (
        message
    )
    assert job["step"] == 2  # steps 1 and 2 were recorded, step 3 failed
    metrics = api.http.get(f"/v1/jobs/{job_id}/metrics", params={"kind": "train"}).json()["data"]
    assert [m["values"]["reward_errors"] for m in metrics] == [8, 8]  # every sample, counted
    events = api.http.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert events[-1]["level"] == "error" and "reward grader 'hostile'" in events[-1]["message"]
    assert 'File "reward.py"' in events[-1]["message"]  # the last error's traceback, trimmed
    warnings = [e for e in events if e["level"] == "warning" and e["message"].startswith("reward grader")]
    assert warnings and all(w["data"]["grader"] == "hostile" for w in warnings)
    assert any('File "reward.py"' in w["data"]["traceback"] for w in warnings)  # each kind of error, once

    # The same worker process is still serving: a job with a good python grader succeeds.
    body = job_body(dataset["id"], steps=2, reward=python_reward("contains_answer", GOOD))
    next_id = api.http.post("/v1/jobs", json=body).json()["id"]
    job = wait_for(api.http, next_id, finished, worker=worker)
    assert job["status"] == "succeeded", (job, worker.log()[-3000:])
    metrics = api.http.get(f"/v1/jobs/{next_id}/metrics", params={"kind": "train"}).json()["data"]
    assert all(m["values"]["reward_errors"] == 0 and "reward/contains_answer" in m["values"] for m in metrics)
    assert worker.process.poll() is None
