"""POST /v1/rewards/test and /v1/rewards/{id}/test: the training sandbox, reached over HTTP.

Hostile graders are scored for real; after each one the API still answers /health and scores
a good reward. The deployment's sandbox settings are small (1 s, 256 MB) to keep this fast.
"""

from __future__ import annotations

import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.db import transaction
from service.keys import create_key
from service.settings import Settings
from tests.conftest import ApiClient

pytestmark = pytest.mark.usefixtures("sandbox_privileges")

SANDBOX = {
    "sandbox_timeout_seconds": 1,
    "sandbox_cpu_seconds": 4,
    "sandbox_memory_mb": 256,
    "sandbox_max_processes": 4,
    "sandbox_output_bytes": 512,
    "sandbox_test_seconds": 20,
}
GOOD = "def reward(completion, example):\n    return float(completion.strip() == str(example['answer']))\n"
SECRET = "s3cret-api-value-that-must-not-leak"


def python(source: str, **fields) -> dict:
    return {"type": "python", "source": textwrap.dedent(source), **fields}


def deployment(tmp: Path, database_url: str, broker_url: str, **overrides) -> ApiClient:
    values = {**SANDBOX, **overrides}
    settings = Settings(data_dir=tmp / "data", database_url=database_url, broker_url=broker_url, **values)
    return ApiClient(settings)


def release(client: ApiClient) -> None:
    sandbox = getattr(client.app.state, "sandbox", None)
    if sandbox is not None:
        sandbox.close()
    client.http.close()
    client.app.state.services.sessions.kw["bind"].dispose()
    client.sessions.kw["bind"].dispose()


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, migrated_postgres: str, redis_url: str
) -> Iterator[ApiClient]:
    client = deployment(tmp_path_factory.mktemp("reward-tests"), migrated_postgres, redis_url)
    with client.http:
        yield client
    release(client)


def test_reward(api: ApiClient, graders: list[dict], samples: list[dict]) -> dict:
    response = api.http.post("/v1/rewards/test", json={"graders": graders, "samples": samples})
    assert response.status_code == 200, response.text
    return response.json()


test_reward.__test__ = False  # a helper, not a test


def assert_still_serving(api: ApiClient) -> None:
    assert api.http.get("/health").status_code == 200
    body = test_reward(api, [python(GOOD)], [{"completion": "4", "example": {"answer": 4}}])
    assert body["samples"][0]["total"] == 1.0 and body["reward_errors"] == 0


# ----- what it answers ----------------------------------------------------------------------------


def test_a_mixed_spec_is_scored_per_sample_and_per_grader(api):
    chatty = """
        def reward(completion, example):
            print("looking at", completion)
            return len(completion) / 10
    """
    graders = [
        {"type": "exact_match", "field": "answer"},
        python(chatty, name="length", weight=0.5),
    ]
    samples = [
        {"completion": "42", "example": {"answer": "42"}},
        {"completion": "41", "example": {"answer": "42"}},
        {"completion": "x", "example": {}},  # no answer: exact_match fails on this one
    ]
    body = test_reward(api, graders, samples)
    assert body["object"] == "reward.test"
    assert [s["total"] for s in body["samples"]] == [1.1, 0.1, 0.05]
    assert body["samples"][0]["scores"] == {"exact_match": 1.0, "length": 0.2}
    assert body["samples"][0]["output"] == {"length": "looking at 42\n"}
    assert body["samples"][2]["errors"] == {"exact_match": "KeyError: \"example has no field 'answer'\""}
    assert body["reward_errors"] == 1 and body["errors_by_grader"] == {"exact_match": 1}
    assert set(body["timing"]["graders"]) == {"exact_match", "length"}
    assert body["timing"]["total_seconds"] >= body["timing"]["graders"]["length"] > 0


def test_a_trl_batch_function_and_the_prompt(api):
    trl = """
        def accuracy(prompts, completions, answer, **kwargs):
            return [float(p.endswith("?") and c == a) for p, c, a in zip(prompts, completions, answer)]
    """
    samples = [
        {"completion": "4", "example": {"prompt": "2+2?", "answer": "4"}},
        {"completion": "4", "example": {"prompt": "2+2.", "answer": "4"}},
    ]
    body = test_reward(api, [python(trl, function="accuracy")], samples)
    assert [s["total"] for s in body["samples"]] == [1.0, 0.0]


def test_a_stored_reward_is_tested_by_its_owner_only(api):
    created = api.http.post("/v1/rewards", json={"name": "python-good", "graders": [python(GOOD)]})
    assert created.status_code == 201, created.text
    reward_id = created.json()["id"]
    samples = {
        "samples": [
            {"completion": "7", "example": {"answer": 7}},
            {"completion": "8", "example": {"answer": 7}},
        ]
    }
    response = api.http.post(f"/v1/rewards/{reward_id}/test", json=samples)
    assert response.status_code == 200, response.text
    assert [s["total"] for s in response.json()["samples"]] == [1.0, 0.0]

    other = api.other_project()
    try:
        refused = other.http.post(f"/v1/rewards/{reward_id}/test", json=samples)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "reward_not_found"
    finally:
        release(other)
    assert api.http.post("/v1/rewards/rew_000000000000000000000000/test", json=samples).status_code == 404


def test_two_projects_never_share_a_warm_sandbox_even_with_the_same_code(api):
    # A warm process keeps module state: shared, it would carry one project's samples to another.
    recorder = """
        seen = []
        def reward(completion, example):
            seen.append(completion)
            print(seen)
            return len(seen)
    """
    request = {"graders": [python(recorder, name="rec")], "samples": [{"completion": "mine"}]}
    assert api.http.post("/v1/rewards/test", json=request).json()["samples"][0]["total"] == 1.0
    assert api.http.post("/v1/rewards/test", json=request).json()["samples"][0]["total"] == 2.0
    with transaction(api.sessions) as session:  # another project on the same app, so the same pool
        _, other_key = create_key(session, f"other-{uuid.uuid4().hex[:12]}")
    theirs = {**request, "samples": [{"completion": "theirs"}]}
    response = api.http.post(
        "/v1/rewards/test", json=theirs, headers={"Authorization": f"Bearer {other_key}"}
    )
    sample = response.json()["samples"][0]
    assert sample["total"] == 1.0 and "mine" not in sample["output"]["rec"]


@pytest.mark.parametrize(
    ("source", "param", "message"),
    [
        ("def reward(c, e):\n    return = 1\n", "graders.0.source", "line 2, column"),
        (
            "import os\nimport torch\ndef reward(c, e):\n    return 1\n",
            "graders.0.source",
            "line 2: module 'torch'",
        ),
        (
            "#" * (256 * 1024) + "\ndef reward(c, e):\n    return 1\n",
            "graders.0.source",
            "over the limit of 262144",
        ),
        ("def score(c, e):\n    return 1\n", "graders.0.function", "no top-level function 'reward'"),
    ],
    ids=["syntax", "import", "size", "function"],
)
def test_bad_code_is_refused_at_creation_with_the_line_and_nothing_is_stored(api, source, param, message):
    before = api.http.get("/v1/rewards", params={"limit": 100}).json()["data"]
    for path, body in (
        ("/v1/rewards", {"name": "bad", "graders": [python(source)]}),
        ("/v1/rewards/test", {"graders": [python(source)], "samples": [{"completion": "x"}]}),
    ):
        response = api.http.post(path, json=body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert (
            error["code"] == "invalid_reward" and error["param"] == param and message in error["message"]
        ), error
    assert api.http.get("/v1/rewards", params={"limit": 100}).json()["data"] == before


def test_request_size_limits(api):
    too_many = {"graders": [python(GOOD)], "samples": [{"completion": "x"}] * 257}
    assert api.http.post("/v1/rewards/test", json=too_many).json()["error"]["param"] == "samples"
    too_long = {"graders": [python(GOOD)], "samples": [{"completion": "x" * 100_001}]}
    assert api.http.post("/v1/rewards/test", json=too_long).status_code == 422


# ----- hostile code -------------------------------------------------------------------------------

HOSTILE = {
    "infinite_loop": ("def reward(c, e):\n    while True:\n        pass\n", "time limit of 1 s"),
    "memory_bomb": ("def reward(c, e):\n    return len(bytearray(10**11))\n", "MemoryError"),
    "fork_bomb": (
        "import os\ndef reward(c, e):\n    while True:\n        os.fork()\n",
        "Resource temporarily",
    ),
    "socket": (
        "import socket\ndef reward(c, e):\n    socket.create_connection(('127.0.0.1', 5432))\n",
        "Network is unreachable",
    ),
    "huge_file": ("def reward(c, e):\n    open('f', 'wb').write(b'x' * 10**8)\n", "File too large"),
    "os_exit": ("import os\ndef reward(c, e):\n    os._exit(1)\n", "exited with code 1"),
    "returns_a_string": ("def reward(c, e):\n    return 'yes'\n", "returned str"),
    "returns_nan": ("def reward(c, e):\n    return float('nan')\n", "not a finite number"),
    "returns_a_huge_number": ("def reward(c, e):\n    return 1e12\n", "outside"),
    "raises": ("def reward(c, e):\n    raise RuntimeError('boom')\n", "RuntimeError: boom"),
    "import_off_the_list": ("def reward(c, e):\n    return __import__('fastapi')\n", "not available"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_code_is_contained_and_the_api_keeps_serving(api, case):
    source, expected = HOSTILE[case]
    body = test_reward(api, [python(source, name="hostile")], [{"completion": "a"}, {"completion": "b"}])
    assert [s["total"] for s in body["samples"]] == [0.0, 0.0]
    assert body["errors_by_grader"] == {"hostile": 2}
    for sample in body["samples"]:
        assert expected in sample["errors"]["hostile"], sample
    assert_still_serving(api)


def test_secrets_of_the_api_process_do_not_reach_reward_code(api, monkeypatch):
    monkeypatch.setenv("PREFIX_RFT_SECRET_FOR_TEST", SECRET)
    snoop = """
        import os
        def reward(completion, example):
            print(dict(os.environ))
            for path in ("/proc/self/environ", "/proc/1/environ", "/etc/passwd"):
                try:
                    print(open(path).read())
                except OSError as exc:
                    print(path, type(exc).__name__)
            return 1.0
    """
    body = test_reward(api, [python(snoop, name="snoop")], [{"completion": "a"}])
    output = body["samples"][0]["output"]["snoop"]
    assert body["samples"][0]["total"] == 1.0 and SECRET not in output and "PREFIX_RFT" not in output
    assert "/proc/self/environ FileNotFoundError" in output
    assert_still_serving(api)


def test_printing_gigabytes_returns_the_first_bytes_only(api):
    chatty = "def reward(c, e):\n    for _ in range(1000):\n        print('x' * 10**6)\n    return 1.0\n"
    body = test_reward(api, [python(chatty, name="chatty")], [{"completion": "a"}])
    output = body["samples"][0]["output"]["chatty"]
    assert body["samples"][0]["total"] == 1.0 and output.startswith("x" * 512) and len(output) < 700
    assert_still_serving(api)


def test_a_slow_request_blocks_neither_the_api_nor_other_scoring(api):
    sleepy = "import time\ndef reward(c, e):\n    time.sleep(60)\n"
    done = {}

    def slow():
        started = time.perf_counter()
        done["body"] = test_reward(api, [python(sleepy, name="sleepy")], [{"completion": "a"}] * 3)
        done["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.5)
    started = time.perf_counter()
    assert_still_serving(api)
    assert time.perf_counter() - started < 2.0  # not after the slow request (3 s)
    thread.join()
    assert all("time limit of 1 s" in s["errors"]["sleepy"] for s in done["body"]["samples"])
    assert 3.0 <= done["seconds"] < 5.0


def test_a_request_stops_at_its_time_budget(tmp_path, migrated_postgres, redis_url):
    client = deployment(tmp_path, migrated_postgres, redis_url, sandbox_test_seconds=2.5, sandbox_workers=1)
    try:
        sleepy = "import time\ndef reward(c, e):\n    time.sleep(60)\n"
        started = time.perf_counter()
        body = test_reward(client, [python(sleepy, name="sleepy")], [{"completion": "a"}] * 10)
        assert time.perf_counter() - started < 5.0
        errors = [s["errors"]["sleepy"] for s in body["samples"]]
        assert all("time limit of 1 s" in e for e in errors[:2])
        assert errors[-1] == "not scored: the time budget of the request ran out"
        assert_still_serving(client)
    finally:
        release(client)


def test_no_sandbox_means_503_and_no_user_code_run(tmp_path, migrated_postgres, redis_url, monkeypatch):
    monkeypatch.setattr("core.rewards.sandbox.SERVER", Path("/nonexistent/sandbox_server.py"))
    client = deployment(tmp_path, migrated_postgres, redis_url)
    try:
        response = client.http.post(
            "/v1/rewards/test", json={"graders": [python(GOOD)], "samples": [{"completion": "x"}]}
        )
        assert response.status_code == 503 and response.json()["error"]["code"] == "sandbox_unavailable"
        declarative = {"graders": [{"type": "contains", "value": "x"}], "samples": [{"completion": "x"}]}
        assert client.http.post("/v1/rewards/test", json=declarative).json()["samples"][0]["total"] == 1.0
    finally:
        release(client)
