"""The example configs are the learning study's recipe: who copies one trains as the study did."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.learning import ABLATIONS, SIZES, chosen_rates, main_plan, run_config
from core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "docs/benchmarks/learning/bfloat16"
# Example -> (the study's task, the settings it changes from prefix_rft's defaults there).
RECIPES = {
    "addition": ("A", {}),
    "addition3": ("B", ABLATIONS[("B", "prefix_rft", "prefix-decay-10-steps")]),
}
NOT_THE_RECIPE = {"dtype", "samples_per_step"}  # how the study runs, not what it trains


@pytest.mark.parametrize("example", RECIPES)
def test_an_example_trains_prefix_rft_as_the_study_does(example, tmp_path):
    task, changes = RECIPES[example]
    plan = main_plan(chosen_rates(STUDY), "bfloat16")
    run = next(r for r in plan if r["key"] == f"{task}-prefix_rft-prefix-s0")
    files = {name: tmp_path / f"{name}.jsonl" for name in ("train", "validation", "test")}
    study = run_config({**run, "changes": changes}, files, tmp_path)
    ours = load_config(ROOT / "examples" / example / "config.yaml")

    assert (ours.model, ours.method, ours.adapter) == (study.model, study.method, study.adapter)
    assert ours.learning_rate == study.learning_rate  # the example leaves it to the adapter's default
    settings = NOT_THE_RECIPE | {"learning_rate"}
    assert ours.training.model_dump(exclude=settings) == study.training.model_dump(exclude=settings)
    assert (ours.eval.every, ours.eval.max_examples) == (study.eval.every, SIZES["validation"])
    assert ours.checkpoint.every == study.checkpoint.every
