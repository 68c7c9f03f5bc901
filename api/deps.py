"""Request dependencies: the database session, the caller's project, and the shared services."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from api.errors import APIError
from service.keys import project_for_key
from service.settings import Settings
from service.storage import Storage


@dataclass
class Services:
    """Created once per process by create_app and kept on app.state."""

    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    celery: Celery


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    with services.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def current_project(request: Request, session: SessionDep) -> str:
    """The project of the bearer API key; every resource lookup is scoped to it."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "missing_api_key", "send an API key as 'Authorization: Bearer <key>'")
    project_id = project_for_key(session, key.strip())
    if project_id is None:
        raise APIError(401, "invalid_api_key", "the API key is not valid (unknown or revoked)")
    return project_id


ProjectDep = Annotated[str, Depends(current_project)]
