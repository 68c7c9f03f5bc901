"""`Idempotency-Key` on create requests: a retried request gets the first response, not a twin.

The key's row is written in the same transaction as the resource it created, so either both exist
or neither does. Two concurrent requests with one key race on the row's primary key: the loser's
transaction (its resource included) rolls back, and it answers with the winner's response.
The same key with a different request is refused (400). The reaper forgets keys after
settings.idempotency_hours (at least 24).

The official OpenAI client sends no key, but it numbers its tries (`x-stainless-retry-count`, 0 on
the first): such a request is remembered under a generated key, and a retry (count 1 or more) of
the same request within RETRY_WINDOW gets the first response, so a create whose answer was lost
(a timeout, a 5xx after the commit) is not made twice.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

from fastapi import Header
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from protocol.errors import APIError
from service.tables import IdempotencyKey, utcnow

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",  # printable ASCII without spaces, like Stripe's and IETF's keys
        description="Retry safely: the same key and request return the first response (kept 24 h or more).",
    ),
]
RetryCountHeader = Annotated[
    int | None,
    Header(
        alias="x-stainless-retry-count",
        ge=0,
        description="The official client's try number: a retry of a request gets its first response.",
    ),
]
PARAM = "Idempotency-Key"
RETRY_WINDOW = timedelta(minutes=10)
# Generated keys hold a space, which a client's key (printable ASCII without spaces) cannot.
GENERATED = "retry "


class ConcurrentDuplicate(Exception):
    """Another request with the same key committed first; answer with its response."""


def fingerprint(request: Any) -> str:
    """sha256 of the request in a canonical JSON form."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class IdempotentRequest:
    """A create request's Idempotency-Key (None: the request has none) and its fingerprint."""

    project_id: str
    operation: str  # keys of different operations never meet: "create_job", "upload_dataset"
    key: str | None
    request_sha256: str
    retry_count: int | None = None  # the official client's try number, when it sent one

    def replay(self, session: Session) -> JSONResponse | None:
        """The first response to this key (or, without one, to the try this one retries), or None."""
        if self.key is None:
            return self._replay_retried(session) if self.retry_count else None
        row = session.get(IdempotencyKey, (self.project_id, self.operation, self.key))
        if row is None:
            return None
        if row.request_sha256 != self.request_sha256:
            raise APIError(
                400,
                "idempotency_key_reused",
                f"the Idempotency-Key {self.key!r} was already used with a different request; use a new key",
                PARAM,
            )
        return _replayed(row)

    def remember(self, session: Session, status_code: int, response: dict[str, Any]) -> None:
        """Store the response with the resource, in its transaction; raises ConcurrentDuplicate if
        another request with this key got there first (PostgreSQL waits here for it to commit)."""
        key = self.key
        if key is None and self.retry_count is not None:
            key = f"{GENERATED}{uuid.uuid4().hex}"
        if key is None:
            return
        row = IdempotencyKey(
            project_id=self.project_id,
            operation=self.operation,
            key=key,
            request_sha256=self.request_sha256,
            status_code=status_code,
            response=response,
        )
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError as exc:
            raise ConcurrentDuplicate(self.key) from exc

    def _replay_retried(self, session: Session) -> JSONResponse | None:
        row = session.scalars(
            select(IdempotencyKey)
            .where(
                IdempotencyKey.project_id == self.project_id,
                IdempotencyKey.operation == self.operation,
                IdempotencyKey.request_sha256 == self.request_sha256,
                IdempotencyKey.key.startswith(GENERATED),
                IdempotencyKey.created_at >= utcnow() - RETRY_WINDOW,
            )
            .order_by(IdempotencyKey.created_at.desc())
            .limit(1)
        ).first()
        return _replayed(row) if row is not None else None


def _replayed(row: IdempotencyKey) -> JSONResponse:
    return JSONResponse(row.response, row.status_code, headers={"Idempotent-Replayed": "true"})
