"""Base models the operator registered: listed with their facts, accepted by jobs and chat, refused
at job creation when no worker could train them; prompts too long for a job refused at creation
with the line and the field."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from core.base_models import describe_model_dir, register_model
from tests.conftest import EXACT_ANSWER, ApiClient, job_request
from tests.model_dirs import fake_model_dir, second_model_dir

JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture
def deployment(make_settings, migrated_postgres, redis_url, tmp_path):
    """Settings of a deployment with `mine` registered (as `prefix-rft models add` does) and two
    models listed in PREFIX_RFT_BASE_MODELS that no job can train."""

    listed = {
        "gpt2": str(fake_model_dir(tmp_path / "gpt2", "GPT2LMHeadModel")),
        "plain": str(fake_model_dir(tmp_path / "plain", template=None)),
    }

    def make(**overrides) -> ApiClient:
        settings = make_settings(
            database_url=migrated_postgres, broker_url=redis_url, base_models=listed, **overrides
        )
        register_model(str(second_model_dir()), "mine", directory=settings.data_dir)
        clients.append(ApiClient(settings))
        return clients[-1]

    clients: list[ApiClient] = []
    yield make
    for client in clients:
        client.http.close()


@pytest.fixture
def api(deployment) -> Iterator[ApiClient]:
    return deployment()


def lines(*prompts) -> list[str]:
    return [json.dumps({("prompt" if isinstance(p, str) else "messages"): p, "answer": "4"}) for p in prompts]


def create(api: ApiClient, model: str = "mine", prompts=("What is 2 + 2?",), **hyper):
    file_id = api.upload(lines(*prompts)).json()["id"]
    body = job_request(file_id, grader=EXACT_ANSWER, model=model, hyperparameters={"steps": 2, **hyper})
    return api.http.post(JOBS, json=body)


def error_of(response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_registered_models_are_listed_with_their_facts(api):
    models = {m["id"]: m for m in api.http.get("/v1/models").json()["data"]}
    assert {"smollm2-135m-instruct", "tiny-random", "mine", "gpt2", "plain"} <= set(models)
    facts = describe_model_dir(second_model_dir(), "mine")
    mine = models["mine"]
    assert (mine["architecture"], mine["parameters"], mine["context_length"], mine["chat_template"]) == (
        "LlamaForCausalLM",
        facts.parameters,
        512,
        True,
    )
    assert models["gpt2"]["architecture"] == "GPT2LMHeadModel" and models["plain"]["chat_template"] is False
    assert api.http.get("/v1/models/mine").json() == mine


def test_a_job_on_a_registered_model_is_created(api):
    created = create(api)
    assert created.status_code == 200, created.text
    assert created.json()["model"] == "mine" and created.json()["status"] == "queued"


def test_models_no_worker_can_train_are_refused_at_creation(api, deployment):
    gpt2 = error_of(create(api, "gpt2"))
    assert gpt2["code"] == "unsupported_model" and gpt2["param"] == "model"
    assert "is a GPT2LMHeadModel; this service trains and serves LlamaForCausalLM" in gpt2["message"]
    plain = error_of(create(api, "plain"))
    assert plain["code"] == "unsupported_model" and "has no chat template" in plain["message"]
    unknown = error_of(create(api, "nobody"))
    assert unknown["code"] == "unknown_model" and "mine" in unknown["message"]

    small_workers = deployment(worker_memory_gb=0.001)
    big = error_of(create(small_workers))
    facts = describe_model_dir(second_model_dir(), "mine")
    assert big["code"] == "model_too_large" and big["param"] == "model"
    assert f"has {facts.parameters:,} parameters" in big["message"]
    assert f"at least {facts.parameters * 4 / 1e9:.1f} GB" in big["message"]
    assert "the workers have 0.0 GB (PREFIX_RFT_WORKER_MEMORY_GB)" in big["message"]


def test_a_prompt_over_max_prompt_tokens_is_refused_with_its_line_and_field(api):
    long_text = "Please add these numbers carefully. " * 20
    response = create(
        api,
        prompts=("What is 2 + 2?", long_text, [{"role": "user", "content": long_text}]),
        max_prompt_tokens=64,
    )
    error = error_of(response)
    assert error["code"] == "prompt_too_long" and error["param"] == "training_file"
    assert [(d["line"], d["field"]) for d in error["details"]] == [(2, "prompt"), (3, "messages")]
    assert "over method.reinforcement.hyperparameters.max_prompt_tokens=64" in error["details"][0]["message"]
    assert "2 prompt(s) of file" in error["message"] and "line 2, field 'prompt'" in error["message"]
    # The estimate does not read the files (a form asks it on every change): only create counts.
    file_id = api.upload(lines("hi", long_text)).json()["id"]
    body = job_request(file_id, grader=EXACT_ANSWER, model="mine", hyperparameters={"max_prompt_tokens": 64})
    assert api.http.post("/v1/fine_tuning/estimates", json=body).status_code == 200
    assert error_of(api.http.post(JOBS, json=body))["details"][0]["line"] == 2


def test_a_prompt_that_leaves_no_room_in_the_context_is_refused(api):
    # 512 tokens of context: 24 prefix tokens (the system turn) + the prompt + 480 completion tokens.
    error = error_of(create(api, prompts=("hi", "What is 2 + 2? " * 6), max_completion_tokens=480))
    assert [d["line"] for d in error["details"]] == [2]
    assert "completion tokens (max_completion_tokens) make" in error["details"][0]["message"]
    assert "over the model's context length of 512" in error["details"][0]["message"]
    assert create(api, prompts=("hi",), max_completion_tokens=480).status_code == 200


def test_a_validation_file_is_checked_too(api):
    train = api.upload(lines("hi")).json()["id"]
    heldout = api.upload(lines("fine", "Add them. " * 50)).json()["id"]
    body = job_request(
        train,
        grader=EXACT_ANSWER,
        model="mine",
        hyperparameters={"max_prompt_tokens": 64},
        validation_file=heldout,
    )
    error = error_of(api.http.post(JOBS, json=body))
    assert error["param"] == "validation_file" and error["details"][0]["line"] == 2


def test_chat_requests_accept_a_registered_model(api):
    # Resolved as a base model and forwarded (no model server runs here): not a 404.
    response = api.http.post(
        "/v1/chat/completions", json={"model": "mine", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.status_code == 503 and response.json()["error"]["code"] == "inference_unavailable"
