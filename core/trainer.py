"""The Prefix-RFT training loop: one class you can read top to bottom.

A step of prefix_rft / rft: sample a group of rollouts per prompt (some continuing a cut of the
demonstration), reward them, compute group advantages, and take one clipped policy-gradient step.
sft trains cross-entropy on demonstrations; sft_then_rft runs the two phases in one job.
Everything outside this file that it uses is either pure math (algorithm.py), token plumbing
(rollout.py) or I/O (adapters, checkpoints, metrics).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.adapters import (
    attach_adapter,
    export_adapter,
    load_trainable_state,
    swapped_adapter_weights,
    trainable_state,
)
from core.algorithm import (
    clipped_policy_loss,
    demo_prefix_length,
    demo_prefix_low,
    entropy_keep_mask,
    group_advantages,
    kl_to_reference,
)
from core.config import TrainConfig
from core.data import DatasetError, DatasetReport, Example, load_dataset, missing_fields, split_heldout
from core.models import load_base_model
from core.rewards import RewardResult, SandboxLimits, SandboxPool, score_completions
from core.rollout import (
    EncodedExample,
    encode_example,
    sample,
    score_responses,
    scoring_batch,
    stop_token_ids,
)

log = logging.getLogger(__name__)


class TrainerCallback:
    """Hooks the CLI and the worker implement; every method is optional."""

    def on_step(self, metrics: dict[str, Any]) -> None: ...
    def on_eval(self, metrics: dict[str, Any]) -> None: ...
    def on_samples(self, step: int, samples: list[dict[str, Any]]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_event(self, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        """Something the job's owner should read (a failing reward grader and its traceback, ...)."""

    def should_stop(self) -> bool:
        return False


class RewardErrorRateExceeded(ValueError):
    """A grader kept failing on too many samples: the reward needs fixing, not the model."""


MAX_REWARD_ERROR_EVENTS = 20  # distinct reward errors reported as events per run; the rest are counted


@dataclass
class RewardErrorWatch:
    """Which reward errors were reported already, and for how many steps each grader failed too often."""

    max_rate: float
    steps: int
    streaks: dict[str, int] = field(default_factory=dict)
    reported: set[tuple[str, str]] = field(default_factory=set)

    def new_errors(self, result: RewardResult) -> list[tuple[str, int, str]]:
        """(grader, samples it failed on, traceback) for each kind of error not reported before."""
        found = []
        for label, failures in result.failures.items():
            for failure in failures:
                key = (label, failure.strip().splitlines()[-1] if failure else "")
                if failure and key not in self.reported and len(self.reported) < MAX_REWARD_ERROR_EVENTS:
                    self.reported.add(key)
                    found.append((label, result.errors[label], failure))
        return found

    def grader_over_limit(self, result: RewardResult, samples: int) -> str | None:
        """Count this step; the first grader whose error rate stayed over the limit long enough."""
        failing = None
        for label in result.per_grader:
            over = result.errors.get(label, 0) / max(samples, 1) > self.max_rate
            self.streaks[label] = self.streaks.get(label, 0) + 1 if over else 0
            if self.streaks[label] >= self.steps and failing is None:
                failing = label
        return failing


@dataclass
class Rollouts:
    """One step's rollouts, row-aligned (row = group * N + k)."""

    examples: list[EncodedExample]
    responses: list[list[int]]
    demo_prefix_lengths: list[int]  # 0 for on-policy rows
    groups: list[int]
    texts: list[str]

    @property
    def row_examples(self) -> list[EncodedExample]:
        return [self.examples[g] for g in self.groups]

    @property
    def prompts(self) -> list[list[int]]:
        return [self.examples[g].prompt_ids for g in self.groups]


@dataclass
class TrainResult:
    steps_done: int
    stopped: bool
    adapter_dir: Path | None
    final_eval: dict[str, Any] | None
    initial_eval: dict[str, Any] | None


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        callbacks: list[TrainerCallback] | None = None,
        sandbox_limits: SandboxLimits | None = None,
    ):
        """`sandbox_limits`: of the processes that run python graders (default: SandboxLimits())."""
        self.config = config
        self.callbacks = callbacks or []
        self.out_dir = Path(config.output_dir)
        self.device = torch.device(
            "cuda"
            if config.training.device == "cuda"
            or (config.training.device == "auto" and torch.cuda.is_available())
            else "cpu"
        )
        dtype_name = config.training.dtype
        if dtype_name == "auto":
            dtype_name = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, dtype_name)

        train, heldout = self._read_data()  # before the model load: bad data fails in a second
        self.sandbox: SandboxPool | None = None
        if config.reward is not None and config.reward.runs_user_code:
            self.sandbox = SandboxPool(sandbox_limits or SandboxLimits())
            log.info("reward sandbox: %s", self.sandbox.check())  # refuses here if it cannot isolate
        self.reward_errors = RewardErrorWatch(
            config.training.max_reward_error_rate, config.training.reward_error_steps
        )
        torch.manual_seed(config.seed)
        base, self.tokenizer = load_base_model(config.model, dtype=self.dtype, device=self.device)
        self.pad_id = self.tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(base, self.tokenizer)
        self.eos_id = (
            self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else min(self.stop_ids)
        )
        self.model = attach_adapter(base, self.tokenizer, config.adapter)
        self.model.eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.learning_rate, weight_decay=config.training.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.reference = trainable_state(self.model) if config.training.kl_beta > 0 else None
        self.train_examples = [self._encode(e) for e in train]
        self.eval_examples = [self._encode(e) for e in heldout]
        self.step = 0

    # ----- data -------------------------------------------------------------------------------

    def _read_data(self) -> tuple[list[Example], list[Example]]:
        """Training and held-out examples, checked against what the method and reward need."""
        data = self.config.data
        train = load_dataset(data.train)
        if data.eval is not None:
            heldout = load_dataset(data.eval)
        else:
            train, heldout = split_heldout(train, data.eval_size, data.split_seed)
        if self.config.reward is not None:
            needed = self.config.reward.fields_needed()
            for source, examples in (("train", train), ("eval", heldout)):
                problems = missing_fields(examples, needed)
                if problems:
                    raise DatasetError(
                        f"{source} data", DatasetReport(errors=problems[:100], error_count=len(problems))
                    )
        if self.config.sft_steps and not any(e.demonstration for e in train):
            raise ValueError(
                f"method {self.config.method!r} trains on demonstrations, but no example has one"
            )
        return train, heldout

    def _encode(self, example: Example) -> EncodedExample:
        encoded = encode_example(self.tokenizer, example, self.eos_id)
        limit = self.config.training.max_prompt_tokens
        if len(encoded.prompt_ids) > limit:
            raise ValueError(
                f"line {example.line}: prompt is {len(encoded.prompt_ids)} tokens, over training.max_prompt_tokens={limit}"
            )
        return encoded

    def _batch_at(self, step: int, pool: list[EncodedExample], size: int, salt: int) -> list[EncodedExample]:
        """The examples of `step`: a seeded shuffle per epoch, so any step is found without replay."""
        batch = []
        for i in range(step * size, (step + 1) * size):
            epoch, index = divmod(i, len(pool))
            batch.append(pool[_epoch_order(f"{self.config.seed}-{salt}-{epoch}", len(pool))[index]])
        return batch

    # ----- schedule ---------------------------------------------------------------------------

    def _lr_factor(self, step: int) -> float:
        t = self.config.training
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        span = max(1, t.steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        if t.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if t.lr_scheduler == "linear":
            return 1.0 - progress
        return 1.0

    def demo_prefix_window(self, step: int) -> tuple[float, float]:
        """(low, high) of the demonstration-prefix ratio at an RFT step (counted from the RFT phase)."""
        t = self.config.training
        rft_step = step - self.config.sft_steps
        decay = t.demo_prefix_decay_steps or max(1, t.steps - self.config.sft_steps)
        return demo_prefix_low(
            rft_step, decay, t.demo_prefix_low_start, t.demo_prefix_low_end
        ), t.demo_prefix_high

    # ----- the loop ---------------------------------------------------------------------------

    def train(self, resume_from: Path | None = None) -> TrainResult:
        try:
            return self._train(resume_from)
        finally:
            if self.sandbox is not None:
                self.sandbox.close()  # started again if the trainer scores more

    def _train(self, resume_from: Path | None) -> TrainResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        initial_eval = None
        if self.step == 0:
            initial_eval = self.evaluate()
        t = self.config.training
        stopped = False
        while self.step < t.steps:
            if any(cb.should_stop() for cb in self.callbacks):
                stopped = True
                break
            metrics = self.sft_step() if self.step < self.config.sft_steps else self.rft_step()
            self.step += 1
            metrics["step"] = self.step
            self._emit_step(metrics)
            if self.config.eval.every and self.step % self.config.eval.every == 0 and self.step < t.steps:
                self.evaluate()
            if self.config.checkpoint.every and self.step % self.config.checkpoint.every == 0:
                self.save_checkpoint()
        if stopped:
            if self.config.checkpoint.every:
                self.save_checkpoint()
            return TrainResult(self.step, True, None, None, initial_eval)
        final_eval = self.evaluate()
        adapter_dir = export_adapter(self.model, self.out_dir / "adapter", self.config.model)
        (self.out_dir / "summary.json").write_text(
            json.dumps({"steps": self.step, "initial_eval": initial_eval, "final_eval": final_eval}, indent=2)
        )
        return TrainResult(self.step, False, adapter_dir, final_eval, initial_eval)

    def rft_step(self) -> dict[str, Any]:
        t = self.config.training
        started = time.perf_counter()
        examples = self._batch_at(self.step, self.train_examples, t.prompts_per_step, salt=1)
        low, high = self.demo_prefix_window(self.step)
        rollouts = self.generate_rollouts(
            examples, low, high, random.Random(f"{self.config.seed}-ratio-{self.step}")
        )
        rollout_time = time.perf_counter() - started
        generated = sum(
            len(r) - p for r, p in zip(rollouts.responses, rollouts.demo_prefix_lengths, strict=True)
        )

        reward = self.score(rollouts.texts, rollouts.row_examples)
        self._check_reward_errors(reward)
        rewards = torch.tensor(reward.totals, dtype=torch.float32)
        is_hybrid = torch.tensor([n > 0 for n in rollouts.demo_prefix_lengths])
        n = t.rollouts_per_prompt
        advantages = torch.cat(
            [
                group_advantages(rewards[g * n : (g + 1) * n], is_hybrid[g * n : (g + 1) * n], t.advantage)
                for g in range(len(examples))
            ]
        )
        update = self.policy_update(rollouts, advantages)

        metrics: dict[str, Any] = {
            "phase": "rft",
            "loss": update["loss"],
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std(unbiased=False).item(),
            "reward_errors": reward.error_count,
            **{f"reward_errors/{label}": reward.errors.get(label, 0) for label in reward.per_grader},
            **{f"reward/{label}": sum(v) / len(v) for label, v in reward.per_grader.items()},
            "demo_prefix_low": low,
            "demo_prefix_high": high,
            "response_length": sum(len(r) for r in rollouts.responses) / len(rollouts.responses),
            "rollout_tokens_per_s": generated / rollout_time if rollout_time > 0 else 0.0,
            "rollout_time_s": rollout_time,
            "step_time_s": time.perf_counter() - started,
            "lr": self.scheduler.get_last_lr()[0],
            **{k: v for k, v in update.items() if k != "loss"},
        }
        if reward.correct is not None:
            metrics["accuracy"] = sum(reward.correct) / len(reward.correct)
        hybrid_ratios = [
            p / len(e.demo_ids)
            for p, e in zip(rollouts.demo_prefix_lengths, rollouts.row_examples, strict=True)
            if p > 0 and e.demo_ids
        ]
        metrics["hybrid_rollouts"] = len(hybrid_ratios)
        if hybrid_ratios:
            metrics["demo_prefix_ratio_mean"] = sum(hybrid_ratios) / len(hybrid_ratios)
        if reward.error_messages:
            metrics["reward_error_messages"] = reward.error_messages
        self._emit_samples(rollouts, reward.totals, reward.per_grader)
        return metrics

    def generate_rollouts(
        self, examples: list[EncodedExample], low: float, high: float, rng: random.Random
    ) -> Rollouts:
        """N rollouts per prompt; the first H of an example with a demonstration are hybrids."""
        t = self.config.training
        hybrids = self.config.hybrid_rollouts_per_prompt
        inputs, budgets, prefix_lengths, groups = [], [], [], []
        for g, example in enumerate(examples):
            demo = example.demo_ids
            for k in range(t.rollouts_per_prompt):
                cut = 0
                if k < hybrids and demo is not None and len(demo) >= 2 and t.max_completion_tokens >= 2:
                    cut = min(
                        demo_prefix_length(rng.uniform(low, high), len(demo)), t.max_completion_tokens - 1
                    )
                inputs.append(example.prompt_ids + (demo[:cut] if cut else []))
                budgets.append(t.max_completion_tokens - cut)
                prefix_lengths.append(cut)
                groups.append(g)
        continuations = self._sample_chunked(inputs, budgets, greedy=False)
        responses = [
            (examples[g].demo_ids[:cut] if cut else []) + cont  # type: ignore[index]
            for g, cut, cont in zip(groups, prefix_lengths, continuations, strict=True)
        ]
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return Rollouts(examples, responses, prefix_lengths, groups, texts)

    def _sample_chunked(self, inputs: list[list[int]], budgets: list[int], greedy: bool) -> list[list[int]]:
        size = self.config.training.generation_batch_size if not greedy else self.config.eval.batch_size
        out: list[list[int]] = []
        for start in range(0, len(inputs), size):
            out += sample(
                self.model,
                inputs[start : start + size],
                budgets[start : start + size],
                self.stop_ids,
                self.pad_id,
                temperature=self.config.training.temperature,
                greedy=greedy,
            )
        return out

    def _micro_batches(self, lengths: list[int], rows: list[int] | None = None) -> list[list[int]]:
        """Row indices in micro-batches of similar response length (less padding to compute)."""
        rows = list(range(len(lengths))) if rows is None else rows
        ordered = sorted(rows, key=lambda i: -lengths[i])
        size = self.config.training.micro_batch_size
        return [ordered[i : i + size] for i in range(0, len(ordered), size)]

    def _token_tensors(self, rollouts: Rollouts, rows: list[int]):
        batch = scoring_batch(
            [rollouts.prompts[i] for i in rows],
            [rollouts.responses[i] for i in rows],
            self.pad_id,
            self.device,
        )
        prefix = torch.tensor([rollouts.demo_prefix_lengths[i] for i in rows], device=self.device)
        demo_prefix_mask = torch.arange(batch.response_width, device=self.device)[None, :] < prefix[:, None]
        return batch, demo_prefix_mask & batch.response_mask

    @torch.inference_mode()
    def _inference_scores(self, rollouts: Rollouts, micro_batches: list[list[int]], with_entropy: bool):
        """Per micro-batch: (log-probs, entropies) under the current weights."""
        results = []
        for mb in micro_batches:
            batch, _ = self._token_tensors(rollouts, mb)
            results.append(score_responses(self.model, batch, self.config.training.temperature, with_entropy))
        return results

    def _demo_prefix_keep(self, rollouts: Rollouts) -> dict[int, torch.Tensor]:
        """Entropy clipping: per hybrid row, which of its demonstration-prefix tokens keep their advantage.

        The top fraction is taken over all demonstration-prefix tokens of the step, so their
        entropies are computed first, in one inference pass over the hybrid rows only.
        """
        prefix_lengths = rollouts.demo_prefix_lengths
        hybrid_rows = [i for i, n in enumerate(prefix_lengths) if n > 0]
        if not hybrid_rows:
            return {}
        micro_batches = self._micro_batches([len(r) for r in rollouts.responses], hybrid_rows)
        scores = self._inference_scores(rollouts, micro_batches, with_entropy=True)
        width = max(prefix_lengths[row] for row in hybrid_rows)
        entropy = torch.zeros(len(hybrid_rows), width, device=self.device)
        prefix_mask = torch.zeros(len(hybrid_rows), width, dtype=torch.bool, device=self.device)
        position = {row: j for j, row in enumerate(hybrid_rows)}
        for mb, (_, mb_entropy) in zip(micro_batches, scores, strict=True):
            for k, row in enumerate(mb):
                n = prefix_lengths[row]
                entropy[position[row], :n] = mb_entropy[k, :n]
                prefix_mask[position[row], :n] = True
        keep = entropy_keep_mask(entropy, prefix_mask, self.config.training.entropy_keep_fraction)
        return {row: keep[position[row], : prefix_lengths[row]] for row in hybrid_rows}

    def policy_update(self, rollouts: Rollouts, advantages: torch.Tensor) -> dict[str, float]:
        """One clipped policy-gradient step over the rollouts (or `updates_per_batch` of them)."""
        t = self.config.training
        rows = len(rollouts.responses)
        keep_by_row = self._demo_prefix_keep(rollouts)
        micro_batches = self._micro_batches([len(r) for r in rollouts.responses])
        # pi_old: with one update per batch it is the current policy, detached in the same forward.
        old = self._inference_scores(rollouts, micro_batches, False) if t.updates_per_batch > 1 else None
        reference = None
        if self.reference is not None:
            with swapped_adapter_weights(self.model, self.reference):
                reference = self._inference_scores(rollouts, micro_batches, False)
        normaliser = float(t.max_completion_tokens * rows)

        totals = {
            "loss": 0.0,
            "clipped": 0.0,
            "tokens": 0.0,
            "entropy_sum": 0.0,
            "kl_sum": 0.0,
            "prefix_kept": 0.0,
        }
        self.model.train()
        for _ in range(t.updates_per_batch):
            for m, mb in enumerate(micro_batches):
                batch, demo_prefix_mask = self._token_tensors(rollouts, mb)
                log_probs, entropy = score_responses(self.model, batch, t.temperature, with_entropy=True)
                keep = torch.ones_like(batch.response_mask)
                for j, row in enumerate(mb):
                    if row in keep_by_row:
                        keep[j, : len(keep_by_row[row])] = keep_by_row[row]
                token_advantages = advantages[mb].to(self.device)[:, None] * keep.float()
                old_log_probs = old[m][0] if old is not None else log_probs.detach()
                result = clipped_policy_loss(
                    log_probs,
                    old_log_probs,
                    token_advantages,
                    batch.response_mask,
                    normaliser,
                    t.clip_epsilon,
                    t.dual_clip,
                )
                loss = result.loss
                if reference is not None:
                    kl = kl_to_reference(log_probs, reference[m][0]) * batch.response_mask
                    loss = loss + t.kl_beta * kl.sum() / normaliser
                    totals["kl_sum"] += kl.sum().item()
                loss.backward()
                totals["loss"] += loss.item()
                totals["clipped"] += result.clipped_tokens.item()
                totals["tokens"] += result.tokens.item()
                totals["entropy_sum"] += (entropy * batch.response_mask).sum().item()
                totals["prefix_kept"] += (keep & demo_prefix_mask).sum().item()
            grad_norm = self._optimizer_step()
        self.model.eval()
        tokens = max(totals["tokens"], 1.0)
        passes = t.updates_per_batch
        metrics = {
            "loss": totals["loss"] / passes,
            "grad_norm": grad_norm,
            "clip_fraction": totals["clipped"] / tokens,
            "entropy": totals["entropy_sum"] / tokens,
            "demo_prefix_tokens_trained": int(totals["prefix_kept"] / passes),
        }
        if reference is not None:
            metrics["kl"] = totals["kl_sum"] / tokens
        return metrics

    def _optimizer_step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.training.max_grad_norm).item()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def sft_step(self) -> dict[str, Any]:
        """Cross-entropy on demonstrations, averaged over every demonstration token of the batch."""
        t = self.config.training
        started = time.perf_counter()
        pool = [e for e in self.train_examples if e.demo_ids]
        size = t.sft_examples_per_step or t.prompts_per_step * t.rollouts_per_prompt
        examples = self._batch_at(self.step, pool, size, salt=2)
        prompts = [e.prompt_ids for e in examples]
        responses = [e.demo_ids[: t.max_completion_tokens] for e in examples]  # type: ignore[index]
        total_tokens = sum(len(r) for r in responses)
        loss_sum = 0.0
        self.model.train()
        for mb in self._micro_batches([len(r) for r in responses]):
            batch = scoring_batch(
                [prompts[i] for i in mb], [responses[i] for i in mb], self.pad_id, self.device
            )
            log_probs, _ = score_responses(self.model, batch)
            nll = -log_probs * batch.response_mask
            loss = nll.sum() / total_tokens
            loss.backward()
            loss_sum += loss.item()
        grad_norm = self._optimizer_step()
        self.model.eval()
        elapsed = time.perf_counter() - started
        return {
            "phase": "sft",
            "loss": loss_sum,
            "grad_norm": grad_norm,
            "response_length": total_tokens / len(examples),
            "train_tokens_per_s": total_tokens / elapsed,
            "step_time_s": elapsed,
            "lr": self.scheduler.get_last_lr()[0],
        }

    # ----- rewards ----------------------------------------------------------------------------

    def score(self, texts: list[str], examples: list[EncodedExample]) -> RewardResult:
        """Reward the completions; python graders run in the sandbox pool."""
        assert self.config.reward is not None
        return score_completions(
            self.config.reward,
            texts,
            [e.example.fields for e in examples],
            prompts=[e.example.prompt for e in examples],
            sandbox=self.sandbox,
        )

    def _check_reward_errors(self, reward: RewardResult) -> None:
        """Report new kinds of grader errors as events; fail the job when a grader keeps failing."""
        step = self.step + 1
        samples = len(reward.totals)
        for label, failed, failure in self.reward_errors.new_errors(reward):
            self._emit_event(
                f"reward grader {label!r} failed on {failed} of {samples} samples at step {step}: "
                f"{failure.strip().splitlines()[-1]}",
                "warning",
                {"grader": label, "step": step, "failed": failed, "samples": samples, "traceback": failure},
            )
        label = self.reward_errors.grader_over_limit(reward, samples)
        if label is not None:
            t = self.config.training
            last = next(f for f in reversed(reward.failures[label]) if f)
            raise RewardErrorRateExceeded(
                f"reward grader {label!r} failed on more than {t.max_reward_error_rate:.0%} of the samples for "
                f"{t.reward_error_steps} steps in a row ({reward.errors[label]} of {samples} at step {step}; "
                f"training.max_reward_error_rate). Last error:\n{last[-1500:]}"
            )

    # ----- evaluation -------------------------------------------------------------------------

    @torch.inference_mode()
    def evaluate(self) -> dict[str, Any] | None:
        """Greedy decoding on the held-out split: mean reward, accuracy (binary specs), per grader."""
        if not self.eval_examples or self.config.reward is None:
            return None
        started = time.perf_counter()
        examples = self.eval_examples[: self.config.eval.max_examples]
        budget = self.config.eval.max_completion_tokens or self.config.training.max_completion_tokens
        responses = self._sample_chunked(
            [e.prompt_ids for e in examples], [budget] * len(examples), greedy=True
        )
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        reward = self.score(texts, examples)
        metrics: dict[str, Any] = {
            "step": self.step,
            "examples": len(examples),
            "reward_mean": sum(reward.totals) / len(examples),
            **{f"reward/{label}": sum(v) / len(v) for label, v in reward.per_grader.items()},
            "response_length": sum(len(r) for r in responses) / len(responses),
            "reward_errors": reward.error_count,
            "eval_time_s": time.perf_counter() - started,
        }
        if reward.correct is not None:
            metrics["accuracy"] = sum(reward.correct) / len(reward.correct)
        self._append_jsonl("eval.jsonl", metrics)
        for cb in self.callbacks:
            cb.on_eval(metrics)
        return metrics

    # ----- reporting --------------------------------------------------------------------------

    def _emit_event(self, message: str, level: str, data: dict[str, Any]) -> None:
        log.log(logging.WARNING if level == "warning" else logging.INFO, message)
        for cb in self.callbacks:
            cb.on_event(message, level, data)

    def _emit_step(self, metrics: dict[str, Any]) -> None:
        self._append_jsonl("metrics.jsonl", metrics)
        for cb in self.callbacks:
            cb.on_step(metrics)

    def _emit_samples(
        self, rollouts: Rollouts, totals: list[float], per_grader: dict[str, list[float]]
    ) -> None:
        count = self.config.training.samples_per_step
        if not count:
            return
        samples = [
            {
                "step": self.step + 1,
                "prompt": rollouts.examples[rollouts.groups[i]].example.prompt_text,
                "completion": rollouts.texts[i],
                "demo_prefix_tokens": rollouts.demo_prefix_lengths[i],
                "reward": totals[i],
                "rewards": {label: scores[i] for label, scores in per_grader.items()},
            }
            for i in range(min(count, len(rollouts.texts)))
        ]
        for sample_row in samples:
            self._append_jsonl("samples.jsonl", sample_row)
        for cb in self.callbacks:
            cb.on_samples(self.step + 1, samples)

    def _append_jsonl(self, name: str, row: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / name).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    # ----- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Adapter, optimizer, scheduler, RNG and step, written atomically under checkpoints/."""
        root = self.out_dir / "checkpoints"
        final = root / f"step-{self.step:06d}"
        staging = root / f".step-{self.step:06d}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in trainable_state(self.model).items()},
            staging / "adapter_state.safetensors",
        )
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            staging / "trainer_state.pt",
        )
        low, high = self.demo_prefix_window(self.step)
        (staging / "state.json").write_text(
            json.dumps(
                {
                    "step": self.step,
                    "demo_prefix_low": low,
                    "demo_prefix_high": high,
                    "model": self.config.model,
                }
            )
        )
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[: -self.config.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for cb in self.callbacks:
            cb.on_checkpoint(self.step, final)
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Resume from a checkpoint directory, or the latest one under an output directory."""
        path = latest_checkpoint(path) or path
        state_file = path / "state.json"
        if not state_file.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        state = json.loads(state_file.read_text())
        load_trainable_state(
            self.model, load_file(path / "adapter_state.safetensors", device=str(self.device))
        )
        trainer_state = torch.load(path / "trainer_state.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        torch.set_rng_state(trainer_state["torch_rng"].cpu())
        if trainer_state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer_state["cuda_rng"])
        self.step = int(state["step"])
        for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
            _truncate_after_step(self.out_dir / name, self.step)
        log.info("resumed from %s at step %d", path, self.step)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: str, size: int) -> tuple[int, ...]:
    order = list(range(size))
    random.Random(seed).shuffle(order)
    return tuple(order)


def latest_checkpoint(path: Path) -> Path | None:
    candidates = sorted(
        p for p in (Path(path) / "checkpoints").glob("step-*") if (p / "state.json").is_file()
    )
    return candidates[-1] if candidates else None


def _truncate_after_step(path: Path, step: int) -> None:
    """Drop rows written after the checkpoint, so a resumed run's logs read as one run."""
    if not path.is_file():
        return
    kept = [
        line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in kept))
