"""Models: the base models jobs can train, and the adapters the caller's jobs produced."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from api.deps import ProjectDep, SessionDep
from api.schemas import ModelList, ModelOut
from core.base_models import REGISTRY
from service.tables import Job, JobStatus

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, project_id: ProjectDep) -> ModelList:
    base = [
        ModelOut(id=info.name, created=0, owned_by="prefix-rft", description=info.description)
        for info in REGISTRY
    ]
    jobs = session.scalars(
        select(Job)
        .where(Job.project_id == project_id, Job.status == JobStatus.SUCCEEDED)
        .order_by(Job.id.desc())
    )
    adapters = [
        ModelOut(
            id=job.fine_tuned_model,
            created=int(job.finished_at.timestamp()) if job.finished_at else 0,
            owned_by=project_id,
            base_model=job.model,
            job_id=job.id,
        )
        for job in jobs
        if job.fine_tuned_model
    ]
    return ModelList(data=base + adapters)
