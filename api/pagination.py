"""OpenAI's cursor pagination: `after` is the last id seen, lists are newest first."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Select, tuple_
from sqlalchemy.orm import Session

from protocol.errors import APIError

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # every id this service makes has this shape


def openai_page(
    session: Session,
    query: Select,
    model: Any,
    after: str | None,
    limit: int,
    order: str = "desc",
) -> dict:
    """A page as OpenAI's lists answer: `created_at` then id, newest first unless `order="asc"`,
    items strictly after the `after` item (which must be in `query`: else 400 on `after`, never
    the first page again, which would loop a client that follows `has_more`)."""
    newest_first = order == "desc"
    if after is not None and not _ID.match(after):  # e.g. a NUL byte, which the database refuses
        raise APIError(400, "invalid_cursor", f"`after` names no item of this list: {after!r}", "after")
    key = (model.created_at, model.id)
    if after is not None:
        anchor = session.scalar(query.where(model.id == after))
        if anchor is None:
            raise APIError(400, "invalid_cursor", f"`after` names no item of this list: {after!r}", "after")
        earlier = tuple_(*key) < tuple_(anchor.created_at, anchor.id)
        later = tuple_(*key) > tuple_(anchor.created_at, anchor.id)
        query = query.where(earlier if newest_first else later)
    ordering = [c.desc() for c in key] if newest_first else list(key)
    rows = list(session.scalars(query.order_by(*ordering).limit(limit + 1)))
    has_more = len(rows) > limit
    rows = rows[:limit]
    return {
        "data": rows,
        "has_more": has_more,
        "first_id": rows[0].id if rows else None,
        "last_id": rows[-1].id if rows else None,
    }
