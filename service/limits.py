"""The largest job a deployment accepts. Each size a job spec can ask for has a maximum here,
checked when the job is created (api/specs.py), so a job too big for the workers is refused with
the field and the limit instead of failing on every attempt. Set as JSON in the environment:
`PREFIX_RFT_JOB_LIMITS='{"steps": 2000, "max_completion_tokens": 1024}'` (the rest keep these)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class JobLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(10_000, ge=1, description="Training steps (n_epochs is read into steps).")
    prompts_per_step: int = Field(1024, ge=1, description="Prompts per step (batch_size).")
    rollouts_per_prompt: int = Field(64, ge=2, description="Rollouts per prompt.")
    sft_examples_per_step: int = Field(8192, ge=1, description="Demonstrations per supervised step.")
    max_completion_tokens: int = Field(8192, ge=1, description="Completion tokens, training and evaluation.")
    max_prompt_tokens: int = Field(16_384, ge=1, description="Prompt tokens.")
    micro_batch_size: int = Field(1024, ge=1, description="Sequences per forward/backward.")
    generation_batch_size: int = Field(4096, ge=1, description="Sequences per generate call, evaluation too.")
    updates_per_batch: int = Field(32, ge=1, description="Optimizer passes over a rollout batch.")
    psft_minibatches: int = Field(256, ge=1, description="psft's mini-batches per batch.")
    eval_samples: int = Field(100_000, ge=1, description="Held-out examples scored per evaluation.")
    processes: int = Field(
        1, ge=1, description="Training processes (ranks) one job may ask its worker for (training.processes)."
    )
    file_examples: int = Field(
        10_000_000, ge=1, description="Examples in a training or validation file a job may use."
    )

    def exceeded(self, config: dict, examples: dict[str, int]) -> list[tuple[str, int, int]]:
        """(where, value, limit) for each size over its limit: `config` is a job's trainer config
        as JSON, `examples` its files' example counts by where they are named."""
        training, evaluation = config["training"], config["eval"]
        sizes = [
            ("training.steps", training["steps"], self.steps),
            ("training.prompts_per_step", training["prompts_per_step"], self.prompts_per_step),
            ("training.rollouts_per_prompt", training["rollouts_per_prompt"], self.rollouts_per_prompt),
            (
                "training.sft_examples_per_step",
                training.get("sft_examples_per_step"),
                self.sft_examples_per_step,
            ),
            ("training.max_completion_tokens", training["max_completion_tokens"], self.max_completion_tokens),
            ("training.max_prompt_tokens", training["max_prompt_tokens"], self.max_prompt_tokens),
            ("training.micro_batch_size", training["micro_batch_size"], self.micro_batch_size),
            ("training.generation_batch_size", training["generation_batch_size"], self.generation_batch_size),
            ("training.updates_per_batch", training["updates_per_batch"], self.updates_per_batch),
            ("training.psft_minibatches", training["psft_minibatches"], self.psft_minibatches),
            ("training.processes", training.get("processes"), self.processes),
            ("eval.max_examples", evaluation["max_examples"], self.eval_samples),
            ("eval.batch_size", evaluation["batch_size"], self.generation_batch_size),
            (
                "eval.max_completion_tokens",
                evaluation.get("max_completion_tokens"),
                self.max_completion_tokens,
            ),
        ]
        sizes += [(field, count, self.file_examples) for field, count in examples.items()]
        return [(where, value, limit) for where, value, limit in sizes if value is not None and value > limit]
