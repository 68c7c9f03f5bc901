"""Property-based fuzzing of the whole OpenAPI schema with schemathesis.

For every operation, valid and invalid requests generated from the schema (plus its examples and
schemathesis' boundary cases) must get no 5xx and an answer the schema describes: a documented
status code, content type, headers and body (error bodies included), 401 once the key is left
out, and an `Allow` header that lists every method of the resource.

The requests go in-process to the real app on PostgreSQL with a real project key. The deployment
has a database of its own (dropped afterwards) and the broker kept in files in a temporary
directory, so the jobs the fuzzer creates never reach another test's worker or reaper. Its project
is seeded with a dataset, a reward, a queued job and a succeeded one (adapter, metrics, samples,
checkpoint), and about half the generated cases use those ids (in the path, and in job bodies), so
the fuzzer gets past the 404s into the code behind them.

Generation is derandomized (the same cases on every run, so a CI failure reproduces locally);
about a minute on two cores.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from api.app import create_app
from migrations import upgrade_to_head
from service.settings import Settings
from tests.api.test_project_isolation import ProjectA, make_project_a, release
from tests.conftest import ApiClient, temporary_database

MAX_EXAMPLES = 200  # generated cases per operation; examples and boundary cases come on top


def served_schema() -> dict[str, Any]:
    """The app's OpenAPI schema (from an app that connects to nothing). Read at import, so that
    pytest collects one test per operation: schemathesis' lazy loader
    (`schemathesis.pytest.from_fixture`) fails on pytest 9, which no longer has `Node._nodeid`."""
    app = create_app(Settings(data_dir=Path(os.environ["PREFIX_RFT_DATA_DIR"]) / "openapi"))
    return app.openapi()


CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {
            # The key goes with every request (below); without it, schemathesis' own probes check
            # the 401, so it generates no made-up tokens.
            "with-security-parameters": False,
            # Unknown query parameters are ignored, as by most HTTP APIs, not refused.
            "allow-extra-parameters": False,
        },
        "operations": [
            {
                # The schema types these bodies loosely (any file, a list of grader objects, config
                # dicts); the service checks their content and answers 422 naming the line or field.
                "include-name": [
                    "POST /v1/datasets",
                    "POST /v1/rewards",
                    "POST /v1/rewards/test",
                    "POST /v1/jobs",
                ],
                "checks": {
                    "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "404", "409", "422"]}
                },
            },
            {
                # OpenAI's routes type the file as any bytes and the grader as any object, as OpenAI's
                # schema does; the service checks them and answers 400 naming the line or field.
                "include-name": [
                    "GET /v1/files",  # an `after` that names no file is a 400, never the first page again
                    "POST /v1/files",
                    "POST /v1/fine_tuning/alpha/graders/run",
                    "POST /v1/fine_tuning/alpha/graders/validate",
                    "GET /v1/fine_tuning/jobs",
                    "POST /v1/fine_tuning/jobs",  # method and grader are any object, as in OpenAI's schema
                ],
                "checks": {
                    "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "404", "413"]}
                },
            },
            {
                # /v1/rewards/test (the path the API promises) also matches GET /v1/rewards/{reward_id},
                # so Allow rightly names GET there too, which the schema cannot show for that path.
                "include-name": "POST /v1/rewards/test",
                "checks": {"allow_header_conformance": {"enabled": False}},
            },
        ],
    }
)


class AppUnderTest:
    """The ASGI app schemathesis sends every request to, its checks' probes included. The schema is
    loaded at import, but the app exists only once `seeded` has made its database: this passes the
    requests on to it."""

    app: FastAPI | None = None

    async def __call__(self, scope, receive, send) -> None:
        assert self.app is not None, "the `seeded` fixture sets the app"
        await self.app(scope, receive, send)


APP = AppUnderTest()
schema = schemathesis.openapi.from_dict(served_schema(), config=CONFIG)
schema.app = APP
SEEDED_IDS: dict[str, list[str]] = {}  # path parameter -> the seeded project's ids, set by `seeded`


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProjectA]:
    """A deployment on a database of its own, and a project seeded through its API."""
    from schemathesis.python.asgi import shutdown_lifespans

    with temporary_database() as database_url:
        upgrade_to_head(database_url)
        data_dir = tmp_path_factory.mktemp("schema-fuzz") / "data"  # its objects and file broker
        client = ApiClient(Settings(data_dir=data_dir, database_url=database_url))
        APP.app = client.app
        try:
            project = make_project_a(client)
            SEEDED_IDS.update(project.ids)
            yield project
        finally:
            shutdown_lifespans()  # schemathesis started the app's lifespan (its reaper) to call it
            release(client)


# ----- the seeded ids in generated cases ---------------------------------------------------------


@schema.hook
def flatmap_case(context: schemathesis.HookContext, case: schemathesis.Case) -> st.SearchStrategy:
    """Half the generated cases name the seeded resources instead of made-up ids."""
    return st.booleans().flatmap(lambda seeded: with_seeded_ids(case) if seeded else st.just(case))


def with_seeded_ids(case: schemathesis.Case) -> st.SearchStrategy:
    params = case.path_parameters or {}
    drawn = {name: st.sampled_from(SEEDED_IDS[name]) for name in params if name in SEEDED_IDS}
    return st.fixed_dictionaries(drawn).map(lambda ids: _use_ids(case, ids))


def _use_ids(case: schemathesis.Case, ids: dict[str, str]) -> schemathesis.Case:
    if ids:
        case.path_parameters = {**case.path_parameters, **ids}
    body = case.body
    positive = case.meta is None or case.meta.generation.mode == schemathesis.GenerationMode.POSITIVE
    if case.operation.label == "POST /v1/jobs" and positive and isinstance(body, dict):
        # A job that passes the id checks, so that what gets validated is its config. (A negative
        # body is left alone: filling in its ids could make it valid.)
        body["model"] = "tiny-random"
        body["training_dataset"] = SEEDED_IDS["dataset_id"][0]
        if body.get("validation_dataset") is not None:
            body["validation_dataset"] = SEEDED_IDS["dataset_id"][0]
        if body.get("reward") is None:
            body["reward_id"] = SEEDED_IDS["reward_id"][0]
        else:
            body.pop("reward_id", None)  # the inline reward gets validated
    return case


# ----- the test ----------------------------------------------------------------------------------


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # the same cases on every run
    database=None,  # and no example database replaying failures from earlier runs
    deadline=None,  # latency is not what is tested here
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_documented(case: schemathesis.Case, seeded: ProjectA):
    case.call_and_validate(headers={"Authorization": f"Bearer {seeded.client.key}"})
