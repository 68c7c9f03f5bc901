"""Reward specs: named, validated weighted lists of graders."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.deps import ProjectDep, ServicesDep, SessionDep
from api.errors import APIError, not_found
from api.pagination import page_of
from api.schemas import Page, RewardCreate, RewardOut
from core.config import ConfigError, parse_reward_spec
from core.rewards import RewardSpec
from service.db import transaction
from service.tables import RewardSpecRecord

router = APIRouter(prefix="/v1/rewards", tags=["rewards"])


def validated_spec(raw: dict[str, Any], param: str) -> RewardSpec:
    try:
        return parse_reward_spec(raw)
    except ConfigError as exc:
        details = [
            {"param": f"{param}.{p.param}" if p.param else param, "message": p.message} for p in exc.details
        ]
        raise APIError(422, "invalid_reward", str(exc), details[0]["param"], details) from exc


def reward_out(record: RewardSpecRecord) -> RewardOut:
    spec = RewardSpec.model_validate(record.spec)
    return RewardOut(
        id=record.id,
        name=record.name,
        graders=record.spec["graders"],
        fields_needed=sorted(spec.fields_needed()),
        created_at=record.created_at,
    )


def get_reward(session, project_id: str, reward_id: str, param: str | None = None) -> RewardSpecRecord:
    record = session.get(RewardSpecRecord, reward_id)
    if record is None or record.project_id != project_id:
        raise not_found("reward", reward_id, param)
    return record


@router.post("", status_code=201, response_model=RewardOut)
def create_reward(body: RewardCreate, project_id: ProjectDep, services: ServicesDep) -> RewardOut:
    spec = validated_spec({"graders": body.graders}, "graders")
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
    after: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
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
    return reward_out(get_reward(session, project_id, reward_id))
