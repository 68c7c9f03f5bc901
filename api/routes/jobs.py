"""Fine-tuning jobs: create, read, list, cancel, and what a running job reports."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.deps import CursorQuery, LimitQuery, ProjectDep, Services, ServicesDep, SessionDep, owned
from api.errors import error_responses
from api.idempotency import ConcurrentDuplicate, IdempotencyKeyHeader, IdempotentRequest, fingerprint
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
from api.specs import build_config, validated_spec
from core.config import REWARD_FREE_METHODS
from protocol.errors import APIError
from service.db import transaction
from service.queue import dispatch_job
from service.tables import (
    Artifact,
    Checkpoint,
    Dataset,
    Job,
    JobEvent,
    JobMetric,
    JobSample,
    JobStatus,
    RewardSpecRecord,
    new_id,
    utcnow,
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
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def get_job(session: Session, project_id: str, job_id: str) -> Job:
    return owned(session, Job, job_id, project_id)


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


def new_job(
    session: Session, body: JobCreate, project_id: str, served_judges: frozenset[str], id_prefix: str = "job"
) -> Job:
    # Shared locks: a concurrent delete of these datasets waits for this job (or wins before it).
    train = _locked_dataset(session, project_id, body.training_dataset, "training_dataset")
    heldout = (
        _locked_dataset(session, project_id, body.validation_dataset, "validation_dataset")
        if body.validation_dataset
        else None
    )
    if body.method not in REWARD_FREE_METHODS and body.reward_id is None and body.reward is None:
        raise APIError(
            422,
            "invalid_job",
            f"method {body.method!r} needs a reward: give reward_id or reward",
            "reward",
        )
    if body.reward_id and body.reward:
        raise APIError(422, "invalid_job", "give either reward_id or an inline reward, not both", "reward")
    reward = body.reward
    if body.reward_id:
        reward = owned(session, RewardSpecRecord, body.reward_id, project_id, "reward_id").spec
    elif reward is not None:
        reward = validated_spec(reward, "reward").model_dump(mode="json")
    config = build_config(body, reward, train, heldout, served_judges)
    job = Job(
        id=new_id(id_prefix),
        project_id=project_id,
        status=JobStatus.QUEUED,
        model=body.model,
        method=body.method,
        config=config,
        training_dataset_id=train.id,
        validation_dataset_id=heldout.id if heldout else None,
        reward_spec_id=body.reward_id,
        suffix=body.suffix,
        user_metadata=body.metadata,
        seed=config["seed"],
        total_steps=config["training"]["steps"],
        dispatched_at=utcnow(),
    )
    session.add(job)
    session.add(JobEvent(job_id=job.id, level="info", message=f"job created: {body.method} on {body.model}"))
    session.flush()  # defaults (created_at, ...) for the response
    return job


def _locked_dataset(session: Session, project_id: str, dataset_id: str, param: str) -> Dataset:
    return owned(session, Dataset, dataset_id, project_id, param, with_for_update={"read": True})


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


def request_cancel(services: Services, project_id: str, job_id: str) -> None:
    """Cancel at once when queued, at the next step when running; 409 once it has finished."""
    with transaction(services.sessions) as session:
        job = get_job(session, project_id, job_id)
        transitions = {
            JobStatus.VALIDATING: JobStatus.CANCELLED,
            JobStatus.QUEUED: JobStatus.CANCELLED,
            JobStatus.RUNNING: JobStatus.CANCELLING,
        }
        target = transitions.get(JobStatus(job.status))
        if target is None and job.status != JobStatus.CANCELLING:
            raise APIError(
                409,
                "job_finished",
                f"job {job_id!r} has already finished ({job.status})",
                headers={"x-should-retry": "false"},  # the official client retries a 409 unless told
            )
        if target is not None:
            values: dict[str, Any] = {"status": target}
            if target == JobStatus.CANCELLED:
                values["finished_at"] = utcnow()
            # Conditional: the worker may have moved the job on since it was read.
            moved = session.execute(
                update(Job).where(Job.id == job_id, Job.status == job.status).values(**values)
            ).rowcount
            if not moved:
                raise APIError(409, "job_changed", "the job changed state meanwhile; read it and retry")
            session.add(JobEvent(job_id=job_id, level="info", message=f"cancel requested: {target}"))


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
