"""Two projects on one deployment: neither can see, change or even confirm the other's resources.

Project A owns a dataset, a reward, a queued job and a succeeded job (marked so in the database,
with an adapter, metrics, samples and a checkpoint). Project B calls every route of the app with
A's ids and must get 404, exactly as for an id that does not exist, never 403 or 200. The routes
are read from the app, so a new route with a path parameter is covered without editing this file.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from sqlalchemy import func, select, update

from service.db import transaction
from service.tables import (
    Artifact,
    Checkpoint,
    Dataset,
    Job,
    JobEvent,
    JobMetric,
    JobSample,
    JobStatus,
    RewardSpecRecord,
    utcnow,
)
from tests.conftest import ApiClient

MODEL = "tiny-random"
LINES = [f'{{"prompt": "{i}+1=", "answer": "{i + 1}", "demonstration": "{i + 1}"}}' for i in range(3)]
REWARD = {"graders": [{"type": "exact_match", "field": "answer"}]}
ADAPTER_BYTES = b"not really a tarball, but the bytes of A's adapter"

# Routes with path parameters that exist today: a check that route discovery finds them all.
KNOWN_ID_ROUTES = {
    ("GET", "/v1/datasets/{dataset_id}"),
    ("DELETE", "/v1/datasets/{dataset_id}"),
    ("GET", "/v1/rewards/{reward_id}"),
    ("GET", "/v1/jobs/{job_id}"),
    ("POST", "/v1/jobs/{job_id}/cancel"),
    ("GET", "/v1/jobs/{job_id}/events"),
    ("GET", "/v1/jobs/{job_id}/metrics"),
    ("GET", "/v1/jobs/{job_id}/samples"),
    ("GET", "/v1/jobs/{job_id}/checkpoints"),
    ("GET", "/v1/jobs/{job_id}/adapter"),
    ("GET", "/v1/models/{model_id:path}"),
}
# The resource kind each path parameter names, as in the `<kind>_not_found` error code.
PARAM_KINDS = {
    "dataset_id": "dataset",
    "file_id": "file",
    "reward_id": "reward",
    "job_id": "job",
    "fine_tuning_job_id": "job",
    "model_id": "model",
}


def api_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path template) of every API route of the app.

    Recent FastAPI keeps included routers nested in `app.routes`; iter_route_contexts walks them.
    """
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        routes = [(route, route.path, route.methods) for route in app.routes]
    else:
        routes = [(c.original_route, c.path, c.methods) for c in iter_route_contexts(app.routes)]
    return sorted(
        (method, path) for route, path, methods in routes if isinstance(route, APIRoute) for method in methods
    )


def release(client: ApiClient) -> None:
    """Close a client and both of its connection pools (a test deployment holds two engines)."""
    client.http.close()
    client.app.state.services.sessions.kw["bind"].dispose()
    client.sessions.kw["bind"].dispose()


def created(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    return response.json()


@dataclass
class ProjectA:
    client: ApiClient
    dataset: str
    dataset_name: str
    reward: str
    reward_name: str
    queued_job: str
    done_job: str
    fine_tuned_model: str
    ids: dict[str, list[str]] = field(default_factory=dict)

    @property
    def secrets(self) -> list[str]:
        """Strings that only A's own answers may contain (names are per project, so not these)."""
        return [
            self.client.project_id,
            self.dataset,
            self.reward,
            self.queued_job,
            self.done_job,
            self.fine_tuned_model,
        ]


def make_project_a(a: ApiClient) -> ProjectA:
    dataset_name = "a-private-data.jsonl"
    dataset = created(a.upload(LINES, name=dataset_name))["id"]
    reward_name = "a-exact"
    reward = created(a.http.post("/v1/rewards", json={"name": reward_name, **REWARD}))["id"]
    body = {"model": MODEL, "training_dataset": dataset, "reward_id": reward, "suffix": "a-run"}
    queued = created(a.http.post("/v1/jobs", json=body))["id"]
    done = created(a.http.post("/v1/jobs", json=body))["id"]

    # The second job "succeeded": what a worker would have written, without running one.
    fine_tuned_model = f"ft:{MODEL}:a-run:{done}"
    key = f"jobs/{done}/adapter.tar.gz"
    a.app.state.services.storage.put_bytes(key, ADAPTER_BYTES)
    now = utcnow()
    with transaction(a.sessions) as session:
        session.execute(
            update(Job)
            .where(Job.id == done)
            .values(
                status=JobStatus.SUCCEEDED,
                step=Job.total_steps,
                fine_tuned_model=fine_tuned_model,
                started_at=now,
                finished_at=now,
            )
        )
        session.add(
            Artifact(
                job_id=done,
                storage_key=key,
                sha256=hashlib.sha256(ADAPTER_BYTES).hexdigest(),
                bytes=len(ADAPTER_BYTES),
            )
        )
        session.add(JobMetric(job_id=done, kind="train", step=1, values={"reward_mean": 0.5}))
        session.add(JobMetric(job_id=done, kind="eval", step=1, values={"accuracy": 0.25}))
        session.add(JobSample(job_id=done, step=1, data={"prompt": "0+1=", "completion": "1", "reward": 1.0}))
        session.add(
            Checkpoint(job_id=done, step=1, storage_key=f"jobs/{done}/checkpoints/step-000001.tar", bytes=9)
        )
        session.add(JobEvent(job_id=done, level="info", message="succeeded after 100 steps"))
    return ProjectA(
        client=a,
        dataset=dataset,
        dataset_name=dataset_name,
        reward=reward,
        reward_name=reward_name,
        queued_job=queued,
        done_job=done,
        fine_tuned_model=fine_tuned_model,
        ids={
            "dataset_id": [dataset],
            "file_id": [dataset],  # a dataset is a file of purpose fine-tune
            "reward_id": [reward],
            "job_id": [queued, done],
            "fine_tuning_job_id": [queued, done],
            "model_id": [fine_tuned_model],
        },
    )


@pytest.fixture
def projects(pg_settings) -> Iterator[tuple[ProjectA, ApiClient]]:
    """Project A with its resources, and project B on the same deployment."""
    a = ApiClient(pg_settings)
    b = a.other_project()
    try:
        yield make_project_a(a), b
    finally:
        release(a)
        release(b)


def view(a: ProjectA) -> dict[str, Any]:
    """Everything A can read about its resources, and the rows and objects behind them."""
    http = a.client.http
    paths = [
        f"/v1/datasets/{a.dataset}",
        f"/v1/rewards/{a.reward}",
        "/v1/datasets",
        "/v1/rewards",
        "/v1/jobs",
        "/v1/models",
    ]
    for job in (a.queued_job, a.done_job):
        paths += [f"/v1/jobs/{job}{tail}" for tail in ("", "/events", "/metrics", "/samples", "/checkpoints")]
    state: dict[str, Any] = {}
    for path in paths:
        response = http.get(path)
        assert response.status_code == 200, (path, response.text)
        state[path] = response.json()
    adapter = http.get(f"/v1/jobs/{a.done_job}/adapter")
    assert adapter.status_code == 200, adapter.text
    state["adapter"] = adapter.content
    project = a.client.project_id
    with a.client.sessions() as session:
        job_ids = select(Job.id).where(Job.project_id == project)
        for table, where in (
            (Dataset, Dataset.project_id == project),
            (RewardSpecRecord, RewardSpecRecord.project_id == project),
            (Job, Job.project_id == project),
            (JobEvent, JobEvent.job_id.in_(job_ids)),
            (Artifact, Artifact.job_id.in_(job_ids)),
        ):
            state[table.__tablename__] = session.scalar(select(func.count()).select_from(table).where(where))
    storage = a.client.app.state.services.storage
    state["objects"] = storage.list_keys(f"datasets/{project}/") + storage.list_keys(f"jobs/{a.done_job}/")
    return state


def assert_not_found(response: httpx.Response, kind: str, resource_id: str, param: str | None = None) -> None:
    """Exactly what an id that does not exist gets: 404 `<kind>_not_found`, and nothing of A's."""
    assert response.status_code == 404, f"{response.request.method} {response.request.url}: {response.text}"
    error = response.json()["error"]
    assert error["code"] == f"{kind}_not_found", error
    assert error["message"] == f"no {kind} with id {resource_id!r}", error
    assert error["param"] == param, error


# ----- every route, with A's ids ---------------------------------------------------------------


def test_project_a_sees_its_own_resources(projects: tuple[ProjectA, ApiClient]):
    """The control: each route B is refused does answer A, with data behind it."""
    a, _ = projects
    state = view(a)
    done = f"/v1/jobs/{a.done_job}"
    for tail in ("/events", "/metrics", "/samples", "/checkpoints"):
        assert state[done + tail]["data"], tail
    assert state["adapter"] == ADAPTER_BYTES
    assert a.fine_tuned_model in [m["id"] for m in state["/v1/models"]["data"]]


def test_every_route_answers_404_to_another_projects_ids(projects: tuple[ProjectA, ApiClient]):
    a, b = projects
    before = view(a)
    routes = api_routes(b.app)
    id_routes = {(method, path) for method, path in routes if "{" in path}
    assert id_routes >= KNOWN_ID_ROUTES, f"route discovery missed {KNOWN_ID_ROUTES - id_routes}"

    exercised = set()
    for method, template in sorted(id_routes):
        params = re.findall(r"\{(\w+)(?::\w+)?\}", template)  # {name} or {name:converter}
        missing = [p for p in params if p not in a.ids]
        assert not missing, f"{method} {template}: give project A an id for {missing} in this test"
        for values in itertools.product(*(a.ids[p] for p in params)):
            path = template
            for name, value in zip(params, values, strict=True):
                path = re.sub(r"\{" + name + r"(?::\w+)?\}", value, path)
            body = {} if method in ("POST", "PUT", "PATCH") else None
            response = b.http.request(method, path, json=body)
            assert_not_found(response, PARAM_KINDS[params[0]], values[0])
            # The error may echo what B sent (a model name holds a job id), nothing else of A's.
            assert not any(s in response.text for s in a.secrets if s not in values[0]), response.text
        exercised.add((method, template))
    assert exercised == id_routes

    assert view(a) == before, "project B's requests changed project A's resources"


def _b_posts(a: ProjectA, b: ApiClient) -> dict[str, list[tuple[dict[str, Any], int, str | None, str]]]:
    """For each POST route without path parameters: bodies that use A's ids or names."""
    own = created(b.upload(LINES))["id"]
    own_reward = created(b.http.post("/v1/rewards", json={"name": "b-exact", **REWARD}))["id"]
    job = {"model": MODEL, "training_dataset": own, "reward_id": own_reward}
    return {
        "/v1/jobs": [
            ({**job, "training_dataset": a.dataset}, 404, "training_dataset", "dataset"),
            ({**job, "validation_dataset": a.dataset}, 404, "validation_dataset", "dataset"),
            ({**job, "reward_id": a.reward}, 404, "reward_id", "reward"),
        ],
        # Names are per project: B may use the name of A's reward.
        "/v1/rewards": [({"name": a.reward_name, **REWARD}, 201, None, "reward")],
        # An inline reward names nothing of A's; scoring one must not show anything of A's either.
        "/v1/rewards/test": [
            ({**REWARD, "samples": [{"completion": "1", "example": {"answer": "1"}}]}, 200, None, "")
        ],
        # A's adapter is not a model B can call: the same 404 as a name that does not exist.
        "/v1/chat/completions": [
            (
                {"model": a.fine_tuned_model, "messages": [{"role": "user", "content": "hi"}]},
                404,
                "model",
                "model",
            )
        ],
        "/v1/completions": [({"model": a.fine_tuned_model, "prompt": "hi"}, 404, "model", "model")],
        "/v1/fine_tuning/jobs": [
            ({"model": MODEL, "training_file": a.dataset}, 404, "training_file", "file"),
            (
                {"model": MODEL, "training_file": own, "validation_file": a.dataset},
                404,
                "validation_file",
                "file",
            ),
        ],
        # Graders name nothing of A's; running or validating one shows nothing of A's either.
        "/v1/fine_tuning/alpha/graders/run": [
            ({"grader": STRING_CHECK, "model_sample": "1", "item": {"a": "1"}}, 200, None, "")
        ],
        "/v1/fine_tuning/alpha/graders/validate": [({"grader": STRING_CHECK}, 200, None, "")],
    }


STRING_CHECK = {
    "type": "string_check",
    "name": "s",
    "input": "{{sample.output_text}}",
    "reference": "{{item.a}}",
    "operation": "eq",
}


def test_routes_without_ids_keep_projects_apart(projects: tuple[ProjectA, ApiClient]):
    """Lists, models and creation: B never sees A's resources nor reaches them through a body."""
    a, b = projects
    posts = _b_posts(a, b)
    before = view(a)
    for method, path in api_routes(b.app):
        if "{" in path:
            continue
        if method == "GET":
            response = b.http.get(path)
            assert response.status_code in (200, 503), (path, response.text)  # /ready may say 503
            leaked = [s for s in a.secrets if s in response.text]
            assert not leaked, f"GET {path} shows project A's {leaked}"
        elif method == "POST" and path == "/v1/datasets":
            assert created(b.upload(LINES))["id"] not in a.secrets
        elif method == "POST" and path == "/v1/files":
            body = ("\n".join(LINES) + "\n").encode()
            response = b.http.post(
                "/v1/files", files={"file": ("b.jsonl", body)}, data={"purpose": "fine-tune"}
            )
            assert response.status_code == 200 and response.json()["id"] not in a.secrets
        elif method == "POST":
            assert path in posts, f"POST {path}: add bodies that use project A's ids to this test"
            for body, status, param, kind in posts[path]:
                response = b.http.post(path, json=body)
                assert response.status_code == status, (path, body, response.text)
                if status == 404 and kind == "model":
                    error = response.json()["error"]
                    assert (error["code"], error["param"]) == ("model_not_found", "model"), error
                    unknown = b.http.post(path, json={**body, "model": "ft:x:y:job_0"}).json()["error"]
                    assert error["message"] == unknown["message"].replace("ft:x:y:job_0", body["model"])
                elif status == 404:
                    assert_not_found(response, kind, body[param], param)
                else:
                    assert not any(s in response.text for s in a.secrets), (path, response.text)
        else:
            pytest.fail(f"{method} {path}: add a cross-project case for it to this test")
    assert view(a) == before, "project B's requests changed project A's resources"


def test_lists_show_only_the_callers_resources(projects: tuple[ProjectA, ApiClient]):
    a, b = projects
    b_dataset = created(b.upload(LINES))["id"]
    b_reward = created(b.http.post("/v1/rewards", json={"name": a.reward_name, **REWARD}))["id"]
    b_job = created(
        b.http.post("/v1/jobs", json={"model": MODEL, "training_dataset": b_dataset, "reward_id": b_reward})
    )["id"]
    for client, own, other in (
        (b, {b_dataset, b_reward, b_job}, {a.dataset, a.reward, a.queued_job, a.done_job}),
        (a.client, {a.dataset, a.reward, a.queued_job, a.done_job}, {b_dataset, b_reward, b_job}),
    ):
        listed = set()
        for path in ("/v1/datasets", "/v1/rewards", "/v1/jobs", "/v1/jobs?status=queued"):
            response = client.http.get(path)
            assert response.status_code == 200, response.text
            listed |= {item["id"] for item in response.json()["data"]}
        assert listed >= own
        assert not listed & other, f"a list shows another project's {listed & other}"
    assert b.http.get("/v1/jobs?status=succeeded").json()["data"] == []


def test_models_list_only_the_callers_adapters(projects: tuple[ProjectA, ApiClient]):
    a, b = projects
    mine = [m for m in a.client.http.get("/v1/models").json()["data"] if m.get("job_id")]
    assert [(m["id"], m["job_id"], m["owned_by"]) for m in mine] == [
        (a.fine_tuned_model, a.done_job, a.client.project_id)
    ]
    theirs = b.http.get("/v1/models").json()["data"]
    assert [m["id"] for m in theirs if m.get("job_id")] == []
    assert a.fine_tuned_model not in b.http.get("/v1/models").text
    assert {m["id"] for m in theirs} == {m["id"] for m in a.client.http.get("/v1/models").json()["data"]} - {
        a.fine_tuned_model
    }


def test_another_projects_ids_answer_like_missing_ones(projects: tuple[ProjectA, ApiClient]):
    """A 404 for A's id is the 404 for a made-up id: B cannot probe which ids exist."""
    a, b = projects
    for kind, path, real in (
        ("dataset", "/v1/datasets/{}", a.dataset),
        ("file", "/v1/files/{}", a.dataset),
        ("reward", "/v1/rewards/{}", a.reward),
        ("job", "/v1/jobs/{}", a.done_job),
        ("job", "/v1/fine_tuning/jobs/{}", a.done_job),
    ):
        made_up = real[:-4] + ("0000" if not real.endswith("0000") else "1111")
        seen = b.http.get(path.format(real))
        unseen = b.http.get(path.format(made_up))
        assert_not_found(seen, kind, real)
        assert_not_found(unseen, kind, made_up)
        assert seen.headers.keys() == unseen.headers.keys()
