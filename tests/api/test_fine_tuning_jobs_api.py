"""/v1/fine_tuning/jobs through the official openai client: create, retrieve, list, cancel.

The API behind uvicorn on PostgreSQL with Redis as the broker and no worker: jobs stay queued,
which is what these calls see (training through this surface is tested with a worker elsewhere).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import EXACT_ANSWER, ApiClient, served

SFT_LINES = [
    json.dumps(
        {"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
    )
    for i in range(20)
]
RFT_LINES = [
    json.dumps({"messages": [{"role": "user", "content": f"{i}+1?"}], "answer": str(i + 1)})
    for i in range(12)
]
GRADER = EXACT_ANSWER


@pytest.fixture
def deployment(api: ApiClient) -> Iterator[tuple[ApiClient, openai.OpenAI]]:
    with served(api.app) as base_url:
        yield api, openai.OpenAI(base_url=f"{base_url}/v1", api_key=api.key, max_retries=0)


def upload(client: openai.OpenAI, lines: list[str]) -> str:
    return client.files.create(
        file=("data.jsonl", ("\n".join(lines) + "\n").encode()), purpose="fine-tune"
    ).id


def test_a_supervised_job_as_openai_shows_it(deployment):
    _, client = deployment
    training = upload(client, SFT_LINES)
    job = client.fine_tuning.jobs.create(
        model="tiny-random",
        training_file=training,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 8}}},
        suffix="adder",
        seed=7,
        metadata={"team": "a"},
    )
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
    assert (job.status, job.model, job.training_file, job.validation_file) == (
        "queued",
        "tiny-random",
        training,
        None,
    )
    assert job.seed == 7 and job.metadata == {"team": "a"} and job.user_provided_suffix == "adder"
    assert job.error is None and job.fine_tuned_model is None and job.finished_at is None
    assert job.result_files == [] and job.integrations == [] and isinstance(job.created_at, int)
    # ceil(2 epochs x 20 examples / 8) = 5 steps
    assert job.hyperparameters.to_dict() == {"batch_size": 8, "learning_rate_multiplier": 1.0, "n_epochs": 2}
    assert job.method.type == "supervised"
    assert job.method.supervised.hyperparameters.n_epochs == 2 and job.total_steps == 5
    assert client.fine_tuning.jobs.retrieve(job.id).to_dict() == job.to_dict()
    for key in ("trained_tokens", "estimated_finish", "fine_tuned_model", "error", "finished_at"):
        assert key in job.to_dict(exclude_unset=False)


def test_reinforcement_and_our_methods_take_openai_s_layout(deployment):
    _, client = deployment
    training = upload(client, RFT_LINES)
    rft = client.fine_tuning.jobs.create(
        model="tiny-random",
        training_file=training,
        method={
            "type": "reinforcement",
            "reinforcement": {"grader": GRADER, "hyperparameters": {"batch_size": 4, "eval_interval": 2}},
        },
    )
    echoed = rft.method.reinforcement
    assert echoed.grader.to_dict() == GRADER
    assert echoed.hyperparameters.n_epochs == 1 and rft.total_steps == 3  # 12 prompts at 4 a step
    assert echoed.hyperparameters.eval_interval == 2 and echoed.hyperparameters.compute_multiplier == 1.0
    ours = client.fine_tuning.jobs.create(
        model="tiny-random",
        training_file=training,
        extra_body={
            "method": {
                "type": "prefix_rft",
                "prefix_rft": {"grader": GRADER, "hyperparameters": {"steps": 4}},
            }
        },
    )
    assert ours.method.type == "prefix_rft" and ours.total_steps == 4


@pytest.mark.parametrize(
    ("kwargs", "code", "param"),
    [
        ({"method": {"type": "dpo", "dpo": {}}}, "unsupported_method", "method.type"),
        (
            {"method": {"type": "reinforcement", "reinforcement": {"grader": {**GRADER, "operation": "is"}}}},
            "invalid_grader",
            "method.reinforcement.grader.operation",
        ),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": -1}}}},
            "invalid_request",
            "method.supervised.hyperparameters.n_epochs",
        ),
        ({"model": "gpt-4o-mini"}, "unknown_model", "model"),
        (
            {"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]},
            "unsupported_parameter",
            "integrations",
        ),
        ({"suffix": "Not:Allowed"}, None, "suffix"),
    ],
)
def test_what_cannot_run_is_refused_as_bad_request_naming_the_field(deployment, kwargs, code, param):
    _, client = deployment
    training = upload(client, SFT_LINES)
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(**{"model": "tiny-random", "training_file": training, **kwargs})
    assert caught.value.param == param
    if code:
        assert caught.value.code == code
    assert list(client.fine_tuning.jobs.list()) == []  # nothing was queued


def test_unknown_or_foreign_files_are_not_found(deployment):
    api, client = deployment
    theirs = openai.OpenAI(base_url=str(client.base_url), api_key=api.other_project().key, max_retries=0)
    foreign = upload(theirs, SFT_LINES)
    with pytest.raises(openai.NotFoundError) as caught:
        client.fine_tuning.jobs.create(model="tiny-random", training_file=foreign)
    assert (caught.value.code, caught.value.param) == ("file_not_found", "training_file")
    job = client.fine_tuning.jobs.create(model="tiny-random", training_file=upload(client, SFT_LINES))
    with pytest.raises(openai.NotFoundError):
        theirs.fine_tuning.jobs.retrieve(job.id)


def test_list_pages_end_and_filter_by_metadata(deployment):
    _, client = deployment
    training = upload(client, SFT_LINES)
    ids = [
        client.fine_tuning.jobs.create(
            model="tiny-random", training_file=training, metadata={"run": str(i % 2)}
        ).id
        for i in range(4)
    ]
    assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == ids[::-1]  # four pages of one, then done
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"run": "1"})] == [ids[3], ids[1]]
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.list(after="ftjob-000000000000000000000000")
    assert caught.value.param == "after"


def test_cancel(deployment):
    _, client = deployment
    job = client.fine_tuning.jobs.create(model="tiny-random", training_file=upload(client, SFT_LINES))
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and isinstance(cancelled.finished_at, int)
    with pytest.raises(openai.ConflictError) as caught:
        client.fine_tuning.jobs.cancel(job.id)
    assert caught.value.code == "job_finished"
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_events_and_checkpoints_page_newest_first_and_end(deployment):
    from service.db import transaction
    from service.tables import Checkpoint, JobEvent, JobMetric

    api, client = deployment
    job = client.fine_tuning.jobs.create(model="tiny-random", training_file=upload(client, SFT_LINES))
    with transaction(api.sessions) as session:  # what a worker reports, written as it writes it
        for i in range(24):
            session.add(JobEvent(job_id=job.id, level="warning" if i == 5 else "info", message=f"event {i}"))
        for step in (2, 4, 6, 8):
            session.add(
                Checkpoint(job_id=job.id, step=step, storage_key=f"jobs/{job.id}/ckpt-{step}.tar", bytes=1)
            )
            session.add(
                JobMetric(job_id=job.id, kind="train", step=step, values={"loss": 1.0 / step, "step": step})
            )
        session.add(
            JobMetric(job_id=job.id, kind="eval", step=8, values={"accuracy": 0.5, "reward_mean": 0.25})
        )

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=7))
    assert [e.message for e in events] == [f"event {i}" for i in reversed(range(24))] + [events[-1].message]
    assert len({e.id for e in events}) == 25 and all(e.id.startswith("ftevent-") for e in events)
    assert events[-1].message.startswith("job created")
    assert [e.level for e in events if e.message == "event 5"] == ["warn"]
    assert {e.object for e in events} == {"fine_tuning.job.event"} and all(
        isinstance(e.created_at, int) for e in events
    )

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id, limit=3))
    assert [c.step_number for c in checkpoints] == [8, 6, 4, 2]
    latest = checkpoints[0]
    assert latest.id.startswith("ftckpt_") and latest.fine_tuning_job_id == job.id
    assert latest.fine_tuned_model_checkpoint.endswith(":ckpt-step-8")
    assert latest.metrics.to_dict() == {
        "step": 8.0,
        "train_loss": 0.125,
        "valid_accuracy": 0.5,
        "valid_reward_mean": 0.25,
    }
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.list_events(job.id, after="ftevent-x")
    assert caught.value.param == "after"


def test_a_running_job_estimates_its_finish_from_its_recent_steps(deployment):
    from datetime import UTC, datetime, timedelta

    from service.db import transaction
    from service.tables import Job, JobMetric, JobStatus

    api, client = deployment
    job = client.fine_tuning.jobs.create(
        model="tiny-random",
        training_file=upload(client, SFT_LINES),
        method={"type": "supervised", "supervised": {"hyperparameters": {"steps": 10}}},
    )
    assert job.estimated_finish is None  # queued: no pace yet
    start = datetime(2026, 12, 1, 12, tzinfo=UTC)
    with transaction(api.sessions) as session:
        # A first attempt ran steps 1-2 a minute apart and was paused for an hour; the second
        # attempt, started at `start`, reports steps 3-4 30 s apart: only its pace counts.
        for step in (1, 2):
            at = start - timedelta(hours=1, minutes=3 - step)
            session.add(JobMetric(job_id=job.id, kind="train", step=step, values={}, created_at=at))
        row = session.get(Job, job.id)
        row.status, row.started_at = JobStatus.RUNNING, start
        for step in (3, 4):
            at = start + timedelta(seconds=30 * step)
            session.add(JobMetric(job_id=job.id, kind="train", step=step, values={}, created_at=at))
    running = client.fine_tuning.jobs.retrieve(job.id)
    assert running.estimated_finish == int((start + timedelta(seconds=30 * 10)).timestamp())
    assert [j.estimated_finish for j in client.fine_tuning.jobs.list() if j.id == job.id] == [
        running.estimated_finish
    ]


def test_a_metrics_event_reads_in_openai_s_names(deployment):
    from service.db import transaction
    from service.lifecycle import add_event

    api, client = deployment
    job = client.fine_tuning.jobs.create(model="tiny-random", training_file=upload(client, SFT_LINES))
    step = {"split": "train", "total_steps": 20, "step": 3, "loss": 0.5, "reward_mean": 0.25, "phase": "rft"}
    with transaction(api.sessions) as session:  # as the worker writes a training step
        add_event(session, job.id, "step 3/20: loss=0.5", data=step, type="metrics")
    newest = client.fine_tuning.jobs.list_events(job.id, limit=1).data[0]
    assert newest.type == "metrics"
    assert newest.message == "Step 3/20: training loss=0.50, train mean reward=0.25"
    assert newest.data["train_loss"] == 0.5 and newest.data["train_mean_reward"] == 0.25
    assert newest.data["step"] == 3 and newest.data["total_steps"] == 20
    older = client.fine_tuning.jobs.list_events(job.id).data[-1]
    assert older.type == "message" and older.message.startswith("job created")


def test_a_retried_create_gets_the_first_job_not_a_twin(deployment):
    """The official client numbers its tries (x-stainless-retry-count) and sends no key: a retry of a
    create whose answer was lost gets the first job; a new first try makes a new one."""
    api, client = deployment
    body = {"model": "tiny-random", "training_file": upload(client, SFT_LINES), "suffix": "retried"}

    def create(headers: dict[str, str]) -> dict:
        response = api.http.post("/v1/fine_tuning/jobs", json=body, headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    first = create({"x-stainless-retry-count": "0"})
    retried = create({"x-stainless-retry-count": "1"})
    again = create({"x-stainless-retry-count": "0"})  # asked for twice on purpose
    assert retried["id"] == first["id"] and again["id"] != first["id"]
    assert create({"x-stainless-retry-count": "2"})["id"] == again["id"]  # the newest first try
    keyed = client.fine_tuning.jobs.create(**body, extra_headers={"Idempotency-Key": "my-create-1"})
    assert (
        client.fine_tuning.jobs.create(**body, extra_headers={"Idempotency-Key": "my-create-1"}).id
        == keyed.id
    )
    jobs = [j for j in client.fine_tuning.jobs.list() if j.user_provided_suffix == "retried"]
    assert len(jobs) == 3


def test_a_retried_upload_gets_the_first_file(deployment):
    api, _ = deployment
    data = ("\n".join(SFT_LINES) + "\n").encode()

    def create(retry: str) -> str:
        response = api.http.post(
            "/v1/files",
            files={"file": ("retried.jsonl", data)},
            data={"purpose": "fine-tune"},
            headers={"x-stainless-retry-count": retry},
        )
        assert response.status_code == 200, response.text
        return response.json()["id"]

    first = create("0")
    assert create("1") == first and create("0") != first


def test_every_size_has_a_limit_checked_at_creation(pg_settings, monkeypatch):
    """A job too big for the workers is refused when it is made, naming the field and the limit;
    the deployment sets the limits (PREFIX_RFT_JOB_LIMITS, any subset, as JSON)."""
    from service.settings import Settings

    monkeypatch.setenv("PREFIX_RFT_JOB_LIMITS", '{"steps": 50, "file_examples": 15}')
    limited = Settings(**{k: getattr(pg_settings, k) for k in ("data_dir", "database_url", "broker_url")})
    assert limited.job_limits.steps == 50 and limited.job_limits.max_completion_tokens == 8192
    api = ApiClient(limited)
    try:
        with served(api.app) as base_url:
            client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api.key, max_retries=0)
            training = upload(client, RFT_LINES)  # 12 examples: within 15

            def refused(hyperparameters: dict, **fields) -> openai.BadRequestError:
                method = {"grader": GRADER, "hyperparameters": hyperparameters}
                with pytest.raises(openai.BadRequestError) as caught:
                    client.fine_tuning.jobs.create(
                        model="tiny-random",
                        training_file=fields.get("training_file", training),
                        method={"type": "reinforcement", "reinforcement": method},
                    )
                assert caught.value.code == "over_limit"
                return caught.value

            where = "method.reinforcement.hyperparameters"
            huge = refused({"max_completion_tokens": 10**9})  # once allocated [rows, 10**9] in the worker
            assert huge.param == f"{where}.max_completion_tokens"
            assert "is 1000000000; this deployment accepts at most 8192" in huge.message
            assert refused({"steps": 51}).param == f"{where}.steps"
            assert refused({"n_epochs": 100, "batch_size": 4}).param == f"{where}.steps"  # 300 steps
            both = refused({"rollouts_per_prompt": 65, "generation_batch_size": 5000})
            assert {d["param"] for d in both.body["details"]} == {
                f"{where}.rollouts_per_prompt",
                f"{where}.generation_batch_size",
            }
            # More training processes than the deployment allows (1 by default) are no job's to take.
            assert refused({"processes": 8}).param == f"{where}.processes"
            bigger = upload(client, RFT_LINES + RFT_LINES[:4])  # 16 examples
            assert refused({"steps": 5}, training_file=bigger).param == "training_file"

            at_the_limits = client.fine_tuning.jobs.create(
                model="tiny-random",
                training_file=training,
                method={
                    "type": "reinforcement",
                    "reinforcement": {"grader": GRADER, "hyperparameters": {"steps": 50}},
                },
            )
            assert at_the_limits.status == "queued"
    finally:
        api.http.close()


def test_a_job_s_duration_is_estimated_before_it_is_made(make_settings, redis_url):
    """Priced at what this deployment measured on the same model and adapter type (a database of
    its own here, so that no other test's jobs count)."""
    from migrations import upgrade_to_head
    from service.db import transaction
    from service.tables import Job, JobMetric, JobStatus
    from tests.conftest import temporary_database

    with temporary_database() as database:
        upgrade_to_head(database)
        api = ApiClient(make_settings(database_url=database, broker_url=redis_url, reaper_seconds=0))
        training = api.upload(RFT_LINES).json()["id"]  # 12 examples: 2 held out
        hyper = {
            "steps": 10,
            "batch_size": 4,
            "compute_multiplier": 1,
            "max_completion_tokens": 50,
            "eval_interval": 5,
        }
        body = {
            "model": "smollm2-135m-instruct",
            "training_file": training,
            "method": {
                "type": "reinforcement",
                "reinforcement": {"grader": GRADER, "hyperparameters": hyper},
            },
        }
        first = api.http.post("/v1/fine_tuning/estimates", json=body)
        assert first.status_code == 200, first.text
        assert first.json()["estimated_seconds"] is None and first.json()["measured"] == 0  # nothing measured
        assert (first.json()["steps"], first.json()["evaluations"]) == (10, 2 + 1)  # before, at 5, after
        assert api.http.get("/v1/fine_tuning/jobs").json()["data"] == []  # an estimate makes no job

        # A job of the same shape ran: 4 prompts x 8 rollouts x 50 tokens took 8 s a step, and
        # its evaluations of 2 examples x 50 tokens 0.5 s.
        ran = api.http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
        with transaction(api.sessions) as session:
            session.get(Job, ran).status = JobStatus.SUCCEEDED
            for step in (1, 2, 3):
                values = {"phase": "rft", "step_time_s": 7.0 + step / 2}  # 7.5, 8, 8.5: median 8
                session.add(JobMetric(job_id=ran, kind="train", step=step, values=values))
            session.add(
                JobMetric(job_id=ran, kind="eval", step=0, values={"eval_time_s": 0.5, "examples": 2})
            )
        priced = api.http.post("/v1/fine_tuning/estimates", json=body).json()
        assert priced["seconds_per_step"]["reinforcement"] == pytest.approx(8.0)
        assert priced["seconds_per_evaluation"] == pytest.approx(0.5)
        assert priced["estimated_seconds"] == pytest.approx(10 * 8.0 + 3 * 0.5)
        assert priced["measured"] == 4

        # Twice the rollouts and the tokens: four times the work a step.
        bigger = {**hyper, "compute_multiplier": 2, "max_completion_tokens": 100}
        body["method"]["reinforcement"]["hyperparameters"] = bigger
        assert api.http.post("/v1/fine_tuning/estimates", json=body).json()["seconds_per_step"][
            "reinforcement"
        ] == pytest.approx(32.0)
        # Checked as create checks: a bad request is refused the same way.
        body["method"]["reinforcement"]["hyperparameters"] = {**hyper, "max_completion_tokens": 10**9}
        refused = api.http.post("/v1/fine_tuning/estimates", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "over_limit"
        api.http.close()


def test_base_models_are_listed_with_what_they_are(deployment):
    _, client = deployment
    models = {m.id: m for m in client.models.list()}
    tiny = models["tiny-random"]
    assert (tiny.architecture, tiny.parameters, tiny.context_length, tiny.chat_template) == (
        "LlamaForCausalLM",
        102_912,
        1024,
        True,
    )
    assert models["smollm2-135m-instruct"].context_length == 8192
