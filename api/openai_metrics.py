"""Our training numbers in OpenAI's names: the `data` of a `type: metrics` job event and the
`metrics` of a checkpoint.

A training step's values are ours (`loss`, `reward_mean`, `reward/<grader>`, ...). Every number
is kept under its own name with the split in front (`train_loss`, `valid_accuracy`), and the
keys OpenAI's clients read are added where we have the quantity: `train_mean_reward`,
`full_valid_mean_reward`, `completion_tokens_mean`, `scores`, `timing` (docs/openai-compat.md §2.3).
A running job's `estimated_finish` comes from when its recent steps ended, and each event is
shown as OpenAI's `fine_tuning.job.event`.
"""

from __future__ import annotations

from typing import Any

from api.schemas import FineTuningJobEvent
from service.tables import JobEvent

PREFIX = {"train": "train_", "validation": "valid_"}


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def prefixed(values: dict[str, Any], split: str) -> dict[str, float]:
    """Every number of one split under `train_<name>` / `valid_<name>` (`step` is not a metric)."""
    prefix = PREFIX[split]
    return {f"{prefix}{k}": float(v) for k, v in values.items() if is_number(v) and k != "step"}


def event_data(data: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's layout for one of our metrics events (`split`, `total_steps` and the values)."""
    split = data.get("split", "train")
    values = {k: v for k, v in data.items() if k not in ("split", "total_steps")}
    short = "train" if split == "train" else "valid"
    out: dict[str, Any] = {"step": values.get("step"), "total_steps": data.get("total_steps")}
    out |= prefixed(values, split)
    graders = [
        {"name": k.removeprefix("reward/"), f"{short}_reward_mean": float(v)}
        for k, v in values.items()
        if k.startswith("reward/") and is_number(v)
    ]
    if is_number(values.get("reward_mean")):
        mean = float(values["reward_mean"])
        out["train_mean_reward" if split == "train" else "full_valid_mean_reward"] = mean
        out["scores"] = {f"{short}_reward_mean": mean, "graders": graders}
    if is_number(values.get("response_length")):
        out["completion_tokens_mean"] = float(values["response_length"])
    timing = {
        theirs: float(values[ours])
        for ours, theirs in (
            ("rollout_time_s", "sampling"),
            ("eval_time_s", "eval"),
            ("step_time_s", "full_iteration"),
        )
        if is_number(values.get(ours))
    }
    if timing:
        out["timing"] = {"step": timing}
    return out


def event_message(data: dict[str, Any]) -> str:
    """As OpenAI words it: "Step 3/20: training loss=0.41, train mean reward=0.50"."""
    split = data.get("split", "train")
    names = (
        (("loss", "training loss"), ("reward_mean", "train mean reward"), ("accuracy", "train accuracy"))
        if split == "train"
        else (("reward_mean", "full validation mean reward"), ("accuracy", "full validation accuracy"))
    )
    shown = [f"{label}={float(data[key]):.2f}" for key, label in names if is_number(data.get(key))]
    return f"Step {data.get('step')}/{data.get('total_steps')}: " + ", ".join(shown)


def estimated_finish(steps_ended_at: list[tuple[int, float]], total_steps: int) -> int | None:
    """When a running job should end (unix seconds): the wall time per step between the first and
    last of its recent steps (`(step, ended at)`, oldest first; evaluations and checkpoints
    included), carried on from the last over the steps left. None until two steps have ended."""
    if len(steps_ended_at) < 2:
        return None
    (first_step, first_at), (last_step, last_at) = steps_ended_at[0], steps_ended_at[-1]
    if last_step <= first_step:
        return None
    per_step = (last_at - first_at) / (last_step - first_step)
    return round(last_at + per_step * max(0, total_steps - last_step))


EVENT_PREFIX = "ftevent-"  # our integer event id inside OpenAI's string id: `ftevent-12`
_LEVELS = {"info": "info", "warning": "warn", "error": "error"}


def openai_event(event: JobEvent) -> FineTuningJobEvent:
    """A job's event as OpenAI's fine_tuning.job.event; a metrics event in OpenAI's names."""
    metrics = event.type == "metrics" and event.data is not None
    return FineTuningJobEvent(
        id=f"{EVENT_PREFIX}{event.id}",
        created_at=int(event.created_at.timestamp()),
        level=_LEVELS.get(event.level, "info"),
        message=event_message(event.data) if metrics else event.message,
        type="metrics" if metrics else "message",
        data=event_data(event.data) if metrics else event.data,
    )
