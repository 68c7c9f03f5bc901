"""Two projects on one deployment: neither can see, change or even confirm the other's resources.

Project A owns a training file, a queued job and a succeeded job (marked so in the database, with
an adapter, a results file, metrics, samples, an event and a servable checkpoint). Project B calls
every route of the app with A's ids and must get 404, exactly as for an id that does not exist,
never 403 or 200. The routes are read from the app, so a new route with a path parameter is
covered without editing this file.
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

from api.routes.completions import resolve_model
from service.db import transaction
from service.tables import (
    RESULTS_PURPOSE,
    Artifact,
    Checkpoint,
    Dataset,
    Job,
    JobEvent,
    JobMetric,
    JobSample,
    JobStatus,
    new_id,
    utcnow,
)
from tests.conftest import EXACT_ANSWER, ApiClient, job_request

MODEL = "tiny-random"
LINES = [f'{{"prompt": "{i}+1=", "answer": "{i + 1}", "demonstration": "{i + 1}"}}' for i in range(3)]
GRADER = EXACT_ANSWER
ADAPTER_BYTES = b"not really a tarball, but the bytes of A's adapter"
CHECKPOINT_BYTES = b"nor is this one: A's checkpoint"
RESULTS_CSV = b"step,train_reward_mean,valid_accuracy\n1,0.5,0.25\n"
METADATA = {"team": "same-name-in-both-projects"}
A_WEBHOOK_URL = "http://127.0.0.1:9/project-a-hooks"

# Routes with path parameters that exist today: a check that route discovery finds them all.
JOB = "/v1/fine_tuning/jobs/{fine_tuning_job_id}"
KNOWN_ID_ROUTES = {
    ("GET", "/v1/files/{file_id}"),
    ("DELETE", "/v1/files/{file_id}"),
    ("GET", "/v1/files/{file_id}/content"),
    ("GET", JOB),
    ("POST", f"{JOB}/cancel"),
    ("POST", f"{JOB}/pause"),
    ("POST", f"{JOB}/resume"),
    ("GET", f"{JOB}/events"),
    ("GET", f"{JOB}/checkpoints"),
    ("GET", f"{JOB}/metrics"),
    ("GET", f"{JOB}/samples"),
    ("GET", f"{JOB}/adapter"),
    ("GET", "/v1/models/{model_id:path}"),
    ("GET", f"{JOB}/events/stream"),
    ("GET", "/v1/webhooks/{endpoint_id}"),
    ("DELETE", "/v1/webhooks/{endpoint_id}"),
    ("GET", "/v1/webhooks/{endpoint_id}/deliveries"),
}
# The resource kind each path parameter names, as in the `<kind>_not_found` error code.
PARAM_KINDS = {
    "file_id": "file",
    "fine_tuning_job_id": "job",
    "model_id": "model",
    "endpoint_id": "webhook_endpoint",
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


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def create_job(client: ApiClient, training_file: str, **fields) -> str:
    body = job_request(training_file, "reinforcement", grader=GRADER, **fields)
    return ok(client.http.post("/v1/fine_tuning/jobs", json=body))["id"]


@dataclass
class ProjectA:
    client: ApiClient
    file: str
    results_file: str
    queued_job: str
    done_job: str
    fine_tuned_model: str
    checkpoint_model: str
    webhook: str
    webhook_secret: str
    ids: dict[str, list[str]] = field(default_factory=dict)

    @property
    def secrets(self) -> list[str]:
        """Strings that only A's own answers may contain."""
        return [
            self.client.project_id,
            self.file,
            self.results_file,
            self.queued_job,
            self.done_job,
            self.fine_tuned_model,
            self.checkpoint_model,
            self.webhook,
            self.webhook_secret,
        ]


def make_project_a(a: ApiClient) -> ProjectA:
    file = ok(a.upload(LINES, name="a-private-data.jsonl"))["id"]
    webhook = ok(a.http.post("/v1/webhooks", json={"url": A_WEBHOOK_URL}))
    queued = create_job(a, file, suffix="a-run", metadata=METADATA)
    done = create_job(a, file, suffix="a-run", metadata=METADATA)

    # The second job "succeeded": what a worker would have written, without running one.
    fine_tuned_model = f"ft:{MODEL}:a-run:{done}"
    checkpoint_model = f"{fine_tuned_model}:ckpt-step-1"
    storage = a.app.state.services.storage
    adapter_key, checkpoint_key = f"jobs/{done}/adapter.tar.gz", f"jobs/{done}/checkpoints/step-000001.tar"
    results_key = f"jobs/{done}/attempt-1/results.csv"
    for key, data in (
        (adapter_key, ADAPTER_BYTES),
        (checkpoint_key, CHECKPOINT_BYTES),
        (results_key, RESULTS_CSV),
    ):
        storage.put_bytes(key, data)
    results_file = new_id("file")
    now = utcnow()
    with transaction(a.sessions) as session:
        session.add(
            Dataset(
                id=results_file,
                project_id=a.project_id,
                name=f"{done}-results.csv",
                purpose=RESULTS_PURPOSE,
                bytes=len(RESULTS_CSV),
                sha256=hashlib.sha256(RESULTS_CSV).hexdigest(),
                storage_key=results_key,
                lines=2,
                examples=0,
                with_demonstration=0,
                field_counts={},
            )
        )
        session.flush()  # the file row before the job names it
        session.execute(
            update(Job)
            .where(Job.id == done)
            .values(
                status=JobStatus.SUCCEEDED,
                step=Job.total_steps,
                fine_tuned_model=fine_tuned_model,
                result_file_id=results_file,
                started_at=now,
                finished_at=now,
            )
        )
        session.add(
            Artifact(
                job_id=done,
                storage_key=adapter_key,
                sha256=hashlib.sha256(ADAPTER_BYTES).hexdigest(),
                bytes=len(ADAPTER_BYTES),
            )
        )
        session.add(JobMetric(job_id=done, kind="train", step=1, values={"reward_mean": 0.5}))
        session.add(JobMetric(job_id=done, kind="eval", step=1, values={"accuracy": 0.25}))
        session.add(JobSample(job_id=done, step=1, data={"prompt": "0+1=", "completion": "1", "reward": 1.0}))
        session.add(
            Checkpoint(
                job_id=done,
                step=1,
                storage_key=checkpoint_key,
                bytes=len(CHECKPOINT_BYTES),
                sha256=hashlib.sha256(CHECKPOINT_BYTES).hexdigest(),  # servable: a model A may call
            )
        )
        session.add(JobEvent(job_id=done, level="info", message="succeeded after 100 steps"))
    return ProjectA(
        client=a,
        file=file,
        results_file=results_file,
        queued_job=queued,
        done_job=done,
        fine_tuned_model=fine_tuned_model,
        checkpoint_model=checkpoint_model,
        webhook=webhook["id"],
        webhook_secret=webhook["secret"],
        ids={
            "file_id": [file, results_file],
            "fine_tuning_job_id": [queued, done],
            "model_id": [fine_tuned_model],
            "endpoint_id": [webhook["id"]],
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
        f"/v1/files/{a.file}",
        f"/v1/files/{a.results_file}",
        "/v1/files",
        "/v1/fine_tuning/jobs",
        "/v1/models",
        f"/v1/models/{a.fine_tuned_model}",
        "/v1/webhooks",
        f"/v1/webhooks/{a.webhook}/deliveries",
    ]
    for job in (a.queued_job, a.done_job):
        paths += [
            f"/v1/fine_tuning/jobs/{job}{tail}"
            for tail in ("", "/events", "/metrics", "/samples", "/checkpoints")
        ]
    state: dict[str, Any] = {path: ok(http.get(path)) for path in paths}
    for path in (
        f"/v1/files/{a.file}/content",
        f"/v1/files/{a.results_file}/content",
        f"/v1/fine_tuning/jobs/{a.done_job}/adapter",
    ):
        response = http.get(path)
        assert response.status_code == 200, (path, response.text)
        state[path] = response.content
    project = a.client.project_id
    with a.client.sessions() as session:
        job_ids = select(Job.id).where(Job.project_id == project)
        for table, where in (
            (Dataset, Dataset.project_id == project),
            (Job, Job.project_id == project),
            (JobEvent, JobEvent.job_id.in_(job_ids)),
            (JobMetric, JobMetric.job_id.in_(job_ids)),
            (JobSample, JobSample.job_id.in_(job_ids)),
            (Checkpoint, Checkpoint.job_id.in_(job_ids)),
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
    done = f"/v1/fine_tuning/jobs/{a.done_job}"
    for tail in ("/events", "/metrics", "/samples", "/checkpoints"):
        assert state[done + tail]["data"], tail
    assert state[done]["result_files"] == [a.results_file]
    assert state[f"{done}/checkpoints"]["data"][0]["fine_tuned_model_checkpoint"] == a.checkpoint_model
    assert state[f"{done}/adapter"] == ADAPTER_BYTES
    assert state[f"/v1/files/{a.results_file}/content"] == RESULTS_CSV
    assert a.fine_tuned_model in [m["id"] for m in state["/v1/models"]["data"]]
    # The models B is refused below are ones A may call (no model server runs here to call them).
    services = a.client.app.state.services
    for model in (a.fine_tuned_model, a.checkpoint_model):
        assert resolve_model(services, a.client.project_id, model).adapter is not None, model


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
    """For each POST route without path parameters: (body using A's ids or names, status, param, kind)."""
    own = ok(b.upload(LINES))["id"]
    job = job_request(own, "reinforcement", grader=GRADER)
    chats = [
        ({"model": model, "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model")
        for model in (a.fine_tuned_model, a.checkpoint_model)
    ]
    return {
        "/v1/fine_tuning/jobs": [
            ({**job, "training_file": a.file}, 404, "training_file", "file"),
            ({**job, "training_file": a.results_file}, 404, "training_file", "file"),
            ({**job, "validation_file": a.file}, 404, "validation_file", "file"),
        ],
        "/v1/fine_tuning/estimates": [
            ({**job, "training_file": a.file}, 404, "training_file", "file"),
            ({**job, "validation_file": a.file}, 404, "validation_file", "file"),
        ],
        # Graders name nothing of A's; running or validating one shows nothing of A's either.
        "/v1/fine_tuning/alpha/graders/run": [
            ({"grader": GRADER, "model_sample": "1", "item": {"answer": "1"}}, 200, None, "")
        ],
        "/v1/fine_tuning/alpha/graders/validate": [({"grader": GRADER}, 200, None, "")],
        # A's adapter and checkpoint are not models B can call: the same 404 as a name that does not exist.
        "/v1/chat/completions": chats,
        "/v1/completions": [
            ({"model": model, "prompt": "hi"}, 404, "model", "model")
            for model in (a.fine_tuned_model, a.checkpoint_model)
        ],
        # The same URL as A's: an endpoint of B's own, with its own id and secret.
        "/v1/webhooks": [({"url": A_WEBHOOK_URL}, 200, None, "")],
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
        elif method == "POST" and path == "/v1/files":
            assert ok(b.upload(LINES))["id"] not in a.secrets
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
    b_file = ok(b.upload(LINES))["id"]
    b_job = create_job(b, b_file, metadata=METADATA)  # the same metadata as A's jobs
    lists = (
        "/v1/files",
        f"/v1/files?purpose={RESULTS_PURPOSE}",
        "/v1/fine_tuning/jobs",
        f"/v1/fine_tuning/jobs?metadata[team]={METADATA['team']}",
    )
    for client, own, other in (
        (b, {b_file, b_job}, {a.file, a.results_file, a.queued_job, a.done_job}),
        (a.client, {a.file, a.results_file, a.queued_job, a.done_job}, {b_file, b_job}),
    ):
        listed = set()
        for path in lists:
            listed |= {item["id"] for item in ok(client.http.get(path))["data"]}
        assert listed >= own
        assert not listed & other, f"a list shows another project's {listed & other}"
    assert ok(b.http.get(f"/v1/files?purpose={RESULTS_PURPOSE}"))["data"] == []


def test_models_list_only_the_callers_adapters(projects: tuple[ProjectA, ApiClient]):
    a, b = projects
    mine = [m for m in ok(a.client.http.get("/v1/models"))["data"] if m.get("job_id")]
    assert [(m["id"], m["job_id"], m["owned_by"]) for m in mine] == [
        (a.fine_tuned_model, a.done_job, a.client.project_id)
    ]
    theirs = ok(b.http.get("/v1/models"))["data"]
    assert [m["id"] for m in theirs if m.get("job_id")] == []
    assert a.fine_tuned_model not in b.http.get("/v1/models").text
    assert {m["id"] for m in theirs} == {m["id"] for m in ok(a.client.http.get("/v1/models"))["data"]} - {
        a.fine_tuned_model
    }


def test_another_projects_ids_answer_like_missing_ones(projects: tuple[ProjectA, ApiClient]):
    """A 404 for A's id is the 404 for a made-up id: B cannot probe which ids exist."""
    a, b = projects
    for kind, path, real in (
        ("file", "/v1/files/{}", a.file),
        ("file", "/v1/files/{}/content", a.results_file),
        ("job", "/v1/fine_tuning/jobs/{}", a.done_job),
        ("job", "/v1/fine_tuning/jobs/{}/adapter", a.done_job),
        ("model", "/v1/models/{}", a.fine_tuned_model),
    ):
        made_up = real[:-4] + ("0000" if not real.endswith("0000") else "1111")
        seen = b.http.get(path.format(real))
        unseen = b.http.get(path.format(made_up))
        assert_not_found(seen, kind, real)
        assert_not_found(unseen, kind, made_up)
        assert seen.headers.keys() == unseen.headers.keys()


def test_a_page_cursor_of_another_projects_item_answers_like_a_made_up_one(
    projects: tuple[ProjectA, ApiClient],
):
    """`after` names an item of the caller's own list only; A's ids are as unknown to B as any."""
    a, b = projects
    for path, real in (("/v1/files", a.file), ("/v1/fine_tuning/jobs", a.done_job)):
        made_up = real[:-4] + ("0000" if not real.endswith("0000") else "1111")
        seen = b.http.get(path, params={"after": real}).json()["error"]
        unseen = b.http.get(path, params={"after": made_up}).json()["error"]
        assert (seen["code"], seen["param"]) == ("invalid_cursor", "after"), seen
        assert seen["message"] == unseen["message"].replace(made_up, real)
