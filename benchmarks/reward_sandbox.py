"""Throughput of python graders in the reward sandbox, and a sleeping grader cut at its limit.

    python -m benchmarks.reward_sandbox --out docs/benchmarks/reward_sandbox.json
    python -m benchmarks.reward_sandbox --completions 2000     # a smoke run

Targets (the issue): a trivial python reward scores at least 2,000 completions per second, and a
grader that sleeps is cut at its time limit without stalling the others.

What is measured, on a SandboxPool with the deployment's default limits except where said:
- cold start: one sandbox process built and a grader loaded (pool.check());
- a trivial per-sample reward (`float(completion == example["answer"])`) on --completions
  completions in one call (processes already warm; the median of --repeats runs), and the
  latency of one training step's worth (64 completions);
- the same reward in TRL's batch form, and a math-verify reward (a realistic heavy one);
- a sleeping grader: 64 completions of which 4 sleep for an hour, with a 1 s time limit; the
  others must score, and a trivial grader called meanwhile from another thread must answer at
  once. Scoring runs on the same machine as the caller (needs user namespaces, as the sandbox does).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.provenance import provenance, write_report
from core.rewards.sandbox import GraderProgram, SandboxLimits, SandboxPool

TARGET_PER_SECOND = 2000.0
STEP = 64  # completions of one training step (8 prompts x 8 rollouts, the trainer's defaults)

TRIVIAL = GraderProgram(
    "def reward(completion, example):\n    return float(completion == example['answer'])\n"
)
TRIVIAL_BATCH = GraderProgram(
    "def reward(completions, answer, **kwargs):\n"
    "    return [float(c == a) for c, a in zip(completions, answer)]\n",
    form="batch",
)
MATH = GraderProgram(
    "from math_verify import parse, verify\n"
    "def reward(completion, example):\n"
    "    return float(verify(parse(example['answer']), parse(completion)))\n"
)
SLEEPY = GraderProgram(
    "import time\n"
    "def reward(completion, example):\n"
    "    if example['slow']:\n"
    "        time.sleep(3600)\n"
    "    return 1.0\n"
)


def inputs(n: int, **example: Any) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    completions = [str(i % 100) for i in range(n)]
    return [""] * n, completions, [{"answer": "7", **example} for _ in range(n)]


def throughput(pool: SandboxPool, program: GraderProgram, n: int, repeats: int) -> dict[str, float]:
    prompts, completions, examples = inputs(n)
    pool.score(program, prompts, completions, examples)  # warm: processes started and loaded
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        outcomes = pool.score(program, prompts, completions, examples)
        times.append(time.perf_counter() - started)
        assert all(o.error is None for o in outcomes), outcomes[0]
    seconds = statistics.median(times)
    return {"completions": n, "median_seconds": seconds, "completions_per_second": n / seconds}


def step_latency(pool: SandboxPool, program: GraderProgram, repeats: int = 50) -> dict[str, float]:
    prompts, completions, examples = inputs(STEP)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        pool.score(program, prompts, completions, examples)
        times.append(time.perf_counter() - started)
    return {"completions": STEP, "median_ms": statistics.median(times) * 1000, "max_ms": max(times) * 1000}


def math_throughput(pool: SandboxPool, n: int) -> dict[str, float]:
    completions = [f"The answer is $\\frac{{{i % 7 + 1}}}{{2}}$" for i in range(n)]
    examples = [{"answer": f"{(i % 7 + 1) / 2}"} for i in range(n)]
    pool.score(MATH, [""] * n, completions, examples)
    started = time.perf_counter()
    outcomes = pool.score(MATH, [""] * n, completions, examples)
    seconds = time.perf_counter() - started
    assert all(o.score == 1.0 for o in outcomes), outcomes[0]
    return {"completions": n, "seconds": seconds, "completions_per_second": n / seconds}


def sleeping_grader(pool: SandboxPool) -> dict[str, Any]:
    slow = {3, 20, 37, 54}
    prompts, completions, _ = inputs(STEP)
    examples = [{"slow": i in slow} for i in range(STEP)]
    pool.score(TRIVIAL, *inputs(4))  # a warm process for the trivial grader, as in training
    result: dict[str, Any] = {}

    def run() -> None:
        started = time.perf_counter()
        result["outcomes"] = pool.score(SLEEPY, prompts, completions, examples)
        result["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.5)  # the sleepers are sleeping now
    started = time.perf_counter()
    meanwhile = pool.score(TRIVIAL, *inputs(STEP))
    other_ms = (time.perf_counter() - started) * 1000
    thread.join()
    outcomes = result["outcomes"]
    timed_out = [i for i, o in enumerate(outcomes) if o.error and "time limit" in o.error]
    return {
        "completions": STEP,
        "sleeping": sorted(slow),
        "timeout_seconds": pool.limits.timeout_seconds,
        "seconds": result["seconds"],
        "cut_at_time_limit": timed_out,
        "others_scored": sum(o.score == 1.0 for o in outcomes),
        "error_example": outcomes[min(slow)].error,
        "trivial_grader_meanwhile_ms": other_ms,
        "trivial_grader_meanwhile_ok": all(o.error is None for o in meanwhile),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--completions", type=int, default=20_000, help="completions per throughput call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=SandboxLimits().workers, help="warm sandbox processes")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    origin = provenance(shlex.join(["python", "-m", "benchmarks.reward_sandbox", *argv]), args.out)

    limits = SandboxLimits(workers=args.workers)
    pool = SandboxPool(limits)
    try:
        started = time.perf_counter()
        isolation = pool.check()
        cold_start = time.perf_counter() - started
        results = {
            "cold_start_seconds": cold_start,
            "trivial": throughput(pool, TRIVIAL, args.completions, args.repeats),
            "trivial_step_latency": step_latency(pool, TRIVIAL),
            "trivial_batch_form": throughput(pool, TRIVIAL_BATCH, args.completions, args.repeats),
            "math_verify": math_throughput(pool, 640),
        }
        pool.close()
        pool = SandboxPool(SandboxLimits(workers=args.workers, timeout_seconds=1.0))
        results["sleeping_grader"] = sleeping_grader(pool)
    finally:
        pool.close()

    trivial = results["trivial"]["completions_per_second"]
    sleeping = results["sleeping_grader"]
    print(f"sandbox: {isolation}; {args.workers} warm processes on {os.cpu_count()} CPUs")
    print(f"cold start (one sandbox, grader loaded): {cold_start * 1000:.0f} ms")
    print(
        f"trivial python reward: {trivial:,.0f} completions/s (target {TARGET_PER_SECOND:,.0f}/s: "
        f"{'met' if trivial >= TARGET_PER_SECOND else 'MISSED'})"
    )
    print(
        f"  one training step ({STEP} completions): {results['trivial_step_latency']['median_ms']:.2f} ms median"
    )
    print(f"  TRL batch form: {results['trivial_batch_form']['completions_per_second']:,.0f} completions/s")
    print(f"math-verify reward: {results['math_verify']['completions_per_second']:,.0f} completions/s")
    print(
        f"sleeping grader: {len(sleeping['cut_at_time_limit'])} of {len(sleeping['sleeping'])} sleepers cut at "
        f"{sleeping['timeout_seconds']:g} s, {sleeping['others_scored']} of {STEP - len(sleeping['sleeping'])} "
        f"others scored, {sleeping['seconds']:.2f} s in all; a trivial grader meanwhile answered in "
        f"{sleeping['trivial_grader_meanwhile_ms']:.1f} ms"
    )
    if args.out:
        record = {
            **origin,
            "target": {"trivial_completions_per_second": TARGET_PER_SECOND},
            "settings": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "limits": limits.model_dump(),
                "isolation": isolation,
            },
            "result": results,
        }
        write_report(args.out, record)
    met = trivial >= TARGET_PER_SECOND and sleeping["others_scored"] == STEP - len(sleeping["sleeping"])
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
