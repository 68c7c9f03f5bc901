"""Models: the base models jobs can train and serve, and the adapters the caller's jobs produced."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from api.deps import ProjectDep, ServicesDep, SessionDep
from api.errors import not_found
from api.model_names import adapter_job, adapter_model, base_model_out, deployment_base_models
from api.schemas import ModelList, ModelOut
from service.tables import Job, JobStatus

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, project_id: ProjectDep, services: ServicesDep) -> ModelList:
    """The base models (built in and registered), then the project's trained adapters, newest first."""
    jobs = session.scalars(
        select(Job)
        .where(Job.project_id == project_id, Job.status == JobStatus.SUCCEEDED)
        .order_by(Job.id.desc())
    )
    adapters = [adapter_model(job) for job in jobs if job.fine_tuned_model]
    bases = [base_model_out(info) for info in deployment_base_models(services.settings).values()]
    return ModelList(data=[*bases, *adapters])


@router.get("/{model_id:path}", response_model=ModelOut)
def retrieve_model(
    model_id: str, session: SessionDep, project_id: ProjectDep, services: ServicesDep
) -> ModelOut:
    """One model: a base model, or a trained adapter of the caller's project by its `ft:...` name."""
    bases = deployment_base_models(services.settings)
    if model_id in bases:
        return base_model_out(bases[model_id])
    job = adapter_job(session, project_id, model_id)
    if job is None:
        raise not_found("model", model_id)
    return adapter_model(job)
