"""Idempotency-Key on POST /v1/fine_tuning/jobs and POST /v1/files: a retry returns the first response.

The official client's own retries (x-stainless-retry-count, no key) are tested in
test_fine_tuning_jobs_api.py; here the key a caller sends.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from service.tables import Dataset, Job
from tests.conftest import EXACT_ANSWER, ApiClient, job_request

GRADER = EXACT_ANSWER


def addition_lines(count: int = 24) -> list[str]:
    return [
        json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
        for a, b in ((i % 7 + 1, i % 5 + 2) for i in range(count))
    ]


def job_body(training_file: str, steps: int) -> dict:
    hyperparameters = {"steps": steps, "prompts_per_step": 2, "rollouts_per_prompt": 4}
    return job_request(training_file, "reinforcement", grader=GRADER, hyperparameters=hyperparameters)


@pytest.fixture
def training_file(api: ApiClient) -> str:
    response = api.upload(addition_lines())
    assert response.status_code == 200, response.text
    return response.json()["id"]


def create_job(api: ApiClient, body: dict, key: str | bytes):
    return api.http.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": key})


def count(api: ApiClient, model) -> int:
    with api.sessions() as session:
        return session.scalar(
            select(func.count()).select_from(model).where(model.project_id == api.project_id)
        )


def stored_files(api: ApiClient) -> list[str]:
    return api.app.state.services.storage.list_keys(f"datasets/{api.project_id}/")


def record_sent_tasks(api: ApiClient, monkeypatch: pytest.MonkeyPatch) -> list[list]:
    """The args of every task the app sends to the broker, recorded as it sends them (the broker's
    queue itself may be read by any worker on this Redis)."""
    celery = api.app.state.services.celery
    send_task, sent = celery.send_task, []

    def recording(name, args=None, **kwargs):
        sent.append(args)
        return send_task(name, args=args, **kwargs)

    monkeypatch.setattr(celery, "send_task", recording)
    return sent


# ----- jobs ----------------------------------------------------------------------------------------


def test_a_retried_job_creation_returns_the_first_job(
    api: ApiClient, training_file: str, monkeypatch: pytest.MonkeyPatch
):
    sent = record_sent_tasks(api, monkeypatch)
    body = job_body(training_file, steps=2)
    first = create_job(api, body, "create-1")
    again = create_job(api, body, "create-1")
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert count(api, Job) == 1
    assert sent == [[first.json()["id"]]]  # sent to the workers once


def test_the_same_key_with_another_body_is_refused(api: ApiClient, training_file: str):
    assert create_job(api, job_body(training_file, steps=2), "k").status_code == 200
    other = create_job(api, job_body(training_file, steps=3), "k")
    assert other.status_code == 400, other.text
    error = other.json()["error"]
    assert error["code"] == "idempotency_key_reused" and error["param"] == "Idempotency-Key"
    assert count(api, Job) == 1


def test_without_a_key_every_request_creates_a_job(api: ApiClient, training_file: str):
    body = job_body(training_file, steps=2)
    ids = {api.http.post("/v1/fine_tuning/jobs", json=body).json()["id"] for _ in range(2)}
    assert len(ids) == 2


def test_keys_belong_to_a_project(api: ApiClient, training_file: str):
    other = api.other_project()
    other_file = other.upload(addition_lines()).json()["id"]
    mine = create_job(api, job_body(training_file, steps=2), "shared")
    theirs = create_job(other, job_body(other_file, steps=2), "shared")
    assert mine.status_code == theirs.status_code == 200, (mine.text, theirs.text)
    assert mine.json()["id"] != theirs.json()["id"]


def test_a_refused_request_does_not_use_up_the_key(api: ApiClient, training_file: str):
    bad = create_job(api, job_body(training_file, steps=0), "fix-and-retry")
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["param"] == "method.reinforcement.hyperparameters.steps"
    good = create_job(api, job_body(training_file, steps=2), "fix-and-retry")
    assert good.status_code == 200, good.text
    assert "idempotent-replayed" not in good.headers


def test_concurrent_duplicates_create_one_job(
    api: ApiClient, training_file: str, monkeypatch: pytest.MonkeyPatch
):
    sent = record_sent_tasks(api, monkeypatch)
    body = job_body(training_file, steps=2)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: create_job(api, body, "race"), range(8)))
    assert {r.status_code for r in responses} == {200}, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert count(api, Job) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 7
    assert sent == [[responses[0].json()["id"]]]


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "naïve".encode()])
def test_a_malformed_key_is_refused(api: ApiClient, training_file: str, key: str | bytes):
    response = create_job(api, job_body(training_file, steps=2), key)
    assert response.status_code == 400, response.text  # 400, as OpenAI's routes answer a bad request
    assert response.json()["error"]["param"] == "Idempotency-Key"
    assert count(api, Job) == 0


# ----- files ---------------------------------------------------------------------------------------


def upload(api: ApiClient, lines: list[str], key: str):
    body = ("\n".join(lines) + "\n").encode()
    return api.http.post(
        "/v1/files",
        files={"file": ("data.jsonl", body)},
        data={"purpose": "fine-tune"},
        headers={"Idempotency-Key": key},
    )


def test_a_retried_upload_returns_the_first_file(api: ApiClient):
    first, again = upload(api, addition_lines(), "up-1"), upload(api, addition_lines(), "up-1")
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert count(api, Dataset) == 1
    assert len(stored_files(api)) == 1


def test_the_same_upload_key_with_another_file_is_refused(api: ApiClient):
    assert upload(api, addition_lines(), "up-2").status_code == 200
    other = upload(api, addition_lines(12), "up-2")
    assert other.status_code == 400, other.text
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert count(api, Dataset) == 1
    assert len(stored_files(api)) == 1  # the second file was not kept


def test_concurrent_duplicate_uploads_store_one_file(api: ApiClient):
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: upload(api, addition_lines(), "up-race"), range(6)))
    assert {r.status_code for r in responses} == {200}, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert count(api, Dataset) == 1
    assert len(stored_files(api)) == 1  # the losers' objects were removed


def test_an_upload_and_a_job_may_use_the_same_key(api: ApiClient):
    # Keys are kept per operation: a file's key never replays a job, nor the other way round.
    file = upload(api, addition_lines(), "same-key")
    assert file.status_code == 200, file.text
    job = create_job(api, job_body(file.json()["id"], steps=2), "same-key")
    assert job.status_code == 200, job.text
    assert job.json()["object"] == "fine_tuning.job" and "idempotent-replayed" not in job.headers
