"""The Prefix-RFT training loop: one class you can read top to bottom.

A step of prefix_rft / rft: sample a group of rollouts per prompt (some continuing a cut of the
demonstration), reward them, compute group advantages, and take one clipped policy-gradient step.
sft trains cross-entropy on demonstrations, psft its proximal (clipped) form; sft_then_rft and
psft_then_rft run a supervised phase and an RFT phase in one job.
What it uses lives elsewhere: the math as pure functions (algorithm.py), token plumbing
(rollout.py), adapters (adapters.py), checkpoints (checkpoints.py), callbacks and the run's files
(reporting.py), and what to do when reward graders fail (reward_errors.py).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.adapters import (
    attach_adapter,
    export_adapter,
    load_exported_adapter,
    load_trainable_state,
    read_replaced_start,
    replaced_prompt_start,
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
    lr_factor,
    proximal_sft_loss,
)
from core.allocator import release_free_memory
from core.checkpoints import checkpoint_step, load_checkpoint, save_checkpoint
from core.config import ConfigError, Problem, TrainConfig
from core.data import (
    DatasetError,
    DatasetReport,
    Example,
    LineError,
    examples_at_step,
    load_dataset,
    missing_fields,
    split_heldout,
)
from core.distributed import Ranks, concat_reward_results
from core.early_stopping import EarlyStopping
from core.models import load_base_model, resolve_dtype
from core.reporting import RunFiles, TrainerCallback, TrainResult
from core.reward_errors import RewardErrorPolicy
from core.rewards import RewardResult, SandboxLimits, SandboxPool, score_completions
from core.rewards.spec import Judge
from core.rollout import (
    EncodedExample,
    enable_gradient_checkpointing,
    encode_example,
    release_decoder,
    response_batch,
    response_log_probs,
    sample,
    stop_token_ids,
)

log = logging.getLogger(__name__)


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
class Evaluation:
    """A held-out evaluation: the metrics, and per example (in file order) what the model said."""

    metrics: dict[str, Any]
    completions: list[dict[str, Any]]


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        callbacks: list[TrainerCallback] | None = None,
        sandbox_limits: SandboxLimits | None = None,
        judge: Judge | None = None,
        ranks: Ranks | None = None,
    ):
        """`sandbox_limits`: of the processes that run python graders (default: SandboxLimits());
        `judge`: asked by model graders (score_model, label_model); `ranks`: this process's place
        in a run over several processes (core/distributed.py; default: the only one). Only rank 0
        runs callbacks, writes the run's files and checkpoints, and exports the adapter."""
        self.config = config
        self.ranks = ranks or Ranks()
        self.out_dir = Path(config.output_dir)
        self.callbacks = [RunFiles(self.out_dir), *(callbacks or [])] if self.ranks.is_main else []
        self.device = torch.device(
            "cuda"
            if config.training.device == "cuda"
            or (config.training.device == "auto" and torch.cuda.is_available())
            else "cpu"
        )
        self.dtype = resolve_dtype(config.training.dtype, self.device)

        train, heldout = self._read_data()  # before the model load: bad data fails in a second
        self.sandbox: SandboxPool | None = None
        if config.reward is not None and config.reward.runs_user_code:
            self.sandbox = SandboxPool(sandbox_limits or SandboxLimits())
            log.info("reward sandbox: %s", self.sandbox.check())  # refuses here if it cannot isolate
        self.judge = judge
        wanted = config.reward.judge_models if config.reward is not None else set()
        unserved = judge.missing(wanted) if judge is not None else sorted(wanted)
        if unserved:
            raise ConfigError(
                [f"the reward's model graders need judges that are not configured: {', '.join(unserved)}"]
            )
        self.reward_errors = RewardErrorPolicy(
            config.training.max_reward_error_rate, config.training.reward_error_steps
        )
        torch.manual_seed(config.seed)
        with self.ranks.main_first():  # a model converted on first use is converted once
            base, self.tokenizer = load_base_model(config.model, dtype=self.dtype, device=self.device)
        self.pad_id = self.tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(base, self.tokenizer)
        self.eos_id = (
            self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else min(self.stop_ids)
        )
        self.model = attach_adapter(base, self.tokenizer, config.adapter)
        if config.training.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.model.eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ranks.broadcast_parameters(self.params)  # every rank starts from rank 0's adapter
        self._start_phase(0)
        self.reference = trainable_state(self.model) if config.training.kl_beta > 0 else None
        self._examples = train, heldout
        self._encode_examples(replaced_prompt_start(self.tokenizer, config.adapter))
        self.step = 0
        t = config.training
        self.early_stopping = EarlyStopping(
            t.early_stop_patience, t.early_stop_min_delta, t.early_stop_zero_variance_steps
        )
        # With early stopping on: the adapter (trainable tensors, on the CPU) and the metrics of
        # the best evaluation so far, which the run exports in the end.
        self.best_adapter: dict[str, torch.Tensor] | None = None
        self.best_eval: dict[str, Any] | None = None

    def load_adapter(self, directory: str | Path) -> None:
        """Continue from (or evaluate) an exported adapter, fed prompts as it was trained on them."""
        load_exported_adapter(self.model, directory)
        self._encode_examples(read_replaced_start(directory))

    # ----- phases -----------------------------------------------------------------------------

    def phase_of(self, step: int) -> tuple[int, int]:
        """(first step, number of steps) of the phase `step` belongs to.

        sft_then_rft and psft_then_rft have two phases; every other method one. Each phase gets a fresh optimizer
        and its own learning-rate schedule, warm-up included, as a separate SFT run and an RL run
        from its checkpoint would: Adam's second moment from SFT's gradients (several times RFT's)
        would otherwise shrink the RFT updates, and the schedule would give RFT only its tail.
        """
        steps, switch = self.config.training.steps, self.config.sft_steps
        if 0 < switch < steps:
            return (switch, steps - switch) if step >= switch else (0, switch)
        return 0, steps

    def _start_phase(self, step: int) -> None:
        """A fresh optimizer and schedule for the phase of `step`."""
        t = self.config.training
        self.phase_start, length = self.phase_of(step)
        rft_after_supervised = 0 < self.config.sft_steps <= self.phase_start
        lr = (t.rft_learning_rate if rft_after_supervised else None) or self.config.learning_rate
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda k: lr_factor(k, length, t.warmup_steps, t.lr_scheduler)
        )

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
            problem = f"{self.config.method!r} trains on demonstrations, but no example has one"
            raise ConfigError([Problem("method", problem)])
        return train, heldout

    def _encode_examples(self, replaced_start: tuple[int, ...]) -> None:
        """Tokenize every example; `replaced_start`: what the prefix adapter stands in for."""
        if getattr(self, "replaced_start", None) == replaced_start:
            return  # already encoded so (a resumed or loaded adapter trained as this run is)
        self.replaced_start = replaced_start
        train, heldout = self._examples
        self.train_examples = [self._encode(e) for e in train]
        self.eval_examples = [self._encode(e) for e in heldout]

    def _encode(self, example: Example) -> EncodedExample:
        encoded = encode_example(self.tokenizer, example, self.eos_id, self.replaced_start)
        limit = self.config.training.max_prompt_tokens
        if len(encoded.prompt_ids) > limit:
            message = f"{len(encoded.prompt_ids)} tokens, over training.max_prompt_tokens={limit}"
            raise DatasetError(
                "data", DatasetReport(errors=[LineError(example.line, "prompt", message)], error_count=1)
            )
        return encoded

    def _examples_at(self, pool: list[EncodedExample], size: int, salt: int) -> list[EncodedExample]:
        return examples_at_step(pool, self.step, size, seed=f"{self.config.seed}-{salt}")

    # ----- schedule ---------------------------------------------------------------------------

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
        for cb in self.callbacks:
            cb.on_train_begin(self.step)
        initial_eval = None
        if self.step == 0:
            initial_eval, _ = self._evaluate_and_track()
        t = self.config.training
        stopped, stop_reason = False, None
        while self.step < t.steps and stop_reason is None:
            if self.ranks.from_main(any(cb.should_stop() for cb in self.callbacks)):
                stopped = True
                break
            if self.phase_of(self.step)[0] != self.phase_start:
                self._start_phase(self.step)
            metrics = self.supervised_step() if self.step < self.config.sft_steps else self.rft_step()
            self.scheduler.step()
            self.step += 1
            metrics["step"] = self.step
            self._emit_step(metrics)
            if "zero_variance_groups" in metrics:
                stop_reason = self.early_stopping.after_step(
                    metrics["zero_variance_groups"], metrics["groups"]
                )
            if self.config.eval.every and self.step % self.config.eval.every == 0 and self.step < t.steps:
                stop_reason = self._evaluate_and_track()[1] or stop_reason
            if self.config.checkpoint.every and self.step % self.config.checkpoint.every == 0:
                self.save_checkpoint()
        if stopped:
            if self.config.checkpoint.every:
                self.save_checkpoint()
            result = TrainResult(self.step, True, None, None, initial_eval)
        else:
            final_eval, _ = self._evaluate_and_track()
            if self.best_adapter is not None and self.best_eval is not final_eval:
                # Early stopping keeps the best evaluation's adapter, not the last one.
                load_trainable_state(self.model, {k: v.to(self.device) for k, v in self.best_adapter.items()})
                final_eval = self.best_eval
            if stop_reason is not None or self.best_eval is not None:
                kept = (
                    f"the adapter of step {self.early_stopping.best_step}"
                    if self.best_eval
                    else "the last adapter"
                )
                message = f"stopped early at step {self.step}: {stop_reason}" if stop_reason else "finished"
                self._emit_event(
                    f"{message}; {kept} is the result",
                    "info",
                    {
                        "stop_reason": stop_reason,
                        "best_step": self.early_stopping.best_step,
                        "step": self.step,
                    },
                )
            adapter_dir = (
                export_adapter(self.model, self.out_dir / "adapter", self.config.model, self.replaced_start)
                if self.ranks.is_main
                else None
            )
            result = TrainResult(self.step, False, adapter_dir, final_eval, initial_eval, stop_reason)
        for cb in self.callbacks:
            cb.on_train_end(result)
        return result

    def rft_step(self) -> dict[str, Any]:
        t = self.config.training
        started = time.perf_counter()
        examples = self._examples_at(self.train_examples, t.prompts_per_step, salt=1)
        low, high = self.demo_prefix_window(self.step)
        rollouts = self.generate_rollouts(
            examples, low, high, random.Random(f"{self.config.seed}-ratio-{self.step}")
        )
        # The decoder's packed weights and the rollouts' cache go back to the system before the
        # update builds its activations.
        release_decoder(self.model)
        release_free_memory()
        rollout_time = time.perf_counter() - started
        generated = sum(
            len(r) - p for r, p in zip(rollouts.responses, rollouts.demo_prefix_lengths, strict=True)
        )

        reward = self._rewards_sharded(rollouts.texts, rollouts.row_examples, t.rollouts_per_prompt)
        for event in self.reward_errors.new_errors(reward, self.step + 1):
            self._emit_event(event.message, "warning", event.data)
        self.reward_errors.check_rate(reward, self.step + 1)
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
        release_free_memory()  # the update's activations, before the next step's rollouts
        flat_groups = sum(
            bool((rewards[g * n : (g + 1) * n] == rewards[g * n]).all()) for g in range(len(examples))
        )

        metrics: dict[str, Any] = {
            "phase": "rft",
            "loss": update["loss"],
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std(unbiased=False).item(),
            "reward_errors": reward.error_count,
            # Groups whose rollouts all got the same reward: no advantage, nothing learnt from them.
            "zero_variance_groups": flat_groups,
            "groups": len(examples),
            # Prompt and completion tokens of the sequences the update trained on, counted once.
            "trained_tokens": sum(map(len, rollouts.prompts)) + sum(map(len, rollouts.responses)),
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
        self._emit_samples(rollouts, reward)
        return metrics

    def generate_rollouts(
        self, examples: list[EncodedExample], low: float, high: float, rng: random.Random
    ) -> Rollouts:
        """N rollouts per prompt; the first H of an example with a demonstration are hybrids.

        Each row samples from its own seed, (seed, step, row), so a row's tokens do not depend on
        the batches or processes it is sampled in. Over several processes each samples its
        share of the groups, and all get every rollout.
        """
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
        seeds = [self._sampling_seed(row) for row in range(len(inputs))]
        continuations = self._sample_sharded(inputs, budgets, False, t.rollouts_per_prompt, seeds)
        responses = [
            (examples[g].demo_ids[:cut] if cut else []) + cont  # type: ignore[index]
            for g, cut, cont in zip(groups, prefix_lengths, continuations, strict=True)
        ]
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return Rollouts(examples, responses, prefix_lengths, groups, texts)

    def _sampling_seed(self, row: int) -> int:
        """The seed of a rollout row's draws at this step: (run seed, step, row), hashed."""
        digest = hashlib.blake2b(f"{self.config.seed}-sample-{self.step}-{row}".encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "big") >> 1

    def _sample_chunked(
        self,
        inputs: list[list[int]],
        budgets: list[int],
        greedy: bool,
        row_seeds: list[int] | None = None,
    ) -> list[list[int]]:
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
                row_seeds=row_seeds[start : start + size] if row_seeds is not None else None,
            )
        return out

    def _own_rows(self, rows: int, group_size: int = 1) -> range:
        """This rank's contiguous share of `rows`, whole groups of `group_size` rows each."""
        groups = self.ranks.shard(rows // group_size)
        return range(groups.start * group_size, groups.stop * group_size)

    def _sample_sharded(
        self,
        inputs: list[list[int]],
        budgets: list[int],
        greedy: bool,
        group_size: int = 1,
        row_seeds: list[int] | None = None,
    ) -> list[list[int]]:
        """Every row's continuation; over several processes each samples its share, all get all."""
        if not self.ranks.distributed:
            return self._sample_chunked(inputs, budgets, greedy, row_seeds)
        own = self._own_rows(len(inputs), group_size)
        seeds = row_seeds[own.start : own.stop] if row_seeds is not None else None
        mine = self._sample_chunked(
            inputs[own.start : own.stop], budgets[own.start : own.stop], greedy, seeds
        )
        return [row for part in self.ranks.gather(mine) for row in part]

    def _rewards_sharded(
        self, texts: list[str], examples: list[EncodedExample], group_size: int = 1
    ) -> RewardResult:
        """Every row's reward; over several processes each scores its share, all get all."""
        if not self.ranks.distributed:
            return self.compute_rewards(texts, examples)
        own = self._own_rows(len(texts), group_size)
        mine = (
            self.compute_rewards(texts[own.start : own.stop], examples[own.start : own.stop])
            if own
            else RewardResult([], {})
        )
        return concat_reward_results(self.ranks.gather(mine))

    def _micro_batches(self, lengths: list[int], rows: list[int] | None = None) -> list[list[int]]:
        """Row indices in micro-batches of similar response length (less padding to compute)."""
        rows = list(range(len(lengths))) if rows is None else rows
        ordered = sorted(rows, key=lambda i: -lengths[i])
        size = self.config.training.micro_batch_size
        return [ordered[i : i + size] for i in range(0, len(ordered), size)]

    def _token_tensors(self, rollouts: Rollouts, rows: list[int]):
        batch = response_batch(
            [rollouts.prompts[i] for i in rows],
            [rollouts.responses[i] for i in rows],
            self.pad_id,
            self.device,
        )
        prefix = torch.tensor([rollouts.demo_prefix_lengths[i] for i in rows], device=self.device)
        demo_prefix_mask = torch.arange(batch.response_width, device=self.device)[None, :] < prefix[:, None]
        return batch, demo_prefix_mask & batch.response_mask

    @torch.inference_mode()
    def _log_probs_without_grad(self, rollouts: Rollouts, micro_batches: list[list[int]], with_entropy: bool):
        """Per micro-batch: (log-probs, entropies) under the current weights."""
        results = []
        for mb in micro_batches:
            batch, _ = self._token_tensors(rollouts, mb)
            results.append(
                response_log_probs(self.model, batch, self.config.training.temperature, with_entropy)
            )
        return results

    def _demo_prefix_keep(self, rollouts: Rollouts, rows: range) -> dict[int, torch.Tensor]:
        """Entropy clipping: per hybrid row of `rows`, which of its demonstration-prefix tokens keep
        their advantage.

        The top fraction is taken over all demonstration-prefix tokens of the step, so their
        entropies are computed first, in one inference pass over the hybrid rows only; over
        several processes each computes its rows' and all get all of them.
        """
        prefix_lengths = rollouts.demo_prefix_lengths
        if not any(prefix_lengths):
            return {}
        own_hybrids = [i for i in rows if prefix_lengths[i] > 0]
        micro_batches = self._micro_batches([len(r) for r in rollouts.responses], own_hybrids)
        scores = self._log_probs_without_grad(rollouts, micro_batches, with_entropy=True)
        prefix_entropy = {
            row: mb_entropy[k, : prefix_lengths[row]]
            for mb, (_, mb_entropy) in zip(micro_batches, scores, strict=True)
            for k, row in enumerate(mb)
        }
        if self.ranks.distributed:
            parts = self.ranks.gather({row: e.cpu() for row, e in prefix_entropy.items()})
            prefix_entropy = {row: e.to(self.device) for part in parts for row, e in part.items()}
        hybrid_rows = sorted(prefix_entropy)
        width = max(prefix_lengths[row] for row in hybrid_rows)
        entropy = torch.zeros(len(hybrid_rows), width, device=self.device)
        prefix_mask = torch.zeros(len(hybrid_rows), width, dtype=torch.bool, device=self.device)
        position = {row: j for j, row in enumerate(hybrid_rows)}
        for row, row_entropy in prefix_entropy.items():
            n = prefix_lengths[row]
            entropy[position[row], :n] = row_entropy
            prefix_mask[position[row], :n] = True
        keep = entropy_keep_mask(entropy, prefix_mask, self.config.training.entropy_keep_fraction)
        return {row: keep[position[row], : prefix_lengths[row]] for row in own_hybrids}

    def policy_update(self, rollouts: Rollouts, advantages: torch.Tensor) -> dict[str, float]:
        """One clipped policy-gradient step over the rollouts (or `updates_per_batch` of them).

        Over several processes each trains on its share of the groups, its loss divided by the
        whole step's normaliser, and the gradients are summed before the step.
        """
        t = self.config.training
        rows = len(rollouts.responses)
        own = self._own_rows(rows, t.rollouts_per_prompt)
        keep_by_row = self._demo_prefix_keep(rollouts, own)
        micro_batches = self._micro_batches([len(r) for r in rollouts.responses], list(own))
        # pi_old: with one update per batch it is the current policy, detached in the same forward.
        old = (
            self._log_probs_without_grad(rollouts, micro_batches, False) if t.updates_per_batch > 1 else None
        )
        reference = None
        if self.reference is not None:
            with swapped_adapter_weights(self.model, self.reference):
                reference = self._log_probs_without_grad(rollouts, micro_batches, False)
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
                log_probs, entropy = response_log_probs(self.model, batch, t.temperature, with_entropy=True)
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
        if self.ranks.distributed:
            totals = dict(zip(totals, self.ranks.sum(list(totals.values())), strict=True))
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
        """One AdamW step; the learning-rate schedule moves once per training step, not here."""
        self.ranks.sum_gradients(self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.training.max_grad_norm).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def supervised_step(self) -> dict[str, Any]:
        """A batch of demonstrations: one cross-entropy step (sft), or psft's K clipped steps.

        psft computes the batch's log-probs under the policy that starts it (pi_old), then takes
        one optimizer step per mini-batch on -min(r, clip(r, 1 - eps_low, 1 + eps_high)),
        token-mean. Its K = 1 is sft: r = 1 everywhere and the gradient is cross-entropy's.
        `loss` is the demonstrations' mean cross-entropy in both, before each update.
        """
        t = self.config.training
        started = time.perf_counter()
        pool = [e for e in self.train_examples if e.demo_ids]
        size = t.sft_examples_per_step or t.prompts_per_step * t.rollouts_per_prompt
        examples = self._examples_at(pool, size, salt=2)
        prompts = [e.prompt_ids for e in examples]
        responses = [e.demo_ids[: t.max_completion_tokens] for e in examples]  # type: ignore[index]
        lengths = [len(r) for r in responses]
        proximal = self.config.supervised_phase == "psft"
        k = min(t.psft_minibatches, len(examples)) if proximal else 1
        rows = list(range(len(examples)))
        minibatches = [rows[j * len(rows) // k : (j + 1) * len(rows) // k] for j in range(k)]
        # Over several processes each trains on its share of every mini-batch, divided by the
        # mini-batch's tokens (all ranks'), and the gradients are summed before each step.
        own = [[minibatch[i] for i in self.ranks.shard(len(minibatch))] for minibatch in minibatches]
        old = (
            self._demonstration_log_probs(prompts, responses, [i for part in own for i in part])
            if proximal and k > 1
            else None
        )

        nll_sum = clipped = 0.0
        grad_norms = []
        self.model.train()
        for minibatch, own_rows in zip(minibatches, own, strict=True):
            tokens = float(sum(lengths[i] for i in minibatch))
            for mb in self._micro_batches(lengths, own_rows):
                batch = response_batch(
                    [prompts[i] for i in mb], [responses[i] for i in mb], self.pad_id, self.device
                )
                log_probs, _ = response_log_probs(self.model, batch)
                mask = batch.response_mask
                if proximal:
                    old_log_probs = log_probs.detach() if old is None else _padded([old[i] for i in mb], mask)
                    result = proximal_sft_loss(
                        log_probs, old_log_probs, mask, tokens, t.psft_epsilon_low, t.psft_epsilon_high
                    )
                    loss = result.loss
                    clipped += result.clipped_tokens.item()
                else:
                    loss = (-log_probs * mask).sum() / tokens
                loss.backward()
                nll_sum += (-log_probs.detach() * mask).sum().item()
            grad_norms.append(self._optimizer_step())
        self.model.eval()
        if self.ranks.distributed:
            nll_sum, clipped = self.ranks.sum([nll_sum, clipped])
        elapsed = time.perf_counter() - started
        total_tokens = sum(lengths)
        metrics: dict[str, Any] = {
            "phase": self.config.supervised_phase,
            "loss": nll_sum / total_tokens,
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "response_length": total_tokens / len(examples),
            "trained_tokens": sum(map(len, prompts)) + total_tokens,
            "train_tokens_per_s": total_tokens / elapsed,
            "step_time_s": elapsed,
            "lr": self.scheduler.get_last_lr()[0],
        }
        if proximal:
            metrics["clip_fraction"] = clipped / total_tokens
            metrics["optimizer_steps"] = len(minibatches)
        return metrics

    @torch.inference_mode()
    def _demonstration_log_probs(
        self, prompts: list[list[int]], responses: list[list[int]], rows: list[int]
    ) -> list[torch.Tensor]:
        """The per-token log-probs of the demonstrations of `rows` under the current weights,
        unpadded (empty for the other rows)."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(responses)
        for mb in self._micro_batches([len(r) for r in responses], rows):
            batch = response_batch(
                [prompts[i] for i in mb], [responses[i] for i in mb], self.pad_id, self.device
            )
            log_probs, _ = response_log_probs(self.model, batch)
            for j, row in enumerate(mb):
                out[row] = log_probs[j, : len(responses[row])].clone()
        return out

    # ----- rewards ----------------------------------------------------------------------------

    def compute_rewards(self, texts: list[str], examples: list[EncodedExample]) -> RewardResult:
        """Reward the completions; python graders run in the sandbox pool."""
        assert self.config.reward is not None
        return score_completions(
            self.config.reward,
            texts,
            [e.example.fields for e in examples],
            prompts=[e.example.prompt for e in examples],
            sandbox=self.sandbox,
            judge=self.judge,
        )

    # ----- evaluation -------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any] | None:
        """Greedy decoding on the held-out split: mean reward, accuracy (binary specs), per grader."""
        evaluation = self.evaluation()
        if evaluation is None:
            return None
        for cb in self.callbacks:
            cb.on_eval(evaluation.metrics)
        return evaluation.metrics

    def _evaluate_and_track(self) -> tuple[dict[str, Any] | None, str | None]:
        """Evaluate (and report); with early stopping on, keep the best evaluation's adapter.
        Returns the metrics and the reason to stop, if this evaluation gives one."""
        metrics = self.evaluate()
        if metrics is None or self.early_stopping.patience is None:
            return metrics, None
        best, reason = self.early_stopping.after_evaluation(self.step, metrics["reward_mean"])
        if best:
            self.best_adapter = {k: v.cpu() for k, v in trainable_state(self.model).items()}
            self.best_eval = metrics
        return metrics, reason

    @torch.inference_mode()
    def evaluation(self) -> Evaluation | None:
        """The held-out metrics and each example's completion with its scores; reports nothing."""
        if not self.eval_examples or self.config.reward is None:
            return None
        started = time.perf_counter()
        examples = self.eval_examples[: self.config.eval.max_examples]
        budget = self.config.eval.max_completion_tokens or self.config.training.max_completion_tokens
        responses = self._sample_sharded(
            [e.prompt_ids for e in examples], [budget] * len(examples), greedy=True
        )
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        reward = self._rewards_sharded(texts, examples)
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
        completions = [
            {
                "line": e.example.line,
                "prompt": e.example.prompt_text,
                "completion": text,
                "reward": reward.totals[i],
                "rewards": {label: scores[i] for label, scores in reward.per_grader.items()},
                **({"correct": reward.correct[i]} if reward.correct is not None else {}),
            }
            for i, (e, text) in enumerate(zip(examples, texts, strict=True))
        ]
        return Evaluation(metrics, completions)

    # ----- reporting --------------------------------------------------------------------------

    def _emit_event(self, message: str, level: str, data: dict[str, Any]) -> None:
        if not self.ranks.is_main:
            return
        log.log(logging.WARNING if level == "warning" else logging.INFO, message)
        for cb in self.callbacks:
            cb.on_event(message, level, data)

    def _emit_step(self, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_step(metrics)

    def _emit_samples(self, rollouts: Rollouts, reward: RewardResult) -> None:
        count = self.config.training.samples_per_step
        if not count:
            return
        samples = []
        for i in range(min(count, len(rollouts.texts))):
            sample = {
                "step": self.step + 1,
                "prompt": rollouts.examples[rollouts.groups[i]].example.prompt_text,
                "completion": rollouts.texts[i],
                "demo_prefix_tokens": rollouts.demo_prefix_lengths[i],
                # The prefix as text, so that a reader can mark it without the tokenizer.
                "demo_prefix_text": self.tokenizer.decode(
                    rollouts.responses[i][: rollouts.demo_prefix_lengths[i]], skip_special_tokens=True
                ),
                "reward": reward.totals[i],
                "rewards": {label: scores[i] for label, scores in reward.per_grader.items()},
            }
            # What each grader printed, and why it failed (a python grader's traceback).
            errors = {label: why[i] for label, why in reward.failures.items() if why[i]}
            outputs = {label: printed[i] for label, printed in reward.outputs.items() if printed[i]}
            if errors:
                sample["errors"] = errors
            if outputs:
                sample["outputs"] = outputs
            samples.append(sample)
        for cb in self.callbacks:
            cb.on_samples(self.step + 1, samples)

    # ----- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write this step's checkpoint (rank 0 does, for every rank; the others return None)."""
        if not self.ranks.is_main:
            return None
        low, high = self.demo_prefix_window(self.step)
        path = save_checkpoint(
            self.out_dir / "checkpoints",
            self.step,
            self.model,
            self.optimizer,
            self.scheduler,
            {
                "demo_prefix_low": low,
                "demo_prefix_high": high,
                "model": self.config.model,
                "early_stopping": self.early_stopping.state(),
                "best_eval": self.best_eval,
            },
            keep=self.config.checkpoint.keep,
            replaced_start=self.replaced_start,
            best_adapter=self.best_adapter,
        )
        for cb in self.callbacks:
            cb.on_checkpoint(self.step, path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Resume from a checkpoint directory, or the latest one under an output directory."""
        # The optimizer and schedule of the phase the checkpoint's last step ran in.
        self._start_phase(max(checkpoint_step(path) - 1, 0))
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.device)
        self.step = int(state["step"])
        self.early_stopping.load_state(state.get("early_stopping") or {})
        self.best_eval, self.best_adapter = state.get("best_eval"), state.get("best_adapter")
        exported = Path(state["path"]) / "adapter"
        if exported.is_dir():  # prompts as the checkpoint was trained on them (older ones: whole)
            self._encode_examples(read_replaced_start(exported))
        log.info("resumed from %s at step %d", state["path"], self.step)


def _padded(rows: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Unpadded per-row tensors laid out as `mask` [rows, width]; zeros where it is False."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for j, row in enumerate(rows):
        out[j, : len(row)] = row
    return out
