"""Cursor pagination: `after` is the last id seen. Resources list newest first (their ids sort by
creation time); a job's events and samples list oldest first, in the order they happened."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session


def page_of(
    session: Session, query: Select, id_column: InstrumentedAttribute, after: Any, limit: int
) -> dict:
    if after is not None:
        query = query.where(id_column < after)
    rows = list(session.scalars(query.order_by(id_column.desc()).limit(limit + 1)))
    has_more = len(rows) > limit
    rows = rows[:limit]
    return {"data": rows, "has_more": has_more, "last_id": rows[-1].id if rows else None}


def ascending_page(
    session: Session, query: Select, id_column: InstrumentedAttribute, after: Any, limit: int
) -> dict:
    if after is not None:
        query = query.where(id_column > after)
    rows = list(session.scalars(query.order_by(id_column).limit(limit + 1)))
    has_more = len(rows) > limit
    rows = rows[:limit]
    return {"data": rows, "has_more": has_more, "last_id": rows[-1].id if rows else None}
