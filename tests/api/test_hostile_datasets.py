"""Hostile training files, uploaded to POST /v1/files on PostgreSQL.

Each refused file gets a 4xx whose error names the line (and the field, where there is one),
leaves no file row, no stored object and no scratch file behind, and the API answers the next
request. The unusual but valid files (a BOM, CRLF line ends, a line or a file exactly at its
limit, ...) are accepted and read back from storage the way the worker reads them.

This is the one place for what a training file contains; how an upload travels (multipart shape,
Content-Length, chunked bodies, a body cut off) is tested in test_bad_inputs.py.
"""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
import pytest
from sqlalchemy import func, select

from core.data import MAX_FIELD_NAMES, MAX_JSON_DEPTH, load_dataset
from service.settings import Settings
from service.tables import ApiKey, Dataset, IdempotencyKey, Job, JobEvent, Project
from tests.conftest import ApiClient

MiB = 1 << 20
LINES = [f'{{"prompt": "{i}+1=", "answer": "{i + 1}", "demonstration": "{i + 1}"}}' for i in range(3)]
TABLES = (Project, ApiKey, Dataset, IdempotencyKey, Job, JobEvent)  # what a request may write
BOUNDARY = "test-boundary-5d1c"


def jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


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


def purpose_part() -> bytes:
    """The form's `purpose` field, as the first part of a multipart body."""
    return f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'.encode()


def multipart_file(data: bytes) -> tuple[bytes, dict[str, str]]:
    """A POST /v1/files body built by hand (so no client adds or changes anything)."""
    body = (
        purpose_part()
        + (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
    )
    body += data + f"\r\n--{BOUNDARY}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def assert_error(response: httpx.Response, status: int, code: str, param: str | None, says: str) -> dict:
    """An error of `status` in OpenAI's shape, with this code and param, whose message says `says`."""
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["type"] == "invalid_request_error", error
    assert (error["code"], error["param"]) == (code, param), error
    assert says in error["message"], error
    return error


def stored_objects(api: ApiClient) -> list[str]:
    root = Path(unquote(urlparse(api.settings.storage_url).path))
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def release(client: ApiClient) -> None:
    """Close a client and both of its connection pools (a test deployment holds two engines)."""
    client.http.close()
    client.app.state.services.sessions.kw["bind"].dispose()
    client.sessions.kw["bind"].dispose()


def deployment(tmp_path_factory: pytest.TempPathFactory, database_url: str, **limits: int) -> ApiClient:
    """A deployment with a data directory of its own (objects, scratch, the file broker, which no
    upload uses) on the session's database."""
    data_dir = tmp_path_factory.mktemp("hostile-datasets") / "data"
    return ApiClient(Settings(data_dir=data_dir, database_url=database_url, **limits))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, migrated_postgres: str) -> Iterator[ApiClient]:
    """The default limits (lines of 1 MiB, files of 1 GiB); shared, as a refused upload changes
    nothing (which every test checks)."""
    client = deployment(tmp_path_factory, migrated_postgres)
    yield client
    release(client)


@pytest.fixture(scope="module")
def small_api(tmp_path_factory: pytest.TempPathFactory, migrated_postgres: str) -> Iterator[ApiClient]:
    """Tiny limits: lines of 1,000 bytes, files of 10,000."""
    client = deployment(tmp_path_factory, migrated_postgres, max_line_bytes=1000, max_upload_bytes=10_000)
    yield client
    release(client)


def rows(api: ApiClient) -> dict[str, int]:
    with api.sessions() as session:
        return {t.__tablename__: session.scalar(select(func.count()).select_from(t)) for t in TABLES}


def scratch_files(api: ApiClient) -> list[Path]:
    scratch = api.settings.scratch_dir
    return sorted(scratch.rglob("*")) if scratch.exists() else []


@contextmanager
def leaves_nothing(api: ApiClient) -> Iterator[None]:
    """No new row in any table, no stored object, no scratch file; and the API still answers."""
    before = rows(api), stored_objects(api)
    yield
    assert (rows(api), stored_objects(api)) == before, "the upload left rows or objects behind"
    assert scratch_files(api) == [], "the upload left files in the scratch directory"
    assert api.http.get("/v1/files?limit=1").status_code == 200


def refused(api: ApiClient, data: bytes, says: str = "") -> dict:
    """Upload `data`: a 400 `invalid_dataset` about the file, and nothing left behind."""
    with leaves_nothing(api):
        error = assert_error(api.upload(data), 400, "invalid_dataset", "file", says)
    assert all(d["message"] for d in error.get("details", [])), error
    return error


def lines_and_fields(error: dict) -> list[tuple[int, str | None]]:
    return [(d["line"], d["field"]) for d in error["details"]]


def nested(levels: int) -> str:
    """A line whose field `x` holds `levels` nested lists (the line's object is the first level)."""
    return '{"prompt": "a", "x": ' + "[" * levels + "]" * levels + "}"


# ----- refused files: 400 naming each bad line --------------------------------------------------

# name: (file, [(line, field)] of every reported error, a phrase of the message)
REFUSED: dict[str, tuple[bytes, list[tuple[int, str | None]], str]] = {
    # Broken JSON.
    "malformed-json-on-line-3": (
        jsonl([LINES[0], LINES[1], '{"prompt": "2+1=", "answer": ']),
        [(3, None)],
        "line 3: not valid JSON",
    ),
    "trailing-comma": (jsonl([LINES[0], '{"prompt": "a",}']), [(2, None)], "not valid JSON"),
    "two-objects-on-one-line": (jsonl([LINES[0] + LINES[1]]), [(1, None)], "Extra data"),
    "file-cut-mid-line": (jsonl(LINES)[:-20], [(3, None)], "not valid JSON"),
    "lone-cr-line-ends": (b'{"prompt": "a"}\r{"prompt": "b"}\r', [(1, None)], "lone CR"),
    # A line that is JSON, but not an object.
    "line-is-an-array": (jsonl([LINES[0], "[1, 2]"]), [(2, None)], "expected a JSON object, got array"),
    "line-is-a-string": (jsonl([LINES[0], '"2+2="']), [(2, None)], "got string"),
    "line-is-null": (jsonl(["null", LINES[0]]), [(1, None)], "got null"),
    "line-is-a-number": (jsonl([LINES[0], "42"]), [(2, None)], "got number"),
    # Wrong types and shapes.
    "prompt-is-a-number": (jsonl(['{"prompt": 5}', LINES[0]]), [(1, "prompt")], "must be a non-empty string"),
    "messages-not-a-list": (jsonl([LINES[0], '{"messages": "hello"}']), [(2, "messages")], "non-empty list"),
    "both-wrong-types": (
        jsonl(['{"prompt": 5}', '{"messages": {"role": "user"}}']),
        [(1, "prompt"), (2, "messages")],
        "2 invalid line(s)",
    ),
    "prompt-and-messages": (
        jsonl(['{"prompt": "a", "messages": [{"role": "user", "content": "a"}]}']),
        [(1, None)],
        "exactly one of 'prompt'",
    ),
    "bad-role": (
        jsonl(['{"messages": [{"role": "robot", "content": "hi"}]}']),
        [(1, "messages[0].role")],
        "must be one of system, user, assistant",
    ),
    "content-is-a-number": (
        jsonl(['{"messages": [{"role": "user", "content": 7}]}']),
        [(1, "messages[0].content")],
        "must be a string, got number",
    ),
    "demonstration-is-a-list": (
        jsonl(['{"prompt": "a", "demonstration": ["b"]}']),
        [(1, "demonstration")],
        "got array",
    ),
    # Bytes that are not UTF-8 text.
    "latin-1": (LINES[0].encode() + b'\n{"prompt": "caf\xe9"}\n', [(2, None)], "not valid UTF-8 (byte 16"),
    "utf-16": ('{"prompt": "a"}\n'.encode("utf-16"), [(1, None), (2, None)], "the file is UTF-16"),
    "overlong-utf-8": (b'{"prompt": "\xc0\xaf"}\n', [(1, None)], "not valid UTF-8"),
    "utf-8-encoded-surrogate": (b'{"prompt": "\xed\xa0\x80"}\n', [(1, None)], "not valid UTF-8"),
    "nul-bytes-in-a-string": (
        b'{"prompt": "a\x00b"}\n',
        [(1, None)],
        "Invalid control character at column 14",
    ),
    "all-zero-bytes": (b"\x00" * 4096, [(1, None)], "not valid JSON"),
    "bom-in-the-middle": (
        b"\xef\xbb\xbf" + jsonl([LINES[0]]) + b"\xef\xbb\xbf" + jsonl([LINES[1]]),  # two files joined
        [(2, None)],
        "only the file may start with one",
    ),
    # Escapes json accepts but that are not text: a lone half of a UTF-16 surrogate pair.
    "lone-surrogate": (jsonl([LINES[0], r'{"prompt": "\ud800"}']), [(2, "prompt")], "lone UTF-16 surrogate"),
    "lone-surrogate-deep": (
        jsonl([r'{"prompt": "a", "x": {"y": ["ok", "\udc00"]}}']),
        [(1, "x")],
        "lone UTF-16 surrogate",
    ),
    "lone-surrogate-in-a-name": (
        jsonl([r'{"prompt": "a", "\ud800": 1}']),
        [(1, r"\ud800")],
        "lone UTF-16 surrogate",
    ),
    # Numbers json cannot hold.
    "huge-integer": (jsonl(['{"prompt": "a", "answer": ' + "9" * 5000 + "}"]), [(1, None)], "4,300 digits"),
    "float-out-of-range": (
        jsonl(['{"prompt": "a", "answer": -1e999}']),
        [(1, None)],
        "-1e999 is out of range",
    ),
    "nan": (jsonl(['{"prompt": "a", "answer": NaN}']), [(1, None)], "NaN is not a JSON number"),
    "infinity": (
        jsonl(['{"prompt": "a", "answer": Infinity}']),
        [(1, None)],
        "Infinity is not a JSON number",
    ),
    # Structure.
    "duplicate-field": (jsonl([LINES[0], '{"prompt": "a", "prompt": "b"}']), [(2, "prompt")], "given twice"),
    "duplicate-nested-field": (
        jsonl(['{"messages": [{"role": "user", "content": "a", "content": "b"}]}']),
        [(1, "content")],
        "given twice",
    ),
    "nesting-bomb": (jsonl(['{"prompt": "a", "x": ' + "[" * 100_000]), [(1, None)], "nested too deeply"),
    "nested-past-the-limit": (jsonl([nested(MAX_JSON_DEPTH)]), [(1, "x")], "nested deeper than"),
    "field-name-too-long": (
        jsonl(['{"prompt": "a", "' + "n" * 300 + '": 1}']),
        [(1, "n" * 40 + "...")],
        "256",
    ),
    "too-many-field-names": (
        jsonl([f'{{"prompt": "a", "f{i}": 1}}' for i in range(MAX_FIELD_NAMES + 2)]),
        [(MAX_FIELD_NAMES + 1, f"f{MAX_FIELD_NAMES}"), (MAX_FIELD_NAMES + 2, f"f{MAX_FIELD_NAMES + 1}")],
        "more than 1,000 different field names",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_hostile_file_is_refused_naming_each_bad_line(api: ApiClient, case: str):
    data, expected, says = REFUSED[case]
    error = refused(api, data, says)
    assert lines_and_fields(error) == expected, error
    first = error["details"][0]
    assert f"line {first['line']}" in error["message"], error  # the summary names the line too


@pytest.mark.parametrize(
    "data", [b"", b"  \n\r\n\t \n\n", b"\xef\xbb\xbf\r\n"], ids=["empty", "whitespace-only", "bom-only"]
)
def test_a_file_without_examples_is_refused(api: ApiClient, data: bytes):
    error = refused(api, data, "no examples")
    assert "details" not in error, error  # no line is at fault


def test_every_bad_line_is_counted_and_the_first_hundred_listed(api: ApiClient):
    error = refused(api, b"x\n" * 100_000, "100000 invalid line(s)")
    assert [d["line"] for d in error["details"]] == list(range(1, 101))


# ----- the size limits ---------------------------------------------------------------------------


def test_a_line_over_the_line_limit_is_named(small_api: ApiClient):
    at_limit = '{"prompt": "' + "x" * (1000 - 15) + '"}'  # 1,000 bytes with its newline
    error = refused(
        small_api, jsonl([LINES[0], at_limit + " ", at_limit, LINES[1]]), "over the limit of 1,000"
    )
    assert lines_and_fields(error) == [(2, None)]  # line 3, exactly at the limit, is fine
    assert "line is 1,001 bytes" in error["message"]


def test_a_file_at_the_size_limit_is_accepted(small_api: ApiClient):
    """The control for the 413 below, and for those in test_bad_inputs.py."""
    response = small_api.upload(jsonl_of_size(10_000))
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == 10_000


def test_a_file_one_byte_over_the_size_limit_is_413(small_api: ApiClient):
    # Content-Length is sent, but within the allowance for multipart overhead: found while reading.
    body, headers = multipart_file(jsonl_of_size(10_001))
    with leaves_nothing(small_api):
        response = small_api.http.post("/v1/files", content=body, headers=headers)
        assert_error(response, 413, "file_too_large", "file", "10,000 bytes")


async def _multipart_stream(head: bytes, middle: bytes, times: int, tail: bytes) -> AsyncIterator[bytes]:
    """A POST /v1/files body made while it is sent: `middle` repeated, never all in memory."""
    yield purpose_part()
    yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'.encode()
    yield head
    for _ in range(times):
        yield middle
    yield tail + f"\r\n--{BOUNDARY}--\r\n".encode()


def test_a_100_mb_line_is_refused_without_reading_it_into_memory(api: ApiClient):
    """The line is streamed in 1 MiB pieces over httpx's ASGI transport (the TestClient would
    gather the whole body first); the app's own allocations while it takes the upload must stay
    a few MiB, far below the line."""
    chunk = b"x" * MiB
    body = _multipart_stream(jsonl([LINES[0]]) + b'{"prompt": "', chunk, 100, b'"}\n' + jsonl([LINES[1]]))
    headers = {
        "authorization": f"Bearer {api.key}",
        "content-type": f"multipart/form-data; boundary={BOUNDARY}",
    }

    async def upload() -> httpx.Response:
        transport = httpx.ASGITransport(app=api.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.post("/v1/files", content=body, headers=headers, timeout=120)

    with leaves_nothing(api):
        tracemalloc.start()
        try:
            response = asyncio.run(upload())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        error = assert_error(response, 400, "invalid_dataset", "file", "line 2: line is 104,857,615 bytes")
    assert lines_and_fields(error) == [(2, None)], error  # and lines 1 and 3 were read fine
    assert peak < 16 * MiB, f"taking the upload allocated {peak / MiB:.0f} MiB at its peak"
    assert api.upload(LINES).status_code == 200  # the next upload goes through


# ----- unusual files that are valid --------------------------------------------------------------


def accepted(api: ApiClient, data: bytes, tmp_path: Path) -> tuple[dict, list]:
    """Upload `data`: its row, its stored bytes, and its examples as the worker will load them."""
    response = api.upload(data)
    assert response.status_code == 200, response.text
    dataset = response.json()
    key = f"datasets/{api.project_id}/{dataset['id']}.jsonl"
    assert key in stored_objects(api)  # the control for `leaves_nothing`: it sees stored objects
    stored = tmp_path / "stored.jsonl"
    api.app.state.services.storage.download(key, stored)
    assert stored.read_bytes() == data  # stored as sent; the worker validates the same bytes
    return dataset, load_dataset(stored)


def test_bom_and_crlf_are_accepted_and_read_back(api: ApiClient, tmp_path: Path):
    dataset, examples = accepted(api, b"\xef\xbb\xbf" + "\r\n".join(LINES).encode() + b"\r\n", tmp_path)
    assert (dataset["validation"]["examples"], dataset["validation"]["with_demonstration"]) == (3, 3)
    assert dataset["validation"]["field_counts"] == {
        "answer": 3
    }  # not "\ufeffprompt": the BOM is not in a name
    assert [(e.prompt, e.demonstration, e.fields["answer"]) for e in examples] == [
        (f"{i}+1=", f"{i + 1}", f"{i + 1}") for i in range(3)
    ]


def test_unusual_but_valid_json_is_accepted_and_read_back(api: ApiClient, tmp_path: Path):
    lines = [
        r'{"prompt": "smile \ud83d\ude00", "answer": "a\u0000b"}',  # a surrogate pair; an escaped NUL
        '{"prompt": "q", "réponse": 1.7976931348623157e308, "n": ' + "9" * 4300 + "}",
        nested(MAX_JSON_DEPTH - 1),  # exactly at the depth limit
    ]
    dataset, examples = accepted(api, jsonl(lines), tmp_path)
    assert dataset["validation"]["field_counts"] == {"answer": 1, "réponse": 1, "n": 1, "x": 1}
    assert examples[0].prompt == "smile \U0001f600"
    assert examples[0].fields["answer"] == "a\x00b"
    assert examples[1].fields["réponse"] == 1.7976931348623157e308
    assert examples[1].fields["n"] == int("9" * 4300)
    assert json.dumps(examples[2].fields["x"]).count("[") == MAX_JSON_DEPTH - 1


def test_very_many_tiny_lines_are_counted(api: ApiClient):
    data = b'{"prompt":"a"}\n' * 200_000
    response = api.upload(data)
    assert response.status_code == 200, response.text
    validation = response.json()["validation"]
    assert (validation["lines"], validation["examples"]) == (200_000, 200_000)
