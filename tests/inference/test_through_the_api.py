"""OpenAI-compatible inference through the real parts: the official `openai` client, the API
served by uvicorn (PostgreSQL behind it), and the model server in its own process, loading
adapters from object storage.

The adapters are made here (perturbed, so each decodes differently) and stored as a succeeded
job's artifact, exactly as the worker stores them; what they decode is compared with the engine
run in this process on the same adapter directory.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from core.adapters import attach_adapter, export_adapter, replaced_prompt_start
from core.config import LoraAdapterConfig, PrefixAdapterConfig
from core.models import load_base_model
from core.rewards.openai_graders import ScoreModel
from inference.engine import BatchedEngine, GenerationRequest, SamplingParams, load_adapter
from service.db import make_engine, make_sessionmaker, transaction
from service.judge import JudgeEndpoint
from service.settings import Settings
from service.storage import open_storage
from service.tables import Artifact, Checkpoint, Job, JobStatus, checkpoint_model_name, utcnow
from tests.conftest import REPO, ApiClient, free_port, served, settings_env
from worker.runner import write_archive

pytestmark = pytest.mark.slow
QUEUE_ROWS = 12


@dataclass
class Deployment:
    api: ApiClient  # the caller's project
    base_url: str
    model_server: str
    adapters: dict[str, str]  # kind -> fine-tuned model name
    dirs: dict[str, Path]

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key or self.api.key, max_retries=0)

    def stats(self) -> dict:
        return httpx.get(f"{self.model_server}/stats").json().get("tiny-random", {})

    def cancelled_rows(self) -> float:
        """The model server's count of rows that ended cancelled (its Prometheus counter)."""
        text = httpx.get(f"{self.model_server}/metrics").text
        return sum(
            float(row.split()[-1])
            for row in text.splitlines()
            if row.startswith("prefix_rft_inference_rows_total{")
            and 'end="cancelled"' in row
            and 'model="tiny-random"' in row
        )


def make_adapter(directory: Path, kind: str, seed: int) -> Path:
    model, tokenizer = load_base_model("tiny-random")
    config = PrefixAdapterConfig(num_virtual_tokens=6) if kind == "prefix" else LoraAdapterConfig(r=4)
    policy = attach_adapter(model, tokenizer, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_((1.0 if kind == "prefix" else 0.5) * torch.randn(p.shape, generator=generator))
    return export_adapter(policy, directory, "tiny-random")


def make_fresh_prefix_adapter(directory: Path) -> Path:
    """The default prefix adapter before any step, exported as the trainer exports it."""
    model, tokenizer = load_base_model("tiny-random")
    config = PrefixAdapterConfig()
    policy = attach_adapter(model, tokenizer, config)
    return export_adapter(policy, directory, "tiny-random", replaced_prompt_start(tokenizer, config))


def store_as_succeeded_job(settings: Settings, project_id: str, adapter_dir: Path, suffix: str) -> str:
    """Put the adapter where a worker puts one, with the rows of a job that produced it."""
    archive = adapter_dir.parent / f"{suffix}.tar.gz"
    write_archive(adapter_dir, archive, arcname="adapter")
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with transaction(sessions) as session:
        job = Job(
            project_id=project_id,
            status=JobStatus.SUCCEEDED,
            model="tiny-random",
            method="prefix_rft",
            config={},
            seed=1,
            total_steps=1,
            suffix=suffix,
            finished_at=utcnow(),
        )
        session.add(job)
        session.flush()
        job.fine_tuned_model = f"ft:tiny-random:{suffix}:{job.id}"
        key = f"jobs/{job.id}/attempt-1/adapter.tar.gz"
        open_storage(settings.storage_url).put_file(key, archive)
        session.add(
            Artifact(
                job_id=job.id,
                storage_key=key,
                sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
                bytes=archive.stat().st_size,
            )
        )
        return job.fine_tuned_model


def wait_until_up(url: str, process: subprocess.Popen | None, log: Path | None) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process is not None:
            assert process.poll() is None, log.read_text() if log else "exited"
        assert time.monotonic() < deadline, f"{url} did not start"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, migrated_postgres: str, redis_url: str) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("inference")
    model_server = f"http://127.0.0.1:{free_port()}"
    settings = Settings(
        data_dir=root / "data",
        database_url=migrated_postgres,
        broker_url=redis_url,
        inference_url=model_server,
        reaper_seconds=0,
        inference_adapter_cache_mb=64,
        # float32: batched rows must decode exactly as alone, which bfloat16 rounding does not promise.
        inference_dtype="float32",
    )
    open_storage(settings.storage_url).prepare()
    log = root / "model-server.log"
    # A queue of 12 rows: the concurrent test's twelve fit, a request of more is refused at once (429).
    env = settings_env(settings) | {
        "PREFIX_RFT_INFERENCE_ADAPTER_CACHE_MB": "64",
        "PREFIX_RFT_INFERENCE_MAX_QUEUE": str(QUEUE_ROWS),
    }
    port = model_server.rsplit(":", 1)[1]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "model-server", "--port", port],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api = ApiClient(settings)
    server = uvicorn.Server(uvicorn.Config(api.app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base_url = f"http://127.0.0.1:{server.config.port}"
        wait_until_up(base_url, None, None)
        wait_until_up(model_server, process, log)
        dirs = {
            "prefix": make_adapter(root / "prefix", "prefix", seed=1),
            "prefix2": make_adapter(root / "prefix2", "prefix", seed=2),
            "lora": make_adapter(root / "lora", "lora", seed=3),
            "fresh": make_fresh_prefix_adapter(root / "fresh"),
        }
        names = {kind: store_as_succeeded_job(settings, api.project_id, d, kind) for kind, d in dirs.items()}
        yield Deployment(api, base_url, model_server, names, dirs)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        process.terminate()
        process.wait(timeout=30)
        api.http.close()


@pytest.fixture(scope="module")
def engine() -> BatchedEngine:
    return BatchedEngine(*load_base_model("tiny-random"))


def expected(engine: BatchedEngine, adapter_dir: Path | None, prompt: list[int], **params) -> str:
    adapter = load_adapter(adapter_dir, engine.model) if adapter_dir else None
    return engine.generate([GenerationRequest(prompt, adapter, SamplingParams(**params))])[0]


def chat_ids(engine: BatchedEngine, content: str) -> list[int]:
    messages = [{"role": "user", "content": content}]
    return list(
        engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


def test_chat_and_completions_with_the_official_client(deployment: Deployment, engine: BatchedEngine):
    client = deployment.client()
    for kind in ("prefix", "lora"):
        name = deployment.adapters[kind]
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hello there"}], max_tokens=12, temperature=0
        )
        want = expected(
            engine, deployment.dirs[kind], chat_ids(engine, "hello there"), max_tokens=12, temperature=0
        )
        assert reply.model == name and reply.object == "chat.completion"
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content == want.text
        assert reply.choices[0].finish_reason == want.finish_reason
        assert reply.usage.prompt_tokens == want.prompt_tokens
        assert reply.usage.completion_tokens == want.completion_tokens
        assert reply.usage.total_tokens == want.prompt_tokens + want.completion_tokens

    prompt_ids = engine.tokenizer("Once upon a time")["input_ids"]
    text = client.completions.create(
        model="tiny-random", prompt="Once upon a time", max_tokens=9, temperature=0
    )
    want = expected(engine, None, prompt_ids, max_tokens=9, temperature=0)
    assert text.object == "text_completion" and text.choices[0].text == want.text
    assert text.usage.completion_tokens == want.completion_tokens

    # The adapters change what is said: a row served with the wrong adapter would not pass.
    outputs = {
        kind: client.chat.completions.create(
            model=deployment.adapters[kind] if kind != "base" else "tiny-random",
            messages=[{"role": "user", "content": "hello there"}],
            max_tokens=12,
            temperature=0,
        )
        .choices[0]
        .message.content
        for kind in ("prefix", "prefix2", "lora", "base")
    }
    assert len(set(outputs.values())) == 4, outputs

    models = {m.id for m in client.models.list().data}
    assert {"tiny-random", *deployment.adapters.values()} <= models


def test_a_fresh_prefix_adapter_is_served_as_the_base_model(deployment: Deployment):
    """The model server drops the chat start the prefix stands in for, as training did: before any
    step, the fine-tuned model says what the base model says, and the prompt counts as sent."""
    client = deployment.client()
    for question in ("hello there", "what is 2+2?", "name a colour"):
        messages = [{"role": "user", "content": question}]
        fresh, base = (
            client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
            for model in (deployment.adapters["fresh"], "tiny-random")
        )
        assert fresh.choices[0].message.content == base.choices[0].message.content
        assert fresh.usage.prompt_tokens == base.usage.prompt_tokens


def test_streaming_chunks_add_up_to_the_completion(deployment: Deployment):
    client = deployment.client()
    request = {
        "model": deployment.adapters["prefix"],
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me more"}],
        "max_tokens": 40,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**request)
    chunks = list(
        client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()

    # Completions stream too, n choices each with its own index; a seed makes them reproducible.
    stream = client.completions.create(
        model="tiny-random", prompt="abc", max_tokens=10, n=2, seed=5, temperature=1.0, stream=True
    )
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    again = client.completions.create(
        model="tiny-random", prompt="abc", max_tokens=10, n=2, seed=5, temperature=1.0
    )
    assert texts == [c.text for c in again.choices]


def test_stop_strings_end_the_text_before_them(deployment: Deployment):
    client = deployment.client()
    request = {"model": "tiny-random", "prompt": "The", "max_tokens": 30, "temperature": 0}
    full = client.completions.create(**request).choices[0].text
    stop = next(full[i : i + 2] for i in range(2, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    cut = client.completions.create(**request, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(**request, stop=stop, stream=True)
    )
    assert streamed == cut.choices[0].text


def test_concurrent_requests_are_decoded_together(deployment: Deployment, engine: BatchedEngine):
    """Requests for two prefix adapters, a LoRA adapter and the base model, sent at once."""
    client = deployment.client()
    kinds = ["prefix", "prefix2", "lora", "base"] * 3
    questions = [f"question number {i}" for i in range(len(kinds))]

    def ask(i: int):
        model = deployment.adapters[kinds[i]] if kinds[i] != "base" else "tiny-random"
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": questions[i]}], max_tokens=24, temperature=0
        )

    ask(0)  # adapters loaded, so that the timed requests arrive together
    for kind in ("prefix2", "lora"):
        ask(kinds.index(kind))
    wanted = [
        expected(engine, deployment.dirs.get(kind), chat_ids(engine, q), max_tokens=24, temperature=0).text
        for kind, q in zip(kinds, questions, strict=True)
    ]
    bursts = []
    # When the requests reach the server depends on the machine's load: a burst whose requests
    # came one after another cannot show batching, so up to three are sent. One at a time would
    # take one step per token in every burst; together, far fewer.
    for _ in range(3):
        steps_before = deployment.stats()["steps"]
        with ThreadPoolExecutor(len(kinds)) as pool:
            replies = list(pool.map(ask, range(len(kinds))))
        steps = deployment.stats()["steps"] - steps_before
        assert [r.choices[0].message.content for r in replies] == wanted  # every burst decodes right
        bursts.append((steps, sum(r.usage.completion_tokens for r in replies)))
        if steps < bursts[-1][1] / 3:
            break
    assert any(steps < tokens / 3 for steps, tokens in bursts), bursts


def test_bad_requests_get_openai_errors(deployment: Deployment):
    client = deployment.client()
    hello = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=hello)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"

    # Another project's adapter does not exist for this caller.
    other = deployment.api.other_project()
    with pytest.raises(openai.NotFoundError):
        deployment.client(other.key).chat.completions.create(
            model=deployment.adapters["prefix"], messages=hello
        )
    # A name that only looks like ours (the right job id, another base or suffix) is not ours either.
    forged = deployment.adapters["prefix"].replace(":prefix:", ":other:")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=forged, messages=hello)

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-random", messages=hello, max_tokens=5000)
    assert caught.value.code == "context_length_exceeded" and "1024" in caught.value.message

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-random", messages=[{"role": "robot", "content": "hi"}])
    assert caught.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-random", messages=[{"role": "user"}])
    assert caught.value.param == "messages[0].content"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-random", messages=[])
    assert caught.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-random", messages=hello, logit_bias={"5": 10})
    assert caught.value.param == "logit_bias"  # refused, not silently ignored
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny-random", prompt="x", temperature=3)
    assert caught.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:  # 5 prompts x 4 choices > 16 rows
        client.completions.create(model="tiny-random", prompt=["a", "b", "c", "d", "e"], n=4)
    assert caught.value.param == "n"
    with pytest.raises(openai.AuthenticationError):
        deployment.client("prk_not-a-key").models.list()
    # And the service still answers.
    assert client.chat.completions.create(model="tiny-random", messages=hello, max_tokens=2).choices


def test_a_client_that_goes_away_frees_its_rows(deployment: Deployment):
    body = {"model": "tiny-random", "prompt": "a long story:", "max_tokens": 900, "temperature": 0}
    headers = {"Authorization": f"Bearer {deployment.api.key}"}
    # A request that would decode 900 tokens, to be sure the rows are cut, not finished.
    assert deployment.client().completions.create(**body).choices[0].finish_reason == "length"

    # Each hang-up ends its row as cancelled, before the 900 steps it would decode.
    steps, cancelled = deployment.stats()["steps"], deployment.cancelled_rows()
    with httpx.stream(
        "POST", f"{deployment.base_url}/v1/completions", json={**body, "stream": True}, headers=headers
    ) as stream:
        for _ in zip(stream.iter_lines(), range(6), strict=False):
            pass  # a few chunks, then the client hangs up
    _wait_for_idle(deployment)
    assert deployment.cancelled_rows() == cancelled + 1
    assert deployment.stats()["steps"] - steps < 900

    steps, cancelled = deployment.stats()["steps"], deployment.cancelled_rows()
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up waiting
        httpx.post(f"{deployment.base_url}/v1/completions", json=body, headers=headers, timeout=0.3)
    _wait_for_idle(deployment)
    assert deployment.cancelled_rows() == cancelled + 1
    assert deployment.stats()["steps"] - steps < 900


def _wait_for_idle(deployment: Deployment) -> None:
    deadline = time.monotonic() + 10
    while deployment.stats()["running"] or deployment.stats()["queued"]:
        assert time.monotonic() < deadline, deployment.stats()
        time.sleep(0.05)


def test_choices_roles_and_the_default_length(deployment: Deployment):
    client = deployment.client()
    two = client.chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": "hey"}], n=2, seed=3, max_tokens=5
    )
    assert [c.index for c in two.choices] == [0, 1]
    one = client.chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": "hey"}], seed=3, max_tokens=5
    )
    other = client.chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": "hey"}], seed=4, max_tokens=5
    )
    assert two.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once for n choices
    assert two.usage.completion_tokens == one.usage.completion_tokens + other.usage.completion_tokens
    assert two.choices[1].message.content == other.choices[0].message.content  # choice i: seed + i
    assert two.choices[0].message.content == one.choices[0].message.content  # choice 0 uses the seed itself

    system = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hey"}]
    developer = [{"role": "developer", "content": "be terse"}, {"role": "user", "content": "hey"}]
    as_system, as_developer = (
        client.chat.completions.create(model="tiny-random", messages=m, max_tokens=8, temperature=0)
        for m in (system, developer)
    )
    assert as_system.choices[0].message.content == as_developer.choices[0].message.content
    parts = [{"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "y"}]}]
    assert (
        client.chat.completions.create(model="tiny-random", messages=parts, max_tokens=5, seed=3).choices[0]
        == one.choices[0]
    )

    # Without max_tokens a chat completion may use the rest of the context window (1024 here).
    endless = client.chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": "go"}]
    )
    usage = endless.usage
    if endless.choices[0].finish_reason == "length":
        assert usage.prompt_tokens + usage.completion_tokens == 1024
    else:
        assert usage.prompt_tokens + usage.completion_tokens < 1024


def test_models_can_be_retrieved_by_the_project_that_owns_them(deployment: Deployment):
    client = deployment.client()
    adapter = client.models.retrieve(deployment.adapters["lora"])
    assert adapter.id == deployment.adapters["lora"] and adapter.owned_by == deployment.api.project_id
    assert client.models.retrieve("tiny-random").owned_by == "prefix-rft"
    with pytest.raises(openai.NotFoundError):
        deployment.client(deployment.api.other_project().key).models.retrieve(deployment.adapters["lora"])


def test_oversized_text_is_refused_before_any_work(deployment: Deployment):
    client = deployment.client()
    huge = "x" * 1_000_001
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": huge}])
    assert caught.value.param == "messages[0].content"
    with pytest.raises(openai.BadRequestError) as caught:  # under the cap, over the context window
        client.completions.create(model="tiny-random", prompt="x" * 5000, max_tokens=1)
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "prompt"


def test_the_model_server_exports_prometheus_metrics(deployment: Deployment):
    def sample(name: str, labels: str) -> float:
        text = httpx.get(f"{deployment.model_server}/metrics").text
        line = next((x for x in text.splitlines() if x.startswith(f"{name}{{{labels}}}")), None)
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    tokens = 'kind="completion",model="tiny-random"'
    before = sample("prefix_rft_inference_tokens_total", tokens)
    first = sample("prefix_rft_inference_time_to_first_token_seconds_count", 'model="tiny-random"')
    reply = deployment.client().completions.create(model="tiny-random", prompt="abc", max_tokens=7, n=2)
    assert sample("prefix_rft_inference_tokens_total", tokens) - before == reply.usage.completion_tokens
    assert (
        sample("prefix_rft_inference_time_to_first_token_seconds_count", 'model="tiny-random"') - first == 2
    )
    assert sample("prefix_rft_inference_batch_rows", 'model="tiny-random"') == 0


def test_a_checkpoint_answers_by_its_name_while_its_job_runs(deployment: Deployment, engine: BatchedEngine):
    """A checkpoint as the trainer writes it and the worker stores it (core.checkpoints, the uncompressed
    tar), named as the checkpoints list names it, is what chat decodes with."""
    from core.checkpoints import save_checkpoint

    root = deployment.dirs["prefix"].parent / "checkpoint-job"
    model, tokenizer = load_base_model("tiny-random")
    policy = attach_adapter(model, tokenizer, PrefixAdapterConfig(num_virtual_tokens=6))
    generator = torch.Generator().manual_seed(4)
    params = [p for p in policy.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator))
    optimizer = torch.optim.AdamW(params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = save_checkpoint(root, 3, policy, optimizer, scheduler, {"model": "tiny-random"}, keep=2)
    archive = root / "step-3.tar"
    write_archive(path, archive, arcname=".", compress=False)
    settings = deployment.api.settings
    key = "jobs/checkpoint-job/checkpoints/step-000003-attempt-1.tar"
    open_storage(settings.storage_url).put_file(key, archive)
    with transaction(deployment.api.sessions) as session:
        job = Job(
            project_id=deployment.api.project_id,
            status=JobStatus.RUNNING,
            model="tiny-random",
            method="prefix_rft",
            config={},
            seed=1,
            total_steps=10,
            suffix="ckpt",
        )
        session.add(job)
        session.flush()
        for step, digest in ((3, hashlib.sha256(archive.read_bytes()).hexdigest()), (6, None)):
            session.add(
                Checkpoint(
                    job_id=job.id, step=step, storage_key=key, bytes=archive.stat().st_size, sha256=digest
                )
            )
        name, unchecked = checkpoint_model_name(job, 3), checkpoint_model_name(job, 6)

    client = deployment.client()
    reply = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hello there"}], max_tokens=12, temperature=0
    )
    want = expected(engine, path / "adapter", chat_ids(engine, "hello there"), max_tokens=12, temperature=0)
    assert reply.model == name and reply.choices[0].message.content == want.text
    base = expected(engine, None, chat_ids(engine, "hello there"), max_tokens=12, temperature=0)
    assert want.text != base.text  # the checkpoint's adapter changes what is said
    # A step without a checkpoint, one stored before checkpoints had digests, another project's: not found.
    for model_name, key in ((name.replace("step-3", "step-4"), None), (unchecked, None), (name, "other")):
        caller = deployment.client(deployment.api.other_project().key if key else None)
        with pytest.raises(openai.NotFoundError):
            caller.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}])


def test_a_full_queue_answers_429_with_when_to_retry(deployment: Deployment):
    """More rows than the model server's queue holds: 429 with its Retry-After, relayed by the API."""
    client = deployment.client()
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="tiny-random", messages=[{"role": "user", "content": "hi"}], n=QUEUE_ROWS + 1, max_tokens=2
        )
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "1"


def memorized_judge(directory: Path, messages: list[dict[str, str]], answer: str) -> Path:
    """A LoRA adapter of the tiny model trained until its greedy answer to `messages` is `answer`
    (the random base model says no JSON at all): a judge model made and served as a user would."""
    model, tokenizer = load_base_model("tiny-random")
    torch.manual_seed(0)
    policy = attach_adapter(model, tokenizer, LoraAdapterConfig(r=8))
    prompt = chat_template_ids(tokenizer, messages)
    target = [*tokenizer(answer)["input_ids"], tokenizer.eos_token_id]
    ids = torch.tensor([prompt + target])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(400):
        out = policy(input_ids=ids, labels=labels)
        greedy = out.logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
        if greedy == target and out.loss.item() < 0.2:  # a margin, so rounding cannot flip a token
            return export_adapter(policy, directory, "tiny-random")
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    raise AssertionError(f"the judge did not learn its answer: {tokenizer.decode(greedy)!r}")


def chat_template_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def test_a_model_grader_is_judged_by_a_model_we_serve(deployment: Deployment, tmp_path: Path):
    """score_model with its judge name mapped to a fine-tuned model of this deployment: the grader
    asks the API's chat endpoint, the model server decodes with the judge's adapter, and the
    judge's JSON is the reward. Mapped to the base model, which says no JSON, it scores 0 with
    OpenAI's parse error."""
    grader = {
        "type": "score_model",
        "name": "judge",
        "model": "our-judge",
        "input": [{"role": "user", "content": "Rate this answer: {{sample.output_text}}"}],
        "range": [0, 1],
    }
    asked = ScoreModel.model_validate(grader).messages("Paris", {})  # what the judge is sent
    judge_dir = memorized_judge(tmp_path / "judge", asked, '{"result": 0.75}')
    judge = store_as_succeeded_job(deployment.api.settings, deployment.api.project_id, judge_dir, "judge")
    endpoint = {"base_url": f"{deployment.base_url}/v1", "api_key": deployment.api.key}
    judges = {
        "our-judge": JudgeEndpoint(model=judge, **endpoint),
        "base-judge": JudgeEndpoint(model="tiny-random", **endpoint),
    }
    # A second API process of the same deployment, with the judges mapped (another project's key).
    api = ApiClient(deployment.api.settings.model_copy(update={"judge_models": judges}))
    try:
        with served(api.app) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=api.key, max_retries=0)
            result = client.fine_tuning.alpha.graders.run(grader=grader, model_sample="Paris", item={})
            assert result.reward == 0.75 and result.metadata.sampled_model_name == judge
            assert not result.metadata.errors.model_grader_parse_error
            base = client.fine_tuning.alpha.graders.run(
                grader={**grader, "model": "base-judge"}, model_sample="Paris", item={}
            )
            assert base.reward == 0 and base.metadata.errors.model_grader_parse_error
            assert base.metadata.sampled_model_name == "tiny-random"
    finally:
        api.http.close()
