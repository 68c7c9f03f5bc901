"""An OpenAI fine-tuning script, unchanged but for its base URL and key, trains here end to end:
the official client, the API behind uvicorn, PostgreSQL, Redis and a Celery worker process."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ApiClient, served

pytestmark = pytest.mark.slow

SFT = [
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"What is {a} + 1?"},
                {"role": "assistant", "content": str(a + 1)},
            ]
        }
    )
    for a in range(16)
]
RFT = [
    json.dumps({"messages": [{"role": "user", "content": f"What is {a} + 1?"}], "answer": str(a + 1)})
    for a in range(8)
]
GRADER = {
    "type": "string_check",
    "name": "says the answer",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "like",
}
SMALL = {"max_completion_tokens": 8, "rollouts_per_prompt": 4}


@contextmanager
def official_client(settings, start_worker) -> Iterator[tuple[openai.OpenAI, Any]]:
    """The official client against the API behind uvicorn, with a real worker process."""
    api = ApiClient(settings)
    worker = start_worker(settings)
    with served(api.app) as base_url:
        yield openai.OpenAI(base_url=f"{base_url}/v1", api_key=api.key, max_retries=0), worker


def upload(client: openai.OpenAI, lines: list[str], name: str):
    return client.files.create(file=(name, ("\n".join(lines) + "\n").encode()), purpose="fine-tune")


def wait_until_done(client: openai.OpenAI, job_id: str, worker, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"{job_id} is still {job.status}\n{worker.log()[-3000:]}")


def test_supervised_and_reinforcement_jobs_train_through_the_official_client(
    pg_settings, start_worker, webhook_receiver
):
    with official_client(pg_settings, start_worker) as (client, worker):
        hook = httpx.post(  # ours: OpenAI registers webhooks in its dashboard
            f"{client.base_url}webhooks",
            json={"url": webhook_receiver.url, "events": ["fine_tuning.job.succeeded"]},
            headers={"Authorization": f"Bearer {client.api_key}"},
        ).json()
        sft_file = upload(client, SFT, "sft.jsonl")
        rft_file = upload(client, RFT, "rft.jsonl")
        supervised = client.fine_tuning.jobs.create(
            model="tiny-random",
            training_file=sft_file.id,
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}},
            },
            suffix="sum",
        )
        reinforcement = client.fine_tuning.jobs.create(
            model="tiny-random",
            training_file=rft_file.id,
            validation_file=rft_file.id,  # evaluated before and after: validation metrics events
            method={
                "type": "reinforcement",
                "reinforcement": {"grader": GRADER, "hyperparameters": {"batch_size": 4, **SMALL}},
            },
        )
        for job, steps_total in ((supervised, 2), (reinforcement, 2)):
            done = wait_until_done(client, job.id, worker)
            assert done.status == "succeeded", (done.error, worker.log()[-3000:])
            assert done.total_steps == steps_total == done.step and done.error is None
            assert done.fine_tuned_model and job.id in done.fine_tuned_model
            assert isinstance(done.finished_at, int) and done.finished_at >= done.created_at
            events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))  # pages of two, to the end
            assert len({e.id for e in events}) == len(events) > 2
            assert events[-1].message.startswith("job created")
            assert any("succeeded" in e.message for e in events)
            # One metrics event a step, oldest last, in OpenAI's names.
            steps = [e for e in reversed(events) if e.type == "metrics" and "train_loss" in e.data]
            assert [e.data["step"] for e in steps] == list(range(1, steps_total + 1))
            assert all(e.data["total_steps"] == steps_total for e in steps)
            assert steps[0].message.startswith(f"Step 1/{steps_total}: training loss=")
            assert done.trained_tokens == sum(e.data["train_trained_tokens"] for e in steps) > 0
            # The results file: OpenAI's CSV, one row per step and evaluation, the same numbers.
            [results] = done.result_files
            rows = list(csv.DictReader(io.StringIO(client.files.content(results).text)))
            trained = {int(r["step"]): float(r["train_loss"]) for r in rows if r["train_loss"]}
            assert trained == {e.data["step"]: e.data["train_loss"] for e in steps}
            assert client.files.retrieve(results).purpose == "fine-tune-results"
            assert results in [f.id for f in client.files.list(purpose="fine-tune-results")]
            assert results not in [f.id for f in client.files.list(purpose="fine-tune")]
            with pytest.raises(openai.BadRequestError) as refused:  # a results file is no training data
                client.fine_tuning.jobs.create(model="tiny-random", training_file=results)
            assert refused.value.param == "training_file"
            if job is reinforcement:
                assert all(0 <= e.data["train_mean_reward"] <= 1 for e in steps)
                assert any("full_valid_mean_reward" in e.data for e in events if e.type == "metrics")
            names = [m.id for m in client.models.list()]
            assert done.fine_tuned_model in names
        assert done.method.reinforcement.grader.to_dict() == GRADER
        # Each success was announced once, signed as the official client verifies it.
        deadline = time.monotonic() + 30
        while len(webhook_receiver.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        announced = [
            client.webhooks.unwrap(b, h, secret=hook["secret"]) for h, b in webhook_receiver.received
        ]
        assert sorted(e.data.id for e in announced) == sorted([supervised.id, reinforcement.id])
        assert {e.type for e in announced} == {"fine_tuning.job.succeeded"}


def test_pause_checkpoints_and_resume_continues_from_it(pg_settings, start_worker):
    with official_client(pg_settings, start_worker) as (client, worker):
        training = upload(client, SFT, "sft.jsonl")
        job = client.fine_tuning.jobs.create(
            model="tiny-random",
            training_file=training.id,
            method={"type": "supervised", "supervised": {"hyperparameters": {"steps": 200, "batch_size": 4}}},
        )
        deadline = time.monotonic() + 120
        while client.fine_tuning.jobs.retrieve(job.id).step < 3:
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.2)
        with pytest.raises(openai.ConflictError) as caught:  # only a paused job resumes
            client.fine_tuning.jobs.resume(job.id)
        assert caught.value.code == "job_not_paused"
        asked = client.fine_tuning.jobs.pause(job.id)
        assert asked.status in ("running", "paused")  # running until its next step
        while (paused := client.fine_tuning.jobs.retrieve(job.id)).status != "paused":
            assert paused.status == "running" and time.monotonic() < deadline, (
                paused.status,
                worker.log()[-3000:],
            )
            time.sleep(0.2)
        stopped_at = paused.step
        assert 3 <= stopped_at < 200
        [latest, *_] = client.fine_tuning.jobs.checkpoints.list(job.id)
        assert latest.step_number == stopped_at  # the step it stopped at is saved
        time.sleep(1.0)
        assert client.fine_tuning.jobs.retrieve(job.id).step == stopped_at  # nobody trains a paused job
        assert client.fine_tuning.jobs.resume(job.id).status == "queued"
        done = wait_until_done(client, job.id, worker, timeout=300)
        assert done.status == "succeeded" and done.step == 200, worker.log()[-3000:]
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
        assert f"resuming from the checkpoint of step {stopped_at}" in messages
        assert any(m.startswith(f"paused at step {stopped_at}") for m in messages)


def test_our_methods_train_through_the_official_client(pg_settings, start_worker):
    """prefix_rft, the two-phase methods and psft, asked for as OpenAI method types of ours."""
    demonstrated = [
        json.dumps({**json.loads(sft), "answer": json.loads(sft)["messages"][1]["content"]}) for sft in SFT
    ]
    with official_client(pg_settings, start_worker) as (client, worker):
        training = upload(client, demonstrated, "demonstrated.jsonl")
        hyper = {"batch_size": 4, "steps": 2, **SMALL}
        methods = {
            "prefix_rft": {"grader": GRADER, "hyperparameters": hyper},
            "sft_then_rft": {"grader": GRADER, "hyperparameters": {**hyper, "sft_steps": 1}},
            "psft_then_rft": {"grader": GRADER, "hyperparameters": {**hyper, "sft_steps": 1}},
            "psft": {"hyperparameters": {"batch_size": 4, "steps": 2}},
        }
        jobs = {
            kind: client.fine_tuning.jobs.create(
                model="tiny-random",
                training_file=training.id,
                extra_body={"method": {"type": kind, kind: settings}},
            )
            for kind, settings in methods.items()
        }
        for kind, job in jobs.items():
            done = wait_until_done(client, job.id, worker)
            assert done.status == "succeeded", (kind, done.error, worker.log()[-3000:])
            assert done.method.type == kind and done.step == done.total_steps == 2
            assert done.fine_tuned_model in [m.id for m in client.models.list()]
