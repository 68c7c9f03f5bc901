"""Fine-tuning jobs in the shapes the official OpenAI client parses: create, list, retrieve,
cancel, pause, resume, events, checkpoints; and ours on the same job: per-step metrics, the
rollout samples, the adapter download.

A job's `method` is read into ours by api/fine_tuning_methods.py and shown back with "auto"
resolved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import ProjectDep, Services, ServicesDep, SessionDep, owned
from api.errors import error_responses
from api.fine_tuning_methods import OPENAI_TYPES
from api.idempotency import (
    ConcurrentDuplicate,
    IdempotencyKeyHeader,
    IdempotentRequest,
    RetryCountHeader,
    fingerprint,
)
from api.jobs import new_job, request_cancel, request_pause, request_resume
from api.openai_jobs import in_openai_terms, job_spec
from api.openai_metrics import EVENT_PREFIX, estimated_finish, openai_event, prefixed
from api.pagination import openai_page
from api.schemas import (
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointPage,
    FineTuningJobCreate,
    FineTuningJobError,
    FineTuningJobEventPage,
    FineTuningJobPage,
    MetricPage,
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
    checkpoint_model_name,
)

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

# Ours that OpenAI has no name for read as the state they are leaving, until the next step.
_STATUS = {
    JobStatus.VALIDATING: "validating_files",
    JobStatus.CANCELLING: "running",
    JobStatus.PAUSING: "running",
}
_OPENAI_NAME = {ours: theirs for theirs, ours in OPENAI_TYPES.items()}
# Where our job fields live in OpenAI's body, for errors raised by the shared job checks.


def fine_tuning_job(job: Job, session: Session) -> FineTuningJob:
    method = job.fine_tuning_method or _method_of_config(job)
    kind = method["type"]
    hyper = method.get(kind, {}).get("hyperparameters", {})
    return FineTuningJob(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        model=job.model,
        organization_id=job.project_id,
        status=_STATUS.get(JobStatus(job.status), job.status),
        training_file=job.training_dataset_id,
        validation_file=job.validation_dataset_id,
        fine_tuned_model=job.fine_tuned_model,
        trained_tokens=job.trained_tokens,
        result_files=[job.result_file_id] if job.result_file_id else [],
        finished_at=int(job.finished_at.timestamp()) if job.finished_at else None,
        error=FineTuningJobError(**job.error) if job.error and job.status == JobStatus.FAILED else None,
        seed=job.seed,
        hyperparameters={k: hyper.get(k) for k in ("batch_size", "learning_rate_multiplier", "n_epochs")},
        method=method,
        metadata=job.user_metadata,
        user_provided_suffix=job.suffix,
        estimated_finish=_estimated_finish(session, job),
        step=job.step,
        last_reward=_last_reward(session, job),
        total_steps=job.total_steps,
        attempt=job.attempt,
    )


RECENT_STEPS = 10  # the steps a running job's pace is read from: recent enough to follow a change


def _estimated_finish(session: Session, job: Job) -> int | None:
    if job.status != JobStatus.RUNNING or job.started_at is None:
        return None
    recent = session.execute(
        select(JobMetric.step, JobMetric.created_at)
        # This attempt's steps only: a pause or a crash between attempts is no part of the pace.
        .where(JobMetric.job_id == job.id, JobMetric.kind == "train", JobMetric.created_at >= job.started_at)
        .order_by(JobMetric.step.desc())
        .limit(RECENT_STEPS)
    ).all()
    return estimated_finish([(step, at.timestamp()) for step, at in reversed(recent)], job.total_steps)


def _last_reward(session: Session, job: Job) -> float | None:
    if not job.step:
        return None
    values = session.scalar(
        select(JobMetric.values)
        .where(JobMetric.job_id == job.id, JobMetric.kind == "train")
        .order_by(JobMetric.step.desc())
        .limit(1)
    )
    reward = (values or {}).get("reward_mean")
    return float(reward) if isinstance(reward, int | float) else None


def _method_of_config(job: Job) -> dict[str, Any]:
    """The method of a job that did not record OpenAI's (one made before it did), in OpenAI's layout."""
    kind = _OPENAI_NAME.get(job.method, job.method)
    body: dict[str, Any] = {"hyperparameters": dict(job.config["training"]), "adapter": job.config["adapter"]}
    if job.config.get("reward"):
        body["grader"] = job.config["reward"]
    return {"type": kind, kind: body}


@router.post("", response_model=FineTuningJob, responses=error_responses(400, 404))
def create_fine_tuning_job(
    body: FineTuningJobCreate,
    project_id: ProjectDep,
    services: ServicesDep,
    idempotency_key: IdempotencyKeyHeader = None,
    retry_count: RetryCountHeader = None,
) -> FineTuningJob | JSONResponse:
    """Validate and queue a job: the files, the method and its grader are checked before it is queued.

    A retry (an `Idempotency-Key` seen before, or the official client's retry of a create) gets the
    first job, not a twin."""
    request = IdempotentRequest(
        project_id,
        "create_fine_tuning_job",
        idempotency_key,
        fingerprint(body.model_dump(mode="json")),
        retry_count,
    )
    try:
        job, out = _create_fine_tuning_job(body, project_id, services, request)
    except ConcurrentDuplicate:
        with services.sessions() as session:
            return request.replay(session)
    if job is not None:
        dispatch_job(services.celery, services.sessions, job.id)  # after the commit: the worker finds it
    return out


def _create_fine_tuning_job(
    body: FineTuningJobCreate, project_id: str, services: Services, request: IdempotentRequest
) -> tuple[Job | None, FineTuningJob | JSONResponse]:
    if body.integrations:
        raise APIError(
            400, "unsupported_parameter", "integrations (wandb) are not supported here", "integrations"
        )
    with transaction(services.sessions) as session:
        if first := request.replay(session):
            return None, first
        resolved, ours = job_spec(session, body, project_id)
        try:
            judges = frozenset(services.judge.endpoints)
            job = new_job(session, ours, project_id, judges, services.settings.job_limits, services)
        except APIError as exc:
            raise in_openai_terms(exc, resolved.echo["type"]) from exc
        job.fine_tuning_method = resolved.echo
        session.flush()
        out = fine_tuning_job(job, session)
        request.remember(session, 200, out.model_dump(mode="json"))
    return job, out


@router.get("", response_model=FineTuningJobPage, responses=error_responses(400))
def list_fine_tuning_jobs(
    request: Request,
    session: SessionDep,
    project_id: ProjectDep,
    after: Annotated[str | None, Query(description="The last id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict:
    """Newest first; `metadata[key]=value` keeps the jobs whose metadata has that pair."""
    query = select(Job).where(Job.project_id == project_id)
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            query = query.where(Job.user_metadata[name[len("metadata[") : -1]].as_string() == value)
    page = openai_page(session, query, Job, after, limit)
    page["data"] = [fine_tuning_job(j, session) for j in page["data"]]
    return page


@router.get("/{fine_tuning_job_id}", response_model=FineTuningJob)
def retrieve_fine_tuning_job(
    fine_tuning_job_id: str, session: SessionDep, project_id: ProjectDep
) -> FineTuningJob:
    return fine_tuning_job(owned(session, Job, fine_tuning_job_id, project_id), session)


@router.post("/{fine_tuning_job_id}/cancel", response_model=FineTuningJob, responses=error_responses(409))
def cancel_fine_tuning_job(
    fine_tuning_job_id: str, project_id: ProjectDep, services: ServicesDep
) -> FineTuningJob:
    """Queued: cancelled at once; running: stops at its next step (it reads `running` until then)."""
    return _after(request_cancel, services, project_id, fine_tuning_job_id)


@router.post("/{fine_tuning_job_id}/pause", response_model=FineTuningJob, responses=error_responses(409))
def pause_fine_tuning_job(
    fine_tuning_job_id: str, project_id: ProjectDep, services: ServicesDep
) -> FineTuningJob:
    """Queued: paused at once; running: checkpoints at its next step and stops (`running` until then)."""
    return _after(request_pause, services, project_id, fine_tuning_job_id)


@router.post("/{fine_tuning_job_id}/resume", response_model=FineTuningJob, responses=error_responses(409))
def resume_fine_tuning_job(
    fine_tuning_job_id: str, project_id: ProjectDep, services: ServicesDep
) -> FineTuningJob:
    """A paused job is queued again and continues from its last checkpoint."""
    return _after(request_resume, services, project_id, fine_tuning_job_id)


def _after(request: Callable[[Services, str, str], None], services: Services, project_id: str, job_id: str):
    """Ask for a state change, then answer with the job as it is now."""
    request(services, project_id, job_id)
    with services.sessions() as session:
        return fine_tuning_job(owned(session, Job, job_id, project_id), session)


# ----- events and checkpoints -------------------------------------------------------------------
# Our rows have integer ids; OpenAI's have prefixed strings. The integer is kept in the string
# (`ftevent-12`), so `after` reads back exactly and pages follow the rows' order, newest first.


def _row_id(prefix: str, value: str | None) -> int | None:
    if value is None:
        return None
    number = value.removeprefix(prefix)
    if number == value or not number.isdigit() or int(number) > MAX_BIGINT:
        raise APIError(400, "invalid_cursor", f"`after` names no item of this list: {value!r}", "after")
    return int(number)


def _newest_first(
    session: Session, query: Any, column: Any, after: int | None, limit: int
) -> tuple[list, bool]:
    if after is not None:
        query = query.where(column < after)
    rows = list(session.scalars(query.order_by(column.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


@router.get(
    "/{fine_tuning_job_id}/events", response_model=FineTuningJobEventPage, responses=error_responses(400)
)
def list_fine_tuning_events(
    fine_tuning_job_id: str,
    session: SessionDep,
    project_id: ProjectDep,
    after: Annotated[
        str | None, Query(pattern=r"^ftevent-\d{1,18}$", description="The last id of the previous page.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict:
    """Newest first, as OpenAI's."""
    owned(session, Job, fine_tuning_job_id, project_id)
    query = select(JobEvent).where(JobEvent.job_id == fine_tuning_job_id)
    rows, has_more = _newest_first(session, query, JobEvent.id, _row_id(EVENT_PREFIX, after), limit)
    return {
        "data": [openai_event(e) for e in rows],
        "has_more": has_more,
    }


@router.get(
    "/{fine_tuning_job_id}/checkpoints",
    response_model=FineTuningJobCheckpointPage,
    responses=error_responses(400),
)
def list_fine_tuning_checkpoints(
    fine_tuning_job_id: str,
    session: SessionDep,
    project_id: ProjectDep,
    after: Annotated[
        str | None, Query(pattern=r"^ftckpt_\d{1,18}$", description="The last id of the previous page.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> dict:
    """Newest first, each with its step's metrics."""
    job = owned(session, Job, fine_tuning_job_id, project_id)
    query = select(Checkpoint).where(Checkpoint.job_id == job.id)
    rows, has_more = _newest_first(session, query, Checkpoint.id, _row_id(CHECKPOINT_PREFIX, after), limit)
    steps = [c.step for c in rows]
    metrics: dict[int, dict[str, float]] = {}
    for row in session.scalars(
        select(JobMetric).where(JobMetric.job_id == job.id, JobMetric.step.in_(steps))
    ):
        values = prefixed(row.values, "train" if row.kind == "train" else "validation")
        metrics.setdefault(row.step, {"step": float(row.step)}).update(values)
    data = [
        FineTuningJobCheckpoint(
            id=f"{CHECKPOINT_PREFIX}{c.id}",
            created_at=int(c.created_at.timestamp()),
            fine_tuned_model_checkpoint=checkpoint_model_name(job, c.step),
            fine_tuning_job_id=job.id,
            step_number=c.step,
            metrics=metrics.get(c.step, {"step": float(c.step)}),
        )
        for c in rows
    ]
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0].id if data else None,
        "last_id": data[-1].id if data else None,
    }


# ----- ours: metrics, samples, the adapter -------------------------------------------------------
# Oldest first, in the order they happened, so a client that follows along reads on from
# `after_step` / `after`.


@router.get("/{fine_tuning_job_id}/metrics", response_model=MetricPage)
def list_fine_tuning_metrics(
    fine_tuning_job_id: str,
    session: SessionDep,
    project_id: ProjectDep,
    kind: Annotated[str | None, Query(pattern="^(train|eval)$")] = None,
    after_step: Annotated[int | None, Query(ge=-1, le=MAX_INT, description="Rows after this step.")] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> dict:
    """Every step's training metrics (`train`) and each held-out evaluation's (`eval`)."""
    owned(session, Job, fine_tuning_job_id, project_id)
    query = select(JobMetric).where(JobMetric.job_id == fine_tuning_job_id)
    if kind is not None:
        query = query.where(JobMetric.kind == kind)
    if after_step is not None:
        query = query.where(JobMetric.step > after_step)
    rows = list(session.scalars(query.order_by(JobMetric.step, JobMetric.kind).limit(limit + 1)))
    data = [
        {"step": r.step, "kind": r.kind, "values": r.values, "created_at": int(r.created_at.timestamp())}
        for r in rows[:limit]
    ]
    return {"data": data, "has_more": len(rows) > limit}


@router.get("/{fine_tuning_job_id}/samples", response_model=SamplePage)
def list_fine_tuning_samples(
    fine_tuning_job_id: str,
    session: SessionDep,
    project_id: ProjectDep,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_BIGINT, description="The last id of the previous page.")
    ] = None,
    step: Annotated[int | None, Query(ge=1, le=MAX_INT, description="Only this step's samples.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict:
    """Rollouts as trained on: prompt, completion (and the demonstration prefix it began with),
    reward, each grader's score, what a grader printed and why it failed, per step."""
    owned(session, Job, fine_tuning_job_id, project_id)
    query = select(JobSample).where(JobSample.job_id == fine_tuning_job_id)
    if step is not None:
        query = query.where(JobSample.step == step)
    if after is not None:
        query = query.where(JobSample.id > after)
    rows = list(session.scalars(query.order_by(JobSample.id).limit(limit + 1)))
    return {
        "data": rows[:limit],
        "has_more": len(rows) > limit,
        "last_id": rows[:limit][-1].id if rows else None,
    }


@router.get(
    "/{fine_tuning_job_id}/adapter",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/gzip": {}}, "description": "The PEFT adapter as .tar.gz"},
        **error_responses(404),
    },
)
def download_fine_tuning_adapter(
    fine_tuning_job_id: str, session: SessionDep, project_id: ProjectDep, services: ServicesDep
):
    """The trained adapter: a .tar.gz of the PEFT directory; its sha256 is in `X-Content-SHA256`."""
    job = owned(session, Job, fine_tuning_job_id, project_id)
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job.id))
    if artifact is None:
        raise APIError(
            404,
            "adapter_not_ready",
            f"job {job.id!r} has no adapter (status {job.status}); it has one once succeeded",
        )
    return StreamingResponse(
        services.storage.iter_chunks(artifact.storage_key),
        media_type="application/gzip",
        headers={
            "Content-Disposition": f'attachment; filename="{job.id}-adapter.tar.gz"',
            "Content-Length": str(artifact.bytes),
            "X-Content-SHA256": artifact.sha256,
        },
    )


CHECKPOINT_PREFIX = "ftckpt_"
MAX_INT, MAX_BIGINT = 2**31 - 1, 2**63 - 1  # the database's integer ranges bound the cursors
