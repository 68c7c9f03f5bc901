"""Bad inputs to every endpoint: a clear 4xx, an OpenAI-style error body, and nothing changed.

Each test checks the answer (status, `code`, a `message` that says what is wrong, `param` naming
the field) and that the request left no trace: no new row, no stored object, no queued task.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
import pytest
import redis
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from api.schemas import JobCreate
from core.base_models import REGISTRY
from service.db import transaction
from service.keys import create_key
from service.settings import Settings
from service.tables import ApiKey, Dataset, Job, JobEvent, Project, RewardSpecRecord, utcnow
from tests.conftest import ApiClient

ANY: Any = object()
TABLES = (Project, ApiKey, Dataset, RewardSpecRecord, Job, JobEvent)
MODEL = "tiny-random"
LINES = [f'{{"prompt": "{i}+1=", "answer": "{i + 1}", "demonstration": "{i + 1}"}}' for i in range(3)]
BARE_LINES = [f'{{"prompt": "say {i}"}}' for i in range(3)]  # no answer, no demonstration
REWARD = {"graders": [{"type": "exact_match", "field": "answer"}]}
BOUNDARY = "test-boundary-5d1c"


# ----- helpers ---------------------------------------------------------------------------------


def release(client: ApiClient) -> None:
    """Close a client and both of its connection pools (a test deployment holds two engines)."""
    client.http.close()
    client.app.state.services.sessions.kw["bind"].dispose()
    client.sessions.kw["bind"].dispose()


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, migrated_postgres: str, redis_url: str
) -> Iterator[ApiClient]:
    """One deployment and project for the module (overrides conftest's `api`, made per test).

    Sharing is safe because a refused request changes nothing, which every test checks; the few
    tests that create something only ever compare counts before and after their own requests.
    """
    data_dir = tmp_path_factory.mktemp("bad-inputs") / "data"
    client = ApiClient(Settings(data_dir=data_dir, database_url=migrated_postgres, broker_url=redis_url))
    with client.http:  # one event-loop thread for all requests, and the app's lifespan
        yield client
    release(client)


@pytest.fixture
def small_api(make_settings, migrated_postgres: str, redis_url: str) -> Iterator[ApiClient]:
    """A deployment with tiny upload limits: lines of 1,000 bytes, files of 10,000."""
    settings = make_settings(
        database_url=migrated_postgres, broker_url=redis_url, max_line_bytes=1000, max_upload_bytes=10_000
    )
    client = ApiClient(settings)
    yield client
    release(client)


def assert_error(
    response: httpx.Response,
    status: int,
    code: str | None = None,
    param: Any = ANY,
    says: str | tuple[str, ...] = (),
) -> dict[str, Any]:
    """The response is an error of `status` in the OpenAI shape; `param` may be a set of alternatives."""
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"type", "code", "message", "param"} <= set(error), error
    assert error["type"] == ("authentication_error" if status == 401 else "invalid_request_error"), error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    if code is not None:
        assert error["code"] == code, error
    if isinstance(param, (set, frozenset)):
        assert error["param"] in param, error
    elif param is not ANY:
        assert error["param"] == param, error
    for text in (says,) if isinstance(says, str) else says:
        assert text in error["message"], error
    return error


def assert_client_error(response: httpx.Response) -> dict[str, Any]:
    """Any 4xx with a well-formed error body (where the right status is open to the fix)."""
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text}"
    return assert_error(response, response.status_code)


def stored_objects(api: ApiClient) -> list[str]:
    root = Path(unquote(urlparse(api.settings.storage_url).path))
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def queued_tasks(api: ApiClient) -> int:
    client = redis.Redis.from_url(api.settings.broker_url)
    try:
        return client.llen("celery")
    finally:
        client.close()


def counts(api: ApiClient) -> dict[str, int]:
    """Rows of every table a request may write, and the tasks waiting in the broker."""
    with api.sessions() as session:
        rows = {t.__tablename__: session.scalar(select(func.count()).select_from(t)) for t in TABLES}
    rows["queued_tasks"] = queued_tasks(api)
    return rows


@contextmanager
def changes_nothing(api: ApiClient) -> Iterator[None]:
    before = counts(api), stored_objects(api)
    yield
    after = counts(api), stored_objects(api)
    assert after == before, f"the request changed state: {before} -> {after}"


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body built by hand: (name, filename or None, data) per part."""
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename:
            body += b"Content-Type: application/octet-stream\r\n"
        body += b"\r\n" + data + b"\r\n"
    body += f"--{BOUNDARY}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def raw_json(text: str) -> dict[str, Any]:
    """Request kwargs for a body sent as-is (JSON the client would refuse to encode, or not JSON)."""
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def api_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path template) of every API route of the app.

    Recent FastAPI keeps included routers nested in `app.routes`; iter_route_contexts walks them.
    """
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        routes = [(route, route.path, route.methods) for route in app.routes]
    else:
        routes = [(c.original_route, c.path, c.methods) for c in iter_route_contexts(app.routes)]
    return sorted(
        (method, path) for route, path, methods in routes if isinstance(route, APIRoute) for method in methods
    )


# ----- authentication --------------------------------------------------------------------------


def protected_calls(api: ApiClient) -> list[tuple[str, str]]:
    """(method, path) of every /v1 route, path parameters filled with ids that do not exist."""
    calls = [
        (method, re.sub(r"\{[^}]+\}", "x_missing", path))
        for method, path in api_routes(api.app)
        if path.startswith("/v1")
    ]
    assert len(calls) >= 15, calls
    return calls


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "missing_api_key"),
        ("", "missing_api_key"),
        ("Basic dXNlcjpwYXNz", "missing_api_key"),
        ("Bearer", "missing_api_key"),
        ("Bearer    ", "missing_api_key"),
        ("Token prk_abc", "missing_api_key"),
        ("Bearer prk_not-a-real-key", "invalid_api_key"),
    ],
    ids=["no-header", "empty", "basic", "bearer-no-key", "bearer-blank", "other-scheme", "unknown-key"],
)
def test_every_v1_route_refuses_a_missing_or_bad_key(api: ApiClient, authorization: str | None, code: str):
    anonymous = TestClient(api.app, raise_server_exceptions=False)
    headers = {} if authorization is None else {"Authorization": authorization}
    with changes_nothing(api):
        for method, path in protected_calls(api):
            response = anonymous.request(method, path, headers=headers, json={})
            error = assert_error(response, 401, code)
            assert "Bearer" in error["message"] or "not valid" in error["message"], (method, path, error)
    anonymous.close()


def test_a_revoked_key_is_refused(api: ApiClient):
    with transaction(api.sessions) as session:
        project, key = create_key(session, f"revoked-{uuid.uuid4().hex[:12]}")
    assert api.http.get("/v1/datasets", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with transaction(api.sessions) as session:
        session.execute(update(ApiKey).where(ApiKey.project_id == project.id).values(revoked_at=utcnow()))
    response = api.http.get("/v1/datasets", headers={"Authorization": f"Bearer {key}"})
    assert_error(response, 401, "invalid_api_key", says="revoked")


def test_the_scheme_is_case_insensitive(api: ApiClient):
    response = api.http.get("/v1/datasets", headers={"Authorization": f"bearer {api.key}"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_health_probes_need_no_key(api: ApiClient, path: str):
    anonymous = TestClient(api.app, raise_server_exceptions=False)
    response = anonymous.get(path)
    # /ready may say 503 (the fresh deployment's storage directory is not created yet), never 401.
    assert response.status_code in ((200, 503) if path == "/ready" else (200,)), response.text
    anonymous.close()


def test_authentication_comes_before_body_parsing(api: ApiClient):
    """A valid-JSON but wrong body without a key is a 401, not a schema lesson."""
    anonymous = TestClient(api.app, raise_server_exceptions=False)
    assert_error(anonymous.post("/v1/jobs", json={"nonsense": True}), 401, "missing_api_key")
    anonymous.close()


def test_authentication_comes_before_json_decoding(api: ApiClient):
    anonymous = TestClient(api.app, raise_server_exceptions=False)
    assert_error(anonymous.post("/v1/jobs", **raw_json("{not json")), 401, "missing_api_key")
    anonymous.close()


def test_401_names_the_scheme_in_www_authenticate(api: ApiClient):
    anonymous = TestClient(api.app, raise_server_exceptions=False)
    response = anonymous.get("/v1/datasets")
    assert response.status_code == 401
    assert response.headers.get("www-authenticate", "").lower().startswith("bearer")
    anonymous.close()


# ----- dataset uploads -------------------------------------------------------------------------
# How an upload travels. What the file holds (bad lines, encodings, the line limit, a file at and
# one byte over the size limit, BOM and CRLF) is in test_hostile_datasets.py.


def _post(api: ApiClient, **kwargs: Any) -> httpx.Response:
    return api.http.post("/v1/datasets", **kwargs)


def _post_multipart(parts: list[tuple[str, str | None, bytes]]) -> Callable[[ApiClient], httpx.Response]:
    body, headers = multipart(parts)
    return lambda api: _post(api, content=body, headers=headers)


_GOOD_FILE = ("file", "data.jsonl", jsonl(LINES))
_FULL_BODY, _MP_HEADERS = multipart([_GOOD_FILE])

BAD_UPLOADS: dict[str, tuple[Callable[[ApiClient], httpx.Response], int, str, Any, str]] = {
    "json-body": (
        lambda api: _post(api, json={"file": "\n".join(LINES)}),
        400,
        "invalid_upload",
        None,
        "multipart/form-data",
    ),
    "urlencoded-form": (
        lambda api: _post(api, data={"file": "\n".join(LINES)}),
        400,
        "invalid_upload",
        None,
        "multipart/form-data",
    ),
    "multipart-without-boundary": (
        lambda api: _post(api, content=_FULL_BODY, headers={"content-type": "multipart/form-data"}),
        400,
        "invalid_upload",
        None,
        "multipart/form-data",
    ),
    "no-file-part": (
        _post_multipart([("name", None, b"my-data")]),
        400,
        "invalid_upload",
        "file",
        "no 'file' part",
    ),
    "two-file-parts": (
        _post_multipart([_GOOD_FILE, _GOOD_FILE]),
        400,
        "invalid_upload",
        "file",
        "exactly one 'file' part",
    ),
    "name-field-too-long": (
        _post_multipart([("name", None, b"n" * 5000), _GOOD_FILE]),
        400,
        "invalid_upload",
        "name",
        "too long",
    ),
    "garbage-multipart-body": (
        lambda api: _post(api, content=b"this is not multipart", headers=_MP_HEADERS),
        400,
        "invalid_upload",
        None,
        "malformed multipart body",
    ),
    "body-cut-inside-part-headers": (
        lambda api: _post(api, content=_FULL_BODY[:30], headers=_MP_HEADERS),
        400,
        "invalid_upload",
        ANY,
        "",
    ),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_refused(api: ApiClient, case: str):
    send, status, code, param, says = BAD_UPLOADS[case]
    with changes_nothing(api):
        assert_error(send(api), status, code, param, says)


def jsonl_of_size(size: int) -> bytes:
    """Valid JSONL of exactly `size` bytes, lines well under 1,000 bytes."""
    lines, total = [], 0
    while size - total > 600:
        line = '{"prompt": "' + "p" * 480 + '"}\n'
        lines.append(line)
        total += len(line)
    rest = size - total - len('{"prompt": ""}\n')
    lines.append('{"prompt": "' + "q" * rest + '"}\n')
    data = "".join(lines).encode()
    assert len(data) == size
    return data


def test_a_declared_content_length_over_the_limit_is_413_at_once(small_api: ApiClient):
    body, headers = multipart([("file", "huge.jsonl", jsonl_of_size(100_000))])
    with changes_nothing(small_api):
        assert_error(
            small_api.http.post("/v1/datasets", content=body, headers=headers),
            413,
            "file_too_large",
            "file",
            "10,000 bytes",
        )


def test_a_chunked_upload_over_the_limit_is_413(small_api: ApiClient):
    body, headers = multipart([("file", "big.jsonl", jsonl_of_size(30_000))])

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    request = small_api.http.build_request("POST", "/v1/datasets", content=chunks(), headers=headers)
    assert "content-length" not in request.headers  # really streamed without a declared size
    with changes_nothing(small_api):
        assert_error(small_api.http.send(request), 413, "file_too_large", "file", "10,000 bytes")


def test_a_chunked_upload_within_the_limit_is_accepted(small_api: ApiClient):
    body, headers = multipart([("file", "ok.jsonl", jsonl(LINES))])
    response = small_api.http.post("/v1/datasets", content=iter([body[:50], body[50:]]), headers=headers)
    assert response.status_code == 201, response.text


def test_a_body_cut_off_inside_the_file_is_400(api: ApiClient):
    cut = _FULL_BODY[: _FULL_BODY.index(LINES[2].encode())]  # the first two lines arrived, then nothing
    with changes_nothing(api):
        assert_error(api.http.post("/v1/datasets", content=cut, headers=_MP_HEADERS), 400, "invalid_upload")


def test_control_characters_are_dropped_from_the_name(api: ApiClient):
    body, headers = multipart([("name", None, b"my\x00data"), _GOOD_FILE])
    response = api.http.post("/v1/datasets", content=body, headers=headers)
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "mydata"


# ----- dataset reads and deletes ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_unknown_dataset_is_404(api: ApiClient, method: str):
    with changes_nothing(api):
        assert_error(
            api.http.request(method, "/v1/datasets/ds_missing"), 404, "dataset_not_found", says="'ds_missing'"
        )


def test_deleting_a_dataset_of_a_queued_job_is_409(api: ApiClient):
    dataset = api.upload(LINES).json()["id"]
    job = api.http.post("/v1/jobs", json={"model": MODEL, "training_dataset": dataset, "reward": REWARD})
    assert job.status_code == 201, job.text
    with changes_nothing(api):
        assert_error(api.http.delete(f"/v1/datasets/{dataset}"), 409, "dataset_in_use", says=job.json()["id"])
    assert api.http.get(f"/v1/datasets/{dataset}").status_code == 200


LIST_ROUTES = ["/v1/datasets", "/v1/rewards", "/v1/jobs"]


@pytest.mark.parametrize("path", LIST_ROUTES)
@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=0", "limit"),
        ("limit=-1", "limit"),
        ("limit=1000", "limit"),
        ("limit=abc", "limit"),
        ("after=" + "x" * 41, "after"),
    ],
)
def test_bad_list_query_is_422(api: ApiClient, path: str, query: str, param: str):
    with changes_nothing(api):
        assert_error(api.http.get(f"{path}?{query}"), 422, "invalid_request", param, f"{param}:")


def test_unknown_job_status_filter_is_422(api: ApiClient):
    assert_error(api.http.get("/v1/jobs?status=bogus"), 422, "invalid_request", "status", "'queued'")


# ----- rewards ---------------------------------------------------------------------------------

GRADER_TYPES = ("exact_match", "contains", "regex", "numeric", "math", "json_schema")


def _nested(*alternatives: str) -> set[str]:
    """A nested grader field as `graders[0].x` or `graders.0.x` (either notation is clear)."""
    return set(alternatives) | {a.replace("[0]", ".0") for a in alternatives}


BAD_REWARDS: dict[str, tuple[Any, str, Any, tuple[str, ...]]] = {
    "missing-graders": ({"name": "r"}, "invalid_request", "graders", ("Field required",)),
    "missing-name": ({"graders": REWARD["graders"]}, "invalid_request", "name", ("Field required",)),
    "empty-graders": ({"name": "r", "graders": []}, "invalid_request", "graders", ("at least 1",)),
    "graders-not-a-list": ({"name": "r", "graders": {"type": "regex"}}, "invalid_request", "graders", ()),
    "grader-not-an-object": ({"name": "r", "graders": ["regex"]}, "invalid_request", "graders[0]", ()),
    "unknown-grader-type": (
        {"name": "r", "graders": [{"type": "llm_judge"}]},
        "invalid_reward",
        ANY,
        ("llm_judge", *GRADER_TYPES),
    ),
    "grader-without-type": ({"name": "r", "graders": [{"weight": 1}]}, "invalid_reward", ANY, ("type",)),
    "invalid-regex": (
        {"name": "r", "graders": [{"type": "regex", "pattern": "(unclosed"}]},
        "invalid_reward",
        ANY,
        ("pattern", "not a valid regular expression"),
    ),
    "regex-without-pattern": (
        {"name": "r", "graders": [{"type": "regex"}]},
        "invalid_reward",
        ANY,
        ("pattern", "Field required"),
    ),
    "weight-not-a-number": (
        {"name": "r", "graders": [{"type": "exact_match", "weight": "x"}]},
        "invalid_reward",
        ANY,
        ("weight", "valid number"),
    ),
    "unknown-grader-field": (
        {"name": "r", "graders": [{"type": "exact_match", "feild": "answer"}]},
        "invalid_reward",
        ANY,
        ("feild", "did you mean 'field'"),
    ),
    "bad-extract-pattern": (
        {"name": "r", "graders": [{"type": "exact_match", "extract_pattern": "[a-"}]},
        "invalid_reward",
        ANY,
        ("extract_pattern", "not a valid regular expression"),
    ),
    "invalid-json-schema": (
        {"name": "r", "graders": [{"type": "json_schema", "schema": {"type": "nonsense"}}]},
        "invalid_reward",
        ANY,
        ("not a valid JSON Schema",),
    ),
    "repeated-grader-names": (
        {"name": "r", "graders": [{"type": "exact_match"}, {"type": "exact_match"}]},
        "invalid_reward",
        "graders",
        ("unique", "exact_match"),
    ),
    "extra-top-level-field": (
        {"name": "r", "graders": REWARD["graders"], "description": "x"},
        "invalid_request",
        "description",
        ("Extra inputs are not permitted",),
    ),
    "name-with-spaces": ({"name": "my reward", "graders": REWARD["graders"]}, "invalid_request", "name", ()),
    "name-empty": ({"name": "", "graders": REWARD["graders"]}, "invalid_request", "name", ()),
    "name-leading-dash": ({"name": "-r", "graders": REWARD["graders"]}, "invalid_request", "name", ()),
    "name-too-long": ({"name": "r" * 201, "graders": REWARD["graders"]}, "invalid_request", "name", ()),
    "name-not-a-string": ({"name": 5, "graders": REWARD["graders"]}, "invalid_request", "name", ()),
    "body-is-a-list": ([REWARD], "invalid_request", ANY, ("valid dictionary",)),
}


@pytest.mark.parametrize("case", list(BAD_REWARDS))
def test_bad_reward_is_refused(api: ApiClient, case: str):
    body, code, param, says = BAD_REWARDS[case]
    with changes_nothing(api):
        error = assert_error(api.http.post("/v1/rewards", json=body), 422, code, param, says)
    if code == "invalid_reward" and param is ANY:
        assert error["param"].startswith("graders"), error


@pytest.mark.parametrize(
    ("grader", "param"),
    [
        ({"type": "regex", "pattern": "("}, _nested("graders[0].pattern")),
        ({"type": "llm_judge"}, _nested("graders[0].type")),
        ({"type": "exact_match", "weight": "x"}, _nested("graders[0].weight")),
    ],
    ids=["pattern", "type", "weight"],
)
def test_a_bad_grader_field_is_named_once(api: ApiClient, grader: dict, param: set[str]):
    assert_error(api.http.post("/v1/rewards", json={"name": "r", "graders": [grader]}), 422, param=param)


def test_a_grader_without_type_lists_the_types(api: ApiClient):
    response = api.http.post("/v1/rewards", json={"name": "r", "graders": [{"weight": 1}]})
    error = assert_error(response, 422, "invalid_reward")
    assert "discriminator" not in error["message"] and "exact_match" in error["message"], error


def test_a_bad_reward_message_talks_about_the_reward(api: ApiClient):
    response = api.http.post("/v1/rewards", json={"name": "r", "graders": [{"type": "llm_judge"}]})
    error = assert_error(response, 422, "invalid_reward")
    assert "config" not in error["message"] and "\n" not in error["message"], error


def test_duplicate_reward_name_is_409(api: ApiClient):
    name = f"dup-{uuid.uuid4().hex[:8]}"
    assert api.http.post("/v1/rewards", json={"name": name, **REWARD}).status_code == 201
    with changes_nothing(api):
        assert_error(
            api.http.post("/v1/rewards", json={"name": name, **REWARD}),
            409,
            "reward_exists",
            "name",
            f"'{name}'",
        )


def test_unknown_reward_is_404(api: ApiClient):
    assert_error(api.http.get("/v1/rewards/rw_missing"), 404, "reward_not_found", says="'rw_missing'")


def test_an_infinite_weight_is_refused(api: ApiClient):
    body = '{"name": "r", "graders": [{"type": "exact_match", "weight": 1e400}]}'
    with changes_nothing(api):
        error = assert_error(api.http.post("/v1/rewards", **raw_json(body)), 422)
    assert "weight" in error["param"], error


# ----- jobs ------------------------------------------------------------------------------------


DROP: Any = object()  # a key to leave out of the base body


class Env:
    """A project with a dataset that has answers and demonstrations, one without, and a reward."""

    def __init__(self, api: ApiClient):
        self.ds = _created(api.upload(LINES))
        self.bare = _created(api.upload(BARE_LINES))
        name = f"exact-{uuid.uuid4().hex[:8]}"
        self.rw = _created(api.http.post("/v1/rewards", json={"name": name, **REWARD}))

    def body(self, **changes: Any) -> dict[str, Any]:
        body = {"model": MODEL, "training_dataset": self.ds, "reward_id": self.rw, **changes}
        return {k: v for k, v in body.items() if v is not DROP}


def _created(response: httpx.Response) -> str:
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture(scope="module")
def env(api: ApiClient) -> Env:
    return Env(api)


def test_the_base_job_body_is_valid(api: ApiClient, env: Env):
    """The control for the job tests: their base body creates a job, and the counts see it."""
    before = counts(api)
    response = api.http.post("/v1/jobs", json=env.body())
    assert response.status_code == 201, response.text
    after = counts(api)
    assert after["jobs"] == before["jobs"] + 1
    assert after["queued_tasks"] == before["queued_tasks"] + 1


INLINE = {"reward_id": DROP, "reward": REWARD}
MODELS = tuple(info.name for info in REGISTRY)

BAD_JOBS: dict[str, tuple[Callable[[Env], dict[str, Any]], int, str, Any, tuple[str, ...]]] = {
    "missing-training-dataset": (
        lambda e: e.body(training_dataset=DROP),
        422,
        "invalid_request",
        "training_dataset",
        ("Field required",),
    ),
    "missing-model": (lambda e: e.body(model=DROP), 422, "invalid_request", "model", ("Field required",)),
    "unknown-model": (
        lambda e: e.body(model="gpt-5"),
        422,
        "unknown_model",
        "model",
        ("'gpt-5'", *MODELS),
    ),
    "unknown-method": (
        lambda e: e.body(method="ppo"),
        422,
        "invalid_request",
        "method",
        ("prefix_rft", "sft_then_rft"),
    ),
    "unknown-training-dataset": (
        lambda e: e.body(training_dataset="ds_missing"),
        404,
        "dataset_not_found",
        "training_dataset",
        ("'ds_missing'",),
    ),
    "unknown-validation-dataset": (
        lambda e: e.body(validation_dataset="ds_missing"),
        404,
        "dataset_not_found",
        "validation_dataset",
        ("'ds_missing'",),
    ),
    "reward-id-and-reward": (
        lambda e: e.body(reward=REWARD),
        422,
        "invalid_job",
        "reward",
        ("either reward_id or an inline reward",),
    ),
    "unknown-reward-id": (
        lambda e: e.body(reward_id="rw_missing"),
        404,
        "reward_not_found",
        "reward_id",
        ("'rw_missing'",),
    ),
    "no-reward-for-rl": (lambda e: e.body(reward_id=DROP), 422, "invalid_job", "reward", ("needs a reward",)),
    "bad-inline-reward": (
        lambda e: e.body(**INLINE | {"reward": {"graders": [{"type": "llm_judge"}]}}),
        422,
        "invalid_reward",
        _nested("reward.graders[0].type"),
        ("llm_judge", "exact_match"),
    ),
    "inline-reward-without-graders": (
        lambda e: e.body(**INLINE | {"reward": {}}),
        422,
        "invalid_reward",
        "reward.graders",
        ("Field required",),
    ),
    "steps-zero": (
        lambda e: e.body(hyperparameters={"steps": 0}),
        422,
        "invalid_job",
        "hyperparameters.steps",
        ("greater than or equal to 1",),
    ),
    "steps-not-a-number": (
        lambda e: e.body(hyperparameters={"steps": "many"}),
        422,
        "invalid_job",
        "hyperparameters.steps",
        ("valid integer",),
    ),
    "unknown-hyperparameter": (
        lambda e: e.body(hyperparameters={"stepz": 5}),
        422,
        "invalid_job",
        "hyperparameters.stepz",
        ("unknown field", "did you mean 'steps'"),
    ),
    "hybrid-not-below-rollouts": (
        lambda e: e.body(hyperparameters={"rollouts_per_prompt": 4, "hybrid_rollouts_per_prompt": 4}),
        422,
        "invalid_job",
        {"hyperparameters", "hyperparameters.hybrid_rollouts_per_prompt"},
        ("hybrid_rollouts_per_prompt must be smaller than rollouts_per_prompt",),
    ),
    "unknown-scheduler": (
        lambda e: e.body(hyperparameters={"lr_scheduler": "step"}),
        422,
        "invalid_job",
        "hyperparameters.lr_scheduler",
        ("cosine",),
    ),
    "adapter-type-typo": (
        lambda e: e.body(adapter={"type": "prefx"}),
        422,
        "invalid_job",
        "adapter.type",
        ("'prefix'", "'lora'", "'prefx'"),
    ),
    "lora-rank-zero": (
        lambda e: e.body(adapter={"type": "lora", "r": 0}),
        422,
        "invalid_job",
        "adapter.r",
        ("greater than or equal to 1",),
    ),
    "unknown-adapter-field": (
        lambda e: e.body(adapter={"type": "lora", "rank": 8}),
        422,
        "invalid_job",
        "adapter.rank",
        ("unknown field",),
    ),
    "unknown-evaluation-field": (
        lambda e: e.body(evaluation={"evry": 5}),
        422,
        "invalid_job",
        "evaluation.evry",
        ("did you mean 'every'",),
    ),
    "negative-evaluation-every": (
        lambda e: e.body(evaluation={"every": -1}),
        422,
        "invalid_job",
        "evaluation.every",
        (),
    ),
    "reward-field-missing-in-training-data": (
        lambda e: e.body(training_dataset=e.bare),
        422,
        "dataset_missing_field",
        "training_dataset",
        ("'answer'", "3 of 3"),
    ),
    "reward-field-missing-in-validation-data": (
        lambda e: e.body(validation_dataset=e.bare),
        422,
        "dataset_missing_field",
        "validation_dataset",
        ("'answer'",),
    ),
    "sft-without-demonstrations": (
        lambda e: e.body(training_dataset=e.bare, method="sft", reward_id=DROP),
        422,
        "no_demonstrations",
        "training_dataset",
        ("'sft'", "demonstration"),
    ),
    # psft needs no reward either: without one it gets as far as the demonstration check.
    "psft-without-demonstrations": (
        lambda e: e.body(training_dataset=e.bare, method="psft", reward_id=DROP),
        422,
        "no_demonstrations",
        "training_dataset",
        ("'psft'", "demonstration"),
    ),
    "sft-then-rft-without-demonstrations": (
        lambda e: e.body(
            **INLINE
            | {
                "training_dataset": e.bare,
                "method": "sft_then_rft",
                "reward": {"graders": [{"type": "contains", "value": "yes"}]},
            }
        ),
        422,
        "no_demonstrations",
        "training_dataset",
        ("'sft_then_rft'", "demonstration"),
    ),
    "metadata-non-string-value": (
        lambda e: e.body(metadata={"team": 7}),
        422,
        "invalid_request",
        "metadata.team",
        ("valid string",),
    ),
    "metadata-too-many-pairs": (
        lambda e: e.body(metadata={f"k{i}": "v" for i in range(17)}),
        422,
        "invalid_request",
        "metadata",
        ("16",),
    ),
    "suffix-with-spaces": (
        lambda e: e.body(suffix="my run"),
        422,
        "invalid_request",
        "suffix",
        ("pattern",),
    ),
    "suffix-uppercase": (lambda e: e.body(suffix="Run1"), 422, "invalid_request", "suffix", ()),
    "suffix-too-long": (lambda e: e.body(suffix="a" * 41), 422, "invalid_request", "suffix", ("40",)),
    "checkpoint-every-zero": (
        lambda e: e.body(checkpoint_every=0),
        422,
        "invalid_request",
        "checkpoint_every",
        (),
    ),
    "seed-negative": (lambda e: e.body(seed=-1), 422, "invalid_request", "seed", ()),
    "seed-too-large": (lambda e: e.body(seed=2**31), 422, "invalid_request", "seed", ()),
    "extra-top-level-field": (
        lambda e: e.body(epochs=3),
        422,
        "invalid_request",
        "epochs",
        ("Extra inputs are not permitted",),
    ),
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_bad_job_is_refused(api: ApiClient, env: Env, case: str):
    make_body, status, code, param, says = BAD_JOBS[case]
    with changes_nothing(api):
        assert_error(api.http.post("/v1/jobs", json=make_body(env)), status, code, param, says)


# A value of the wrong JSON type for every field of the request body.
WRONG_TYPES: dict[str, Any] = {
    "model": 5,
    "method": ["rft"],
    "adapter": "prefix",
    "training_dataset": 5,
    "validation_dataset": {"id": "ds_x"},
    "reward_id": 5,
    "reward": [REWARD],
    "hyperparameters": [["steps", 5]],
    "evaluation": "every 5",
    "checkpoint_every": "often",
    "seed": 1.5,
    "suffix": 5,
    "metadata": ["a", "b"],
}


def test_wrong_types_cover_every_job_field():
    assert set(WRONG_TYPES) == set(JobCreate.model_fields)


@pytest.mark.parametrize("field", list(WRONG_TYPES))
def test_wrong_json_type_names_the_field(api: ApiClient, env: Env, field: str):
    with changes_nothing(api):
        assert_error(
            api.http.post("/v1/jobs", json=env.body(**{field: WRONG_TYPES[field]})),
            422,
            "invalid_request",
            field,
            f"{field}:",
        )


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("{not json", "JSON"),
        ('{"model": "tiny-random",}', "JSON"),
        ("[1, 2]", "valid dictionary"),
        ("null", "valid dictionary"),
        ('"a string"', "valid dictionary"),
    ],
    ids=["broken", "trailing-comma", "array", "null", "string"],
)
def test_a_body_that_is_not_a_json_object_is_422(api: ApiClient, body: str, says: str):
    with changes_nothing(api):
        assert_error(api.http.post("/v1/jobs", **raw_json(body)), 422, "invalid_request", says=says)


def test_a_json_decode_error_points_at_no_field(api: ApiClient):
    error = assert_error(api.http.post("/v1/jobs", **raw_json("{not json")), 422, "invalid_request")
    assert error["param"] is None and not error["message"].startswith("["), error


def test_an_empty_body_says_a_body_is_needed(api: ApiClient):
    error = assert_error(api.http.post("/v1/jobs"), 422, "invalid_request")
    assert "body" in error["message"].lower(), error


def test_a_missing_reward_points_at_reward(api: ApiClient, env: Env):
    assert_error(api.http.post("/v1/jobs", json=env.body(reward_id=DROP)), 422, "invalid_job", "reward")


@pytest.mark.parametrize(
    ("hyperparameters", "param"),
    [
        ({"rollouts_per_prompt": 4, "hybrid_rollouts_per_prompt": 4}, "hyperparameters"),
        ({"steps": 4, "sft_steps": 4}, "hyperparameters"),
        ({"cache_implementation": "static"}, "hyperparameters.cache_implementation"),
    ],
    ids=["hybrids", "sft-steps", "retired-field"],
)
def test_combination_errors_use_request_names(api: ApiClient, env: Env, hyperparameters: dict, param: str):
    response = api.http.post("/v1/jobs", json=env.body(hyperparameters=hyperparameters))
    error = assert_error(response, 422, "invalid_job", param)
    assert "training." not in error["message"], error


def test_steps_beyond_the_column_are_refused(api: ApiClient, env: Env):
    with changes_nothing(api):
        error = assert_error(api.http.post("/v1/jobs", json=env.body(hyperparameters={"steps": 2**31})), 422)
    assert error["param"] == "hyperparameters.steps", error


def test_an_infinite_learning_rate_is_refused(api: ApiClient, env: Env):
    body = (
        f'{{"model": "{MODEL}", "training_dataset": "{env.ds}", "reward_id": "{env.rw}", '
        '"hyperparameters": {"learning_rate": 1e400}}'
    )
    with changes_nothing(api):
        error = assert_error(api.http.post("/v1/jobs", **raw_json(body)), 422)
    assert error["param"] == "hyperparameters.learning_rate", error


# ----- job reads and actions -------------------------------------------------------------------


def job_routes(api: ApiClient) -> list[tuple[str, str]]:
    """(method, path template) of every route with a {job_id}."""
    calls = [(method, path) for method, path in api_routes(api.app) if "{job_id}" in path]
    assert len(calls) >= 7, calls  # get, cancel, events, metrics, samples, checkpoints, adapter
    return calls


def test_every_job_route_answers_404_for_an_unknown_job(api: ApiClient):
    with changes_nothing(api):
        for method, template in job_routes(api):
            response = api.http.request(method, template.replace("{job_id}", "job_missing"))
            assert_error(response, 404, "job_not_found", None, "'job_missing'")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/datasets/ds%00x", None),
        ("DELETE", "/v1/datasets/ds%00x", None),
        ("GET", "/v1/datasets?after=ds%00x", None),
        ("GET", "/v1/rewards/rw%00x", None),
        ("GET", "/v1/jobs/job%00x", None),
        ("POST", "/v1/jobs/job%00x/cancel", None),
        ("GET", "/v1/jobs/job%00x/events", None),
        ("POST", "/v1/jobs", {"training_dataset": "ds\x00x"}),
        ("POST", "/v1/jobs", {"reward_id": "rw\x00x"}),
    ],
    ids=[
        "get-dataset",
        "delete-dataset",
        "list-after",
        "get-reward",
        "get-job",
        "cancel-job",
        "job-events",
        "job-training-dataset",
        "job-reward-id",
    ],
)
def test_a_nul_byte_in_an_id_is_a_client_error(
    api: ApiClient, env: Env, method: str, path: str, body: dict | None
):
    with changes_nothing(api):
        assert_client_error(api.http.request(method, path, json=env.body(**body) if body else None))


@pytest.mark.parametrize(
    ("route", "query", "param"),
    [
        ("events", f"after={2**63}", "after"),
        ("samples", f"after={2**63}", "after"),
        ("metrics", f"after_step={2**31}", "after_step"),
    ],
)
def test_a_cursor_beyond_the_column_is_422(api: ApiClient, env: Env, route: str, query: str, param: str):
    job = _created(api.http.post("/v1/jobs", json=env.body()))
    assert_error(api.http.get(f"/v1/jobs/{job}/{route}?{query}"), 422, param=param)


@pytest.mark.parametrize(
    ("route", "query", "param"),
    [
        ("events", "after=-1", "after"),
        ("events", "limit=0", "limit"),
        ("events", "limit=1001", "limit"),
        ("samples", "after=x", "after"),
        ("samples", "limit=0", "limit"),
        ("metrics", "kind=validation", "kind"),
        ("metrics", "after_step=-2", "after_step"),
        ("metrics", "limit=10001", "limit"),
    ],
)
def test_bad_job_report_query_is_422(api: ApiClient, env: Env, route: str, query: str, param: str):
    job = _created(api.http.post("/v1/jobs", json=env.body()))
    with changes_nothing(api):
        assert_error(api.http.get(f"/v1/jobs/{job}/{route}?{query}"), 422, "invalid_request", param)


def test_the_adapter_of_a_queued_job_is_not_ready(api: ApiClient, env: Env):
    job = _created(api.http.post("/v1/jobs", json=env.body()))
    assert_error(api.http.get(f"/v1/jobs/{job}/adapter"), 404, "adapter_not_ready", says=("queued", job))


def test_cancelling_twice_is_409(api: ApiClient, env: Env):
    job = _created(api.http.post("/v1/jobs", json=env.body()))
    first = api.http.post(f"/v1/jobs/{job}/cancel")
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "cancelled"
    assert first.json()["finished_at"] is not None
    with changes_nothing(api):
        assert_error(api.http.post(f"/v1/jobs/{job}/cancel"), 409, "job_finished", says="cancelled")
    assert api.http.get(f"/v1/jobs/{job}").json()["status"] == "cancelled"


def test_a_cancelled_job_frees_its_dataset(api: ApiClient, env: Env):
    dataset = _created(api.upload(LINES))  # its own: the module's env keeps its datasets
    job = _created(api.http.post("/v1/jobs", json=env.body(training_dataset=dataset)))
    assert api.http.delete(f"/v1/datasets/{dataset}").status_code == 409
    assert api.http.post(f"/v1/jobs/{job}/cancel").status_code == 200
    assert api.http.delete(f"/v1/datasets/{dataset}").status_code == 200
    with api.sessions() as session:
        assert session.get(Job, job).training_dataset_id is None


# ----- unknown routes and methods --------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/nothing", "/v2/jobs", "/v1/jobs/x/y/z", "/"])
def test_unknown_route_is_a_json_404(api: ApiClient, path: str):
    assert_error(api.http.get(path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/v1/datasets"), ("PATCH", "/v1/jobs/job_x"), ("DELETE", "/v1/jobs/job_x"), ("POST", "/health")],
)
def test_wrong_method_is_a_json_405(api: ApiClient, method: str, path: str):
    with changes_nothing(api):
        assert_error(api.http.request(method, path), 405, "method_not_allowed")


def test_405_lists_the_allowed_methods(api: ApiClient):
    response = api.http.put("/v1/datasets")
    assert response.status_code == 405
    # Every method served at the path, though GET and POST are two routes.
    allowed = set(response.headers.get("allow", "").replace(" ", "").split(","))
    assert allowed == {"GET", "POST"}
