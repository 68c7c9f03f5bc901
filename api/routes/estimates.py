"""Estimating a job before it is made: POST /v1/fine_tuning/estimates (ours).

The body is create's, checked the same way; the answer prices the job's steps and evaluations at
the times this deployment measured on the same base model and adapter type (service/duration.py).
"""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import ProjectDep, ServicesDep
from api.errors import error_responses
from api.jobs import job_config
from api.openai_jobs import in_openai_terms, job_spec
from api.schemas import FineTuningJobCreate, FineTuningJobEstimate
from api.specs import default_eval_size
from core.config import parse_config
from protocol.errors import APIError
from service.db import transaction
from service.duration import estimate, measured_history

router = APIRouter(prefix="/v1/fine_tuning/estimates", tags=["fine-tuning"])


@router.post("", response_model=FineTuningJobEstimate, responses=error_responses(400, 404))
def estimate_fine_tuning_job(
    body: FineTuningJobCreate, project_id: ProjectDep, services: ServicesDep
) -> FineTuningJobEstimate:
    """How long the job would take here, before it is made: the request is checked as create
    checks it, then priced at the step and evaluation times this deployment measured on the same
    base model and adapter type (service/duration.py). Null where nothing was measured yet.
    The prompts are not counted here (create does): a form asks this on every change, and
    counting reads the whole files."""
    with transaction(services.sessions) as session:
        resolved, ours = job_spec(session, body, project_id)
        try:
            judges = frozenset(services.judge.endpoints)
            raw, train, heldout = job_config(
                session, ours, project_id, judges, services.settings.job_limits, services, count_prompts=False
            )
        except APIError as exc:
            raise in_openai_terms(exc, resolved.echo["type"]) from exc
        config = parse_config(raw)
        eval_examples = heldout.examples if heldout else default_eval_size(train.examples)
        priced = estimate(config, eval_examples, measured_history(session, config.model, config.adapter.type))
    return FineTuningJobEstimate(
        model=body.model,
        method=resolved.echo,
        estimated_seconds=round(priced.seconds, 1) if priced.seconds is not None else None,
        steps=config.training.steps,
        supervised_steps=priced.steps["supervised"],
        reinforcement_steps=priced.steps["reinforcement"],
        evaluations=priced.evaluations,
        seconds_per_step=priced.per_step_seconds,
        seconds_per_evaluation=priced.evaluation_seconds,
        measured=priced.measured,
    )
