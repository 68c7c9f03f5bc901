"""Does training in bfloat16 land where float32 does? The example job in both, over several seeds.

    python -m benchmarks.precision_training --seeds 3 --jobs 2 --out docs/benchmarks/precision_training.json

Each run is `make example`'s job (`examples/addition/config.yaml`: prefix_rft with a prefix
adapter on SmolLM2-135M-Instruct, greedy held-out accuracy on 100 problems before, during and
after training; the committed results ran its 12-step form of the time) with `training.dtype` set
to float32 or bfloat16 and `seed` set. Only the base weights' dtype differs. The seeds change the
steps' examples and the sampling, so float32's spread over seeds is the band a bfloat16 run is
held to. Runs go `--jobs` at a time, the cores split among them: wall-clock minutes are not the
point here.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.provenance import spread

log = logging.getLogger("benchmarks.precision_training")

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "addition" / "config.yaml"
DTYPES = ("float32", "bfloat16")


def run_one(dtype: str, seed: int, threads: int, data_dir: str) -> dict[str, Any]:
    """One example job; returns its held-out evaluations."""
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    from cli.trainer_commands import _quiet_libraries
    from core.config import load_config
    from core.reporting import TrainerCallback
    from core.trainer import Trainer

    _quiet_libraries()
    config = load_config(
        CONFIG,
        {
            "training.dtype": dtype,
            "seed": seed,
            "data.train": f"{data_dir}/train.jsonl",
            "data.eval": f"{data_dir}/eval.jsonl",
            "output_dir": f"{data_dir}/runs/{dtype}-{seed}",
            "checkpoint.every": 0,
        },
    )
    evals: list[dict[str, Any]] = []

    class Collect(TrainerCallback):
        def on_eval(self, metrics: dict[str, Any]) -> None:
            evals.append({"step": metrics["step"], "accuracy": metrics["accuracy"]})
            log.info(
                "  [%s seed %d] eval @ %d: accuracy %.2f", dtype, seed, metrics["step"], metrics["accuracy"]
            )

    started = time.perf_counter()
    Trainer(config, callbacks=[Collect()]).train()
    return {
        "dtype": dtype,
        "seed": seed,
        "evals": evals,
        "wall_minutes": (time.perf_counter() - started) / 60,
    }


def _run_star(args: tuple) -> dict[str, Any]:
    return run_one(*args)


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dtype: final (and base) accuracy, median and range over seeds; is bf16 inside fp32's band?"""
    by_dtype: dict[str, Any] = {}
    for dtype in DTYPES:
        runs = [r for r in results if r["dtype"] == dtype]
        finals = [r["evals"][-1]["accuracy"] for r in runs]
        bases = [r["evals"][0]["accuracy"] for r in runs]
        by_dtype[dtype] = {
            "seeds": [r["seed"] for r in runs],
            "final_accuracy": spread(finals),
            "base_accuracy": spread(bases),
            "finals": finals,
        }
    band = by_dtype["float32"]["final_accuracy"]
    bf16 = by_dtype["bfloat16"]["final_accuracy"]["median"]
    by_dtype["bfloat16_median_in_float32_band"] = band["min"] <= bf16 <= band["max"]
    by_dtype["steps"] = results[0]["evals"][-1]["step"]
    return by_dtype


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for each dtype")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (cores split among them)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from benchmarks.provenance import provenance, write_report
    from core.models import resolve_model_dir
    from examples.addition.make_data import addition_splits, write_jsonl

    origin = provenance(shlex.join(["python", "-m", "benchmarks.precision_training", *argv]), args.out)
    resolve_model_dir("smollm2-135m-instruct")  # converted once, before the runs
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with tempfile.TemporaryDirectory(prefix="precision-training-") as data_dir:
        train, heldout = addition_splits(2000, 200, seed=0)  # make_data.py's defaults
        write_jsonl(Path(data_dir) / "train.jsonl", train)
        write_jsonl(Path(data_dir) / "eval.jsonl", heldout)
        runs = [(dtype, seed, threads, data_dir) for seed in range(args.seeds) for dtype in DTYPES]
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(_run_star, runs, chunksize=1)

    found = summary(results)
    lines = []
    for dtype in DTYPES:
        final, base = found[dtype]["final_accuracy"], found[dtype]["base_accuracy"]
        lines.append(
            f"{dtype:9} held-out accuracy after {found['steps']} steps: median {100 * final['median']:.0f}% "
            f"[{100 * final['min']:.0f}-{100 * final['max']:.0f}] over seeds {found[dtype]['seeds']} "
            f"(before training {100 * base['median']:.0f}%)"
        )
    lines.append(f"bfloat16's median inside float32's range: {found['bfloat16_median_in_float32_band']}")
    log.info("%s", "\n".join(lines))
    if args.out is not None:
        report = {
            **origin,
            "config": str(CONFIG.relative_to(CONFIG.parents[2])),
            "summary": found,
            "runs": results,
            "table": lines,
        }
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
