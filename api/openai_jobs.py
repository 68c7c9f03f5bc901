"""OpenAI's job request read into our job spec, and our job checks' errors named back in OpenAI's
fields: what creating a job and estimating one share."""

from __future__ import annotations

import re

from sqlalchemy.orm import Session

from api.deps import owned
from api.fine_tuning_methods import ResolvedMethod, resolve_method
from api.jobs import JobSpec
from api.schemas import FineTuningJobCreate
from core.config import ConfigError, parse_grader
from protocol.errors import APIError
from service.tables import Dataset

_PARAMS = {"training_dataset": "training_file", "validation_dataset": "validation_file"}


def job_spec(session: Session, body: FineTuningJobCreate, project_id: str) -> tuple[ResolvedMethod, JobSpec]:
    """OpenAI's request read into our job spec: the method resolved against the training file."""
    train = owned(session, Dataset, body.training_file, project_id, "training_file")
    resolved = resolve_method(body.method, body.hyperparameters, train.examples)
    reward = None
    if resolved.grader is not None:
        try:
            reward = parse_grader(resolved.grader).model_dump(mode="json")
        except ConfigError as exc:
            where = f"method.{resolved.echo['type']}.grader"
            details = [
                {"param": ".".join(x for x in (where, p.param) if x), "message": p.message}
                for p in exc.details
            ]
            raise APIError(
                400, "invalid_grader", details[0]["message"], details[0]["param"], details
            ) from exc
    ours = JobSpec(
        model=body.model,
        method=resolved.method,
        adapter=resolved.adapter,
        training_dataset=body.training_file,
        validation_dataset=body.validation_file,
        reward=reward,
        hyperparameters=resolved.training,
        evaluation=resolved.evaluation,
        checkpoint_every=resolved.checkpoint_every,
        seed=body.seed,
        suffix=body.suffix,
        metadata=body.metadata,
    )
    return resolved, ours


def in_openai_terms(error: APIError, kind: str) -> APIError:
    """A shared job check's error with OpenAI's status (400 for what 422 says) and field names,
    in its param, its details and its messages."""

    def param_of(ours: str | None) -> str | None:
        return _openai_name(ours, kind) if ours else None

    def text_of(message: str) -> str:  # settings named in the text (`hyperparameters.steps is 51`)
        return _SETTING.sub(lambda m: _openai_name(m.group(0), kind), message).replace("dataset", "file")

    details = error.details and [
        {**d, "param": param_of(d.get("param")), "message": text_of(str(d.get("message", "")))}
        for d in error.details
    ]
    status = 400 if error.status == 422 else error.status
    code = error.code.replace("dataset", "file")
    return APIError(status, code, text_of(error.message), param_of(error.param), details, error.headers)


_SETTING = re.compile(r"(?<![\w.])(hyperparameters|evaluation|adapter)\.\w+")  # as in a message
_EVALUATION_NAMES = {"max_examples": "eval_samples", "every": "eval_interval"}


def _openai_name(ours: str, kind: str) -> str:
    """Where OpenAI's request has what our spec calls `ours` (`hyperparameters.steps`)."""
    head, _, rest = ours.partition(".")
    if head in _PARAMS:
        return _PARAMS[head]
    if head == "reward":
        return f"method.{kind}.grader"
    if head not in ("hyperparameters", "evaluation", "adapter"):
        return ours  # named alike in both (model, suffix, seed)
    if head == "evaluation":
        rest = _EVALUATION_NAMES.get(rest, rest)
    section = "adapter" if head == "adapter" else "hyperparameters"
    return f"method.{kind}.{section}" + (f".{rest}" if rest else "")
