"""Creating a job from its spec and moving it between states on request.

The fine-tuning routes read OpenAI's request into a JobSpec (api/fine_tuning_methods.py); what
is checked here and in api/specs.py is named in the spec's terms, which the routes map back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from api.deps import Services, owned
from api.model_names import deployment_base_models
from api.prompt_lengths import check_prompt_lengths
from api.specs import build_config, validated_spec
from core.config import REWARD_FREE_METHODS
from protocol.errors import APIError
from service.db import transaction
from service.lifecycle import add_event, request_stop, resume_job
from service.limits import JobLimits
from service.queue import dispatch_job
from service.tables import (
    TERMINAL_STATUSES,
    TRAINING_PURPOSE,
    Dataset,
    Job,
    JobEvent,
    JobStatus,
    new_id,
    utcnow,
)


@dataclass(frozen=True)
class JobSpec:
    """What a job is made of, in our terms: the method, adapter and trainer settings as core's
    config names them (checked there), the datasets by id, the reward as a reward spec."""

    model: str
    method: str
    training_dataset: str
    validation_dataset: str | None = None
    adapter: dict[str, Any] = field(default_factory=dict)
    reward: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int | None = None  # default: a tenth of the steps
    seed: int | None = None  # default: chosen at random and recorded
    suffix: str | None = None
    metadata: dict[str, str] | None = None


def get_job(session: Session, project_id: str, job_id: str) -> Job:
    return owned(session, Job, job_id, project_id)


def job_config(
    session: Session,
    body: JobSpec,
    project_id: str,
    served_judges: frozenset[str],
    limits: JobLimits | None = None,
    services: Services | None = None,
    count_prompts: bool = True,
) -> tuple[dict, Dataset, Dataset | None]:
    """The job's checked trainer config, and its training and held-out files. With `services`,
    the base model is one of the deployment's (built in or registered, trainable, small enough
    for its workers) and, with `count_prompts`, every prompt fits (api/prompt_lengths.py, which
    reads the files); without, a built-in one."""
    # Shared locks: a concurrent delete of these datasets waits for this job (or wins before it).
    train = _locked_dataset(session, project_id, body.training_dataset, "training_dataset")
    heldout = (
        _locked_dataset(session, project_id, body.validation_dataset, "validation_dataset")
        if body.validation_dataset
        else None
    )
    if body.method not in REWARD_FREE_METHODS and body.reward is None:
        raise APIError(422, "invalid_job", f"method {body.method!r} needs a grader", "reward")
    reward = None if body.reward is None else validated_spec(body.reward, "reward").model_dump(mode="json")
    if services is None:
        return build_config(body, reward, train, heldout, served_judges, limits), train, heldout
    settings = services.settings
    models = deployment_base_models(settings)
    config = build_config(
        body, reward, train, heldout, served_judges, limits, models, settings.worker_memory_bytes
    )
    if count_prompts:
        files = [(train, "training_dataset")] + ([(heldout, "validation_dataset")] if heldout else [])
        check_prompt_lengths(services.storage, config, models[body.model], settings.data_dir, files)
    return config, train, heldout


def new_job(
    session: Session,
    body: JobSpec,
    project_id: str,
    served_judges: frozenset[str],
    limits: JobLimits | None = None,
    services: Services | None = None,
) -> Job:
    config, train, heldout = job_config(session, body, project_id, served_judges, limits, services)
    job = Job(
        id=new_id("ftjob"),  # now, not at the flush: the event below names it
        project_id=project_id,
        status=JobStatus.QUEUED,
        model=body.model,
        method=body.method,
        config=config,
        training_dataset_id=train.id,
        validation_dataset_id=heldout.id if heldout else None,
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
    dataset = owned(session, Dataset, dataset_id, project_id, param, with_for_update={"read": True})
    if dataset.purpose != TRAINING_PURPOSE:
        raise APIError(
            422, "invalid_file", f"{dataset_id!r} is a job's {dataset.purpose} file, not training data", param
        )
    return dataset


# What cancel and pause do from each state; a state missing here refuses with 409.
CANCEL = {
    JobStatus.VALIDATING: JobStatus.CANCELLED,
    JobStatus.QUEUED: JobStatus.CANCELLED,
    JobStatus.PAUSED: JobStatus.CANCELLED,
    JobStatus.RUNNING: JobStatus.CANCELLING,
    JobStatus.PAUSING: JobStatus.CANCELLING,
    JobStatus.CANCELLING: JobStatus.CANCELLING,
}
PAUSE = {
    JobStatus.VALIDATING: JobStatus.PAUSED,
    JobStatus.QUEUED: JobStatus.PAUSED,
    JobStatus.RUNNING: JobStatus.PAUSING,
    JobStatus.PAUSING: JobStatus.PAUSING,
    JobStatus.PAUSED: JobStatus.PAUSED,
}


def request_cancel(services: Services, project_id: str, job_id: str) -> None:
    """Cancel at once when queued or paused, at the next step when running; 409 once finished."""
    _request(services, project_id, job_id, CANCEL, "cancel")


def request_pause(services: Services, project_id: str, job_id: str) -> None:
    """Pause at once when queued, at the next step (with a checkpoint) when running."""
    _request(services, project_id, job_id, PAUSE, "pause")


def _request(
    services: Services, project_id: str, job_id: str, transitions: dict[JobStatus, JobStatus], verb: str
) -> None:
    with transaction(services.sessions) as session:
        job = get_job(session, project_id, job_id)
        target = transitions.get(JobStatus(job.status))
        if target is None:
            raise APIError(
                409,
                "job_finished" if job.status in TERMINAL_STATUSES else f"cannot_{verb}",
                f"job {job_id!r} cannot {verb}: it is {job.status}",
                headers={"x-should-retry": "false"},  # the official client retries a 409 unless told
            )
        if target == job.status:
            return  # asked again: nothing changes
        if not request_stop(session, job, target):  # the worker moved it on since it was read
            raise APIError(409, "job_changed", "the job changed state meanwhile; read it and retry")
        add_event(session, job_id, f"{verb} requested: {target}")


def request_resume(services: Services, project_id: str, job_id: str) -> None:
    """A paused job goes back to the queue and continues from its last checkpoint."""
    with transaction(services.sessions) as session:
        job = get_job(session, project_id, job_id)
        if job.status != JobStatus.PAUSED:
            raise APIError(
                409,
                "job_not_paused",
                f"job {job_id!r} is {job.status}; only a paused job resumes",
                headers={"x-should-retry": "false"},
            )
        if not resume_job(session, job):
            raise APIError(409, "job_changed", "the job changed state meanwhile; read it and retry")
    dispatch_job(services.celery, services.sessions, job_id)  # after the commit, so the worker finds it
