"""Reward specs: named, validated weighted lists of graders."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.deps import CursorQuery, LimitQuery, ProjectDep, Services, ServicesDep, SessionDep, owned
from api.errors import error_responses
from api.pagination import page_of
from api.schemas import (
    InlineRewardTest,
    Page,
    RewardCreate,
    RewardOut,
    RewardTest,
    RewardTestOut,
    RewardTestResult,
    RewardTestSample,
    RewardTestTiming,
)
from api.specs import validated_spec
from core.rewards import RewardSpec, SandboxUnavailable, score_completions
from protocol.errors import APIError
from service.db import transaction
from service.tables import RewardSpecRecord

router = APIRouter(prefix="/v1/rewards", tags=["rewards"])


def reward_out(record: RewardSpecRecord) -> RewardOut:
    spec = RewardSpec.model_validate(record.spec)
    return RewardOut(
        id=record.id,
        name=record.name,
        graders=record.spec["graders"],
        fields_needed=sorted(spec.fields_needed()),
        created_at=record.created_at,
    )


@router.post("", status_code=201, response_model=RewardOut, responses=error_responses(409))
def create_reward(body: RewardCreate, project_id: ProjectDep, services: ServicesDep) -> RewardOut:
    spec = validated_spec({"graders": body.graders})
    record = RewardSpecRecord(project_id=project_id, name=body.name, spec=spec.model_dump(mode="json"))
    try:
        with transaction(services.sessions) as session:
            session.add(record)
    except IntegrityError as exc:
        raise APIError(409, "reward_exists", f"a reward named {body.name!r} exists already", "name") from exc
    return reward_out(record)


@router.get("", response_model=Page[RewardOut])
def list_rewards(
    session: SessionDep,
    project_id: ProjectDep,
    after: CursorQuery = None,
    limit: LimitQuery = 20,
) -> dict:
    page = page_of(
        session,
        select(RewardSpecRecord).where(RewardSpecRecord.project_id == project_id),
        RewardSpecRecord.id,
        after,
        limit,
    )
    page["data"] = [reward_out(r) for r in page["data"]]
    return page


@router.get("/{reward_id}", response_model=RewardOut)
def read_reward(reward_id: str, session: SessionDep, project_id: ProjectDep) -> RewardOut:
    return reward_out(owned(session, RewardSpecRecord, reward_id, project_id))


# ----- testing a reward ------------------------------------------------------------------------
# Python graders run in the same sandbox pool as in training (core.rewards.sandbox); these
# handlers are plain `def`s, so the wait runs in the thread pool, not on the event loop.


@router.post("/test", response_model=RewardTestOut)
def test_inline_reward(
    body: InlineRewardTest, project_id: ProjectDep, services: ServicesDep
) -> RewardTestOut:
    """Score samples with a reward given inline, before storing it or paying for a job."""
    spec = validated_spec({"graders": body.graders})
    return run_reward_test(spec, body.samples, project_id, services)


def stored_spec(reward_id: str, session: SessionDep, project_id: ProjectDep) -> RewardSpec:
    """The caller's stored reward. A dependency, so another project's id is a 404 even when the
    body is invalid too (dependencies run before the body is validated)."""
    spec = RewardSpec.model_validate(owned(session, RewardSpecRecord, reward_id, project_id).spec)
    session.close()  # no database connection held while the graders run
    return spec


@router.post("/{reward_id}/test", response_model=RewardTestOut)
def test_stored_reward(
    spec: Annotated[RewardSpec, Depends(stored_spec)],
    body: RewardTest,
    project_id: ProjectDep,
    services: ServicesDep,
) -> RewardTestOut:
    """Score samples with a stored reward."""
    return run_reward_test(spec, body.samples, project_id, services)


def run_reward_test(
    spec: RewardSpec, samples: list[RewardTestSample], project_id: str, services: Services
) -> RewardTestOut:
    started = time.perf_counter()
    try:
        result = score_completions(
            spec,
            [s.completion for s in samples],
            [s.example for s in samples],
            sandbox=services.sandbox if spec.runs_user_code else None,
            deadline=time.monotonic() + services.settings.sandbox_test_seconds,
            owner=project_id,  # a warm sandbox never serves two projects
        )
    except SandboxUnavailable as exc:
        raise APIError(503, "sandbox_unavailable", str(exc), headers={"Retry-After": "5"}) from exc
    rows = [
        RewardTestResult(
            total=result.totals[i],
            scores={label: scores[i] for label, scores in result.per_grader.items()},
            errors={label: failures[i] for label, failures in result.failures.items() if failures[i]},
            output={label: printed[i] for label, printed in result.outputs.items() if printed[i]},
        )
        for i in range(len(samples))
    ]
    return RewardTestOut(
        samples=rows,
        reward_errors=result.error_count,
        errors_by_grader=result.errors,
        timing=RewardTestTiming(total_seconds=time.perf_counter() - started, graders=result.seconds),
    )
