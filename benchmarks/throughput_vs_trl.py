"""Training throughput of our trainer vs TRL's GRPOTrainer on the same work, side by side, on CPU.

    python -m benchmarks.throughput_vs_trl --steps 4 --repeats 3 --out docs/benchmarks/throughput.json

Both trainers fine-tune SmolLM2-135M-Instruct (LoRA r=8 / alpha=16 on every linear layer) on the
same seeded two-digit addition prompts, with the same sampling (8 completions per prompt, 64 new
tokens at most, temperature 1, no top-k/top-p), the same optimizer settings and one optimizer
update per generation batch, no KL term and no reference model. The contenders:

- `ours`: our `rft` trainer on its default precision (`dtype: auto`: bfloat16 base weights on
  CPUs with AMX or AVX512-BF16);
- `ours-prefix`: the product default, `prefix_rft` with a prefix adapter (TRL cannot train prefix
  adapters with GRPO, so this row compares with TRL's LoRA rows; it is not the same work);
- `trl-fp32` and `trl-bf16`: TRL in float32 and with `bf16=True`, its two CPU configurations.

Each run is its own spawned process, one after the other (never concurrently: they would compete
for the same cores), so its peak RSS is its own. The first step of each run is a warm-up and is not
timed. A contender's headline is the median over `--repeats` runs, with the range. Every
contender runs on the same C allocator (`--allocator`): tcmalloc by default, as the worker does.

Throughput is end-to-end: completion tokens generated in a step / wall time of the whole step
(generation, reward, forward, backward, optimizer). Completion lengths are random, so the trainers
do not produce the same number of tokens; tokens/s is the comparable figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import platform
import random
import resource
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# Only the standard library (and benchmarks.provenance, which imports nothing else) at module
# level: spawned children re-import this module, and the torch / TRL imports belong to the child
# that needs them (and to its memory figures).
from benchmarks.provenance import spread

log = logging.getLogger("benchmarks.throughput")

MODEL = "smollm2-135m-instruct"
CONTENDERS = ("ours", "ours-prefix", "trl-fp32", "trl-bf16")
TARGET_SPEEDUP = 3.0  # ours vs TRL's best tokens/s
TARGET_MEMORY = 0.35  # ours vs that TRL run's peak RSS
_MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Everything both trainers are given; it is also recorded in the JSON output."""

    steps: int
    model_dir: str
    data_file: str
    prompts_per_step: int = 4
    rollouts_per_prompt: int = 8
    max_completion_tokens: int = 64
    micro_batch_size: int = 16
    learning_rate: float = 2e-5
    lora_r: int = 8
    lora_alpha: float = 16.0
    temperature: float = 1.0
    seed: int = 0
    threads: int = os.cpu_count() or 1
    warmup_steps: int = 1

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.rollouts_per_prompt

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.completions_per_step // self.micro_batch_size


# ----- data and reward ----------------------------------------------------------------------------


def write_dataset(path: Path, count: int, seed: int) -> None:
    """Two-digit additions as a single user message, with the sum as the `answer` field."""
    from examples.addition.make_data import worked_solution

    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            row = {
                "messages": [{"role": "user", "content": f"What is {a} + {b}?"}],
                "answer": str(a + b),
                "demonstration": worked_solution(a, b),  # for prefix_rft's hybrid rollouts only
            }
            handle.write(json.dumps(row) + "\n")


def addition_reward(text: str, answer: str) -> float:
    """The `numeric` grader's rule: 1.0 if the last number in the text equals the answer."""
    from core.rewards.extract import last_number

    found = last_number(text)
    if found is None:
        return 0.0
    try:
        return float(math.isclose(float(found), float(answer), rel_tol=1e-6, abs_tol=1e-9))
    except ValueError:
        return 0.0


# ----- memory -------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux but in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ----- children -----------------------------------------------------------------------------------


def _prepare_child(settings: Settings) -> None:
    import torch

    _configure_logging()
    # Same intra-op parallelism for both, set before any model exists.
    torch.set_num_threads(settings.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _progress(name: str, step: int, total: int, seconds: float, tokens: int) -> None:
    log.info("  [%s] step %d/%d: %6.2f s, %d completion tokens", name, step, total, seconds, tokens)


def _measure(trainer: Any, steps: list[dict[str, Any]], rss_after_imports: int) -> dict[str, Any]:
    """Train, then report the per-step records with the process's memory and threads."""
    import torch

    rss_after_load = current_rss_bytes()
    trainer.train()
    return {
        "steps": steps,
        "rss_after_imports_bytes": rss_after_imports,
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": peak_rss_bytes(),
        "torch_threads": torch.get_num_threads(),
    }


def ours_config(settings: Settings, work_dir: Path, prefix: bool = False):
    """Our trainer's configuration for the benchmark's work (`rft` + LoRA, or `prefix_rft` + prefix)."""
    from core.config import parse_config

    return parse_config(
        {
            "model": settings.model_dir,
            "method": "prefix_rft" if prefix else "rft",
            "adapter": {"type": "prefix"}
            if prefix
            else {
                "type": "lora",
                "r": settings.lora_r,
                "alpha": settings.lora_alpha,
                "dropout": 0.0,
                "target_modules": "all-linear",
            },
            # No held-out split: with no eval examples the initial and final evaluations are skipped,
            # so the run is training steps only, as in TRL without an eval dataset.
            "data": {"train": settings.data_file, "eval_size": 0},
            "reward": {"graders": [{"type": "numeric", "field": "answer"}]},
            "training": {
                "steps": settings.steps,
                "prompts_per_step": settings.prompts_per_step,
                "rollouts_per_prompt": settings.rollouts_per_prompt,
                "max_completion_tokens": settings.max_completion_tokens,
                "temperature": settings.temperature,
                "learning_rate": settings.learning_rate,
                "lr_scheduler": "constant",
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
                "micro_batch_size": settings.micro_batch_size,
                # One generate call for the whole step, like TRL's single generation batch.
                "generation_batch_size": settings.completions_per_step,
                "advantage": "dr_grpo",
                "clip_epsilon": 0.2,
                "kl_beta": 0.0,
                "updates_per_batch": 1,
                "dtype": "auto",
                "device": "cpu",
                "gradient_checkpointing": False,
                "samples_per_step": 0,
            },
            "checkpoint": {"every": 0},
            "seed": settings.seed,
            "output_dir": str(work_dir / "ours-run"),
        }
    )


def run_ours(settings: Settings, work_dir: Path, prefix: bool = False) -> dict[str, Any]:
    _prepare_child(settings)
    rss_after_imports = current_rss_bytes()  # before our heavy imports, which are part of the load

    from core.reporting import TrainerCallback
    from core.trainer import Trainer

    config = ours_config(settings, work_dir, prefix)
    steps: list[dict[str, Any]] = []
    rows = settings.completions_per_step

    class Recorder(TrainerCallback):
        def on_step(self, metrics: dict[str, Any]) -> None:
            # response_length is the mean over the step's rows (EOS included, as in TRL's lengths).
            tokens = round(metrics["response_length"] * rows)
            steps.append(
                {
                    "step": metrics["step"],
                    "step_time_s": metrics["step_time_s"],
                    "completion_tokens": tokens,
                    "rollout_time_s": metrics["rollout_time_s"],
                    "rollout_tokens_per_s": metrics["rollout_tokens_per_s"],
                    "reward_mean": metrics["reward_mean"],
                    "loss": metrics["loss"],
                    "entropy": metrics.get("entropy"),
                }
            )
            _progress(
                "ours-prefix" if prefix else "ours",
                metrics["step"],
                settings.steps,
                metrics["step_time_s"],
                tokens,
            )

    return _measure(Trainer(config, callbacks=[Recorder()]), steps, rss_after_imports)


def run_trl(settings: Settings, work_dir: Path, bf16: bool = False) -> dict[str, Any]:
    _prepare_child(settings)
    rss_after_imports = current_rss_bytes()
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in Path(settings.data_file).read_text().splitlines() if line]
    # Conversational prompts: TRL applies the chat template with a generation prompt, as we do.
    dataset = Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in rows])

    generated_tokens: list[int] = []  # one entry per generation batch = per optimizer step

    def addition(completions: list[Any], answer: list[str], completion_ids=None, **_: Any) -> list[float]:
        if completion_ids is not None:
            generated_tokens.append(sum(len(ids) for ids in completion_ids))
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [addition_reward(t, a) for t, a in zip(texts, answer, strict=True)]

    # Batch mapping. TRL counts per_device_train_batch_size in completions (not prompts). With
    # steps_per_generation unset it defaults to gradient_accumulation_steps, so
    # generation_batch_size = per_device_train_batch_size * gradient_accumulation_steps
    #                       = micro_batch_size * (completions_per_step / micro_batch_size)
    #                       = prompts_per_step * num_generations,
    # i.e. one generate call per optimizer step whose completions are split into
    # gradient_accumulation_steps micro-batches of micro_batch_size (our micro_batch_size), and
    # consumed by exactly one optimizer step. Since gradient_accumulation_steps is a multiple of
    # steps_per_generation * num_iterations, TRL skips the separate "old log-prob" forward (it uses the
    # detached current log-probs, as we do with one update per batch).
    args = GRPOConfig(
        output_dir=str(work_dir / "trl-run"),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.micro_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        num_generations=settings.rollouts_per_prompt,
        num_iterations=1,
        max_completion_length=settings.max_completion_tokens,
        temperature=settings.temperature,
        top_k=0,  # 0 disables top-k in both TRL and transformers' generate
        top_p=1.0,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",  # TrainingArguments defaults to linear decay
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",  # plain torch AdamW, as ours (the default may be the fused variant)
        # Our rft loss in TRL's terms: advantage r - mean(group) without std scaling, token losses
        # summed and divided by max_completion_length * rows, PPO clip 0.2, no KL term.
        beta=0.0,
        loss_type="dr_grpo",
        scale_rewards="none",
        epsilon=0.2,
        use_vllm=False,
        use_cpu=True,
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=False,  # GRPOConfig turns it on by default
        model_init_kwargs={"dtype": "float32"},
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        seed=settings.seed,
        data_seed=settings.seed,
    )
    peft_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
    )

    steps: list[dict[str, Any]] = []

    class StepTimer(TrainerCallback):
        """Wall time from the first micro-batch of an optimizer step (which generates) to its end."""

        def __init__(self) -> None:
            self.started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            elapsed = time.perf_counter() - self.started
            tokens = generated_tokens[-1] if generated_tokens else 0
            steps.append({"step": state.global_step, "step_time_s": elapsed, "completion_tokens": tokens})
            _progress("trl-bf16" if bf16 else "trl-fp32", state.global_step, settings.steps, elapsed, tokens)

        def on_log(self, args, state, control, logs=None, **kwargs):
            # With logging_steps=1 each log is one step's own metrics; it comes after on_step_end.
            if (
                logs
                and "completions/mean_length" in logs
                and steps
                and steps[-1]["step"] == state.global_step
            ):
                steps[-1].update(
                    {
                        "mean_length": logs["completions/mean_length"],
                        "trl_step_time_s": logs.get("step_time"),  # TRL's own: training_step calls only
                        "reward_mean": logs.get("reward"),
                        "loss": logs.get("loss"),
                        "entropy": logs.get("entropy"),
                    }
                )

    trainer = GRPOTrainer(
        model=settings.model_dir,
        reward_funcs=addition,
        args=args,
        train_dataset=dataset,
        peft_config=peft_config,
        callbacks=[StepTimer()],
    )
    trainer.remove_callback(PrinterCallback)  # our progress lines replace its per-step dicts
    return _measure(trainer, steps, rss_after_imports)


def _child_main(name: str, settings: dict[str, Any], work_dir: str, result_file: str) -> None:
    runners = {
        "ours": run_ours,
        "ours-prefix": lambda s, d: run_ours(s, d, prefix=True),
        "trl-fp32": run_trl,
        "trl-bf16": lambda s, d: run_trl(s, d, bf16=True),
    }
    result = runners[name](Settings(**settings), Path(work_dir))
    Path(result_file).write_text(json.dumps(result))


def run_in_child(name: str, settings: Settings, work_dir: Path) -> dict[str, Any]:
    """Run one trainer in a fresh spawned interpreter and return what it measured."""
    result_file = work_dir / f"{name}-result.json"
    result_file.unlink(missing_ok=True)
    process = multiprocessing.get_context("spawn").Process(
        target=_child_main, args=(name, asdict(settings), str(work_dir), str(result_file)), name=name
    )
    process.start()
    process.join()
    if process.exitcode != 0 or not result_file.is_file():
        raise RuntimeError(f"the {name} benchmark process failed (exit code {process.exitcode}); see above")
    return json.loads(result_file.read_text())


# ----- summary ------------------------------------------------------------------------------------


def summarise(result: dict[str, Any], warmup: int) -> dict[str, Any]:
    timed = result["steps"][warmup:]
    times = [s["step_time_s"] for s in timed]
    tokens = [s["completion_tokens"] for s in timed]
    summary = {
        "timed_steps": len(timed),
        "median_step_time_s": statistics.median(times),
        "mean_completion_tokens_per_step": statistics.fmean(tokens),
        # Sum over sum weights each step by its length; the per-step median is kept alongside.
        "tokens_per_s": sum(tokens) / sum(times),
        "median_step_tokens_per_s": statistics.median(n / t for n, t in zip(tokens, times, strict=True)),
        "rss_after_load_mib": result["rss_after_load_bytes"] / _MIB,
        "peak_rss_mib": result["peak_rss_bytes"] / _MIB,
    }
    rollout_times = [s.get("rollout_time_s") for s in timed]
    if all(t is not None for t in rollout_times):
        summary["rollout_only_tokens_per_s"] = sum(tokens) / sum(rollout_times)
    return summary


def across_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A contender's headline: the median over its runs of each figure, with the range."""
    figures = {}
    for key in ("tokens_per_s", "median_step_time_s", "peak_rss_mib", "rollout_only_tokens_per_s"):
        values = [run[key] for run in runs if run.get(key) is not None]
        if values:
            figures[key] = spread(values)
    return {"runs": len(runs), **figures}


def comparison(headlines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ours against TRL's fastest configuration (by median tokens/s), side by side."""
    best = max(("trl-fp32", "trl-bf16"), key=lambda name: headlines[name]["tokens_per_s"]["median"])
    ours, trl = headlines["ours"], headlines[best]
    speedup = ours["tokens_per_s"]["median"] / trl["tokens_per_s"]["median"]
    memory = ours["peak_rss_mib"]["median"] / trl["peak_rss_mib"]["median"]
    return {
        "trl_best": best,
        "speedup": round(speedup, 2),
        "target_speedup": TARGET_SPEEDUP,
        "peak_rss_ratio": round(memory, 2),
        "target_peak_rss_ratio": TARGET_MEMORY,
        "prefix_speedup_vs_trl_best_lora": round(
            headlines["ours-prefix"]["tokens_per_s"]["median"] / trl["tokens_per_s"]["median"], 2
        ),
    }


def table(headlines: dict[str, dict[str, Any]], compared: dict[str, Any]) -> str:
    def cell(name: str, key: str, digits: int) -> str:
        stats = headlines[name].get(key)
        if stats is None:
            return "n/a"
        return f"{stats['median']:.{digits}f} [{stats['min']:.{digits}f}-{stats['max']:.{digits}f}]"

    lines = [f"{'':14} {'tokens/s':>22} {'step s':>22} {'peak RSS MiB':>22} {'rollout tok/s':>22}"]
    for name in CONTENDERS:
        lines.append(
            f"{name:14} {cell(name, 'tokens_per_s', 1):>22} {cell(name, 'median_step_time_s', 2):>22} "
            f"{cell(name, 'peak_rss_mib', 0):>22} {cell(name, 'rollout_only_tokens_per_s', 1):>22}"
        )
    lines.append("")
    lines.append(
        f"ours vs {compared['trl_best']} (TRL's fastest): {compared['speedup']:.2f}x tokens/s "
        f"(target {TARGET_SPEEDUP}x), {compared['peak_rss_ratio']:.2f}x peak RSS (target <= {TARGET_MEMORY}x); "
        f"ours-prefix (other adapter, not the same work): {compared['prefix_speedup_vs_trl_best_lora']:.2f}x"
    )
    return "\n".join(lines)


def versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["python"] = platform.python_version()
    return found


# ----- entry point --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=6, help="Optimizer steps per trainer (first is warm-up)."
    )
    parser.add_argument("--prompts-per-step", type=int, default=4, help="Prompts per step (x8 completions).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the prompts and of both trainers.")
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="Sequences per forward/backward in both trainers; default min(16, completions per step).",
    )
    parser.add_argument("--learning-rate", type=float, default=2e-5, help="AdamW learning rate of both.")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads in both children."
    )
    parser.add_argument("--repeats", type=int, default=3, help="Runs per contender (fresh processes).")
    parser.add_argument(
        "--allocator",
        choices=("tcmalloc", "system"),
        default="tcmalloc",
        help="C allocator of every contender's process: tcmalloc preloaded (as the worker runs; "
        "core/allocator.py), or the system's malloc.",
    )
    parser.add_argument("--out", type=Path, default=None, help="Write the raw results as JSON here.")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is a warm-up and is not timed")
    if args.prompts_per_step < 1:
        parser.error("--prompts-per-step must be at least 1")
    return args


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    rollouts = 8
    completions = args.prompts_per_step * rollouts
    micro = args.micro_batch_size or min(16, completions)
    if completions % micro:
        # TRL needs whole micro-batches per generation batch (generation_batch_size % batch size == 0).
        raise SystemExit(f"--micro-batch-size {micro} must divide the {completions} completions per step")

    from benchmarks.provenance import provenance, write_report
    from core.allocator import TCMALLOC, find_library
    from core.models import resolve_model_dir

    if args.allocator == "tcmalloc":
        library = find_library(TCMALLOC)
        if library is None:
            raise SystemExit(
                f"{TCMALLOC} not found: install libtcmalloc-minimal4, or pass --allocator system"
            )
        os.environ["LD_PRELOAD"] = str(library)  # every spawned contender starts with it
    else:
        os.environ.pop("LD_PRELOAD", None)

    # Resolved (and converted from GGUF if needed) here, so neither child pays for the conversion.
    model_dir = resolve_model_dir(MODEL)

    with tempfile.TemporaryDirectory(prefix="throughput-vs-trl-") as tmp:
        work_dir = Path(tmp)
        data_file = work_dir / "additions.jsonl"
        # Exactly one epoch of prompts: both trainers see the same set, each in its own seeded order.
        write_dataset(data_file, args.steps * args.prompts_per_step, args.seed)
        settings = Settings(
            steps=args.steps,
            prompts_per_step=args.prompts_per_step,
            micro_batch_size=micro,
            learning_rate=args.learning_rate,
            seed=args.seed,
            threads=args.threads,
            model_dir=str(model_dir),
            data_file=str(data_file),
        )
        log.info(
            f"{args.steps} steps x {completions} completions ({args.prompts_per_step} prompts x {rollouts}), "
            f"micro-batch {micro}, {args.threads} torch threads, model {model_dir}"
        )
        raw: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
        for repeat in range(args.repeats):
            for name in CONTENDERS:  # interleaved, so a slow spell of the machine hits every contender
                log.info("run %d/%d: %s ...", repeat + 1, args.repeats, name)
                raw[name].append(run_in_child(name, settings, work_dir))

    runs = {name: [summarise(r, settings.warmup_steps) for r in raw[name]] for name in CONTENDERS}
    headlines = {name: across_runs(runs[name]) for name in CONTENDERS}
    compared = comparison(headlines)
    text = table(headlines, compared)
    log.info("%s", text)

    if args.out is not None:
        command = shlex.join(["python", "-m", "benchmarks.throughput_vs_trl", *argv])
        report = {
            **provenance(command, args.out),
            "settings": {
                **{k: v for k, v in asdict(settings).items() if k != "data_file"},
                "model": MODEL,
                "repeats": args.repeats,
                "allocator": args.allocator,
                "ld_preload": os.environ.get("LD_PRELOAD"),
                "completions_per_step": settings.completions_per_step,
                "gradient_accumulation_steps": settings.gradient_accumulation_steps,
            },
            "versions": versions(),
            "headlines": headlines,
            "comparison": compared,
            "runs": runs,
            "raw": raw,
            "table": text.splitlines(),
        }
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
