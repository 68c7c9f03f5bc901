"""POST /v1/fine_tuning/alpha/graders/run with python graders: the training sandbox over HTTP.

Hostile graders are scored for real; after each one the API still answers /health and scores a
good grader. The deployment's sandbox settings are small (1 s, 256 MB) to keep this fast. What
the official client sees of the grader endpoints is in test_graders_api.py; this file is about
the sandbox: containment, limits, printed output, timings and keeping projects apart.
"""

from __future__ import annotations

import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.rewards.sandbox import OUT_OF_TIME
from service.db import transaction
from service.keys import create_key
from service.settings import Settings
from tests.conftest import ApiClient, job_request

pytestmark = pytest.mark.usefixtures("sandbox_privileges")

RUN = "/v1/fine_tuning/alpha/graders/run"
VALIDATE = "/v1/fine_tuning/alpha/graders/validate"
SANDBOX = {
    "sandbox_timeout_seconds": 1,
    "sandbox_cpu_seconds": 4,
    "sandbox_memory_mb": 256,
    "sandbox_max_processes": 4,
    "sandbox_output_bytes": 512,
    "sandbox_test_seconds": 20,
}
GOOD = "def reward(completion, example):\n    return float(completion.strip() == str(example['answer']))\n"
SLEEPY = "import time\ndef reward(c, e):\n    time.sleep(60)\n"
SECRET = "s3cret-api-value-that-must-not-leak"


def python(source: str, **fields) -> dict:
    return {"type": "python", "source": textwrap.dedent(source), **fields}


def multi(graders: dict[str, dict]) -> dict:
    """A multi grader that sums its sub-graders."""
    return {"type": "multi", "graders": graders, "calculate_output": " + ".join(graders)}


def deployment(tmp: Path, database_url: str, broker_url: str, **overrides) -> ApiClient:
    values = {**SANDBOX, **overrides}
    settings = Settings(data_dir=tmp / "data", database_url=database_url, broker_url=broker_url, **values)
    return ApiClient(settings)


def release(client: ApiClient) -> None:
    """Close a client: its warm sandbox processes and both of its connection pools."""
    client.app.state.services.sandbox.close()
    client.http.close()
    client.app.state.services.sessions.kw["bind"].dispose()
    client.sessions.kw["bind"].dispose()


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, migrated_postgres: str, redis_url: str
) -> Iterator[ApiClient]:
    client = deployment(tmp_path_factory.mktemp("grader-sandbox"), migrated_postgres, redis_url)
    with client.http:  # the app's lifespan: its sandbox pool is closed at the end
        yield client
    release(client)


def run_grader(api: ApiClient, grader: dict, sample: str, item: dict | None = None, **headers) -> dict:
    response = api.http.post(
        RUN, json={"grader": grader, "model_sample": sample, "item": item or {}}, headers=headers
    )
    assert response.status_code == 200, response.text
    return response.json()


def assert_still_serving(api: ApiClient) -> None:
    assert api.http.get("/health").status_code == 200
    body = run_grader(api, python(GOOD), "4", {"answer": 4})
    assert body["reward"] == 1.0 and body["metadata"]["messages"] == {}


# ----- what it answers ----------------------------------------------------------------------------


def test_a_multi_grader_reports_each_sub_grader_its_output_and_its_failure(api):
    chatty = """
        def reward(completion, example):
            print("looking at", completion)
            return len(completion) / 10
    """
    grader = multi({"exact": {"type": "exact_match", "field": "answer"}, "length": python(chatty)})
    body = run_grader(api, grader, "42", {"answer": "42"})
    assert body["reward"] == pytest.approx(1.2)
    assert body["sub_rewards"] == {"exact": 1.0, "length": 0.2}
    assert body["metadata"]["output"] == {"length": "looking at 42\n"}
    assert body["metadata"]["messages"] == {}

    # No answer in the item: exact_match fails there and scores 0; the python grader still scores.
    failed = run_grader(api, grader, "42", {})
    assert failed["sub_rewards"] == {"exact": 0.0, "length": 0.2}
    assert failed["metadata"]["messages"] == {"exact": "KeyError: \"example has no field 'answer'\""}
    assert failed["metadata"]["errors"]["other_error"] is True


def test_a_trl_batch_function_sees_the_prompt(api):
    trl = """
        def accuracy(prompts, completions, answer, **kwargs):
            return [float(p.endswith("?") and c == a) for p, c, a in zip(prompts, completions, answer)]
    """
    grader = python(trl, function="accuracy")
    assert run_grader(api, grader, "4", {"prompt": "2+2?", "answer": "4"})["reward"] == 1.0
    assert run_grader(api, grader, "4", {"prompt": "2+2.", "answer": "4"})["reward"] == 0.0


def test_execution_time_counts_the_time_spent_in_the_sandbox(api):
    slow = "import time\ndef reward(c, e):\n    time.sleep(0.3)\n    return 1.0\n"
    body = run_grader(api, python(slow), "a")
    assert body["reward"] == 1.0 and body["metadata"]["execution_time"] >= 0.3


def test_two_projects_never_share_a_warm_sandbox_even_with_the_same_code(api):
    # A warm process keeps module state: shared, it would carry one project's samples to another.
    recorder = python(
        """
        seen = []
        def reward(completion, example):
            seen.append(completion)
            print(seen)
            return len(seen)
        """,
        name="rec",
    )
    assert run_grader(api, recorder, "mine")["reward"] == 1.0
    assert run_grader(api, recorder, "mine")["reward"] == 2.0  # the control: the process is warm
    with transaction(api.sessions) as session:  # another project on the same app, so the same pool
        _, other_key = create_key(session, f"other-{uuid.uuid4().hex[:12]}")
    theirs = run_grader(api, recorder, "theirs", Authorization=f"Bearer {other_key}")
    assert theirs["reward"] == 1.0 and "mine" not in theirs["metadata"]["output"]["rec"]


@pytest.mark.parametrize(
    ("source", "param", "message"),
    [
        ("def reward(c, e):\n    return = 1\n", "source", "line 2, column"),
        ("import os\nimport torch\ndef reward(c, e):\n    return 1\n", "source", "line 2: module 'torch'"),
        ("#" * (256 * 1024) + "\ndef reward(c, e):\n    return 1\n", "source", "over the limit of 262144"),
        ("def score(c, e):\n    return 1\n", "function", "no top-level function 'reward'"),
    ],
    ids=["syntax", "import", "size", "function"],
)
def test_bad_code_is_refused_before_it_runs_with_the_line(api, source, param, message):
    training_file = api.upload(['{"prompt": "2+2=", "answer": "4"}']).json()["id"]
    jobs_before = api.http.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
    for path, body, where in (
        (VALIDATE, {"grader": python(source)}, "grader"),
        (RUN, {"grader": python(source), "model_sample": "x"}, "grader"),
        (
            "/v1/fine_tuning/jobs",
            job_request(training_file, "reinforcement", grader=python(source)),
            "method.reinforcement.grader",
        ),
    ):
        response = api.http.post(path, json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_grader" and error["param"] == f"{where}.{param}", error
        assert message in error["message"], error
    assert api.http.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"] == jobs_before


def test_a_sample_over_the_size_limit_is_refused(api):
    response = api.http.post(RUN, json={"grader": python(GOOD), "model_sample": "x" * 100_001})
    assert response.status_code == 400 and response.json()["error"]["param"] == "model_sample"


# ----- hostile code -------------------------------------------------------------------------------

# name: (source, a phrase of what went wrong, the error flag OpenAI's clients read)
HOSTILE = {
    "infinite_loop": (
        "def reward(c, e):\n    while True:\n        pass\n",
        "time limit of 1 s",
        "python_grader_server_error",
    ),
    "memory_bomb": (
        "def reward(c, e):\n    return len(bytearray(10**11))\n",
        "MemoryError",
        "python_grader_runtime_error",
    ),
    "fork_bomb": (
        "import os\ndef reward(c, e):\n    while True:\n        os.fork()\n",
        "Resource temporarily",
        "python_grader_runtime_error",
    ),
    "socket": (
        "import socket\ndef reward(c, e):\n    socket.create_connection(('127.0.0.1', 5432))\n",
        "Network is unreachable",
        "python_grader_runtime_error",
    ),
    "huge_file": (
        "def reward(c, e):\n    open('f', 'wb').write(b'x' * 10**8)\n",
        "File too large",
        "python_grader_runtime_error",
    ),
    "os_exit": (
        "import os\ndef reward(c, e):\n    os._exit(1)\n",
        "exited with code 1",
        "python_grader_server_error",
    ),
    "returns_a_string": (
        "def reward(c, e):\n    return 'yes'\n",
        "returned str",
        "python_grader_runtime_error",
    ),
    "returns_nan": (
        "def reward(c, e):\n    return float('nan')\n",
        "not a finite number",
        "python_grader_runtime_error",
    ),
    "returns_a_huge_number": (
        "def reward(c, e):\n    return 1e12\n",
        "outside",
        "python_grader_runtime_error",
    ),
    "raises": (
        "def reward(c, e):\n    raise RuntimeError('boom')\n",
        "RuntimeError: boom",
        "python_grader_runtime_error",
    ),
    "import_off_the_list": (
        "def reward(c, e):\n    return __import__('fastapi')\n",
        "not available",
        "python_grader_runtime_error",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_code_scores_0_with_its_traceback_and_the_api_keeps_serving(api, case):
    source, expected, flag = HOSTILE[case]
    body = run_grader(api, python(source, name="hostile"), "a")
    assert body["reward"] == 0.0
    metadata = body["metadata"]
    assert expected in metadata["messages"]["hostile"], metadata
    assert metadata["errors"][flag] is True, metadata["errors"]
    if flag == "python_grader_runtime_error":
        assert metadata["errors"]["python_grader_runtime_error_details"] == metadata["messages"]["hostile"]
    assert_still_serving(api)


def test_secrets_of_the_api_process_do_not_reach_grader_code(api, monkeypatch):
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
    body = run_grader(api, python(snoop, name="snoop"), "a")
    output = body["metadata"]["output"]["snoop"]
    assert body["reward"] == 1.0 and SECRET not in output and "PREFIX_RFT" not in output
    assert "/proc/self/environ FileNotFoundError" in output
    assert_still_serving(api)


def test_printing_gigabytes_returns_the_first_bytes_only(api):
    chatty = "def reward(c, e):\n    for _ in range(1000):\n        print('x' * 10**6)\n    return 1.0\n"
    body = run_grader(api, python(chatty, name="chatty"), "a")
    output = body["metadata"]["output"]["chatty"]
    assert body["reward"] == 1.0 and output.startswith("x" * 512) and len(output) < 700
    assert_still_serving(api)


def test_a_slow_request_blocks_neither_the_api_nor_other_scoring(api):
    # Three sub-graders that each run into the 1 s limit, one after another: about 3 s.
    sleepy = multi({f"sleepy{i}": python(SLEEPY) for i in range(3)})
    done = {}

    def slow():
        started = time.perf_counter()
        done["body"] = run_grader(api, sleepy, "a")
        done["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.5)
    started = time.perf_counter()
    assert_still_serving(api)
    assert time.perf_counter() - started < 2.0  # not after the slow request (3 s)
    thread.join()
    assert all("time limit of 1 s" in m for m in done["body"]["metadata"]["messages"].values())
    assert len(done["body"]["metadata"]["messages"]) == 3
    assert 3.0 <= done["seconds"] < 5.0


def test_a_request_stops_at_its_time_budget(tmp_path, migrated_postgres, redis_url):
    client = deployment(tmp_path, migrated_postgres, redis_url, sandbox_test_seconds=2.5, sandbox_workers=1)
    try:
        started = time.perf_counter()
        body = run_grader(client, multi({f"s{i}": python(SLEEPY) for i in range(10)}), "a")
        assert time.perf_counter() - started < 5.0
        messages = body["metadata"]["messages"]
        assert all("time limit of 1 s" in messages[f"s{i}"] for i in range(2))
        assert messages["s9"] == OUT_OF_TIME
        assert body["reward"] == 0.0 and body["metadata"]["errors"]["python_grader_server_error"] is True
        assert_still_serving(client)
    finally:
        release(client)


def test_no_sandbox_means_503_and_no_user_code_run(tmp_path, migrated_postgres, redis_url, monkeypatch):
    monkeypatch.setattr("core.rewards.sandbox.SERVER", Path("/nonexistent/sandbox_server.py"))
    client = deployment(tmp_path, migrated_postgres, redis_url)
    try:
        response = client.http.post(RUN, json={"grader": python(GOOD), "model_sample": "x"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "sandbox_unavailable"
        assert response.headers["retry-after"] == "5"
        declarative = {"type": "contains", "value": "x"}
        assert run_grader(client, declarative, "x")["reward"] == 1.0
    finally:
        release(client)
