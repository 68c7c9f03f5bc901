"""Reward specs: named, validated weighted lists of graders."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.deps import CursorQuery, LimitQuery, ProjectDep, ServicesDep, SessionDep, owned
from api.errors import APIError
from api.pagination import page_of
from api.schemas import Page, RewardCreate, RewardOut
from core.config import ConfigError, parse_reward_spec
from core.rewards import RewardSpec
from service.db import transaction
from service.tables import RewardSpecRecord

router = APIRouter(prefix="/v1/rewards", tags=["rewards"])


def validated_spec(raw: dict[str, Any], prefix: str | None = None) -> RewardSpec:
    """A RewardSpec, or a 422 whose params point into the request (`reward.graders.0.type`)."""
    try:
        return parse_reward_spec(raw)
    except ConfigError as exc:
        details = [
            {"param": ".".join(x for x in (prefix, p.param or "graders") if x) or None, "message": p.message}
            for p in exc.details
        ]
        raise APIError(422, "invalid_reward", joined(details), details[0]["param"], details) from exc


def joined(details: list[dict[str, Any]]) -> str:
    return "; ".join(f"{d['param']}: {d['message']}" if d["param"] else d["message"] for d in details)


def reward_out(record: RewardSpecRecord) -> RewardOut:
    spec = RewardSpec.model_validate(record.spec)
    return RewardOut(
        id=record.id,
        name=record.name,
        graders=record.spec["graders"],
        fields_needed=sorted(spec.fields_needed()),
        created_at=record.created_at,
    )


@router.post("", status_code=201, response_model=RewardOut)
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
