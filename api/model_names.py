"""What a request's `model` names: a base model, or a trained adapter (or a checkpoint of one) of the
caller's project."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.schemas import ModelOut
from core.base_models import BaseModelInfo, base_models
from service.settings import Settings
from service.tables import CHECKPOINT_MARK, Checkpoint, Job, JobStatus, fine_tuned_model_name


def deployment_base_models(settings: Settings) -> dict[str, BaseModelInfo]:
    """The base models of this deployment: the built-in ones, those `prefix-rft models add`
    recorded in its data directory, and PREFIX_RFT_BASE_MODELS; read on each call (a small file),
    so a model registered while the API runs is seen."""
    return base_models(settings.data_dir, settings.base_models)


def base_model_out(info: BaseModelInfo) -> ModelOut:
    """A base model as /v1/models lists it."""
    return ModelOut(
        id=info.name,
        created=0,
        owned_by="prefix-rft",
        description=info.description,
        architecture=info.architecture,
        parameters=info.parameters,
        context_length=info.context_length,
        chat_template=info.chat_template,
    )


def adapter_job(session: Session, project_id: str, name: str) -> Job | None:
    """The project's succeeded job whose adapter is called `name` (`ft:<base>:<suffix>:<job id>`)."""
    job = session.get(Job, name.rsplit(":", 1)[-1]) if name.startswith("ft:") else None
    ok = job is not None and job.project_id == project_id and job.status == JobStatus.SUCCEEDED
    return job if ok and job.fine_tuned_model == name else None


def checkpoint_of(session: Session, project_id: str, name: str) -> tuple[Job, Checkpoint] | None:
    """The project's job checkpoint called `name` (`<the job's model name>:ckpt-step-<n>`), while
    it is kept and servable; the job may still be running."""
    model, mark, step = name.rpartition(CHECKPOINT_MARK)
    if not mark or not step.isdigit() or not model.startswith("ft:") or len(step) > 9:
        return None
    job = session.get(Job, model.rsplit(":", 1)[-1])
    if job is None or job.project_id != project_id or fine_tuned_model_name(job) != model:
        return None
    checkpoint = session.scalar(
        select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == int(step))
    )
    return (job, checkpoint) if checkpoint is not None and checkpoint.sha256 else None


def adapter_model(job: Job) -> ModelOut:
    """The model a succeeded job trained, as /v1/models lists it."""
    return ModelOut(
        id=job.fine_tuned_model,
        created=int(job.finished_at.timestamp()) if job.finished_at else 0,
        owned_by=job.project_id,
        base_model=job.model,
        job_id=job.id,
    )
