"""Datasets: streaming upload with validation, get, list, delete."""

from __future__ import annotations

from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import select

from api.datasets import delete_dataset_row, store_dataset
from api.deps import CursorQuery, LimitQuery, ProjectDep, ServicesDep, SessionDep, owned
from api.errors import error_responses
from api.idempotency import IdempotencyKeyHeader
from api.pagination import page_of
from api.schemas import DatasetOut, Deleted, Page
from api.uploads import UPLOAD_OPENAPI
from service.tables import TRAINING_PURPOSE, Dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
Out = TypeVar("Out", bound=BaseModel)


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    openapi_extra=UPLOAD_OPENAPI,
    responses=error_responses(400, 413, 422),
)
async def upload_dataset(
    request: Request,
    project_id: ProjectDep,
    services: ServicesDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> DatasetOut | JSONResponse:
    """Upload JSONL as multipart (`file`, optional `name`). Invalid files are refused with every bad line.

    With an `Idempotency-Key`, a retry of the same upload returns the first dataset."""
    return await store_dataset(
        request, project_id, services, idempotency_key, "upload_dataset", "ds", 422, dataset_out
    )


def dataset_out(dataset: Dataset) -> DatasetOut:
    return DatasetOut.model_validate(dataset, from_attributes=True)


@router.get("", response_model=Page[DatasetOut])
def list_datasets(
    session: SessionDep,
    project_id: ProjectDep,
    after: CursorQuery = None,
    limit: LimitQuery = 20,
) -> dict:
    query = select(Dataset).where(Dataset.project_id == project_id, Dataset.purpose == TRAINING_PURPOSE)
    return page_of(session, query, Dataset.id, after, limit)


@router.get("/{dataset_id}", response_model=DatasetOut)
def read_dataset(dataset_id: str, session: SessionDep, project_id: ProjectDep) -> Dataset:
    return owned(session, Dataset, dataset_id, project_id)


@router.delete("/{dataset_id}", response_model=Deleted, responses=error_responses(409))
def delete_dataset(dataset_id: str, project_id: ProjectDep, services: ServicesDep) -> Deleted:
    """Refused while a queued or running job uses the dataset; finished jobs keep their history."""
    delete_dataset_row(services, project_id, dataset_id)
    return Deleted(id=dataset_id, object="dataset")
