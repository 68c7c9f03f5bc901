"""Fine-tuning jobs: create, read, list, cancel, and what a running job reports."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select

from api.deps import CursorQuery, LimitQuery, ProjectDep, ServicesDep, SessionDep
from api.errors import error_responses
from api.idempotency import ConcurrentDuplicate, IdempotencyKeyHeader, IdempotentRequest, fingerprint
from api.jobs import get_job, new_job, request_cancel
from api.pagination import ascending_page, page_of
from api.schemas import (
    CheckpointList,
    EventPage,
    JobCreate,
    JobOut,
    MetricPage,
    Page,
    SamplePage,
)
from protocol.errors import APIError
from service.db import transaction
from service.queue import dispatch_job
from service.tables import (
    Artifact,
    Checkpoint,
    Job,
    JobEvent,
    JobMetric,
    JobSample,
    JobStatus,
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_INT, MAX_BIGINT = 2**31 - 1, 2**63 - 1  # the database's integer ranges bound the cursors


def job_out(job: Job) -> JobOut:
    config = job.config
    return JobOut(
        id=job.id,
        status=job.status,
        model=job.model,
        method=job.method,
        adapter=config["adapter"],
        training_dataset=job.training_dataset_id,
        validation_dataset=job.validation_dataset_id,
        reward_id=job.reward_spec_id,
        reward=config.get("reward"),
        hyperparameters=config["training"],
        seed=job.seed,
        suffix=job.suffix,
        metadata=job.user_metadata,
        step=job.step,
        total_steps=job.total_steps,
        attempt=job.attempt,
        error=job.error,
        fine_tuned_model=job.fine_tuned_model,
        trained_tokens=job.trained_tokens,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


@router.post("", status_code=201, response_model=JobOut, responses=error_responses(404))
def create_job(
    body: JobCreate,
    project_id: ProjectDep,
    services: ServicesDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobOut | JSONResponse:
    """Validate and queue a job. With an `Idempotency-Key`, a retry returns the first job."""
    request = IdempotentRequest(
        project_id, "create_job", idempotency_key, fingerprint(body.model_dump(mode="json"))
    )
    try:
        with transaction(services.sessions) as session:
            if first := request.replay(session):
                return first
            job = new_job(session, body, project_id, frozenset(services.judge.endpoints))
            out = job_out(job)
            request.remember(session, 201, out.model_dump(mode="json"))
    except ConcurrentDuplicate:
        with services.sessions() as session:
            return request.replay(session)
    dispatch_job(services.celery, services.sessions, job.id)  # after the commit, so the worker finds the row
    return out


@router.get("", response_model=Page[JobOut])
def list_jobs(
    session: SessionDep,
    project_id: ProjectDep,
    status: JobStatus | None = None,
    after: CursorQuery = None,
    limit: LimitQuery = 20,
) -> dict:
    query = select(Job).where(Job.project_id == project_id)
    if status is not None:
        query = query.where(Job.status == status)
    page = page_of(session, query, Job.id, after, limit)
    page["data"] = [job_out(j) for j in page["data"]]
    return page


@router.get("/{job_id}", response_model=JobOut)
def read_job(job_id: str, session: SessionDep, project_id: ProjectDep) -> JobOut:
    return job_out(get_job(session, project_id, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=error_responses(409))
def cancel_job(job_id: str, project_id: ProjectDep, services: ServicesDep) -> JobOut:
    """A queued job is cancelled at once; a running one stops at its next step and ends `cancelled`."""
    request_cancel(services, project_id, job_id)
    with services.sessions() as session:
        return job_out(get_job(session, project_id, job_id))


@router.get("/{job_id}/events", response_model=EventPage)
def list_events(
    job_id: str,
    session: SessionDep,
    project_id: ProjectDep,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_BIGINT, description="Events after this id (oldest first).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict:
    get_job(session, project_id, job_id)
    return ascending_page(
        session, select(JobEvent).where(JobEvent.job_id == job_id), JobEvent.id, after, limit
    )


@router.get("/{job_id}/metrics", response_model=MetricPage)
def list_metrics(
    job_id: str,
    session: SessionDep,
    project_id: ProjectDep,
    kind: Annotated[str | None, Query(pattern="^(train|eval)$")] = None,
    after_step: Annotated[int | None, Query(ge=-1, le=MAX_INT, description="Rows after this step.")] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> dict:
    get_job(session, project_id, job_id)
    query = select(JobMetric).where(JobMetric.job_id == job_id)
    if kind is not None:
        query = query.where(JobMetric.kind == kind)
    if after_step is not None:
        query = query.where(JobMetric.step > after_step)
    rows = list(session.scalars(query.order_by(JobMetric.step, JobMetric.kind).limit(limit + 1)))
    return {"data": rows[:limit], "has_more": len(rows) > limit}


@router.get("/{job_id}/samples", response_model=SamplePage)
def list_samples(
    job_id: str,
    session: SessionDep,
    project_id: ProjectDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_BIGINT)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict:
    get_job(session, project_id, job_id)
    query = select(JobSample).where(JobSample.job_id == job_id)
    return ascending_page(session, query, JobSample.id, after, limit)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(job_id: str, session: SessionDep, project_id: ProjectDep) -> dict:
    get_job(session, project_id, job_id)
    rows = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step))
    return {"data": list(rows)}


@router.get(
    "/{job_id}/adapter",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/gzip": {}}, "description": "The PEFT adapter as .tar.gz"}},
)
def download_adapter(job_id: str, session: SessionDep, project_id: ProjectDep, services: ServicesDep):
    """The trained adapter: a .tar.gz of the PEFT directory; its sha256 is in `X-Content-SHA256`."""
    job = get_job(session, project_id, job_id)
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job.id))
    if artifact is None:
        raise APIError(
            404,
            "adapter_not_ready",
            f"job {job_id!r} has no adapter (status {job.status}); it has one once succeeded",
        )
    chunks = services.storage.iter_chunks(artifact.storage_key)
    return StreamingResponse(
        chunks,
        media_type="application/gzip",
        headers={
            "Content-Disposition": f'attachment; filename="{job.id}-adapter.tar.gz"',
            "Content-Length": str(artifact.bytes),
            "X-Content-SHA256": artifact.sha256,
        },
    )
