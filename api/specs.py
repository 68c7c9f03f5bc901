"""The trainer's specs in a request: reward specs and job configs validated with core's models,
with errors whose params point into the request body (`reward.graders.0.type`,
`hyperparameters.steps`), not into the trainer's config."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from core.base_models import BUILT_IN, BaseModelInfo, too_big_reason, untrainable_reason
from core.config import ConfigError, parse_config, parse_reward_spec
from core.rewards import RewardSpec
from protocol.errors import APIError, joined
from service.limits import JobLimits
from service.tables import Dataset

if TYPE_CHECKING:  # api.jobs builds on this module
    from api.jobs import JobSpec

# Where a config field lives in the request body, for error messages that point at the request.
_BODY_PARAMS = {"training": "hyperparameters", "eval": "evaluation", "checkpoint.every": "checkpoint_every"}


def validated_spec(raw: dict[str, Any], prefix: str | None = None) -> RewardSpec:
    """A RewardSpec, or a 422 whose params point into the request (`reward.graders.0.type`)."""
    try:
        return parse_reward_spec(raw)
    except ConfigError as exc:
        details = [
            {"param": ".".join(x for x in (prefix, p.param or "graders") if x) or None, "message": p.message}
            for p in exc.details
        ]
        raise APIError(422, "invalid_reward", joined(details), details[0]["param"], details) from exc


def default_eval_size(examples: int) -> int:
    """Held-out examples carved from the training data when no validation dataset is given."""
    return min(100, examples // 5) if examples >= 10 else 0


def _body_param(config_param: str) -> str:
    for prefix, body_name in _BODY_PARAMS.items():
        if config_param == prefix or config_param.startswith(prefix + "."):
            return body_name + config_param[len(prefix) :]
    return config_param


def _body_detail(config_param: str | None, message: str) -> dict[str, str | None]:
    """A trainer-config problem in the request's terms. Cross-field checks have no location of
    their own; the first field their message names stands for it."""
    named = re.findall(r"\b(?:training|eval)\.[a-z_]+", message)
    for name in named:
        message = message.replace(name, _body_param(name))
    if config_param is None and named:
        config_param = named[0]
    return {"param": _body_param(config_param) if config_param else None, "message": message}


def _check_limits(config: dict, train: Dataset, heldout: Dataset | None, limits: JobLimits) -> None:
    examples = {"training_dataset": train.examples}
    if heldout is not None:
        examples["validation_dataset"] = heldout.examples
    over = limits.exceeded(config, examples)
    if over:
        details = [
            {
                "param": _body_param(where),
                "message": f"{_body_param(where)} is {value}; this deployment accepts at most {limit}",
            }
            for where, value, limit in over
        ]
        raise APIError(422, "over_limit", joined(details), details[0]["param"], details)


def _check_fields(dataset: Dataset, needed: set[str], param: str) -> None:
    for name in sorted(needed):
        have = dataset.field_counts.get(name, 0)
        if have < dataset.examples:
            raise APIError(
                422,
                "dataset_missing_field",
                f"the reward reads field {name!r}, but {dataset.examples - have} of {dataset.examples} "
                f"examples of dataset {dataset.id!r} lack it",
                param,
            )


def check_base_model(
    name: str, models: Mapping[str, BaseModelInfo], worker_memory_bytes: int | None
) -> BaseModelInfo:
    """The job's base model, or a 422 saying why no job can train it here."""
    info = models.get(name)
    if info is None:
        allowed = ", ".join(models)
        raise APIError(422, "unknown_model", f"unknown base model {name!r} (available: {allowed})", "model")
    if reason := untrainable_reason(info):
        raise APIError(422, "unsupported_model", reason, "model")
    if reason := too_big_reason(info, worker_memory_bytes):
        raise APIError(422, "model_too_large", reason, "model")
    return info


def build_config(
    body: JobSpec,
    reward: dict[str, Any] | None,
    train: Dataset,
    heldout: Dataset | None,
    served_judges: frozenset[str] = frozenset(),
    limits: JobLimits | None = None,
    models: Mapping[str, BaseModelInfo] | None = None,
    worker_memory_bytes: int | None = None,
) -> dict:
    """The job's validated trainer config as JSON; data paths are filled in by the worker.
    `served_judges`: the judge models this deployment maps (model graders must name one);
    `limits`: the largest job the deployment accepts (default: service/limits.py's);
    `models`: its base models (default: the built-in ones); `worker_memory_bytes`: what a worker
    trains in (default: not checked)."""
    check_base_model(body.model, BUILT_IN if models is None else models, worker_memory_bytes)
    raw = {
        "model": body.model,
        "method": body.method,
        "adapter": body.adapter,
        "data": {
            "train": "train.jsonl",
            "eval": "eval.jsonl" if heldout else None,
            "eval_size": 0 if heldout else default_eval_size(train.examples),
        },
        "reward": reward,
        "training": body.hyperparameters,
        "eval": body.evaluation,
        "seed": body.seed if body.seed is not None else random.randrange(2**31),
        "output_dir": "run",
    }
    try:
        config = parse_config(raw)
    except ConfigError as exc:
        details = [_body_detail(p.param, p.message) for p in exc.details]
        raise APIError(422, "invalid_job", joined(details), details[0]["param"], details) from exc
    config.checkpoint.every = body.checkpoint_every or max(1, config.training.steps // 10)
    _check_limits(config.model_dump(mode="json"), train, heldout, limits or JobLimits())
    if config.sft_steps and train.with_demonstration == 0:
        raise APIError(
            422,
            "no_demonstrations",
            f"method {body.method!r} trains on demonstrations, but no example of {train.id!r} has one",
            "training_dataset",
        )
    if config.reward is not None:
        unserved = sorted(config.reward.judge_models - served_judges)
        if unserved:
            raise APIError(
                422,
                "judge_model_unavailable",
                f"the reward's model graders name judges this deployment does not serve: {', '.join(unserved)} "
                f"(served: {', '.join(sorted(served_judges)) or 'none'})",
                "reward",
            )
        needed = config.reward.fields_needed()
        _check_fields(train, needed, "training_dataset")
        if heldout:
            _check_fields(heldout, needed, "validation_dataset")
    return config.model_dump(mode="json")
