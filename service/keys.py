"""API keys: random, shown once, stored as a sha256 digest.

A key has 256 bits of randomness, so a fast hash is safe here (a slow password hash protects
guessable secrets) and keeps authentication off the latency budget of status polling.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.tables import ApiKey, Project

KEY_PREFIX = "prk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, project_name: str, key_name: str = "default") -> tuple[Project, str]:
    """A new key for a project (created if missing). Returns the project and the key, which is not stored."""
    project = session.scalar(select(Project).where(Project.name == project_name))
    if project is None:
        project = Project(name=project_name)
        session.add(project)
        session.flush()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(project_id=project.id, name=key_name, key_hash=hash_key(key), display_prefix=key[:10]))
    return project, key


def project_for_key(session: Session, key: str) -> str | None:
    """The project id of a valid, unrevoked key."""
    return session.scalar(
        select(ApiKey.project_id).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
