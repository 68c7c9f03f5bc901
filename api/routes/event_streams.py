"""A job's events as server-sent events: GET /v1/fine_tuning/jobs/{id}/events/stream.

Oldest first, each with `id:` its event number and `event:` its type (`message` or `metrics`, the
per-step numbers), `data:` the event as /events shows it. A client that reconnects with
`Last-Event-ID` (or `?after=ftevent-<n>`) gets every later event once: a job's events commit in
the order of their ids (service.lifecycle.add_event). A quiet stream sends a `: keep-alive`
comment; once the job has ended and its last events are out, an `end` event closes it.

Each stream polls the database (one small query a poll) and keeps no queue of its own, so a slow
client is held back by its own socket and a vanished one costs nothing: Starlette cancels the
generator when the client disconnects, and the stream also checks between polls.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from prometheus_client import Gauge
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.deps import ProjectDep, ServicesDep, SessionDep, owned
from api.errors import error_responses
from api.openai_metrics import EVENT_PREFIX, openai_event
from service.tables import TERMINAL_STATUSES, Job, JobEvent

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

OPEN_STREAMS = Gauge("prefix_rft_event_streams", "Job event streams open now")
BATCH = 500  # events read per poll: a long backlog goes out in several
RETRY_MILLISECONDS = 2000  # what a browser's EventSource waits before it reconnects


@router.get(
    "/{fine_tuning_job_id}/events/stream",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The job's events, then `end`."},
        **error_responses(400),
    },
)
def stream_fine_tuning_events(
    fine_tuning_job_id: str,
    request: Request,
    session: SessionDep,
    project_id: ProjectDep,
    services: ServicesDep,
    after: Annotated[
        str | None, Query(pattern=r"^ftevent-\d{1,18}$", description="Send the events after this one.")
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            description="The id of the last event a reconnecting client saw; one that is no event id "
            "is ignored, as servers of server-sent events do.",
        ),
    ] = None,
) -> StreamingResponse:
    """Every event of the job, oldest first, as it happens; ends when the job has ended."""
    job = owned(session, Job, fine_tuning_job_id, project_id)
    cursor = event_number(last_event_id) or event_number(after)
    settings = services.settings
    stream = _events(
        services.sessions,
        job.id,
        cursor,
        request,
        settings.stream_poll_seconds,
        settings.stream_keepalive_seconds,
    )
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def event_number(cursor: str | None) -> int:
    """`ftevent-12` or `12` -> 12 (EventSource sends back the `id:` it was given); 0 for none or
    for anything else: the stream then starts from the beginning, repeating rather than losing."""
    number = (cursor or "").strip().removeprefix(EVENT_PREFIX)
    return int(number) if number.isdigit() and len(number) <= 18 else 0


def sse(event: str, data: str, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n"


async def _events(
    sessions: sessionmaker[Session],
    job_id: str,
    cursor: int,
    request: Request,
    poll_seconds: float,
    keepalive_seconds: float,
) -> AsyncIterator[str]:
    OPEN_STREAMS.inc()
    try:
        yield f"retry: {RETRY_MILLISECONDS}\n\n"
        last_sent, ended_seen = time.monotonic(), False
        while True:
            status, events = await run_in_threadpool(_read, sessions, job_id, cursor)
            for number, event in events:
                cursor = number
                yield sse(event["type"], json.dumps(event), number)
                last_sent = time.monotonic()
            if len(events) == BATCH:
                continue  # more are waiting
            if status is None or status in TERMINAL_STATUSES:
                # One more read after the final status: events its transaction wrote come too.
                if ended_seen:
                    yield sse("end", json.dumps({"status": status}))
                    return
                ended_seen = True
                continue
            if time.monotonic() - last_sent >= keepalive_seconds:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            if await request.is_disconnected():
                return
            await asyncio.sleep(poll_seconds)
    finally:
        OPEN_STREAMS.dec()


def _read(
    sessions: sessionmaker[Session], job_id: str, cursor: int
) -> tuple[str | None, list[tuple[int, dict]]]:
    """The job's status, then its events after `cursor` (in this order: every event committed
    before the status was read is among them)."""
    with sessions() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        rows = session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.id > cursor)
            .order_by(JobEvent.id)
            .limit(BATCH)
        ).all()
        return status, [(row.id, openai_event(row).model_dump(mode="json")) for row in rows]
