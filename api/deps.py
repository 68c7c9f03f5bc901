"""Request dependencies: the database session, the caller's project, and the shared services."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, TypeVar

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from api.errors import BEARER_CHALLENGE, MISSING_KEY, not_found
from core.rewards import SandboxPool
from protocol.errors import APIError
from service.judge import ChatJudge
from service.keys import project_for_key
from service.settings import Settings
from service.storage import Storage
from service.tables import Dataset, Job, WebhookEndpoint


@dataclass
class Services:
    """Created once per process by create_app and kept on app.state."""

    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    celery: Celery
    sandbox: SandboxPool  # warm processes for python graders (POST /v1/fine_tuning/alpha/graders/run)
    judge: ChatJudge  # the judges of model graders (settings.judge_models)


# Dependencies that touch no database are async: a sync dependency costs a trip through the
# thread pool. A session is opened on the event loop and connects only inside the handler's
# thread; no dependency holds a pooled connection while it waits for a thread.


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_session(services: ServicesDep) -> AsyncIterator[Session]:
    session = services.sessions()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def current_project(request: Request, services: ServicesDep) -> str:
    """The project of the bearer API key; every resource lookup is scoped to it."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise APIError(401, *MISSING_KEY, headers=BEARER_CHALLENGE)
    with services.sessions() as session:  # opened and closed in this one thread trip
        project_id = project_for_key(session, key)
    if project_id is None:
        raise APIError(
            401, "invalid_api_key", "the API key is not valid (unknown or revoked)", headers=BEARER_CHALLENGE
        )
    return project_id


ProjectDep = Annotated[str, Depends(current_project)]

ID_PATTERN = r"^[a-z]+[_-][0-9a-f]{24}$"  # the shape of service.tables.new_id
_ID = re.compile(ID_PATTERN)
Model = TypeVar("Model", Dataset, Job, WebhookEndpoint)


def owned(
    session: Session,
    model: type[Model],
    resource_id: str,
    project_id: str,
    param: str | None = None,
    kind: str | None = None,
    **get,
) -> Model:
    """The caller's resource by id; anything else (another project's, malformed, missing) is a 404.
    `kind` names it in the error (`file_not_found`); default: the table's resource name."""
    kind = kind or {Dataset: "file", Job: "job", WebhookEndpoint: "webhook_endpoint"}[model]
    row = session.get(model, resource_id, **get) if _ID.match(resource_id) else None
    if row is None or row.project_id != project_id:
        raise not_found(kind, resource_id, param)
    return row
