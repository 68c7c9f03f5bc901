"""Idempotency-Key on job creation and dataset upload: retries return the first response."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from sqlalchemy import func, select

from service.tables import Dataset, Job
from tests.conftest import ApiClient
from tests.service.test_end_to_end import addition_lines, job_body


@pytest.fixture
def dataset_id(api: ApiClient) -> str:
    return api.upload(addition_lines()).json()["id"]


def count(api: ApiClient, model) -> int:
    with api.sessions() as session:
        return session.scalar(
            select(func.count()).select_from(model).where(model.project_id == api.project_id)
        )


def messages_for(api: ApiClient, job_id: str) -> int:
    client = redis.Redis.from_url(api.settings.broker_url)
    return sum(job_id.encode() in raw for raw in client.lrange("celery", 0, -1))


def test_a_retried_job_creation_returns_the_first_job(api: ApiClient, dataset_id: str):
    body = job_body(dataset_id, steps=2)
    first = api.http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "create-1"})
    again = api.http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "create-1"})
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert count(api, Job) == 1
    assert messages_for(api, first.json()["id"]) == 1  # sent once


def test_the_same_key_with_another_body_is_422(api: ApiClient, dataset_id: str):
    assert api.http.post(
        "/v1/jobs", json=job_body(dataset_id, steps=2), headers={"Idempotency-Key": "k"}
    ).is_success
    other = api.http.post("/v1/jobs", json=job_body(dataset_id, steps=3), headers={"Idempotency-Key": "k"})
    assert other.status_code == 422
    error = other.json()["error"]
    assert error["code"] == "idempotency_key_reused" and error["param"] == "Idempotency-Key"
    assert count(api, Job) == 1


def test_without_a_key_every_request_creates_a_job(api: ApiClient, dataset_id: str):
    body = job_body(dataset_id, steps=2)
    ids = {api.http.post("/v1/jobs", json=body).json()["id"] for _ in range(2)}
    assert len(ids) == 2


def test_keys_belong_to_a_project(api: ApiClient, dataset_id: str):
    other = api.other_project()
    other_dataset = other.upload(addition_lines()).json()["id"]
    mine = api.http.post(
        "/v1/jobs", json=job_body(dataset_id, steps=2), headers={"Idempotency-Key": "shared"}
    )
    theirs = other.http.post(
        "/v1/jobs", json=job_body(other_dataset, steps=2), headers={"Idempotency-Key": "shared"}
    )
    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["id"] != theirs.json()["id"]


def test_a_refused_request_does_not_use_up_the_key(api: ApiClient, dataset_id: str):
    bad = job_body(dataset_id, steps=0)
    assert (
        api.http.post("/v1/jobs", json=bad, headers={"Idempotency-Key": "fix-and-retry"}).status_code == 422
    )
    good = api.http.post(
        "/v1/jobs", json=job_body(dataset_id, steps=2), headers={"Idempotency-Key": "fix-and-retry"}
    )
    assert good.status_code == 201


def test_concurrent_duplicates_create_one_job(api: ApiClient, dataset_id: str):
    body = job_body(dataset_id, steps=2)

    def create(_):
        return api.http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "race"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(create, range(8)))
    assert {r.status_code for r in responses} == {201}, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert count(api, Job) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 7


@pytest.mark.parametrize(
    "key",
    ["", "has space", "x" * 256, "naïve".encode()],
)
def test_a_malformed_key_is_422(api: ApiClient, dataset_id: str, key: str | bytes):
    response = api.http.post("/v1/jobs", json=job_body(dataset_id, steps=2), headers={"Idempotency-Key": key})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "Idempotency-Key"
    assert count(api, Job) == 0


def upload(api: ApiClient, lines: list[str], key: str):
    body = ("\n".join(lines) + "\n").encode()
    return api.http.post(
        "/v1/datasets", files={"file": ("data.jsonl", body)}, headers={"Idempotency-Key": key}
    )


def test_a_retried_upload_returns_the_first_dataset(api: ApiClient):
    first, again = upload(api, addition_lines(), "up-1"), upload(api, addition_lines(), "up-1")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert count(api, Dataset) == 1
    assert len(api.app.state.services.storage.list_keys(f"datasets/{api.project_id}/")) == 1


def test_the_same_upload_key_with_another_file_is_422(api: ApiClient):
    assert upload(api, addition_lines(), "up-2").status_code == 201
    other = upload(api, addition_lines(12), "up-2")
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert count(api, Dataset) == 1
    assert len(api.app.state.services.storage.list_keys(f"datasets/{api.project_id}/")) == 1


def test_concurrent_duplicate_uploads_store_one_dataset(api: ApiClient):
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: upload(api, addition_lines(), "up-race"), range(6)))
    assert {r.status_code for r in responses} == {201}, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert count(api, Dataset) == 1
    assert (
        len(api.app.state.services.storage.list_keys(f"datasets/{api.project_id}/")) == 1
    )  # losers cleaned up
