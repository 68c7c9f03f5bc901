"""Models: the base models jobs can train and serve, and the adapters the caller's jobs produced."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from api.deps import ProjectDep, SessionDep
from api.errors import not_found
from api.model_names import BASE_MODELS, adapter_job, adapter_model
from api.schemas import ModelList, ModelOut
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
    adapters = [adapter_model(job) for job in jobs if job.fine_tuned_model]
    return ModelList(data=[*BASE_MODELS.values(), *adapters])


@router.get("/{model_id:path}", response_model=ModelOut)
def retrieve_model(model_id: str, session: SessionDep, project_id: ProjectDep) -> ModelOut:
    """One model: a base model, or a trained adapter of the caller's project by its `ft:...` name."""
    if model_id in BASE_MODELS:
        return BASE_MODELS[model_id]
    job = adapter_job(session, project_id, model_id)
    if job is None:
        raise not_found("model", model_id)
    return adapter_model(job)
