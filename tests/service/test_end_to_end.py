"""Whole jobs through the real parts: API, broker, a Celery worker process, database, storage."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from sqlalchemy import func, select

from cli.launcher import initialise
from core.models import load_base_model
from service.tables import Artifact, Job
from tests.conftest import REPO, ApiClient, free_port, job_request

pytestmark = pytest.mark.slow

GRADER = {"type": "numeric", "field": "answer", "extract": "last_number"}
JOBS = "/v1/fine_tuning/jobs"


def addition_lines(count: int = 24) -> list[str]:
    return [
        json.dumps(
            {
                "prompt": f"What is {a} + {b}?",
                "demonstration": f"The answer is {a + b}.",
                "answer": str(a + b),
            }
        )
        for a, b in ((i % 7 + 1, i % 5 + 2) for i in range(count))
    ]


def job_body(file_id: str, steps: int, grader: dict = GRADER, checkpoint_every: int = 1, **hyper) -> dict:
    """A small prefix_rft job, evaluated before and after training only (eval_interval = steps)."""
    return job_request(
        file_id,
        method="prefix_rft",
        grader=grader,
        hyperparameters={
            "steps": steps,
            "prompts_per_step": 2,
            "rollouts_per_prompt": 4,
            "max_completion_tokens": 12,
            "eval_interval": steps,
            "checkpoint_every": checkpoint_every,
            **hyper,
        },
        suffix="e2e",
        seed=7,
    )


def wait_for(http, job_id: str, done, timeout: float = 180, worker=None, every: float = 0.3) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"{JOBS}/{job_id}").json()
        if done(job):
            return job
        time.sleep(every)
    log = worker.log()[-3000:] if worker else ""
    raise AssertionError(f"job {job_id} did not get there in {timeout} s: {job}\n{log}")


FINISHED = ("succeeded", "failed", "cancelled")


def finished(job: dict) -> bool:
    return job["status"] in FINISHED


def all_events(http, job_id: str) -> list[dict]:
    """Every event of the job, newest first."""
    return http.get(f"{JOBS}/{job_id}/events", params={"limit": 1000}).json()["data"]


def check_adapter_archive(content: bytes, sha256: str, target: Path) -> Path:
    assert hashlib.sha256(content).hexdigest() == sha256
    with tarfile.open(fileobj=io.BytesIO(content)) as tar:
        tar.extractall(target, filter="data")
    adapter = target / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    return adapter


def assert_loads_with_peft(adapter: Path) -> None:
    base, tokenizer = load_base_model("tiny-random")
    ids = tokenizer("What is 2 + 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = base(ids).logits
        tuned = PeftModel.from_pretrained(base, adapter)(ids).logits
    assert tuned.shape == plain.shape and torch.isfinite(tuned).all()
    assert not torch.allclose(tuned, plain), "the trained adapter changes nothing"


def attempt_of(api: ApiClient, job_id: str) -> int:
    """The job's attempt number, which the API does not show: read from its row."""
    with api.sessions() as session:
        return session.scalar(select(Job.attempt).where(Job.id == job_id))


def test_a_job_on_postgres_redis_s3_and_a_worker_process(
    make_settings, pg_settings, s3_endpoint, s3_bucket, start_worker, tmp_path
):
    settings = make_settings(
        database_url=pg_settings.database_url,
        broker_url=pg_settings.broker_url,
        storage_url=f"s3://{s3_bucket}/service",
        s3_endpoint_url=s3_endpoint,
    )
    initialise(settings)  # the compose stack's one-off migrate step: migrations and the bucket
    api = ApiClient(settings)
    worker = start_worker(settings)

    uploaded = api.upload(addition_lines())
    assert uploaded.status_code == 200, uploaded.text
    validation = uploaded.json()["validation"]
    assert validation["examples"] == 24 and validation["field_counts"] == {"answer": 24}
    created = api.http.post(JOBS, json=job_body(uploaded.json()["id"], steps=3))
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]

    job = wait_for(api.http, job_id, finished, worker=worker)
    assert job["status"] == "succeeded", (job, worker.log()[-3000:])
    assert job["step"] == 3 and attempt_of(api, job_id) == 1
    assert job["fine_tuned_model"] == f"ft:tiny-random:e2e:{job_id}"

    # Ours beside OpenAI's: every step's metrics, the evaluations, the rollouts.
    metrics = f"{JOBS}/{job_id}/metrics"
    train = api.http.get(metrics, params={"kind": "train"}).json()["data"]
    assert [m["step"] for m in train] == [1, 2, 3]
    assert {"loss", "reward_mean", "demo_prefix_low"} <= set(train[0]["values"])
    evals = api.http.get(metrics, params={"kind": "eval"}).json()["data"]
    assert [m["step"] for m in evals] == [0, 3]
    later = api.http.get(metrics, params={"kind": "train", "after_step": 1}).json()["data"]
    assert [m["step"] for m in later] == [2, 3]
    samples = api.http.get(f"{JOBS}/{job_id}/samples").json()["data"]
    assert samples and {"completion", "reward", "rewards"} <= set(samples[0]["data"])
    assert {s["step"] for s in samples} == {1, 2, 3}
    second = api.http.get(f"{JOBS}/{job_id}/samples", params={"step": 2}).json()["data"]
    assert second == [s for s in samples if s["step"] == 2]
    assert job["last_reward"] == pytest.approx(train[-1]["values"]["reward_mean"])
    checkpoints = api.http.get(f"{JOBS}/{job_id}/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [3, 2, 1]  # newest first

    download = api.http.get(f"{JOBS}/{job_id}/adapter")
    assert download.status_code == 200
    adapter = check_adapter_archive(
        download.content, download.headers["x-content-sha256"], tmp_path / "download"
    )
    assert_loads_with_peft(adapter)
    with api.sessions() as session:
        assert (
            session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id)) == 1
        )
    # What the API says is stored is what is in the bucket.
    keys = api.app.state.services.storage.list_keys(f"jobs/{job_id}/")
    assert (
        f"jobs/{job_id}/attempt-1/adapter.tar.gz" in keys
        and len([k for k in keys if "checkpoints" in k]) == 3
    )


def test_cancel_stops_a_running_job_at_its_next_step(pg_settings, start_worker):
    api = ApiClient(pg_settings)
    worker = start_worker(pg_settings)
    file_id = api.upload(addition_lines()).json()["id"]
    job_id = api.http.post(JOBS, json=job_body(file_id, steps=500)).json()["id"]
    wait_for(api.http, job_id, lambda j: j["status"] == "running" and j["step"] >= 1, worker=worker)

    cancelled = api.http.post(f"{JOBS}/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "running"  # until its next step
    job = wait_for(api.http, job_id, finished, timeout=60, worker=worker)
    assert job["status"] == "cancelled" and 1 <= job["step"] < 500
    assert api.http.get(f"{JOBS}/{job_id}/adapter").json()["error"]["code"] == "adapter_not_ready"
    assert f"cancelled at step {job['step']}" in [e["message"] for e in all_events(api.http, job_id)]
    # The worker is free again: the next job runs.
    next_id = api.http.post(JOBS, json=job_body(file_id, steps=1)).json()["id"]
    assert wait_for(api.http, next_id, finished, worker=worker)["status"] == "succeeded"


def test_a_job_with_a_training_error_fails_with_a_message(pg_settings, start_worker, monkeypatch):
    # As where the API holds no tokenizer (compose): the prompts are first counted by the worker.
    monkeypatch.setattr("api.jobs.check_prompt_lengths", lambda *args, **kwargs: None)
    api = ApiClient(pg_settings)
    worker = start_worker(pg_settings)
    file_id = api.upload(addition_lines(4)).json()["id"]  # too few examples for a held-out split...
    body = job_body(file_id, steps=2, eval_samples=1, max_prompt_tokens=2)  # ...and prompts too long
    job_id = api.http.post(JOBS, json=body).json()["id"]
    job = wait_for(api.http, job_id, finished, worker=worker)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_input" and "max_prompt_tokens" in job["error"]["message"], job[
        "error"
    ]
    assert all_events(api.http, job_id)[0]["level"] == "error"  # the newest


def test_the_embedded_default_serves_a_whole_job(tmp_path):
    """`prefix-rft serve` on SQLite, local storage and the file broker: the official openai client
    uploads, trains, pages the events and checkpoints and chats; our CLI client downloads."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_RFT_")}
    env["PREFIX_RFT_DATA_DIR"] = str(tmp_path / "data")
    env["PREFIX_RFT_INFERENCE_URL"] = f"http://127.0.0.1:{free_port()}"
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            key = re.search(r"prk_[A-Za-z0-9_-]+", log_path.read_text())
            try:
                if key and httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.3)
        http = httpx.Client(base_url=base, timeout=30)
        assert http.get("/ready").json()["status"] == "ok"
        # The official openai client, as an OpenAI fine-tuning script would use it.
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key.group(), max_retries=0, timeout=120)
        uploaded = client.files.create(
            file=("add.jsonl", "\n".join(addition_lines()).encode()), purpose="fine-tune"
        )
        body = job_body(uploaded.id, steps=2)
        created = client.fine_tuning.jobs.create(
            model=body["model"],
            training_file=uploaded.id,
            suffix=body["suffix"],
            seed=body["seed"],
            extra_body={"method": body["method"]},
        )
        deadline = time.monotonic() + 240
        while (job := client.fine_tuning.jobs.retrieve(created.id)).status not in FINISHED:
            assert time.monotonic() < deadline, f"{job.status}\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        assert job.status == "succeeded", (job.error, log_path.read_text()[-3000:])
        events = [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=2)]  # pages of two
        assert len(events) == len(set(events)) > 4  # the loop ends, nothing repeats
        assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)] == [2, 1]

        client_env = {**env, "PREFIX_RFT_API_URL": base, "PREFIX_RFT_API_KEY": key.group()}
        cli = [sys.executable, "-m", "cli.main", "jobs"]
        listed = subprocess.run(
            [*cli, "list"], env=client_env, cwd=REPO, capture_output=True, text=True, check=True
        )
        assert job.id in listed.stdout and "succeeded" in listed.stdout
        subprocess.run(
            [*cli, "download", job.id, "-o", str(tmp_path / "dl")], env=client_env, cwd=REPO, check=True
        )
        assert_loads_with_peft(tmp_path / "dl" / "adapter")

        # The trained adapter answers at once through the model server `serve` started.
        chat = client.chat.completions.create(
            model=job.fine_tuned_model,
            messages=[{"role": "user", "content": "What is 2 + 3?"}],
            max_tokens=8,
            temperature=0,
        )
        assert chat.model == job.fine_tuned_model and 1 <= chat.usage.completion_tokens <= 8
    finally:
        server.terminate()
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
    # Stopping the service stops its worker too.
    worker_pid = int(re.search(r"worker started \(pid (\d+)\)", log_path.read_text()).group(1))
    deadline = time.monotonic() + 60
    while Path(f"/proc/{worker_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not Path(f"/proc/{worker_pid}").exists(), "the worker outlived prefix-rft serve"
    model_server_pid = int(
        re.search(r"model server started on \S+ \(pid (\d+)\)", log_path.read_text()).group(1)
    )
    assert not Path(f"/proc/{model_server_pid}").exists(), "the model server outlived prefix-rft serve"
