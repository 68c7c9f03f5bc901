"""The web dashboard in a real browser: Debian's chromium, headless, driven by playwright, against
the real parts (the API under uvicorn on PostgreSQL, a Celery worker process training the tiny
model, the model server answering the chat).

Screenshots of each page are kept under test-artifacts/ui/. Every page is checked for console
errors (a script error, a refused script or style, a 5xx) and for controls without a label.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from service.db import make_engine, make_sessionmaker, transaction
from service.keys import create_key
from service.settings import Settings
from service.storage import open_storage
from tests.conftest import WorkerProcess, job_request, missing, served, user_namespace_refusal

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
TIMEOUT_MS = 90_000  # a wait in the browser: the longest is a whole job on the tiny model

# The grader of the job made in the form: it prints, it is slow enough (0.1 s a sample) that the
# job is still running when the test pauses it, and it fails on every third line.
GRADER = {
    "type": "python",
    "name": "picky",
    "source": (
        "import time\n"
        "def reward(completion, example):\n"
        "    time.sleep(0.1)\n"
        "    print('graded line', example['i'])\n"
        "    if example['i'] % 3 == 0:\n"
        "        raise ValueError('no answer for line %d' % example['i'])\n"
        "    return float(len(completion) % 2)\n"
    ),
}
GOOD_LINES = "".join(
    json.dumps({"prompt": f"say something {i}", "demonstration": "a b c d e f", "i": i}) + "\n"
    for i in range(12)
)


@dataclass
class Stack:
    url: str
    key: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory, migrated_postgres: str, redis_url: str) -> Iterator[Stack]:
    refusal = user_namespace_refusal()
    if refusal:
        missing(f"the python grader's sandbox needs user namespaces, refused here ({refusal})")
    from api.app import create_app
    from inference.server import create_model_server

    root = tmp_path_factory.mktemp("dashboard")
    settings = Settings(
        data_dir=root / "data",
        database_url=migrated_postgres,
        broker_url=redis_url,
        reaper_seconds=0,
        heartbeat_seconds=1,
        lease_seconds=30,
        stream_poll_seconds=0.2,
    )
    open_storage(settings.storage_url).prepare()
    redis.Redis.from_url(redis_url).delete("celery")  # no other test's messages
    with transaction(make_sessionmaker(make_engine(settings.database_url))) as session:
        _, key = create_key(session, "dashboard")
    worker = WorkerProcess(settings, root / "worker.log")
    try:
        with served(create_model_server(settings)) as model_server:
            settings = settings.model_copy(update={"inference_url": model_server})
            with served(create_app(settings)) as url:
                yield Stack(url, key)
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    if executable is None:
        missing("chromium is not installed (make test installs Debian's package)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


# Chromium logs every 4xx answer as a console error; those are refusals the page shows the user
# (a bad key, a bad line), which the tests check on the page itself. Anything else is an error.
EXPECTED_REFUSAL = "the server responded with a status of 4"


@pytest.fixture
def page(browser, stack: Stack, request):
    context = browser.new_context(
        base_url=stack.url, accept_downloads=True, viewport={"width": 1400, "height": 1000}
    )
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    page.on(
        "console", lambda m: m.type == "error" and EXPECTED_REFUSAL not in m.text and problems.append(m.text)
    )
    page.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
    page.problems = problems
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-end.png"), full_page=True)
    context.close()
    assert not problems, problems


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def unlabelled_controls(page) -> list[str]:
    """Form controls and buttons that a screen reader could not name."""
    return page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter(el => !el.closest('[hidden]'))
            .filter(el => el.tagName === 'BUTTON'
                ? !(el.textContent.trim() || el.getAttribute('aria-label'))
                : !(el.labels?.length || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby')))
            .map(el => el.outerHTML.slice(0, 120))"""
    )


def sign_in(page, key: str) -> None:
    page.goto("/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Jobs").wait_for()


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    """The API as the signed-in user, to check what the pages show against."""
    with httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {stack.key}"}, timeout=30
    ) as http:
        yield http


def wait_for_status(client: httpx.Client, job_id: str, statuses: set[str], seconds: float = 120) -> dict:
    deadline = time.monotonic() + seconds
    while (job := client.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in statuses:
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    return job


def points(page, chart: str) -> int:
    return int(page.locator(f'figure[data-chart="{chart}"]').get_attribute("data-points"))


def wait_until(check, seconds: float = TIMEOUT_MS / 1000) -> None:
    """Polls from the test: the page's policy forbids the string evaluation wait_for_function uses."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


# ----- tests ---------------------------------------------------------------------------------------


def test_sign_in_by_keyboard_refuses_a_bad_key_and_keeps_the_key_out_of_urls(page, stack):
    page.goto("/")
    assert page.url.endswith("/ui/")
    for _ in range(6):  # the key's field is reached with Tab from the top of the page
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.name") == "api-key":
            break
    else:
        pytest.fail("Tab never reached the API key field")
    page.keyboard.type("sk-not-a-key")
    page.keyboard.press("Enter")
    page.get_by_role("alert").filter(has_text="not accepted").wait_for()
    assert page.evaluate("sessionStorage.length") == 0

    page.get_by_label("API key").fill(stack.key)
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Jobs").wait_for()
    assert stack.key not in page.url
    assert page.evaluate("Object.values(sessionStorage)") == [stack.key]  # this tab only
    assert unlabelled_controls(page) == []
    shot(page, "jobs")

    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("heading", name="Sign in").wait_for()
    assert page.evaluate("sessionStorage.length") == 0


def test_the_dashboard_is_served_with_a_strict_content_policy(stack):
    response = httpx.get(f"{stack.url}/ui/")
    assert response.status_code == 200 and "Prefix-RFT" in response.text
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy.split("style-src")[0]
    assert httpx.get(f"{stack.url}/ui/vendor/uplot/uPlot.iife.min.js").status_code == 200


def test_a_bad_upload_is_reported_at_its_line(page, stack):
    sign_in(page, stack.key)
    page.get_by_role("link", name="New job").first.click()
    page.get_by_label("Upload a training file (JSONL)").set_input_files(
        {
            "name": "bad.jsonl",
            "mimeType": "application/jsonl",
            "buffer": b'{"prompt": "fine"}\n{"prompt": 5}\n',
        }
    )
    report = page.locator(".report.bad")
    report.wait_for()
    assert "bad.jsonl was refused" in report.inner_text()
    assert "line 2" in report.inner_text()
    assert unlabelled_controls(page) == []
    shot(page, "bad-upload")


def test_a_job_made_in_the_form_is_followed_live_to_its_adapter_and_chat(page, stack, client):
    sign_in(page, stack.key)
    page.goto("/ui/#/jobs/new")
    page.get_by_label("Upload a training file (JSONL)").set_input_files(
        {"name": "numbers.jsonl", "mimeType": "application/jsonl", "buffer": GOOD_LINES.encode()}
    )
    page.locator(".report.ok").filter(has_text="12 examples").wait_for()
    page.get_by_label("Base model").select_option("tiny-random")
    page.get_by_label("Method").select_option("prefix_rft")
    page.get_by_label("Grader (JSON)").fill(json.dumps(GRADER))
    # The try-it box runs the grader on a sample: a line it fails on shows the traceback.
    page.get_by_label("Try it: a model's answer").fill("hello")
    page.get_by_label("Try it: the dataset line (JSON)").fill('{"i": 3}')
    page.get_by_role("button", name="Run grader on the sample").click()
    page.locator(".traceback").filter(has_text="no answer for line 3").wait_for()
    page.get_by_label("Steps (instead of epochs)").fill("16")
    page.get_by_label("Batch size (prompts per step)").fill("2")
    page.get_by_label("More hyperparameters (JSON)").fill(
        json.dumps(
            {
                "rollouts_per_prompt": 4,
                "max_completion_tokens": 8,
                "samples_per_step": 8,
                "max_reward_error_rate": 1.0,
            }
        )
    )
    page.get_by_label("Suffix of the model name").fill("watched")
    page.locator(".estimate").filter(has_text="16 steps").wait_for()  # the estimate answered
    assert unlabelled_controls(page) == []
    shot(page, "create-form")
    page.get_by_role("button", name="Create job").click()
    page.locator("section.job").wait_for()
    job_id = page.locator("section.job").get_attribute("data-job")

    # The curves grow while it runs; paused, it stops; resumed, it grows on to the end, all on
    # the same page (the event stream, not a reload).
    wait_until(lambda: points(page, "Reward") >= 2)
    page.get_by_role("button", name="Pause").click()
    page.locator("[data-status=paused]").wait_for()
    paused_at = points(page, "Reward")
    assert 2 <= paused_at < 16
    shot(page, "job-paused")
    page.get_by_role("button", name="Resume").click()
    page.locator("[data-status=succeeded]").wait_for()
    metrics = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").json()["data"]
    train_steps = {m["step"] for m in metrics if m["kind"] == "train"}
    all_steps = train_steps | {m["step"] for m in metrics if m["kind"] == "eval"}  # 0: before training
    assert train_steps == set(range(1, 17))
    wait_until(lambda: points(page, "Reward") == len(all_steps))
    for chart in ("Loss", "Entropy", "Clip fraction", "Demonstration prefix", "Rollout tokens/s"):
        assert points(page, chart) == len(train_steps), chart
    assert points(page, "Response length (tokens)") == len(all_steps)
    assert points(page, "Accuracy") == 0  # a python grader's reward is not right-or-wrong
    legend = page.locator('figure[data-chart="Reward"] .u-legend').inner_text()
    assert "picky" in legend and "held-out" in legend  # per grader, and the held-out reward

    # A step's rollouts: the demonstration prefix is marked, the failing grader's traceback shown.
    samples = client.get(f"/v1/fine_tuning/jobs/{job_id}/samples?limit=1000").json()["data"]
    step = next(s["step"] for s in samples if s["data"]["demo_prefix_tokens"] > 0 and "errors" in s["data"])
    page.get_by_label("Step", exact=True).select_option(str(step))
    rows = page.locator("table.rollouts tbody tr")
    expected = [s["data"] for s in samples if s["step"] == step]
    page.locator(f'table.rollouts tbody[data-step="{step}"]').wait_for(state="attached")
    assert rows.count() == len(expected)
    assert (
        page.locator("table.rollouts mark").count() == sum(s["demo_prefix_tokens"] > 0 for s in expected) > 0
    )
    tracebacks = page.locator("table.rollouts .traceback")
    assert tracebacks.count() == sum("errors" in s for s in expected)
    assert "ValueError: no answer for line" in tracebacks.first.inner_text()
    assert 'File "reward.py"' in tracebacks.first.inner_text()
    assert rows.first.locator("summary").filter(has_text="picky printed").count() == 1
    shot(page, "job-rollouts")

    # Events, filtered by level: the grader's failures are warnings.
    page.get_by_label("Level").select_option("warn")
    warnings = page.locator("ol.events li:visible").all_inner_texts()
    assert warnings and all(t.startswith("WARN") and "failed on" in t for t in warnings)
    page.get_by_label("Level").select_option("")
    assert page.locator("ol.events li:visible").count() > len(warnings)
    assert page.locator("table.checkpoints tbody tr").count() >= 1

    # The adapter downloads as the archive the API serves.
    with page.expect_download() as download:
        page.get_by_role("button", name="Download adapter").click()
    archive = download.value.path().read_bytes()
    assert archive == client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter").content
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert any(name.endswith("adapter_config.json") for name in tar.getnames())

    # And the chat streams from it.
    page.get_by_role("link", name="Chat with it").click()
    page.get_by_role("heading", name="Playground").wait_for()
    model = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["fine_tuned_model"]
    assert page.get_by_label("Model", exact=True).input_value() == model
    page.get_by_label("Message", exact=True).fill("say something 1")
    page.get_by_role("button", name="Send").click()
    reply = page.locator("li.assistant .content")
    wait_until(lambda: reply.get_attribute("data-finish"))
    assert reply.get_attribute("data-finish") in ("stop", "length")
    answer = client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "say something 1"}],
            "max_tokens": 64,
            "temperature": 0,
        },
    ).json()["choices"][0]["message"]["content"]
    assert reply.inner_text() == answer  # greedy: the streamed reply is the model's answer
    assert unlabelled_controls(page) == []
    shot(page, "playground")


def test_jobs_are_compared_on_one_set_of_curves(page, stack, client):
    file_id = client.post(
        "/v1/files", files={"file": ("sft.jsonl", GOOD_LINES.encode())}, data={"purpose": "fine-tune"}
    ).json()["id"]
    ids = []
    for suffix, steps in (("short", 2), ("long", 4)):
        body = job_request(file_id, method="supervised", hyperparameters={"steps": steps}, suffix=suffix)
        ids.append(client.post("/v1/fine_tuning/jobs", json=body).json()["id"])
    for job_id in ids:
        wait_for_status(client, job_id, {"succeeded"})

    sign_in(page, stack.key)
    # Chosen in the list, as a user would.
    for job_id in ids:
        page.get_by_label(f"compare {job_id}").check()
    page.get_by_role("button", name="Compare selected").click()
    page.get_by_role("heading", name="Compare jobs").wait_for()
    wait_until(lambda: points(page, "Loss") == 4)
    legend = page.locator('figure[data-chart="Loss"] .u-legend').inner_text()
    assert "short" in legend and "long" in legend
    assert unlabelled_controls(page) == []
    shot(page, "compare")
