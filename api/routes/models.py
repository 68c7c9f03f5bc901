"""Models: the base models jobs can train and serve, and the adapters the caller's jobs produced."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import ProjectDep, SessionDep
from api.errors import not_found
from api.schemas import ModelList, ModelOut
from core.base_models import REGISTRY
from service.tables import Job, JobStatus

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, project_id: ProjectDep) -> ModelList:
    """The base models, then the project's trained adapters, newest first."""
    jobs = session.scalars(
        select(Job)
        .where(Job.project_id == project_id, Job.status == JobStatus.SUCCEEDED)
        .order_by(Job.id.desc())
    )
    adapters = [_adapter(job) for job in jobs if job.fine_tuned_model]
    return ModelList(data=[*BASE_MODELS.values(), *adapters])


@router.get("/{model_id:path}", response_model=ModelOut)
def retrieve_model(model_id: str, session: SessionDep, project_id: ProjectDep) -> ModelOut:
    """One model: a base model, or a trained adapter of the caller's project by its `ft:...` name."""
    if model_id in BASE_MODELS:
        return BASE_MODELS[model_id]
    job = adapter_job(session, project_id, model_id)
    if job is None:
        raise not_found("model", model_id)
    return _adapter(job)


def adapter_job(session: Session, project_id: str, name: str) -> Job | None:
    """The project's succeeded job whose adapter is called `name` (`ft:<base>:<suffix>:<job id>`)."""
    job = session.get(Job, name.rsplit(":", 1)[-1]) if name.startswith("ft:") else None
    ok = job is not None and job.project_id == project_id and job.status == JobStatus.SUCCEEDED
    return job if ok and job.fine_tuned_model == name else None


BASE_MODELS = {
    info.name: ModelOut(id=info.name, created=0, owned_by="prefix-rft", description=info.description)
    for info in REGISTRY
}


def _adapter(job: Job) -> ModelOut:
    return ModelOut(
        id=job.fine_tuned_model,
        created=int(job.finished_at.timestamp()) if job.finished_at else 0,
        owned_by=job.project_id,
        base_model=job.model,
        job_id=job.id,
    )
