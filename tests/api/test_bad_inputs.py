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

from api.schemas import FineTuningJobCreate
from core.base_models import REGISTRY
from service.db import transaction
from service.keys import create_key
from service.settings import Settings
from service.tables import ApiKey, Dataset, IdempotencyKey, Job, JobEvent, Project, utcnow
from tests.conftest import ApiClient, job_request

ANY: Any = object()
TABLES = (Project, ApiKey, Dataset, Job, JobEvent, IdempotencyKey)
MODEL = "tiny-random"
LINES = [f'{{"prompt": "{i}+1=", "answer": "{i + 1}", "demonstration": "{i + 1}"}}' for i in range(3)]
BARE_LINES = [f'{{"prompt": "say {i}"}}' for i in range(3)]  # no answer, no demonstration
GRADER = {"type": "exact_match", "field": "answer"}
BOUNDARY = "test-boundary-5d1c"
JOBS = "/v1/fine_tuning/jobs"
VALIDATE = "/v1/fine_tuning/alpha/graders/validate"


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
    assert api.http.get("/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with transaction(api.sessions) as session:
        session.execute(update(ApiKey).where(ApiKey.project_id == project.id).values(revoked_at=utcnow()))
    response = api.http.get("/v1/files", headers={"Authorization": f"Bearer {key}"})
    assert_error(response, 401, "invalid_api_key", says="revoked")


def test_the_scheme_is_case_insensitive(api: ApiClient):
    response = api.http.get("/v1/files", headers={"Authorization": f"bearer {api.key}"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_health_probes_need_no_key(api: ApiClient, path: str):
    anonymous = TestClient(api.app, raise_server_exceptions=False)
    response = anonymous.get(path)
    # /ready may say 503 (the fresh deployment's storage directory is not created yet), never 401.
    assert response.status_code in ((200, 503) if path == "/ready" else (200,)), response.text
    anonymous.close()


@pytest.mark.parametrize("path", [JOBS, VALIDATE])
def test_authentication_comes_before_body_parsing(api: ApiClient, path: str):
    """A valid-JSON but wrong body without a key is a 401, not a schema lesson."""
    anonymous = TestClient(api.app, raise_server_exceptions=False)
    assert_error(anonymous.post(path, json={"nonsense": True}), 401, "missing_api_key")
    anonymous.close()


def test_authentication_comes_before_json_decoding(api: ApiClient):
    anonymous = TestClient(api.app, raise_server_exceptions=False)
    assert_error(anonymous.post(JOBS, **raw_json("{not json")), 401, "missing_api_key")
    anonymous.close()


def test_401_names_the_scheme_in_www_authenticate(api: ApiClient):
    anonymous = TestClient(api.app, raise_server_exceptions=False)
    response = anonymous.get("/v1/files")
    assert response.status_code == 401
    assert response.headers.get("www-authenticate", "").lower().startswith("bearer")
    anonymous.close()


# ----- file uploads ----------------------------------------------------------------------------
# How an upload travels. What the file holds (bad lines, encodings, the line limit, a file at and
# one byte over the size limit, BOM and CRLF) is in test_hostile_datasets.py.


def _post(api: ApiClient, **kwargs: Any) -> httpx.Response:
    return api.http.post("/v1/files", **kwargs)


def _post_multipart(parts: list[tuple[str, str | None, bytes]]) -> Callable[[ApiClient], httpx.Response]:
    body, headers = multipart(parts)
    return lambda api: _post(api, content=body, headers=headers)


_GOOD_FILE = ("file", "data.jsonl", jsonl(LINES))
_PURPOSE = ("purpose", None, b"fine-tune")
_FULL_BODY, _MP_HEADERS = multipart([_PURPOSE, _GOOD_FILE])

BAD_UPLOADS: dict[str, tuple[Callable[[ApiClient], httpx.Response], int, str, Any, str]] = {
    "json-body": (
        lambda api: _post(api, json={"file": "\n".join(LINES), "purpose": "fine-tune"}),
        400,
        "invalid_upload",
        None,
        "multipart/form-data",
    ),
    "urlencoded-form": (
        lambda api: _post(api, data={"file": "\n".join(LINES), "purpose": "fine-tune"}),
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
        _post_multipart([_PURPOSE, ("name", None, b"my-data")]),
        400,
        "invalid_upload",
        "file",
        "no 'file' part",
    ),
    "two-file-parts": (
        _post_multipart([_PURPOSE, _GOOD_FILE, _GOOD_FILE]),
        400,
        "invalid_upload",
        "file",
        "exactly one 'file' part",
    ),
    "no-purpose-part": (
        _post_multipart([_GOOD_FILE]),
        400,
        "invalid_purpose",
        "purpose",
        "got none",
    ),
    "purpose-too-long": (
        _post_multipart([("purpose", None, b"p" * 5000), _GOOD_FILE]),
        400,
        "invalid_upload",
        "purpose",
        "too long",
    ),
    "name-field-too-long": (
        _post_multipart([_PURPOSE, ("name", None, b"n" * 5000), _GOOD_FILE]),
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
    body, headers = multipart([_PURPOSE, ("file", "huge.jsonl", jsonl_of_size(100_000))])
    with changes_nothing(small_api):
        assert_error(
            small_api.http.post("/v1/files", content=body, headers=headers),
            413,
            "file_too_large",
            "file",
            "10,000 bytes",
        )


def test_a_chunked_upload_over_the_limit_is_413(small_api: ApiClient):
    body, headers = multipart([_PURPOSE, ("file", "big.jsonl", jsonl_of_size(30_000))])

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    request = small_api.http.build_request("POST", "/v1/files", content=chunks(), headers=headers)
    assert "content-length" not in request.headers  # really streamed without a declared size
    with changes_nothing(small_api):
        assert_error(small_api.http.send(request), 413, "file_too_large", "file", "10,000 bytes")


def test_a_chunked_upload_within_the_limit_is_accepted(small_api: ApiClient):
    body, headers = multipart([_PURPOSE, ("file", "ok.jsonl", jsonl(LINES))])
    response = small_api.http.post("/v1/files", content=iter([body[:50], body[50:]]), headers=headers)
    assert response.status_code == 200, response.text


def test_a_body_cut_off_inside_the_file_is_400(api: ApiClient):
    cut = _FULL_BODY[: _FULL_BODY.index(LINES[2].encode())]  # the first two lines arrived, then nothing
    with changes_nothing(api):
        assert_error(api.http.post("/v1/files", content=cut, headers=_MP_HEADERS), 400, "invalid_upload")


def test_control_characters_are_dropped_from_the_filename(api: ApiClient):
    body, headers = multipart([_PURPOSE, ("file", "my\x01data.jsonl", jsonl(LINES))])
    response = api.http.post("/v1/files", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "mydata.jsonl"


# ----- file reads and deletes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", ""), ("DELETE", ""), ("GET", "/content")],
    ids=["get", "delete", "content"],
)
@pytest.mark.parametrize("file_id", ["file_missing", "file-000000000000000000000000"], ids=["bad", "unknown"])
def test_unknown_file_is_404(api: ApiClient, method: str, path: str, file_id: str):
    with changes_nothing(api):
        assert_error(
            api.http.request(method, f"/v1/files/{file_id}{path}"), 404, "file_not_found", says=f"'{file_id}'"
        )


def test_deleting_a_file_of_a_queued_job_is_409(api: ApiClient):
    training_file = _ok(api.upload(LINES))
    job = _ok(api.http.post(JOBS, json=job_request(training_file, "reinforcement", grader=GRADER)))
    with changes_nothing(api):
        assert_error(api.http.delete(f"/v1/files/{training_file}"), 409, "file_in_use", says=job)
    assert api.http.get(f"/v1/files/{training_file}").status_code == 200


# Each list's largest page plus one (files: 10,000; jobs: 100, as OpenAI's).
LIST_ROUTES = {"/v1/files": 10_001, JOBS: 101}


@pytest.mark.parametrize("path", list(LIST_ROUTES))
@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=0", "limit"),
        ("limit=-1", "limit"),
        ("limit={too_many}", "limit"),
        ("limit=abc", "limit"),
    ],
)
def test_bad_list_query_is_400(api: ApiClient, path: str, query: str, param: str):
    query = query.format(too_many=LIST_ROUTES[path])
    with changes_nothing(api):
        assert_error(api.http.get(f"{path}?{query}"), 400, "invalid_request", param, f"{param}:")


@pytest.mark.parametrize("path", list(LIST_ROUTES))
@pytest.mark.parametrize(
    "after", ["x" * 41, "file-000000000000000000000000", "ftjob-000000000000000000000000"]
)
def test_an_after_that_names_no_item_is_400(api: ApiClient, path: str, after: str):
    """Never the first page again: a client following `has_more` would loop."""
    with changes_nothing(api):
        assert_error(api.http.get(f"{path}?after={after}"), 400, "invalid_cursor", "after", repr(after))


def test_unknown_file_order_is_400(api: ApiClient):
    assert_error(api.http.get("/v1/files?order=newest"), 400, "invalid_request", "order", "'asc'")


# ----- graders ---------------------------------------------------------------------------------
# A grader is checked the same way where it is validated and in a job's method; here through
# /validate (and /run, which checks it first), in a job under "jobs" below.

GRADER_TYPES = ("string_check", "text_similarity", "python", "exact_match", "regex", "json_schema", "multi")

BAD_GRADER_BODIES: dict[str, tuple[Any, str, Any, tuple[str, ...]]] = {
    "missing-grader": ({}, "invalid_request", "grader", ("Field required",)),
    "grader-not-an-object": ({"grader": "regex"}, "invalid_request", "grader", ("valid dictionary",)),
    "grader-is-a-list": ({"grader": [GRADER]}, "invalid_request", "grader", ("valid dictionary",)),
    "extra-top-level-field": (
        {"grader": GRADER, "graders": [GRADER]},
        "invalid_request",
        "graders",
        ("Extra inputs are not permitted",),
    ),
    "body-is-a-list": ([GRADER], "invalid_request", ANY, ("valid dictionary",)),
    "unknown-grader-type": (
        {"grader": {"type": "llm_judge"}},
        "invalid_grader",
        "grader.type",
        ("llm_judge", *GRADER_TYPES),
    ),
    "grader-without-type": (
        {"grader": {"weight": 1}},
        "invalid_grader",
        "grader.type",
        ("`type`", "string_check"),
    ),
    "empty-grader": ({"grader": {}}, "invalid_grader", "grader.type", ("`type`",)),
    "invalid-regex": (
        {"grader": {"type": "regex", "pattern": "(unclosed"}},
        "invalid_grader",
        "grader.pattern",
        ("not a valid regular expression",),
    ),
    "regex-without-pattern": (
        {"grader": {"type": "regex"}},
        "invalid_grader",
        "grader.pattern",
        ("Field required",),
    ),
    "weight-not-a-number": (
        {"grader": {"type": "exact_match", "weight": "x"}},
        "invalid_grader",
        "grader.weight",
        ("valid number",),
    ),
    "unknown-grader-field": (
        {"grader": {"type": "exact_match", "feild": "answer"}},
        "invalid_grader",
        "grader.feild",
        ("did you mean 'field'",),
    ),
    "bad-extract-pattern": (
        {"grader": {"type": "exact_match", "extract_pattern": "[a-"}},
        "invalid_grader",
        "grader.extract_pattern",
        ("not a valid regular expression",),
    ),
    "invalid-json-schema": (
        {"grader": {"type": "json_schema", "schema": {"type": "nonsense"}}},
        "invalid_grader",
        "grader",
        ("not a valid JSON Schema",),
    ),
    "string-check-bad-operation": (
        {"grader": {"type": "string_check", "input": "a", "reference": "b", "operation": "is"}},
        "invalid_grader",
        "grader.operation",
        (),
    ),
    "multi-without-formula": (
        {"grader": {"type": "multi", "graders": {"a": GRADER}}},
        "invalid_grader",
        "grader.graders",
        ("calculate_output",),
    ),
    "multi-formula-names-no-grader": (
        {"grader": {"type": "multi", "graders": {"a": GRADER}, "calculate_output": "a + b"}},
        "invalid_grader",
        "grader.calculate_output",
        ("'b'",),
    ),
    "multi-bad-sub-grader": (
        {"grader": {"type": "multi", "graders": {"a": {"type": "regex"}}, "calculate_output": "a"}},
        "invalid_grader",
        "grader.graders.a.pattern",
        ("Field required",),
    ),
}


@pytest.mark.parametrize("route", ["validate", "run"])
@pytest.mark.parametrize("case", list(BAD_GRADER_BODIES))
def test_bad_grader_is_refused(api: ApiClient, case: str, route: str):
    body, code, param, says = BAD_GRADER_BODIES[case]
    if route == "run" and isinstance(body, dict):
        body = {**body, "model_sample": "1"}
    with changes_nothing(api):
        assert_error(
            api.http.post(f"/v1/fine_tuning/alpha/graders/{route}", json=body), 400, code, param, says
        )


def test_a_grader_without_type_talks_about_the_grader(api: ApiClient):
    response = api.http.post(VALIDATE, json={"grader": {"weight": 1}})
    error = assert_error(response, 400, "invalid_grader")
    assert "discriminator" not in error["message"] and "config" not in error["message"], error
    assert "\n" not in error["message"], error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"grader": GRADER}, "model_sample"),
        ({"grader": GRADER, "model_sample": 5}, "model_sample"),
        ({"grader": GRADER, "model_sample": "x" * 100_001}, "model_sample"),
        ({"grader": GRADER, "model_sample": "1", "item": ["answer", "1"]}, "item"),
    ],
    ids=["missing-sample", "sample-not-a-string", "sample-too-long", "item-not-an-object"],
)
def test_a_bad_sample_to_run_is_refused(api: ApiClient, body: dict, param: str):
    with changes_nothing(api):
        assert_error(
            api.http.post("/v1/fine_tuning/alpha/graders/run", json=body), 400, "invalid_request", param
        )


def test_an_infinite_weight_is_refused(api: ApiClient):
    body = '{"grader": {"type": "exact_match", "weight": 1e400}}'
    with changes_nothing(api):
        assert_error(
            api.http.post(VALIDATE, **raw_json(body)), 400, "invalid_grader", "grader.weight", "finite"
        )


# ----- jobs ------------------------------------------------------------------------------------


DROP: Any = object()  # a key to leave out of the base body


class Env:
    """A project with a file that has answers and demonstrations, and one without."""

    def __init__(self, api: ApiClient):
        self.file = _ok(api.upload(LINES))
        self.bare = _ok(api.upload(BARE_LINES))

    def body(
        self,
        kind: str = "reinforcement",
        grader: Any = GRADER,
        hyper: dict[str, Any] | None = None,
        adapter: dict[str, Any] | None = None,
        **top: Any,
    ) -> dict[str, Any]:
        """A job of method `kind` on the good file, with `grader`, `hyper` (its hyperparameters) and
        `adapter` in its method; `top` changes (or DROPs) top-level fields, `method` included."""
        body = job_request(
            self.file,
            kind,
            grader=None if grader is DROP else grader,
            hyperparameters=hyper,
            adapter=adapter,
        )
        body.update(top)
        return {k: v for k, v in body.items() if v is not DROP}


def _ok(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["id"]


@pytest.fixture(scope="module")
def env(api: ApiClient) -> Env:
    return Env(api)


def test_the_base_job_body_is_valid(api: ApiClient, env: Env):
    """The control for the job tests: their base body creates a job, and the counts see it."""
    before = counts(api)
    response = api.http.post(JOBS, json=env.body())
    assert response.status_code == 200, response.text
    after = counts(api)
    assert after["jobs"] == before["jobs"] + 1
    assert after["queued_tasks"] == before["queued_tasks"] + 1


MODELS = tuple(info.name for info in REGISTRY)
RFT = "method.reinforcement"  # where the base body's grader, hyperparameters and adapter go
HYPER = f"{RFT}.hyperparameters"

BAD_JOBS: dict[str, tuple[Callable[[Env], dict[str, Any]], int, str, Any, tuple[str, ...]]] = {
    "missing-training-file": (
        lambda e: e.body(training_file=DROP),
        400,
        "invalid_request",
        "training_file",
        ("Field required",),
    ),
    "missing-model": (lambda e: e.body(model=DROP), 400, "invalid_request", "model", ("Field required",)),
    "unknown-model": (
        lambda e: e.body(model="gpt-5"),
        400,
        "unknown_model",
        "model",
        ("'gpt-5'", *MODELS),
    ),
    "unknown-method-type": (
        lambda e: e.body(kind="ppo"),
        400,
        "invalid_request",
        "method.type",
        ("'ppo'", "reinforcement", "prefix_rft", "sft_then_rft"),
    ),
    "dpo": (
        lambda e: e.body(kind="dpo", grader=DROP),
        400,
        "unsupported_method",
        "method.type",
        ("'dpo'", "supervised"),
    ),
    "method-body-not-an-object": (
        lambda e: e.body(method={"type": "reinforcement", "reinforcement": ["grader"]}),
        400,
        "invalid_request",
        RFT,
        ("object",),
    ),
    "unknown-method-field": (
        lambda e: e.body(method={"type": "reinforcement", "reinforcement": {"grader": GRADER, "reward": {}}}),
        400,
        "invalid_request",
        f"{RFT}.reward",
        ("unknown",),
    ),
    "hyperparameters-beside-method": (
        lambda e: e.body(hyperparameters={"n_epochs": 1}),
        400,
        "invalid_request",
        "hyperparameters",
        ("inside method",),
    ),
    "unknown-training-file": (
        lambda e: e.body(training_file="file-000000000000000000000000"),
        404,
        "file_not_found",
        "training_file",
        ("'file-000000000000000000000000'",),
    ),
    "malformed-training-file": (
        lambda e: e.body(training_file="ds_missing"),
        404,
        "file_not_found",
        "training_file",
        ("'ds_missing'",),
    ),
    "unknown-validation-file": (
        lambda e: e.body(validation_file="file-000000000000000000000000"),
        404,
        "file_not_found",
        "validation_file",
        ("'file-000000000000000000000000'",),
    ),
    "no-grader-for-rl": (
        lambda e: e.body(grader=DROP),
        400,
        "invalid_request",
        f"{RFT}.grader",
        ("needs a grader",),
    ),
    "grader-for-supervised": (
        lambda e: e.body(kind="supervised"),
        400,
        "invalid_request",
        "method.supervised.grader",
        ("takes no grader",),
    ),
    "unknown-grader-type": (
        lambda e: e.body(grader={"type": "llm_judge"}),
        400,
        "invalid_grader",
        f"{RFT}.grader.type",
        ("llm_judge", "exact_match"),
    ),
    "empty-grader": (lambda e: e.body(grader={}), 400, "invalid_grader", f"{RFT}.grader.type", ("`type`",)),
    "bad-sub-grader": (
        lambda e: e.body(
            grader={"type": "multi", "graders": {"a": {"type": "regex"}}, "calculate_output": "a"}
        ),
        400,
        "invalid_grader",
        f"{RFT}.grader.graders.a.pattern",
        ("Field required",),
    ),
    "steps-zero": (
        lambda e: e.body(hyper={"steps": 0}),
        400,
        "invalid_job",
        f"{HYPER}.steps",
        ("greater than or equal to 1",),
    ),
    "steps-not-a-number": (
        lambda e: e.body(hyper={"steps": "many"}),
        400,
        ANY,
        f"{HYPER}.steps",
        ("integer",),
    ),
    "steps-and-epochs": (
        lambda e: e.body(hyper={"steps": 4, "n_epochs": 2}),
        400,
        "invalid_request",
        f"{HYPER}.n_epochs",
        ("not both",),
    ),
    "epochs-not-a-number": (
        lambda e: e.body(hyper={"n_epochs": "three"}),
        400,
        "invalid_request",
        f"{HYPER}.n_epochs",
        ('"auto" or an integer',),
    ),
    "batch-size-zero": (
        lambda e: e.body(hyper={"batch_size": 0}),
        400,
        "invalid_request",
        f"{HYPER}.batch_size",
        ("at least 1",),
    ),
    "learning-rate-multiplier-zero": (
        lambda e: e.body(hyper={"learning_rate_multiplier": 0}),
        400,
        "invalid_request",
        f"{HYPER}.learning_rate_multiplier",
        ("over 0",),
    ),
    "learning-rate-and-multiplier": (
        lambda e: e.body(hyper={"learning_rate": 1e-4, "learning_rate_multiplier": 2}),
        400,
        "invalid_request",
        f"{HYPER}.learning_rate",
        ("not both",),
    ),
    "unknown-hyperparameter": (
        lambda e: e.body(hyper={"stepz": 5}),
        400,
        "invalid_request",
        f"{HYPER}.stepz",
        ("unknown hyperparameter", "'stepz'"),
    ),
    "hybrid-not-below-rollouts": (
        lambda e: e.body(hyper={"rollouts_per_prompt": 4, "hybrid_rollouts_per_prompt": 4}),
        400,
        "invalid_job",
        {HYPER, f"{HYPER}.hybrid_rollouts_per_prompt"},
        ("hybrid_rollouts_per_prompt must be smaller than rollouts_per_prompt",),
    ),
    "unknown-scheduler": (
        lambda e: e.body(hyper={"lr_scheduler": "step"}),
        400,
        "invalid_job",
        f"{HYPER}.lr_scheduler",
        ("cosine",),
    ),
    "eval-interval-zero": (
        lambda e: e.body(hyper={"eval_interval": 0}),
        400,
        "invalid_request",
        f"{HYPER}.eval_interval",
        ("at least 1",),
    ),
    "eval-samples-not-a-number": (
        lambda e: e.body(hyper={"eval_samples": "all"}),
        400,
        "invalid_request",
        f"{HYPER}.eval_samples",
        ('"auto" or an integer',),
    ),
    "checkpoint-every-zero": (
        lambda e: e.body(hyper={"checkpoint_every": 0}),
        400,
        "invalid_request",
        f"{HYPER}.checkpoint_every",
        ("at least 1",),
    ),
    "adapter-type-typo": (
        lambda e: e.body(adapter={"type": "prefx"}),
        400,
        "invalid_request",
        f"{RFT}.adapter",
        ("'prefix'", "'lora'", "'prefx'"),
    ),
    "lora-rank-zero": (
        lambda e: e.body(adapter={"type": "lora", "r": 0}),
        400,
        "invalid_request",
        f"{RFT}.adapter",
        ("greater than or equal to 1",),
    ),
    "unknown-adapter-field": (
        lambda e: e.body(adapter={"type": "lora", "rank": 8}),
        400,
        "invalid_request",
        f"{RFT}.adapter",
        ("rank",),
    ),
    "grader-field-missing-in-training-data": (
        lambda e: e.body(training_file=e.bare),
        400,
        "file_missing_field",
        "training_file",
        ("'answer'", "3 of 3"),
    ),
    "grader-field-missing-in-validation-data": (
        lambda e: e.body(validation_file=e.bare),
        400,
        "file_missing_field",
        "validation_file",
        ("'answer'",),
    ),
    "supervised-without-demonstrations": (
        lambda e: e.body(kind="supervised", grader=DROP, training_file=e.bare),
        400,
        "no_demonstrations",
        "training_file",
        ("'sft'", "demonstration"),
    ),
    # psft needs no grader either: without one it gets as far as the demonstration check.
    "psft-without-demonstrations": (
        lambda e: e.body(kind="psft", grader=DROP, training_file=e.bare),
        400,
        "no_demonstrations",
        "training_file",
        ("'psft'", "demonstration"),
    ),
    "sft-then-rft-without-demonstrations": (
        # Four steps, so that the supervised phase (half of them) has steps to train on demonstrations.
        lambda e: e.body(
            kind="sft_then_rft",
            grader={"type": "contains", "value": "yes"},
            hyper={"steps": 4},
            training_file=e.bare,
        ),
        400,
        "no_demonstrations",
        "training_file",
        ("'sft_then_rft'", "demonstration"),
    ),
    "integrations": (
        lambda e: e.body(integrations=[{"type": "wandb", "wandb": {"project": "p"}}]),
        400,
        "unsupported_parameter",
        "integrations",
        ("wandb",),
    ),
    "metadata-non-string-value": (
        lambda e: e.body(metadata={"team": 7}),
        400,
        "invalid_request",
        "metadata.team",
        ("valid string",),
    ),
    "metadata-too-many-pairs": (
        lambda e: e.body(metadata={f"k{i}": "v" for i in range(17)}),
        400,
        "invalid_request",
        "metadata",
        ("16",),
    ),
    "suffix-with-spaces": (
        lambda e: e.body(suffix="my run"),
        400,
        "invalid_request",
        "suffix",
        ("pattern",),
    ),
    "suffix-uppercase": (lambda e: e.body(suffix="Run1"), 400, "invalid_request", "suffix", ()),
    "suffix-too-long": (lambda e: e.body(suffix="a" * 41), 400, "invalid_request", "suffix", ("40",)),
    "seed-negative": (lambda e: e.body(seed=-1), 400, "invalid_request", "seed", ()),
    "seed-too-large": (lambda e: e.body(seed=2**31), 400, "invalid_request", "seed", ()),
    "extra-top-level-field": (
        lambda e: e.body(epochs=3),
        400,
        "invalid_request",
        "epochs",
        ("Extra inputs are not permitted",),
    ),
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_bad_job_is_refused(api: ApiClient, env: Env, case: str):
    make_body, status, code, param, says = BAD_JOBS[case]
    with changes_nothing(api):
        assert_error(
            api.http.post(JOBS, json=make_body(env)), status, None if code is ANY else code, param, says
        )


# A value of the wrong JSON type for every field of the request body.
WRONG_TYPES: dict[str, Any] = {
    "model": 5,
    "training_file": 5,
    "validation_file": {"id": "file-x"},
    "method": ["reinforcement"],
    "hyperparameters": [["steps", 5]],
    "suffix": 5,
    "seed": 1.5,
    "metadata": ["a", "b"],
    "integrations": "wandb",
}


def test_wrong_types_cover_every_job_field():
    assert set(WRONG_TYPES) == set(FineTuningJobCreate.model_fields)


@pytest.mark.parametrize("field", list(WRONG_TYPES))
def test_wrong_json_type_names_the_field(api: ApiClient, env: Env, field: str):
    with changes_nothing(api):
        assert_error(
            api.http.post(JOBS, json=env.body(**{field: WRONG_TYPES[field]})),
            400,
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
@pytest.mark.parametrize("path", [JOBS, VALIDATE])
def test_a_body_that_is_not_a_json_object_is_400(api: ApiClient, path: str, body: str, says: str):
    with changes_nothing(api):
        assert_error(api.http.post(path, **raw_json(body)), 400, "invalid_request", says=says)


def test_a_json_decode_error_points_at_no_field(api: ApiClient):
    error = assert_error(api.http.post(JOBS, **raw_json("{not json")), 400, "invalid_request")
    assert error["param"] is None and not error["message"].startswith("["), error


@pytest.mark.parametrize("path", [JOBS, VALIDATE])
def test_an_empty_body_says_a_body_is_needed(api: ApiClient, path: str):
    error = assert_error(api.http.post(path), 400, "invalid_request")
    assert "body" in error["message"].lower(), error


@pytest.mark.parametrize(
    ("hyperparameters", "param"),
    [
        ({"rollouts_per_prompt": 4, "hybrid_rollouts_per_prompt": 4}, HYPER),
        ({"steps": 4, "sft_steps": 4}, HYPER),
        ({"dtype": "float8"}, f"{HYPER}.dtype"),
    ],
    ids=["hybrids", "sft-steps", "bad-dtype"],
)
def test_combination_errors_use_request_names(api: ApiClient, env: Env, hyperparameters: dict, param: str):
    response = api.http.post(JOBS, json=env.body(hyper=hyperparameters))
    error = assert_error(response, 400, "invalid_job", param)
    assert "training." not in error["message"], error


def test_steps_beyond_the_column_are_refused(api: ApiClient, env: Env):
    with changes_nothing(api):
        error = assert_error(api.http.post(JOBS, json=env.body(hyper={"steps": 2**31})), 400)
    assert error["param"] == f"{HYPER}.steps", error


# The field each infinite value is refused on: the multiplier becomes learning_rate before the
# trainer's check sees it, so naming either is clear.
INFINITE_RATES = {
    "learning_rate": {f"{HYPER}.learning_rate"},
    "learning_rate_multiplier": {f"{HYPER}.learning_rate_multiplier", f"{HYPER}.learning_rate"},
    "compute_multiplier": {f"{HYPER}.compute_multiplier", f"{HYPER}.rollouts_per_prompt"},
}


@pytest.mark.parametrize("name", list(INFINITE_RATES))
def test_an_infinite_rate_is_refused(api: ApiClient, env: Env, name: str):
    body = (
        f'{{"model": "{MODEL}", "training_file": "{env.file}", "method": {{"type": "reinforcement", '
        f'"reinforcement": {{"grader": {{"type": "exact_match", "field": "answer"}}, '
        f'"hyperparameters": {{"{name}": 1e400}}}}}}}}'
    )
    with changes_nothing(api):
        assert_error(api.http.post(JOBS, **raw_json(body)), 400, param=INFINITE_RATES[name])


# ----- job reads and actions -------------------------------------------------------------------


def job_routes(api: ApiClient) -> list[tuple[str, str]]:
    """(method, path template) of every route with a {fine_tuning_job_id}."""
    calls = [(method, path) for method, path in api_routes(api.app) if "{fine_tuning_job_id}" in path]
    # get, cancel, pause, resume, events, checkpoints, metrics, samples, adapter
    assert len(calls) >= 9, calls
    return calls


@pytest.mark.parametrize("job_id", ["job_missing", "ftjob-000000000000000000000000"], ids=["bad", "unknown"])
def test_every_job_route_answers_404_for_an_unknown_job(api: ApiClient, job_id: str):
    with changes_nothing(api):
        for method, template in job_routes(api):
            response = api.http.request(method, template.replace("{fine_tuning_job_id}", job_id))
            assert_error(response, 404, "job_not_found", None, f"'{job_id}'")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/files/file%00x", None),
        ("DELETE", "/v1/files/file%00x", None),
        ("GET", "/v1/files/file%00x/content", None),
        ("GET", "/v1/files?after=file%00x", None),
        ("GET", f"{JOBS}/ftjob%00x", None),
        ("POST", f"{JOBS}/ftjob%00x/cancel", None),
        ("GET", f"{JOBS}/ftjob%00x/events", None),
        ("GET", f"{JOBS}?after=ftjob%00x", None),
        ("POST", JOBS, {"training_file": "file\x00x"}),
        ("POST", JOBS, {"validation_file": "file\x00x"}),
        ("POST", JOBS, {"suffix": "a\x00b"}),
    ],
    ids=[
        "get-file",
        "delete-file",
        "file-content",
        "files-after",
        "get-job",
        "cancel-job",
        "job-events",
        "jobs-after",
        "job-training-file",
        "job-validation-file",
        "job-suffix",
    ],
)
def test_a_nul_byte_is_a_client_error(api: ApiClient, env: Env, method: str, path: str, body: dict | None):
    with changes_nothing(api):
        assert_client_error(api.http.request(method, path, json=env.body(**body) if body else None))


@pytest.mark.parametrize(
    ("route", "query"),
    [
        ("events", f"after=ftevent-{2**63}"),
        ("checkpoints", f"after=ftckpt_{2**63}"),
        ("samples", f"after={2**63}"),
        ("metrics", f"after_step={2**31}"),
    ],
)
def test_a_cursor_beyond_the_column_is_400(api: ApiClient, env: Env, route: str, query: str):
    job = _ok(api.http.post(JOBS, json=env.body()))
    param = query.partition("=")[0]
    with changes_nothing(api):
        assert_error(api.http.get(f"{JOBS}/{job}/{route}?{query}"), 400, param=param)


@pytest.mark.parametrize(
    ("route", "query", "code", "param"),
    [
        ("events", "after=7", "invalid_request", "after"),
        ("events", "after=ftckpt_7", "invalid_request", "after"),
        ("events", "limit=0", "invalid_request", "limit"),
        ("events", "limit=1001", "invalid_request", "limit"),
        ("checkpoints", "after=ftevent-7", "invalid_request", "after"),
        ("checkpoints", "limit=101", "invalid_request", "limit"),
        ("samples", "after=x", "invalid_request", "after"),
        ("samples", "after=-1", "invalid_request", "after"),
        ("samples", "limit=0", "invalid_request", "limit"),
        ("metrics", "kind=validation", "invalid_request", "kind"),
        ("metrics", "after_step=-2", "invalid_request", "after_step"),
        ("metrics", "limit=10001", "invalid_request", "limit"),
    ],
)
def test_bad_job_report_query_is_400(api: ApiClient, env: Env, route: str, query: str, code: str, param: str):
    job = _ok(api.http.post(JOBS, json=env.body()))
    with changes_nothing(api):
        assert_error(api.http.get(f"{JOBS}/{job}/{route}?{query}"), 400, code, param)


def test_the_adapter_of_a_queued_job_is_not_ready(api: ApiClient, env: Env):
    job = _ok(api.http.post(JOBS, json=env.body()))
    assert_error(api.http.get(f"{JOBS}/{job}/adapter"), 404, "adapter_not_ready", says=("queued", job))


def test_cancelling_twice_is_409(api: ApiClient, env: Env):
    job = _ok(api.http.post(JOBS, json=env.body()))
    first = api.http.post(f"{JOBS}/{job}/cancel")
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "cancelled"
    assert first.json()["finished_at"] is not None
    with changes_nothing(api):
        for action in ("cancel", "pause", "resume"):
            response = api.http.post(f"{JOBS}/{job}/{action}")
            assert_error(response, 409, says="cancelled")
            assert response.headers["x-should-retry"] == "false", action
    assert api.http.get(f"{JOBS}/{job}").json()["status"] == "cancelled"


def test_resuming_a_job_that_is_not_paused_is_409(api: ApiClient, env: Env):
    job = _ok(api.http.post(JOBS, json=env.body()))
    with changes_nothing(api):
        assert_error(api.http.post(f"{JOBS}/{job}/resume"), 409, "job_not_paused", says="queued")
    assert api.http.get(f"{JOBS}/{job}").json()["status"] == "queued"


def test_a_cancelled_job_frees_its_file(api: ApiClient, env: Env):
    training_file = _ok(api.upload(LINES))  # its own: the module's env keeps its files
    job = _ok(api.http.post(JOBS, json=job_request(training_file, "reinforcement", grader=GRADER)))
    assert api.http.delete(f"/v1/files/{training_file}").status_code == 409
    assert api.http.post(f"{JOBS}/{job}/cancel").status_code == 200
    assert api.http.delete(f"/v1/files/{training_file}").status_code == 200
    with api.sessions() as session:
        assert session.get(Job, job).training_dataset_id is None


# ----- unknown routes and methods --------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/v1/nothing", "/v1/datasets", "/v1/jobs", "/v1/rewards", "/v2/fine_tuning/jobs", f"{JOBS}/x/y/z", "/x"],
)
def test_unknown_route_is_a_json_404(api: ApiClient, path: str):
    assert_error(api.http.get(path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/files"),
        ("PATCH", f"{JOBS}/ftjob_x"),
        ("DELETE", f"{JOBS}/ftjob_x"),
        ("GET", VALIDATE),
        ("POST", "/health"),
    ],
)
def test_wrong_method_is_a_json_405(api: ApiClient, method: str, path: str):
    with changes_nothing(api):
        assert_error(api.http.request(method, path), 405, "method_not_allowed")


@pytest.mark.parametrize(
    ("path", "methods"),
    [("/v1/files", {"GET", "POST"}), (JOBS, {"GET", "POST"}), ("/v1/files/file_x", {"GET", "DELETE"})],
)
def test_405_lists_the_allowed_methods(api: ApiClient, path: str, methods: set[str]):
    response = api.http.put(path)
    assert response.status_code == 405
    # Every method served at the path, though each is a route of its own.
    allowed = set(response.headers.get("allow", "").replace(" ", "").split(","))
    assert allowed == methods
