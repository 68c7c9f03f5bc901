"""How long a job should take, before it starts: its steps and evaluations priced at the step and
evaluation times this deployment measured on the same base model and adapter type.

A step's time is taken to grow with the sequences it trains on times their token budget (sampling
dominates an RFT step; a supervised step's tokens are its demonstrations', bounded by the same
budget), so each measured step gives a rate, seconds per sequence-token, and the median rate of
the recent steps prices the new job's. The same for evaluations, per example-token. A model with
no measured step here has no estimate: the answer says so rather than guess.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.config import TrainConfig, parse_config
from service.tables import Job, JobMetric, JobStatus

HISTORY_ROWS = 400  # the most recent measured steps and evaluations read
SUPERVISED, REINFORCEMENT = "supervised", "reinforcement"


@dataclass(frozen=True)
class Measured:
    """One measured step (`kind` supervised or reinforcement) or evaluation (`evaluation`)."""

    kind: str
    seconds: float
    sequences: int
    tokens: int  # the token budget of each sequence


@dataclass(frozen=True)
class Estimate:
    seconds: float | None
    steps: dict[str, int]  # supervised, reinforcement
    evaluations: int
    per_step_seconds: dict[str, float | None]
    evaluation_seconds: float | None
    measured: int  # how many measured steps and evaluations priced it


def step_shape(config: TrainConfig, kind: str) -> tuple[int, int]:
    """(sequences, token budget) of one step of `kind`, or of one evaluation."""
    t = config.training
    if kind == "evaluation":
        return config.eval.max_examples, config.eval.max_completion_tokens or t.max_completion_tokens
    if kind == SUPERVISED:
        return t.sft_examples_per_step or t.prompts_per_step * t.rollouts_per_prompt, t.max_completion_tokens
    return t.prompts_per_step * t.rollouts_per_prompt, t.max_completion_tokens


def estimate(config: TrainConfig, eval_examples: int, history: list[Measured]) -> Estimate:
    """The job's steps and evaluations priced at the median measured rate of each kind."""
    steps = {SUPERVISED: config.sft_steps, REINFORCEMENT: config.training.steps - config.sft_steps}
    every = config.eval.every
    evaluations = 0
    if eval_examples and config.reward is not None:  # before, every `every` steps, and after
        evaluations = 2 + (max(0, (config.training.steps - 1) // every) if every else 0)
    per_step: dict[str, float | None] = {}
    for kind in (SUPERVISED, REINFORCEMENT, "evaluation"):
        rates = [
            m.seconds / (m.sequences * m.tokens) for m in history if m.kind == kind and m.sequences * m.tokens
        ]
        sequences, tokens = step_shape(config, kind)
        if kind == "evaluation":
            sequences = min(sequences, eval_examples)
        per_step[kind] = statistics.median(rates) * sequences * tokens if rates else None
    evaluation_seconds = per_step.pop("evaluation")
    parts = [(n, per_step[kind]) for kind, n in steps.items()] + [(evaluations, evaluation_seconds)]
    known = all(seconds is not None for n, seconds in parts if n)
    return Estimate(
        seconds=sum(n * seconds for n, seconds in parts if n and seconds) if known else None,
        steps=steps,
        evaluations=evaluations,
        per_step_seconds=per_step,
        evaluation_seconds=evaluation_seconds,
        measured=len(history),
    )


def measured_history(session: Session, model: str, adapter_type: str) -> list[Measured]:
    """The recent measured steps and evaluations of jobs on this base model and adapter type."""
    rows = session.execute(
        select(JobMetric.kind, JobMetric.values, Job.id, Job.config)
        .join(Job, Job.id == JobMetric.job_id)
        .where(Job.model == model, Job.status.in_((JobStatus.SUCCEEDED, JobStatus.RUNNING)))
        .order_by(JobMetric.created_at.desc())
        .limit(HISTORY_ROWS)
    ).all()
    configs: dict[str, TrainConfig | None] = {}
    history = []
    for kind, values, job_id, raw in rows:
        if (raw.get("adapter") or {}).get("type") != adapter_type:
            continue
        if job_id not in configs:
            configs[job_id] = _parsed(raw)
        config = configs[job_id]
        if config is None:
            continue
        measured = _measured(kind, values, config)
        if measured is not None:
            history.append(measured)
    return history


def _parsed(raw: dict[str, Any]) -> TrainConfig | None:
    try:
        return parse_config(raw)
    except Exception:  # a config from an older release: its steps are simply not used
        return None


def _measured(kind: str, values: dict[str, Any], config: TrainConfig) -> Measured | None:
    if kind == "eval":
        seconds, examples = values.get("eval_time_s"), values.get("examples")
        if not seconds or not examples:
            return None
        return Measured("evaluation", float(seconds), int(examples), step_shape(config, "evaluation")[1])
    seconds = values.get("step_time_s")
    if not seconds:
        return None
    step_kind = REINFORCEMENT if values.get("phase") == "rft" else SUPERVISED
    sequences, tokens = step_shape(config, step_kind)
    return Measured(step_kind, float(seconds), sequences, tokens)
