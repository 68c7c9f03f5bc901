"""The learning study: six methods on two addition tasks, chosen on validation, reported on test.

    python -m benchmarks.learning --out docs/benchmarks/learning [--jobs 2] [--phase sweep|runs|report]
        [--dtype bfloat16|float32]

Task A is two-digit addition (the base model solves some: RFT has reward to learn from), task B
three-digit addition (it solves about 2.5%: the demonstrations have to carry the signal). Both use
worked column-by-column demonstrations (examples/addition/make_data.py), splits disjoint as
unordered pairs, training prompts in one phrasing and validation and test prompts in four.

1. sweep: the learning rate of each adapter and method family on task A's validation split,
   from at most three values, one seed, short runs. Families: supervised (sft, psft, the first
   phase of the two-phase methods) and reinforcement (rft, prefix_rft, the second phase), the
   latter chosen on the mean of rft and prefix_rft.
2. runs: every method on both tasks, the prefix adapter (the product default) on three seeds and
   LoRA on one (prefix_rft with LoRA on three), with the same number of training sequences per
   run, validated every 10 steps.
3. ablations, one seed, validation only, one setting changed at a time: prefix_rft with the
   prefix adapter on task B (hybrid rollouts per group, entropy keep fraction, the prefix
   schedule's length, the learning rate), where the base model solves almost nothing; and psft
   without its clip on both tasks (it takes 8 optimizer steps per batch where sft takes one).
With --phase all the runs go in the order of what they answer: the product default (the prefix
adapter) on seed 0, the ablations, its other seeds, then LoRA; a study cut short answers the main
question first.
4. report: test accuracy of each run's checkpoint chosen on validation (never the test peak),
   mean and sd over seeds, the base model's test accuracy, table.md, curves.png, study.json.

The runner resumes: a finished run (its JSON under runs/) is skipped, a partial one continues
from its latest checkpoint (under work/, not committed), and each result is written as it lands.

Every run uses the base weights' dtype named by --dtype (default bfloat16, the product's choice
on CPUs with native bf16 and on GPUs), and a study's results live under OUT/<dtype>/: the two
precisions decode differently (the untrained model's validation accuracy is 12% in bf16 and 8%
in fp32 on task A), so runs of one never mix with the other's.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shlex
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.learning")

MODEL = "smollm2-135m-instruct"
METHODS = ("sft", "psft", "rft", "sft_then_rft", "psft_then_rft", "prefix_rft")
FAMILY = {
    "sft": "supervised",
    "psft": "supervised",
    "rft": "reinforcement",
    "prefix_rft": "reinforcement",
}
TWO_PHASE = ("sft_then_rft", "psft_then_rft")
SWEEP = {  # (adapter, family) -> (methods it is chosen on, learning rates tried)
    ("prefix", "supervised"): (("sft",), (3e-3, 1e-2, 3e-2)),
    ("prefix", "reinforcement"): (("rft", "prefix_rft"), (3e-3, 1e-2, 3e-2)),
    ("lora", "supervised"): (("sft",), (1e-4, 3e-4, 1e-3)),
    ("lora", "reinforcement"): (("rft", "prefix_rft"), (1e-4, 3e-4, 1e-3)),
}
# 20 steps: a step of 32 sequences costs about a CPU-minute on one core (measured in the sweep),
# so a run stays within 30 CPU-minutes with its evaluations.
TASKS = {  # name -> digits, steps, max completion tokens
    "A": {"digits": 2, "steps": 20, "max_completion_tokens": 64, "title": "two-digit addition"},
    "B": {"digits": 3, "steps": 20, "max_completion_tokens": 96, "title": "three-digit addition"},
}
SIZES = {"train": 2000, "validation": 100, "test": 100}  # problems; the split is drawn with these
TEST_PROBLEMS = 50  # of the test split, each in all four phrasings: 200 prompts per run
SWEEP_STEPS = 10
EVAL_EVERY = 10
PROMPTS_PER_STEP, ROLLOUTS_PER_PROMPT = 4, 8
PREFIX_SEEDS, LORA_SEEDS = (0, 1, 2), (0,)
ABLATIONS = {  # (task, method, name) -> the training settings changed from the method's defaults
    ("B", "prefix_rft", "hybrids-2"): {"hybrid_rollouts_per_prompt": 2},
    ("B", "prefix_rft", "hybrids-4"): {"hybrid_rollouts_per_prompt": 4},
    ("B", "prefix_rft", "keep-every-prefix-token"): {"entropy_keep_fraction": 1.0},
    ("B", "prefix_rft", "prefix-decay-10-steps"): {"demo_prefix_decay_steps": 10},
    ("B", "prefix_rft", "lr-3e-2"): {"learning_rate": 3e-2},
    # psft takes K=8 optimizer steps per batch where sft takes one: without its clip, is it sft?
    ("A", "psft", "unclipped"): {"psft_epsilon_high": 1e9},
    ("B", "psft", "unclipped"): {"psft_epsilon_high": 1e9},
}
# With LoRA, prefix_rft runs on every seed too: on seed 0 it validated about as high as with the
# prefix adapter, and one seed cannot tell which adapter the product's method should use.
LORA_EVERY_SEED = ("prefix_rft",)
DTYPES = ("bfloat16", "float32")


# ----- data --------------------------------------------------------------------------------------


def write_task_data(task: str, directory: Path) -> dict[str, Path]:
    """train.jsonl (phrasing 0), validation.jsonl (phrasings in turn), test.jsonl (every phrasing)."""
    from examples.addition.make_data import PHRASINGS, addition_example, unordered_pair_splits, write_jsonl

    directory.mkdir(parents=True, exist_ok=True)
    files = {name: directory / f"{name}.jsonl" for name in ("train", "validation", "test")}
    if all(f.is_file() for f in files.values()):
        return files
    validation, test, train = unordered_pair_splits(
        TASKS[task]["digits"], (SIZES["validation"], SIZES["test"], SIZES["train"]), seed=0
    )
    write_jsonl(files["train"], [addition_example(a, b) for a, b in train])
    write_jsonl(
        files["validation"],
        [addition_example(a, b, i % len(PHRASINGS)) for i, (a, b) in enumerate(validation)],
    )
    write_jsonl(files["test"], [addition_example(a, b, p) for a, b in test for p in range(len(PHRASINGS))])
    return files


# ----- the plan ----------------------------------------------------------------------------------


def sweep_plan(dtype: str) -> list[dict[str, Any]]:
    runs = []
    for (adapter, _family), (methods, rates) in SWEEP.items():
        for method in methods:
            for lr in rates:
                runs.append(
                    {
                        "key": f"sweep-A-{method}-{adapter}-lr{lr:g}",
                        "task": "A",
                        "method": method,
                        "adapter": adapter,
                        "seed": 0,
                        "lr": lr,
                        "rft_lr": None,
                        "steps": SWEEP_STEPS,
                        "test": False,
                        "dtype": dtype,
                    }
                )
    return runs


def ablation_plan(rates: dict[tuple[str, str], float], dtype: str) -> list[dict[str, Any]]:
    return [
        {
            "key": f"ablation-{task}-{method}-prefix-{name}",
            "task": task,
            "method": method,
            "adapter": "prefix",
            "seed": 0,
            "lr": changes.get("learning_rate", rates[("prefix", FAMILY[method])]),
            "rft_lr": None,
            "steps": TASKS[task]["steps"],
            "test": False,
            "dtype": dtype,
            "ablation": name,
            "changes": {k: v for k, v in changes.items() if k != "learning_rate"},
        }
        for (task, method, name), changes in ABLATIONS.items()
    ]


def seeds_of(method: str, adapter: str) -> tuple[int, ...]:
    return PREFIX_SEEDS if adapter == "prefix" or method in LORA_EVERY_SEED else LORA_SEEDS


def chosen_rates(out: Path) -> dict[tuple[str, str], float]:
    """Per (adapter, family): the swept rate with the best mean final validation accuracy."""
    chosen = {}
    for (adapter, family), (methods, rates) in SWEEP.items():
        score = {}
        for lr in rates:
            finals = []
            for method in methods:
                result = read_result(out, f"sweep-A-{method}-{adapter}-lr{lr:g}")
                if result is None:
                    raise RuntimeError(f"the sweep is not finished: no result for {method} {adapter} {lr:g}")
                finals.append(result["validation"][-1]["accuracy"])
            score[lr] = statistics.mean(finals)
        chosen[(adapter, family)] = max(rates, key=lambda lr: (score[lr], -rates.index(lr)))
    return chosen


def main_plan(rates: dict[tuple[str, str], float], dtype: str) -> list[dict[str, Any]]:
    runs = []
    for task in TASKS:
        for adapter in ("prefix", "lora"):
            for method in METHODS:
                for seed in seeds_of(method, adapter):
                    supervised = rates[(adapter, "supervised")]
                    reinforcement = rates[(adapter, "reinforcement")]
                    lr = supervised if method in TWO_PHASE else rates[(adapter, FAMILY[method])]
                    runs.append(
                        {
                            "key": f"{task}-{method}-{adapter}-s{seed}",
                            "task": task,
                            "method": method,
                            "adapter": adapter,
                            "seed": seed,
                            "lr": lr,
                            "rft_lr": reinforcement if method in TWO_PHASE else None,
                            "steps": TASKS[task]["steps"],
                            "test": True,
                            "dtype": dtype,
                        }
                    )
    # Seed 0 of every task and adapter first: a study stopped part way still compares every method.
    return sorted(runs, key=lambda run: run["seed"])


# ----- one run -----------------------------------------------------------------------------------


def run_config(run: dict[str, Any], files: dict[str, Path], work: Path, eval_file: Path | None = None):
    from core.config import parse_config

    task = TASKS[run["task"]]
    eval_path = eval_file or files["validation"]
    return parse_config(
        {
            "model": MODEL,
            "method": run["method"],
            "adapter": {"type": run["adapter"]},
            "data": {"train": str(files["train"]), "eval": str(eval_path)},
            "reward": {"graders": [{"type": "numeric", "name": "correct", "extract": "last_number"}]},
            "training": {
                "steps": run["steps"],
                "prompts_per_step": PROMPTS_PER_STEP,
                "rollouts_per_prompt": ROLLOUTS_PER_PROMPT,
                "max_completion_tokens": task["max_completion_tokens"],
                "learning_rate": run["lr"],
                **({"rft_learning_rate": run["rft_lr"]} if run["rft_lr"] else {}),
                **run.get("changes", {}),
                "samples_per_step": 0,
                "dtype": run["dtype"],
            },
            # The test file lists each problem in its four phrasings, one after the other.
            "eval": {"every": EVAL_EVERY, "max_examples": 4 * TEST_PROBLEMS if eval_file else 10_000},
            "checkpoint": {"every": EVAL_EVERY, "keep": run["steps"] // EVAL_EVERY + 1},
            "seed": run["seed"],
            "output_dir": str(work / run["key"]),
        }
    )


def execute(run: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train one run (resuming its checkpoint if any), test its validation-chosen checkpoint."""
    import torch

    torch.set_num_threads(1)  # two runs share the two cores
    _configure_logging()
    from cli.trainer_commands import _quiet_libraries
    from core.checkpoints import latest_checkpoint
    from core.trainer import Trainer

    _quiet_libraries()
    origin = provenance_of_run(run)  # before training: the code this run imported
    files = write_task_data(run["task"], out / "work" / "data" / run["task"])
    work = out / "work"
    config = run_config(run, files, work)
    run_dir = Path(config.output_dir)
    cpu_file = run_dir / "cpu_seconds.json"
    cpu_before = json.loads(cpu_file.read_text())["train"] if cpu_file.is_file() else 0.0
    started_cpu, started = time.process_time(), time.perf_counter()
    resume = latest_checkpoint(run_dir)
    trainer = Trainer(config)
    log.info("[%s] %s", run["key"], f"resuming from {resume}" if resume else "starting")
    result = trainer.train(resume_from=resume)
    train_cpu = cpu_before + time.process_time() - started_cpu
    run_dir.mkdir(parents=True, exist_ok=True)
    cpu_file.write_text(json.dumps({"train": train_cpu}))
    by_step = {  # a run resumed after its last step evaluates that step again: keep one
        e["step"]: e["accuracy"] for e in map(json.loads, (run_dir / "eval.jsonl").read_text().splitlines())
    }
    validation = [{"step": step, "accuracy": accuracy} for step, accuracy in sorted(by_step.items())]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rft_steps = sum(1 for m in steps if m["phase"] == "rft")
    report: dict[str, Any] = {
        **run,
        **origin,
        "validation": validation,
        "final_train_metrics": steps[-1],
        "train_metrics": steps,  # every step's, to read a run's course without its work folder
        "training_sequences": run["steps"] * PROMPTS_PER_STEP * ROLLOUTS_PER_PROMPT,
        "rollouts": rft_steps * PROMPTS_PER_STEP * ROLLOUTS_PER_PROMPT,
        "train_cpu_minutes": train_cpu / 60,
        "adapter_dir": str(result.adapter_dir) if result.adapter_dir else None,
    }
    if run["test"]:
        # The validation-chosen checkpoint; ties go to the earlier step.
        best = max(validation, key=lambda e: (e["accuracy"], -e["step"]))
        test_started = time.process_time()
        tester = Trainer(run_config(run, files, work, eval_file=files["test"]))
        if best["step"] > 0:
            tester.load_checkpoint(run_dir / "checkpoints" / f"step-{best['step']:06d}")
        report["chosen_step"] = best["step"]
        report["test"] = test_summary(tester.evaluation().completions, files["test"])
        report["test_cpu_minutes"] = (time.process_time() - test_started) / 60
    report["wall_minutes_this_process"] = (time.perf_counter() - started) / 60
    write_result(out, run["key"], report)
    log.info("[%s] done: validation %s", run["key"], [e["accuracy"] for e in validation])
    return report


def provenance_of_run(run: dict[str, Any]) -> dict[str, Any]:
    """Commit, uncommitted paths, date and machine, for one run's result file."""
    from benchmarks.provenance import provenance

    return provenance(f"python -m benchmarks.learning (run {run['key']})", Path("docs/benchmarks/learning"))


def test_summary(completions: list[dict[str, Any]], test_file: Path) -> dict[str, Any]:
    """Accuracy overall and per phrasing (the test file holds every problem in every phrasing)."""
    lines = test_file.read_text().splitlines()[: len(completions)]
    phrasings = [json.loads(line)["phrasing"] for line in lines]
    per: dict[int, list[bool]] = {}
    for row, phrasing in zip(completions, phrasings, strict=True):
        per.setdefault(phrasing, []).append(bool(row["correct"]))
    return {
        "accuracy": sum(r["correct"] for r in completions) / len(completions),
        "per_phrasing": {str(p): sum(v) / len(v) for p, v in sorted(per.items())},
        "examples": len(completions),
        "samples": completions[:4],
    }


def base_accuracy(task: str, adapter: str, dtype: str, out: Path) -> dict[str, Any]:
    """Test accuracy before training: LoRA starts as the base model exactly; the prefix adapter's
    fresh initialisation is measured too (it should match)."""
    import torch

    torch.set_num_threads(1)
    _configure_logging()
    from cli.trainer_commands import _quiet_libraries
    from core.trainer import Trainer

    _quiet_libraries()
    key = untrained_key(task, adapter, local_bf16_matmuls())
    files = write_task_data(task, out / "work" / "data" / task)
    run = {
        "key": key,
        "task": task,
        "method": "rft",
        "adapter": adapter,
        "seed": 0,
        "lr": 1e-3,
        "rft_lr": None,
        "steps": 1,
        "test": True,
        "dtype": dtype,
    }
    origin = provenance_of_run(run)
    started = time.process_time()
    trainer = Trainer(run_config(run, files, out / "work", eval_file=files["test"]))
    report = {
        "key": key,
        **origin,
        "task": task,
        "adapter": adapter,
        "dtype": dtype,
        "test": test_summary(trainer.evaluation().completions, files["test"]),
        "test_cpu_minutes": (time.process_time() - started) / 60,
    }
    write_result(out, key, report)
    return report


def read_result(out: Path, key: str) -> dict[str, Any] | None:
    path = out / "runs" / f"{key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_result(out: Path, key: str, report: dict[str, Any]) -> None:
    path = out / "runs" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(report, indent=2))
    staging.replace(path)  # atomic: a killed runner never leaves half a result


# ----- the runner --------------------------------------------------------------------------------


def _execute_star(args: tuple) -> dict[str, Any]:
    kind, payload, out = args
    if kind == "base":
        return base_accuracy(*payload, out)
    return execute(payload, out)


def run_all(jobs: list[tuple], out: Path, parallel: int) -> None:
    pending = [j for j in jobs if read_result(out, _key(j)) is None]
    log.info("%d to run (%d already done)", len(pending), len(jobs) - len(pending))
    if not pending:
        return
    if parallel > 1:
        # SIGTERM ends the pool's runs too (leaving the pool terminates it): orphaned runs would
        # go on writing the run folders a restarted runner resumes from.
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
        # A fresh process per run: its memory goes back to the system when it ends.
        context = multiprocessing.get_context("spawn")
        with context.Pool(parallel, maxtasksperchild=1) as pool:
            for _ in pool.imap_unordered(_execute_star, [(*j, out) for j in pending]):
                pass
    else:
        for job in pending:
            _execute_star((*job, out))


def _key(job: tuple) -> str:
    kind, payload = job
    return untrained_key(*payload[:2], local_bf16_matmuls()) if kind == "base" else payload["key"]


def untrained_key(task: str, adapter: str, matmuls: str) -> str:
    """The result name of a task's test accuracy before training, with that adapter, on CPUs with
    those bf16 matmul units: greedy decoding follows their rounding, so each kind has its own."""
    return f"{task}-untrained-{adapter}-{matmuls}"


def base_accuracies(out: Path, task: str, adapter: str) -> dict[str, float]:
    """Test accuracy before training, per kind of CPU (bf16 matmul units) it was measured on."""
    results = (
        read_result(out, path.stem)
        for path in sorted((out / "runs").glob(f"{task}-untrained-{adapter}-*.json"))
    )
    return {bf16_matmuls(r["machine"]): r["test"]["accuracy"] for r in results}


def gain_over_base(results: list[dict[str, Any]], bases: dict[str, float]) -> float | None:
    """Mean over seeds of test accuracy minus the base model's on the same kind of CPU."""
    if any(bf16_matmuls(r["machine"]) not in bases for r in results):
        return None
    return statistics.mean(r["test"]["accuracy"] - bases[bf16_matmuls(r["machine"])] for r in results)


# ----- the report --------------------------------------------------------------------------------


def summarise(out: Path, rates: dict[tuple[str, str], float]) -> dict[str, Any]:
    rows = []
    for task in TASKS:
        bases = base_accuracies(out, task, "lora")  # LoRA starts as the base model exactly
        for adapter in ("prefix", "lora"):
            for method in METHODS:
                results = [
                    r
                    for r in (
                        read_result(out, f"{task}-{method}-{adapter}-s{s}") for s in seeds_of(method, adapter)
                    )
                    if r is not None
                ]
                if not results:
                    continue
                tests = [r["test"]["accuracy"] for r in results]
                rows.append(
                    {
                        "task": task,
                        "method": method,
                        "adapter": adapter,
                        "seeds": [r["seed"] for r in results],
                        "lr": results[0]["lr"],
                        "rft_lr": results[0]["rft_lr"],
                        "test_accuracy": tests,
                        "test_mean": statistics.mean(tests),
                        "test_sd": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                        "gain_over_base": gain_over_base(results, bases),
                        "chosen_steps": [r["chosen_step"] for r in results],
                        "training_sequences": results[0]["training_sequences"],
                        "rollouts": results[0]["rollouts"],
                        # Seeds may have run on different CPUs: their minutes and rounding differ.
                        "cpu_minutes_by_seed": [
                            r["train_cpu_minutes"] + r["test_cpu_minutes"] for r in results
                        ],
                        "bf16_matmuls_by_seed": [bf16_matmuls(r["machine"]) for r in results],
                    }
                )
    return {
        "learning_rates": {f"{a}/{f}": lr for (a, f), lr in rates.items()},
        "base_test_accuracy": {  # task -> adapter -> bf16 matmul units -> accuracy
            task: {adapter: base_accuracies(out, task, adapter) for adapter in ("lora", "prefix")}
            for task in TASKS
        },
        "sweep": sweep_rows(out, rates),
        "rows": rows,
        "ablations": ablation_rows(out, rates),
    }


def ablation_rows(out: Path, rates: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
    """Per ablated method and task: its seed-0 validation curve as is, then each ablation's."""
    rows, defaults_shown = [], set()
    for run in ablation_plan(rates, "-"):
        result = read_result(out, run["key"])
        if result is None:
            continue
        default_key = f"{run['task']}-{run['method']}-prefix-s0"
        default = read_result(out, default_key) if default_key not in defaults_shown else None
        if default:
            defaults_shown.add(default_key)
            rows.append({**_ablation_row(default), "ablation": "default", "changes": {}})
        rows.append(
            {**_ablation_row(result), "changes": {**result["changes"], "learning_rate": result["lr"]}}
        )
    return rows


def _ablation_row(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("key", "task", "method", "ablation", "validation")
    return {
        **{k: result.get(k) for k in keys},
        "test_accuracy": result["test"]["accuracy"] if result.get("test") else None,
        "bf16_matmuls": bf16_matmuls(result["machine"]),
    }


def sweep_rows(out: Path, rates: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
    """Each swept method's validation accuracy at the start and after SWEEP_STEPS, per rate."""
    rows = []
    for (adapter, family), (methods, tried) in SWEEP.items():
        for method in methods:
            results = {lr: read_result(out, f"sweep-A-{method}-{adapter}-lr{lr:g}") for lr in tried}
            rows.append(
                {
                    "adapter": adapter,
                    "family": family,
                    "method": method,
                    "start": results[tried[0]]["validation"][0]["accuracy"],
                    "final": {f"{lr:g}": r["validation"][-1]["accuracy"] for lr, r in results.items()},
                    "chosen": rates[(adapter, family)],
                    "commits": sorted({r["commit"][:7] for r in results.values()}),
                }
            )
    return rows


def table(summary: dict[str, Any]) -> str:
    lines = [
        f"### Learning rates: task A's validation accuracy after {SWEEP_STEPS} steps (one seed)",
        "",
        "| adapter | family | method | start | rates tried: accuracy | chosen | commits |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["sweep"]:
        tried = ", ".join(f"{lr}: {_pct(accuracy)}" for lr, accuracy in r["final"].items())
        lines.append(
            f"| {r['adapter']} | {r['family']} | {r['method']} | {_pct(r['start'])} | {tried} | "
            f"{r['chosen']:g} | {', '.join(r['commits'])} |"
        )
    lines.append("")
    for task, spec in TASKS.items():
        base = summary["base_test_accuracy"][task]
        lines += [
            f"### Task {task}: {spec['title']} (base model on test: {_per_cpu(base['lora'])}; "
            f"fresh prefix adapter: {_per_cpu(base['prefix'])}; gains are over the base model on the "
            "same kind of CPU)",
            "",
            "| method | adapter | seeds | lr | test accuracy (mean ± sd) | gain (points) | chosen steps "
            "| sequences | rollouts | CPU-min/run | bf16 matmuls |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in summary["rows"] if r["task"] == task):
            lr = f"{r['lr']:g}" + (f" / {r['rft_lr']:g}" if r["rft_lr"] else "")
            gain = f"{100 * r['gain_over_base']:+.1f}" if r["gain_over_base"] is not None else "-"
            lines.append(
                f"| {r['method']} | {r['adapter']} | {len(r['seeds'])} | {lr} | "
                f"{100 * r['test_mean']:.1f}% ± {100 * r['test_sd']:.1f} | {gain} | "
                f"{','.join(map(str, r['chosen_steps']))} | {r['training_sequences']} | {r['rollouts']} | "
                f"{', '.join(f'{m:.1f}' for m in r['cpu_minutes_by_seed'])} | "
                f"{_by_seed(r['seeds'], r['bf16_matmuls_by_seed'])} |"
            )
        lines.append("")
    if summary["ablations"]:
        steps = [e["step"] for e in summary["ablations"][0]["validation"]]
        lines += [
            "### Ablations: prefix adapter, seed 0, validation accuracy (test: the default runs' only)",
            "",
            "| task | method | setting | changes | "
            + " | ".join(f"step {step}" for step in steps)
            + " | test | bf16 matmuls |",
            "|---|---|---|---|" + "---|" * (len(steps) + 2),
        ]
        for r in summary["ablations"]:
            changes = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "the product's defaults"
            curve = " | ".join(_pct(e["accuracy"]) for e in r["validation"])
            lines.append(
                f"| {r['task']} | {r['method']} | {r['ablation']} | {changes} | {curve} | "
                f"{_pct(r['test_accuracy'])} | {r['bf16_matmuls']} |"
            )
        lines.append("")
    return "\n".join(lines)


def bf16_matmuls(machine: dict[str, Any]) -> str:
    """Which bf16 matrix units a CPU (as provenance records it) has: AMX tiles, AVX512-BF16 vectors,
    or neither."""
    flags = machine.get("native_bf16", [])
    return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "emulated"


def _by_seed(seeds: list[int], values: list[str]) -> str:
    """'s0 AVX512-BF16, s1-2 AMX': runs of seeds that share a value, grouped."""
    groups: list[tuple[list[int], str]] = []
    for seed, value in zip(seeds, values, strict=True):
        if groups and groups[-1][1] == value and groups[-1][0][-1] == seed - 1:
            groups[-1][0].append(seed)
        else:
            groups.append(([seed], value))
    return ", ".join(f"s{g[0]}" + (f"-{g[-1]}" if len(g) > 1 else "") + f" {value}" for g, value in groups)


def _per_cpu(accuracies: dict[str, float]) -> str:
    return ", ".join(f"{_pct(a)} on {matmuls}" for matmuls, a in accuracies.items()) or "-"


def local_bf16_matmuls() -> str:
    from benchmarks.provenance import machine

    return bf16_matmuls(machine())


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def plot(out: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(
        zip(METHODS, ("tab:blue", "tab:cyan", "tab:orange", "tab:green", "tab:olive", "tab:red"), strict=True)
    )
    fig, axes = plt.subplots(1, len(TASKS), figsize=(12, 4.5), sharey=True)
    for ax, (task, spec) in zip(axes, TASKS.items(), strict=True):
        for method in METHODS:
            curves = [
                r["validation"]
                for r in (read_result(out, f"{task}-{method}-prefix-s{s}") for s in PREFIX_SEEDS)
                if r
            ]
            if not curves:
                continue
            steps = [e["step"] for e in curves[0]]
            accuracy = [[c[i]["accuracy"] for c in curves] for i in range(len(steps))]
            mean = [100 * statistics.mean(a) for a in accuracy]
            sd = [100 * (statistics.stdev(a) if len(a) > 1 else 0.0) for a in accuracy]
            ax.plot(steps, mean, marker="o", color=colours[method], label=f"{method} ({len(curves)} seeds)")
            ax.fill_between(
                steps,
                [m - s for m, s in zip(mean, sd, strict=True)],
                [m + s for m, s in zip(mean, sd, strict=True)],
                color=colours[method],
                alpha=0.15,
            )
        ax.set_title(f"Task {task}: {spec['title']}, prefix adapter")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy, greedy (%), mean ± sd")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/learning"))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one core each)")
    parser.add_argument("--phase", choices=("sweep", "runs", "ablations", "report", "all"), default="all")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument(
        "--dtype", choices=DTYPES, default="bfloat16", help="base weights' dtype of every run"
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.provenance import provenance
    from core.models import resolve_model_dir

    argv = sys.argv[1:] if argv is None else argv
    out = args.out / args.dtype
    origin = provenance(shlex.join(["python", "-m", "benchmarks.learning", *argv]), args.out)
    resolve_model_dir(MODEL)  # convert once, before the runs start
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.dtype == "bfloat16" and local_bf16_matmuls() == "emulated":
        log.warning("this CPU has no native bf16 (AMX or AVX512-BF16): bfloat16 runs are emulated and slow")
    if args.phase in ("sweep", "all"):
        run_all([("run", r) for r in sweep_plan(args.dtype)], out, args.jobs)
    rates = chosen_rates(out)
    log.info("learning rates chosen on validation: %s", rates)
    if args.phase in ("runs", "all"):
        base = [
            ("base", (task, adapter, args.dtype)) for task in args.tasks for adapter in ("lora", "prefix")
        ]
        runs = [("run", r) for r in main_plan(rates, args.dtype) if r["task"] in args.tasks]
        ablations = [("run", r) for r in ablation_plan(rates, args.dtype)] if "B" in args.tasks else []
        if args.phase == "all":
            first = [
                job for job in runs if job[1]["adapter"] == "prefix" and job[1]["seed"] == PREFIX_SEEDS[0]
            ]
            others = [job for job in runs if job[1]["adapter"] == "prefix" and job not in first]
            lora = [job for job in runs if job[1]["adapter"] == "lora"]
            runs = first + ablations + others + lora
        run_all(base + runs, out, args.jobs)
    if args.phase == "ablations":
        run_all([("run", r) for r in ablation_plan(rates, args.dtype)], out, args.jobs)
    summary = summarise(out, rates)
    report = {
        **origin,
        "settings": {
            "tasks": TASKS,
            "sizes": SIZES,
            "sweep": {f"{a}/{f}": {"methods": m, "rates": r} for (a, f), (m, r) in SWEEP.items()},
            "sweep_steps": SWEEP_STEPS,
            "eval_every": EVAL_EVERY,
            "prompts_per_step": PROMPTS_PER_STEP,
            "rollouts_per_prompt": ROLLOUTS_PER_PROMPT,
            "dtype": args.dtype,
        },
        **summary,
    }
    (out / "study.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(table(summary))
    plot(out, out / "curves.png")
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
