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
import pytest
import torch
from peft import PeftModel
from sqlalchemy import func, select

from cli.launcher import initialise
from core.models import load_base_model
from service.tables import Artifact
from tests.conftest import REPO, ApiClient, free_port

pytestmark = pytest.mark.slow

REWARD = {"graders": [{"type": "numeric", "field": "answer", "extract": "last_number"}]}


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


def job_body(dataset_id: str, steps: int, **extra) -> dict:
    return {
        "model": "tiny-random",
        "training_dataset": dataset_id,
        "reward": REWARD,
        "hyperparameters": {
            "steps": steps,
            "prompts_per_step": 2,
            "rollouts_per_prompt": 4,
            "max_completion_tokens": 12,
        },
        "checkpoint_every": 1,
        "suffix": "e2e",
        "seed": 7,
        **extra,
    }


def wait_for(http, job_id: str, done, timeout: float = 180, worker=None, every: float = 0.3) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if done(job):
            return job
        time.sleep(every)
    log = worker.log()[-3000:] if worker else ""
    raise AssertionError(f"job {job_id} did not get there in {timeout} s: {job}\n{log}")


def finished(job: dict) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


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

    dataset = api.upload(addition_lines()).json()
    assert dataset["examples"] == 24 and dataset["field_counts"] == {"answer": 24}
    created = api.http.post("/v1/jobs", json=job_body(dataset["id"], steps=3))
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    job = wait_for(api.http, job_id, finished, worker=worker)
    assert job["status"] == "succeeded", (job, worker.log()[-3000:])
    assert job["step"] == 3 and job["attempt"] == 1
    assert job["fine_tuned_model"] == f"ft:tiny-random:e2e:{job_id}"

    train = api.http.get(f"/v1/jobs/{job_id}/metrics", params={"kind": "train"}).json()["data"]
    assert [m["step"] for m in train] == [1, 2, 3]
    assert {"loss", "reward_mean", "demo_prefix_low"} <= set(train[0]["values"])
    evals = api.http.get(f"/v1/jobs/{job_id}/metrics", params={"kind": "eval"}).json()["data"]
    assert [m["step"] for m in evals] == [0, 3]
    messages = [e["message"] for e in api.http.get(f"/v1/jobs/{job_id}/events").json()["data"]]
    assert messages[0].startswith("job created") and messages[-1].startswith("succeeded after 3 steps")
    samples = api.http.get(f"/v1/jobs/{job_id}/samples").json()["data"]
    assert samples and {"completion", "reward", "rewards"} <= set(samples[0]["data"])
    checkpoints = api.http.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step"] for c in checkpoints] == [1, 2, 3]
    models = [m["id"] for m in api.http.get("/v1/models").json()["data"]]
    assert job["fine_tuned_model"] in models

    download = api.http.get(f"/v1/jobs/{job_id}/adapter")
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
    dataset = api.upload(addition_lines()).json()
    job_id = api.http.post("/v1/jobs", json=job_body(dataset["id"], steps=500)).json()["id"]
    wait_for(api.http, job_id, lambda j: j["status"] == "running" and j["step"] >= 1, worker=worker)

    cancelled = api.http.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelling"
    job = wait_for(api.http, job_id, finished, timeout=60, worker=worker)
    assert job["status"] == "cancelled" and 1 <= job["step"] < 500
    assert api.http.get(f"/v1/jobs/{job_id}/adapter").json()["error"]["code"] == "adapter_not_ready"
    events = [e["message"] for e in api.http.get(f"/v1/jobs/{job_id}/events").json()["data"]]
    assert f"cancelled at step {job['step']}" in events
    # The worker is free again: the next job runs.
    next_id = api.http.post("/v1/jobs", json=job_body(dataset["id"], steps=1)).json()["id"]
    assert wait_for(api.http, next_id, finished, worker=worker)["status"] == "succeeded"


def test_a_job_with_a_training_error_fails_with_a_message(pg_settings, start_worker):
    api = ApiClient(pg_settings)
    worker = start_worker(pg_settings)
    dataset = api.upload(addition_lines(4)).json()  # too few examples for a held-out split...
    body = job_body(dataset["id"], steps=2, evaluation={"max_examples": 1})
    body["hyperparameters"]["max_prompt_tokens"] = 2  # ...and prompts longer than allowed
    job_id = api.http.post("/v1/jobs", json=body).json()["id"]
    job = wait_for(api.http, job_id, finished, worker=worker)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_input" and "max_prompt_tokens" in job["error"]["message"], job[
        "error"
    ]
    assert api.http.get(f"/v1/jobs/{job_id}/events").json()["data"][-1]["level"] == "error"


def test_the_embedded_default_serves_a_whole_job(tmp_path):
    """`prefix-rft serve` on SQLite, local storage and the file broker; the CLI client downloads."""
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
        http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key.group()}"}, timeout=30)
        assert http.get("/ready").json()["status"] == "ok"
        dataset = http.post("/v1/datasets", files={"file": ("add.jsonl", "\n".join(addition_lines()))}).json()
        job_id = http.post("/v1/jobs", json=job_body(dataset["id"], steps=2)).json()["id"]
        job = wait_for(http, job_id, finished, timeout=240)
        assert job["status"] == "succeeded", (job, log_path.read_text()[-3000:])

        client_env = {**env, "PREFIX_RFT_API_URL": base, "PREFIX_RFT_API_KEY": key.group()}
        cli = [sys.executable, "-m", "cli.main", "jobs"]
        listed = subprocess.run(
            [*cli, "list"], env=client_env, cwd=REPO, capture_output=True, text=True, check=True
        )
        assert job_id in listed.stdout and "succeeded" in listed.stdout
        subprocess.run(
            [*cli, "download", job_id, "-o", str(tmp_path / "dl")], env=client_env, cwd=REPO, check=True
        )
        assert_loads_with_peft(tmp_path / "dl" / "adapter")

        # The trained adapter answers at once through the model server `serve` started.
        chat = http.post(
            "/v1/chat/completions",
            json={
                "model": job["fine_tuned_model"],
                "messages": [{"role": "user", "content": "What is 2 + 3?"}],
                "max_tokens": 8,
                "temperature": 0,
            },
            timeout=120,
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["model"] == job["fine_tuned_model"]
        assert 1 <= chat.json()["usage"]["completion_tokens"] <= 8
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
