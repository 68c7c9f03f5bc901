"""OpenAI's `method` of a fine-tuning job, read into our method and training settings.

    {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}}            -> sft
    {"type": "reinforcement", "reinforcement": {"grader": {...}, "hyperparameters": {...}}} -> rft
    {"type": "prefix_rft", "prefix_rft": {"grader": {...}, "hyperparameters": {...}}}       -> prefix_rft

Our methods are extension types with OpenAI's layout (`sft_then_rft`, `psft`, `psft_then_rft`
too); `adapter` sits beside `hyperparameters`. OpenAI's hyperparameters map onto ours, `"auto"`
is resolved here, and the resolved values are what the job echoes back:

- `batch_size`: prompts per step (supervised: demonstrations per step); auto: our default.
- `n_epochs`: steps = ceil(n_epochs x training examples / batch_size); auto: 3 supervised, 1 otherwise.
- `learning_rate_multiplier`: times the adapter's default learning rate; auto: 1.
- `compute_multiplier`: times the rollouts per prompt (at least 2); auto: 1.
- `eval_interval`: evaluate every K steps; auto: a tenth of the steps.
- `eval_samples`: held-out examples per evaluation; auto: our default.
- `reasoning_effort`: accepted and echoed; our models do not reason separately.

Any of our training settings (`steps`, `rollouts_per_prompt`, `sft_steps`, ...) may be given in
`hyperparameters` as well, and `checkpoint_every` (default: a tenth of the steps); `steps` and `n_epochs` together are refused. Pure functions: the API
checks the result with the trainer's own config models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from core.config import AdapterConfig, EvalConfig, TrainingConfig
from protocol.errors import APIError

OPENAI_TYPES = {"supervised": "sft", "reinforcement": "rft"}
OUR_TYPES = ("prefix_rft", "sft_then_rft", "psft", "psft_then_rft")
SUPERVISED = ("sft", "psft")
SUPPORTED = (*OPENAI_TYPES, *OUR_TYPES)
OPENAI_HYPERPARAMETERS = (
    "batch_size",
    "n_epochs",
    "learning_rate_multiplier",
    "compute_multiplier",
    "eval_interval",
    "eval_samples",
    "reasoning_effort",
)
OUR_HYPERPARAMETERS = ("checkpoint_every",)  # ours that are not the trainer's training settings
AUTO_EPOCHS = {"supervised": 3, "reinforcement": 1}
_TRAINING_FIELDS = set(TrainingConfig.model_fields)


@dataclass
class ResolvedMethod:
    method: str  # ours: sft, rft, prefix_rft, ...
    training: dict[str, Any]  # TrainingConfig fields
    evaluation: dict[str, Any]  # EvalConfig fields
    adapter: dict[str, Any]
    grader: dict[str, Any] | None
    checkpoint_every: int | None = None
    echo: dict[str, Any] = field(default_factory=dict)  # the method as the job shows it, auto resolved


def resolve_method(
    method: dict[str, Any] | None, legacy_hyperparameters: dict[str, Any] | None, training_examples: int
) -> ResolvedMethod:
    """Our method and settings for OpenAI's `method` (or the deprecated top-level `hyperparameters`,
    which mean supervised's); APIError 400 naming the field for anything it cannot use."""
    if method is None:
        method = {"type": "supervised", "supervised": {"hyperparameters": legacy_hyperparameters or {}}}
    elif legacy_hyperparameters:
        raise _bad("give hyperparameters inside method, not also at the top level", "hyperparameters")
    kind = method.get("type")
    if kind == "dpo":
        raise APIError(
            400,
            "unsupported_method",
            f"method type 'dpo' is not supported here; supported: {', '.join(SUPPORTED)}",
            "method.type",
            headers={"x-should-retry": "false"},
        )
    if kind not in SUPPORTED:
        raise _bad(f"unknown method type {kind!r}; supported: {', '.join(SUPPORTED)}", "method.type")
    body = method.get(kind) or {}
    if not isinstance(body, dict):
        raise _bad(f"method.{kind} must be an object", f"method.{kind}")
    unknown = sorted(set(body) - {"hyperparameters", "grader", "adapter", "response_format"})
    if unknown:
        raise _bad(f"unknown fields {', '.join(unknown)}", f"method.{kind}.{unknown[0]}")
    ours = OPENAI_TYPES.get(kind, kind)
    grader = body.get("grader")
    if ours in SUPERVISED and grader is not None:
        raise _bad(f"{kind} trains on demonstrations only and takes no grader", f"method.{kind}.grader")
    if ours not in SUPERVISED and grader is None:
        raise _bad(f"{kind} needs a grader", f"method.{kind}.grader")
    adapter = body.get("adapter") or {}
    hyper = dict(body.get("hyperparameters") or {})
    where = f"method.{kind}.hyperparameters"
    training, evaluation, resolved = _resolve_hyperparameters(
        hyper, ours, kind, adapter, training_examples, where
    )
    checkpoint_every = _number(hyper, "checkpoint_every", where, int, minimum=1)
    echo_body = {**body, "hyperparameters": resolved}
    return ResolvedMethod(
        ours, training, evaluation, adapter, grader, checkpoint_every, {"type": kind, kind: echo_body}
    )


def _resolve_hyperparameters(
    hyper: dict[str, Any], ours: str, kind: str, adapter: dict[str, Any], examples: int, where: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    unknown = sorted(set(hyper) - {*OPENAI_HYPERPARAMETERS, *OUR_HYPERPARAMETERS, *_TRAINING_FIELDS})
    if unknown:
        raise _bad(f"unknown hyperparameter {unknown[0]!r}", f"{where}.{unknown[0]}")
    if "steps" in hyper and hyper.get("n_epochs", "auto") != "auto":
        raise _bad("give steps or n_epochs, not both", f"{where}.n_epochs")
    training = {k: _training_setting(k, v, where) for k, v in hyper.items() if k in _TRAINING_FIELDS}
    training = {k: v for k, v in training.items() if v is not None}  # null: the setting's default
    defaults = TrainingConfig.model_fields
    supervised = ours in SUPERVISED

    batch = _number(hyper, "batch_size", where, int, minimum=1)
    if batch is None:
        batch = training.get("sft_examples_per_step" if supervised else "prompts_per_step") or (
            defaults["prompts_per_step"].default * defaults["rollouts_per_prompt"].default
            if supervised
            else defaults["prompts_per_step"].default
        )
    if supervised:
        training.setdefault("sft_examples_per_step", batch)
    else:
        training.setdefault("prompts_per_step", batch)

    epochs = _number(hyper, "n_epochs", where, int, minimum=1)
    if "steps" in training:
        steps = training["steps"]
        epochs_shown: Any = steps * batch / max(1, examples)
    else:
        epochs = epochs or AUTO_EPOCHS["supervised" if supervised else "reinforcement"]
        steps = max(1, math.ceil(epochs * examples / batch))
        training["steps"] = steps
        epochs_shown = epochs

    multiplier = _number(hyper, "learning_rate_multiplier", where, float, minimum=0, exclusive=True)
    base_rate = _adapter_learning_rate(adapter, f"{where.rsplit('.', 1)[0]}.adapter")
    if multiplier is not None:
        if "learning_rate" in training:
            raise _bad("give learning_rate or learning_rate_multiplier, not both", f"{where}.learning_rate")
        training["learning_rate"] = multiplier * base_rate
    multiplier = (
        multiplier if multiplier is not None else training.get("learning_rate", base_rate) / base_rate
    )

    compute = _number(hyper, "compute_multiplier", where, float, minimum=0, exclusive=True)
    if compute is not None and not supervised:
        rollouts = training.get("rollouts_per_prompt", defaults["rollouts_per_prompt"].default)
        training["rollouts_per_prompt"] = max(2, round(compute * rollouts))

    interval = _number(hyper, "eval_interval", where, int, minimum=1)
    samples = _number(hyper, "eval_samples", where, int, minimum=1)
    evaluation = {
        "every": interval or max(1, steps // 10),
        "max_examples": samples or EvalConfig.model_fields["max_examples"].default,
    }
    resolved = {
        **{k: v for k, v in hyper.items() if k in _TRAINING_FIELDS or k in OUR_HYPERPARAMETERS},
        "batch_size": batch,
        "n_epochs": epochs_shown,
        "learning_rate_multiplier": multiplier,
    }
    if not supervised:
        resolved["compute_multiplier"] = compute if compute is not None else 1.0
        resolved["eval_interval"] = evaluation["every"]
        resolved["eval_samples"] = evaluation["max_examples"]
        resolved["reasoning_effort"] = hyper.get("reasoning_effort", "default")
    return training, evaluation, resolved


def _training_setting(name: str, value: Any, where: str) -> Any:
    """One of the trainer's settings, checked alone against its type and bounds before any
    arithmetic here uses it (checks across settings are the trainer config's)."""
    field_info = TrainingConfig.model_fields[name]
    try:
        return TypeAdapter(Annotated[field_info.annotation, field_info]).validate_python(value)
    except ValidationError as exc:
        # The code the trainer config's own checks answer with (api/specs.py), for the same mistake.
        message = f"{where}.{name}: {exc.errors()[0]['msg']}"
        raise APIError(400, "invalid_job", message, f"{where}.{name}") from None


def _number(
    hyper: dict[str, Any], name: str, where: str, kind: type, minimum: float, exclusive: bool = False
) -> Any:
    """The value, None for "auto" or absent; APIError for anything else that is not a number in range."""
    value = hyper.get(name, "auto")
    if value == "auto":
        return None
    numeric = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not numeric or (kind is int and not float(value).is_integer()):
        raise _bad(
            f'{name} must be "auto" or a{"n integer" if kind is int else " number"}', f"{where}.{name}"
        )
    if value < minimum or (exclusive and value == minimum):
        raise _bad(f"{name} must be {'over' if exclusive else 'at least'} {minimum:g}", f"{where}.{name}")
    return kind(value)


def _adapter_learning_rate(adapter: dict[str, Any], param: str) -> float:
    try:
        return TypeAdapter(AdapterConfig).validate_python(adapter).learning_rate
    except ValueError as exc:
        raise _bad(f"invalid adapter: {exc}", param) from None


def _bad(message: str, param: str) -> APIError:
    return APIError(400, "invalid_request", message, param)
