"""/v1/files through the official openai client: upload with validation, pages that end, content,
delete, and other projects' files out of reach. The API behind uvicorn on PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import ApiClient, served

LINES = [
    json.dumps(
        {"messages": [{"role": "user", "content": f"{i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]}
    )
    for i in range(6)
] + [json.dumps({"messages": [{"role": "user", "content": "2 + 2?"}], "answer": "4"})]
DATA = ("\n".join(LINES) + "\n").encode()


@pytest.fixture
def deployment(api: ApiClient) -> Iterator[tuple[ApiClient, openai.OpenAI]]:
    with served(api.app) as base_url:
        yield api, openai.OpenAI(base_url=f"{base_url}/v1", api_key=api.key, max_retries=0)


def test_upload_validates_and_answers_openai_s_file_object(deployment):
    _, client = deployment
    uploaded = client.files.create(file=("train.jsonl", DATA), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.object == "file"
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose, uploaded.status) == (
        len(DATA),
        "train.jsonl",
        "fine-tune",
        "processed",
    )
    assert isinstance(uploaded.created_at, int) and uploaded.expires_at is None
    assert uploaded.validation == {  # ours, readable as an extra attribute
        "lines": 7,
        "examples": 7,
        "with_demonstration": 6,
        "field_counts": {"answer": 1},
        "sha256": uploaded.validation["sha256"],
    }
    assert client.files.wait_for_processing(uploaded.id).status == "processed"
    assert client.files.retrieve(uploaded.id).to_dict() == uploaded.to_dict()
    assert client.files.content(uploaded.id).read() == DATA


def test_bad_files_are_refused_with_each_line(deployment):
    _, client = deployment
    bad = DATA + b'{"messages": []}\nnot json\n'
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    error = caught.value
    assert (error.code, error.param) == ("invalid_dataset", "file")
    assert [d["line"] for d in error.body["details"]] == [8, 9]
    assert error.request_id
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("a.jsonl", DATA), purpose="assistants")
    assert caught.value.param == "purpose" and "fine-tune" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(
            file=("a.jsonl", DATA),
            purpose="fine-tune",
            expires_after={"anchor": "created_at", "seconds": 3600},
        )
    assert caught.value.param == "expires_after"
    assert client.files.list().data == []  # nothing was stored


def test_pages_follow_after_and_end(deployment):
    _, client = deployment
    ids = [client.files.create(file=(f"f{i}.jsonl", DATA), purpose="fine-tune").id for i in range(5)]
    newest_first = [f.id for f in client.files.list(limit=2)]  # the client follows has_more
    assert newest_first == ids[::-1]
    assert [f.id for f in client.files.list(limit=2, order="asc")] == ids
    page = client.files.list(limit=5)
    assert page.has_more is False and len(page.data) == 5
    assert client.files.list(purpose="batch").data == []
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.list(after="file-000000000000000000000000")
    assert caught.value.param == "after"


def test_delete_and_other_projects(deployment):
    api, client = deployment
    kept = client.files.create(file=("kept.jsonl", DATA), purpose="fine-tune")
    stranger = api.other_project()
    theirs = openai.OpenAI(base_url=str(client.base_url), api_key=stranger.key, max_retries=0)
    for call in (theirs.files.retrieve, theirs.files.delete, theirs.files.content):
        with pytest.raises(openai.NotFoundError) as caught:
            call(kept.id)
        assert caught.value.code == "file_not_found"
    assert [f.id for f in theirs.files.list()] == []
    deleted = client.files.delete(kept.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (kept.id, "file", True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(kept.id)


def test_a_file_a_queued_job_trains_on_is_not_deleted(deployment):
    _api, client = deployment
    uploaded = client.files.create(file=("train.jsonl", DATA), purpose="fine-tune")
    client.fine_tuning.jobs.create(model="tiny-random", training_file=uploaded.id)
    with pytest.raises(openai.ConflictError) as caught:
        client.files.delete(uploaded.id)
    assert caught.value.code == "file_in_use"
    assert caught.value.response.headers["x-should-retry"] == "false"  # the client would retry a 409
    assert client.files.retrieve(uploaded.id).id == uploaded.id
