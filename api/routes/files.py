"""OpenAI's files: upload (validated while it streams), list, retrieve, delete, content.

A file of purpose `fine-tune` is a dataset: the same rows, storage and checks as training reads
(core/data.py), shown in OpenAI's shape with what validation found under `validation`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select

from api.datasets import delete_dataset_row, store_dataset
from api.deps import ProjectDep, ServicesDep, SessionDep, owned
from api.errors import error_responses
from api.idempotency import IdempotencyKeyHeader, RetryCountHeader
from api.pagination import openai_page
from api.schemas import FileDeleted, FileObject, FilePage, FileValidation
from api.uploads import UPLOAD_OPENAPI
from protocol.errors import APIError
from service.tables import RESULTS_PURPOSE, Dataset

router = APIRouter(prefix="/v1/files", tags=["files"])

PURPOSE = "fine-tune"
_UPLOAD_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    **UPLOAD_OPENAPI["requestBody"]["content"]["multipart/form-data"]["schema"],
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": UPLOAD_OPENAPI["requestBody"]["content"]["multipart/form-data"]["schema"][
                            "properties"
                        ]["file"],
                        "purpose": {
                            "type": "string",
                            "enum": [PURPOSE],
                            "description": "Only fine-tune here.",
                        },
                    },
                }
            }
        },
    }
}


def file_object(dataset: Dataset) -> FileObject:
    return FileObject(
        id=dataset.id,
        bytes=dataset.bytes,
        created_at=int(dataset.created_at.timestamp()),
        filename=dataset.name,
        purpose=dataset.purpose,
        validation=FileValidation(
            lines=dataset.lines,
            examples=dataset.examples,
            with_demonstration=dataset.with_demonstration,
            field_counts=dataset.field_counts,
            sha256=dataset.sha256,
        ),
    )


def _check_form(fields: dict[str, str]) -> None:
    purpose = fields.get("purpose")
    if purpose != PURPOSE:
        got = "none" if purpose is None else repr(purpose)
        raise APIError(
            400,
            "invalid_purpose",
            f"purpose must be 'fine-tune' (got {got}): this service keeps training data only",
            "purpose",
        )
    if any(name.startswith("expires_after") for name in fields):
        raise APIError(
            400,
            "unsupported_parameter",
            "expires_after is not supported: files are kept until deleted",
            "expires_after",
        )


@router.post(
    "", response_model=FileObject, openapi_extra=_UPLOAD_OPENAPI, responses=error_responses(400, 413)
)
async def create_file(
    request: Request,
    project_id: ProjectDep,
    services: ServicesDep,
    idempotency_key: IdempotencyKeyHeader = None,
    retry_count: RetryCountHeader = None,
) -> FileObject | JSONResponse:
    """Upload JSONL (`file`, `purpose=fine-tune`): every line is checked while it streams in, and a
    file with bad lines is refused (400) with each one's line number and field."""
    return await store_dataset(
        request, project_id, services, idempotency_key, retry_count, _check_form, file_object
    )


@router.get("", response_model=FilePage, responses=error_responses(400))
def list_files(
    session: SessionDep,
    project_id: ProjectDep,
    after: Annotated[str | None, Query(description="The last id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
) -> dict:
    query = select(Dataset).where(Dataset.project_id == project_id)
    if purpose is not None:
        query = query.where(Dataset.purpose == purpose)
    page = openai_page(session, query, Dataset, after, limit, order)
    page["data"] = [file_object(d) for d in page["data"]]
    return page


def _owned_file(session: SessionDep, project_id: str, file_id: str) -> Dataset:
    return owned(session, Dataset, file_id, project_id)


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, session: SessionDep, project_id: ProjectDep) -> FileObject:
    return file_object(_owned_file(session, project_id, file_id))


@router.delete("/{file_id}", response_model=FileDeleted, responses=error_responses(409))
def delete_file(file_id: str, project_id: ProjectDep, services: ServicesDep) -> FileDeleted:
    """Refused (409, not to be retried) while a queued or running job trains on the file."""
    delete_dataset_row(services, project_id, file_id)
    return FileDeleted(id=file_id)


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/jsonl": {}, "text/csv": {}},
            "description": "The file as uploaded; a job's results file is CSV.",
        }
    },
)
def file_content(file_id: str, session: SessionDep, project_id: ProjectDep, services: ServicesDep):
    dataset = _owned_file(session, project_id, file_id)
    return StreamingResponse(
        services.storage.iter_chunks(dataset.storage_key),
        media_type="text/csv" if dataset.purpose == RESULTS_PURPOSE else "application/jsonl",
        headers={"Content-Length": str(dataset.bytes), "X-Content-SHA256": dataset.sha256},
    )
