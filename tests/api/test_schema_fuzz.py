"""Property-based fuzzing of the whole OpenAPI schema with schemathesis.

For every operation, valid and invalid requests generated from the schema (plus its examples and
schemathesis' boundary cases) must get no 5xx and an answer the schema describes: a documented
status code, content type, headers and body (error bodies included), 401 once the key is left
out, and an `Allow` header that lists every method of the resource.

The requests go in-process to the real app on PostgreSQL with a real project key. The deployment
has a database of its own (dropped afterwards) and the broker kept in files in a temporary
directory, so the jobs the fuzzer creates never reach another test's worker or reaper. Its project
is seeded with a training file, a results file, a queued job and a succeeded one (adapter,
metrics, samples, checkpoint), and about half the generated cases use those ids (in the path, and
as a job's files), so the fuzzer gets past the 404s into the code behind them. Those cases also get
a method and a grader of a real type, with fuzzed hyperparameters and a fuzzed grader field: the
schema types both as any object, so generated ones alone would stop at `method.type` and
`grader.type`.

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
from api.fine_tuning_methods import (
    OPENAI_HYPERPARAMETERS,
    OPENAI_TYPES,
    OUR_HYPERPARAMETERS,
    SUPERVISED,
    SUPPORTED,
)
from core.config import TrainingConfig
from migrations import upgrade_to_head
from service.settings import Settings
from tests.api.test_project_isolation import ProjectA, make_project_a, release
from tests.conftest import ApiClient, temporary_database

MAX_EXAMPLES = (
    100  # generated cases per operation (the suite's time); examples and boundary cases come on top
)


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
                # OpenAI's routes type the file as any bytes and the grader as any object, as OpenAI's
                # schema does; the service checks them and answers 400 naming the line or field.
                "include-name": [
                    "GET /v1/files",  # an `after` that names no file is a 400, never the first page again
                    "POST /v1/files",
                    "POST /v1/fine_tuning/alpha/graders/run",
                    "POST /v1/fine_tuning/alpha/graders/validate",
                    "GET /v1/fine_tuning/jobs",
                    "POST /v1/fine_tuning/jobs",  # method and grader are any object, as in OpenAI's schema
                    "POST /v1/fine_tuning/estimates",  # the same body
                    "POST /v1/webhooks",  # the url must be http(s) with a host (a public one in production)
                ],
                "checks": {
                    "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "404", "413"]}
                },
            },
            {
                # A stream answers until its job ends, which a queued job never does here; its
                # answers are tested by tests/api/test_event_streams.py, its 404s by the isolation test.
                "include-name": ["GET /v1/fine_tuning/jobs/{fine_tuning_job_id}/events/stream"],
                "enabled": False,
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
    """Half the generated cases name the seeded resources instead of made-up ids, and send a method
    and grader of a real type."""
    return st.booleans().flatmap(lambda seeded: with_seeded_ids(case) if seeded else st.just(case))


# Graders that score in-process (python ones need the sandbox, model ones a judge, and this
# deployment has neither), valid as they are: the fuzzer changes one field.
GRADERS = [
    {
        "type": "string_check",
        "name": "s",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "eq",
    },
    {
        "type": "text_similarity",
        "name": "t",
        "input": "{{sample.output_text}}",
        "reference": "4",
        "evaluation_metric": "fuzzy_match",
    },
    {"type": "exact_match", "field": "answer"},
    {"type": "regex", "pattern": "[0-9]+"},
    {"type": "numeric", "field": "answer"},
    {
        "type": "multi",
        "graders": {"a": {"type": "exact_match", "field": "answer"}, "b": {"type": "contains", "value": "4"}},
        "calculate_output": "0.5 * a + 0.5 * b",
    },
]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.just("auto"),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
HYPERPARAMETERS = sorted({*OPENAI_HYPERPARAMETERS, *OUR_HYPERPARAMETERS, *TrainingConfig.model_fields})


def _changed(grader: dict[str, Any]) -> st.SearchStrategy:
    """The grader with one field set to a fuzzed value (its type excepted: that is the other kind)."""
    keys = [*sorted(k for k in grader if k != "type"), "weight", "name"]
    return st.tuples(st.sampled_from(keys), VALUES).map(lambda kv: {**grader, kv[0]: kv[1]})


graders = st.sampled_from(GRADERS).flatmap(lambda g: st.one_of(st.just(g), _changed(g)))
methods = st.tuples(
    st.sampled_from(SUPPORTED),
    graders,
    st.dictionaries(st.sampled_from(HYPERPARAMETERS), VALUES, max_size=3),
).map(
    lambda t: {
        "type": t[0],
        t[0]: {"hyperparameters": t[2]}
        | ({} if OPENAI_TYPES.get(t[0], t[0]) in SUPERVISED else {"grader": t[1]}),
    }
)


def with_seeded_ids(case: schemathesis.Case) -> st.SearchStrategy:
    params = case.path_parameters or {}
    drawn = {name: st.sampled_from(SEEDED_IDS[name]) for name in params if name in SEEDED_IDS}
    return st.tuples(st.fixed_dictionaries(drawn), methods, graders).map(lambda t: _use_ids(case, *t))


def _use_ids(
    case: schemathesis.Case, ids: dict[str, str], method: dict[str, Any], grader: dict[str, Any]
) -> schemathesis.Case:
    if ids:
        case.path_parameters = {**case.path_parameters, **ids}
    body = case.body
    positive = case.meta is None or case.meta.generation.mode == schemathesis.GenerationMode.POSITIVE
    # A negative body is left alone: filling in its ids, method or grader could make it valid.
    if not positive or not isinstance(body, dict):
        return case
    if case.operation.label in ("POST /v1/fine_tuning/jobs", "POST /v1/fine_tuning/estimates"):
        # A job that passes the file checks, so that what gets validated is its method and grader.
        body["model"] = "tiny-random"
        body["training_file"] = SEEDED_IDS["file_id"][0]
        if body.get("validation_file") is not None:
            body["validation_file"] = SEEDED_IDS["file_id"][0]
        body["method"] = method
        body.pop("hyperparameters", None)  # given beside a method, they are refused before it is read
        body.pop("integrations", None)  # refused before anything else
    elif case.operation.label.startswith("POST /v1/fine_tuning/alpha/graders/"):
        body["grader"] = grader
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
