"""Storing and deleting training files (the `datasets` table): the JSONL upload validated while
it streams, and the delete that refuses while an active job uses the file."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.deps import Services, owned
from api.idempotency import ConcurrentDuplicate, IdempotentRequest, fingerprint
from api.uploads import receive_file
from core.data import iter_byte_lines, read_jsonl
from protocol.errors import APIError
from service.db import transaction
from service.storage import StorageError
from service.tables import ACTIVE_STATUSES, Dataset, Job, new_id

log = logging.getLogger(__name__)
Out = TypeVar("Out", bound=BaseModel)


async def store_dataset(
    request: Request,
    project_id: str,
    services: Services,
    idempotency_key: str | None,
    retry_count: int | None,
    check_fields: Callable[[dict[str, str]], None],
    render: Callable[[Dataset], Out],
) -> Out | JSONResponse:
    """Receive a JSONL upload, validate it line by line while it streams, store it and its row.

    A refused file answers 400 with every bad line; a replayed `Idempotency-Key` (or the official
    client's retry, `retry_count`, api/idempotency.py) returns the first answer as a JSONResponse.
    `check_fields` checks the form's text fields (purpose) before the file is read; `render` is
    the row as the response shows it.
    """
    settings = services.settings
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.scratch_dir, prefix="upload-") as scratch:
        path = Path(scratch) / "data.jsonl"
        upload = await receive_file(request, path, settings.max_upload_bytes)
        check_fields(upload.fields)
        report = await run_in_threadpool(
            lambda: read_jsonl(
                iter_byte_lines(path, settings.max_line_bytes), settings.max_line_bytes, keep_examples=False
            )
        )
        if not report.ok:
            details = [{"line": e.line, "field": e.field, "message": e.message} for e in report.errors]
            if report.error_count:
                message = (
                    f"the dataset has {report.error_count} invalid line(s); the first: {report.errors[0]}"
                )
            else:
                message = "the file has no examples"
            raise APIError(400, "invalid_dataset", message, "file", details)
        name = _printable(upload.fields.get("name") or upload.filename or "")[:255] or "dataset.jsonl"
        dataset = Dataset(
            id=new_id("file"),
            project_id=project_id,
            name=name,
            bytes=upload.bytes,
            sha256=upload.sha256,
            storage_key="",
            lines=report.lines,
            examples=report.example_count,
            with_demonstration=report.with_demonstration,
            field_counts=report.field_counts,
        )
        dataset.storage_key = f"datasets/{project_id}/{dataset.id}.jsonl"
        idempotent = IdempotentRequest(
            project_id,
            "create_file",
            idempotency_key,
            fingerprint([upload.sha256, upload.fields, upload.filename]),
            retry_count,
        )
        if first := await run_in_threadpool(_replay, services, idempotent):
            return first
        # The object first, then its row: a failure in between leaves an object that is removed here.
        await run_in_threadpool(services.storage.put_file, dataset.storage_key, path)
    try:
        return await run_in_threadpool(_insert, services, dataset, idempotent, render)
    except ConcurrentDuplicate:
        await run_in_threadpool(services.storage.delete, dataset.storage_key)
        return await run_in_threadpool(_replay, services, idempotent)
    except Exception:
        await run_in_threadpool(services.storage.delete, dataset.storage_key)
        raise


def _replay(services, request: IdempotentRequest) -> JSONResponse | None:
    with services.sessions() as session:
        return request.replay(session)


def _printable(text: str) -> str:
    """Names are for display: control characters (NUL included) are dropped."""
    return "".join(ch for ch in text if ch.isprintable()).strip()


def _insert(services, dataset: Dataset, request: IdempotentRequest, render: Callable[[Dataset], Out]) -> Out:
    with transaction(services.sessions) as session:
        session.add(dataset)
        session.flush()
        out = render(dataset)
        request.remember(session, 200, out.model_dump(mode="json"))
    return out


def delete_dataset_row(services: Services, project_id: str, dataset_id: str) -> None:
    """Delete the row, then its object; 409 (not to be retried) while an active job uses it."""
    with transaction(services.sessions) as session:
        # The row lock serialises this with job creation, which takes a shared lock.
        dataset = owned(session, Dataset, dataset_id, project_id, with_for_update=True)
        in_use = session.scalar(
            select(Job.id)
            .where(
                (Job.training_dataset_id == dataset_id) | (Job.validation_dataset_id == dataset_id),
                Job.status.in_(ACTIVE_STATUSES),
            )
            .limit(1)
        )
        if in_use:
            raise APIError(
                409,
                "file_in_use",
                f"file {dataset_id!r} is used by active job {in_use!r}",
                headers={"x-should-retry": "false"},  # the official client retries a 409 unless told
            )
        session.delete(dataset)
        key = dataset.storage_key
    try:
        services.storage.delete(key)  # after the commit: a failed commit never loses the object
    except StorageError:  # the file is deleted for its owner; the object outlives an outage
        log.warning("file %s deleted, but its object %s could not be removed", dataset_id, key, exc_info=True)
