"""A job's duration before it starts, priced at measured rates: checked by hand."""

from __future__ import annotations

import pytest

from core.config import parse_config
from service.duration import Measured, estimate


def config(method: str = "sft_then_rft", **training):
    return parse_config(
        {
            "model": "tiny-random",
            "method": method,
            "data": {"train": "train.jsonl"},
            "reward": {"graders": [{"type": "contains", "value": "a"}]},
            "training": {"steps": 10, "prompts_per_step": 4, "rollouts_per_prompt": 8, "max_completion_tokens": 100,
                         "sft_steps": 4, "sft_examples_per_step": 16, **training},
            "eval": {"every": 3, "max_examples": 50},
        }
    )  # fmt: skip


def test_steps_and_evaluations_are_priced_at_the_median_measured_rate():
    history = [
        # RFT: 2, 3 and 4 ms per sequence-token (median 3 ms): at 32 x 100, 9.6 s a step.
        Measured("reinforcement", 6.4, 32, 100),
        Measured("reinforcement", 4.8, 16, 100),
        Measured("reinforcement", 16.0, 40, 100),
        # Supervised: 1 ms per sequence-token: at 16 x 100, 1.6 s a step.
        Measured("supervised", 0.8, 8, 100),
        # Evaluations: 0.5 ms per example-token: 40 examples (all there are) x 100, 2 s.
        Measured("evaluation", 5.0, 100, 100),
    ]
    priced = estimate(config(), eval_examples=40, history=history)
    assert priced.steps == {"supervised": 4, "reinforcement": 6}
    assert priced.evaluations == 2 + 3  # before, after, and at steps 3, 6, 9
    assert priced.per_step_seconds == {"supervised": pytest.approx(1.6), "reinforcement": pytest.approx(9.6)}
    assert priced.evaluation_seconds == pytest.approx(2.0)
    assert priced.seconds == pytest.approx(4 * 1.6 + 6 * 9.6 + 5 * 2.0)
    assert priced.measured == 5


def test_nothing_measured_is_no_estimate():
    only_rft = [Measured("reinforcement", 6.4, 32, 100)]
    assert estimate(config(), eval_examples=40, history=only_rft).seconds is None  # no supervised rate
    assert estimate(config(), eval_examples=40, history=[]).seconds is None
    # A job without evaluations needs no evaluation rate.
    plain = config("rft", sft_steps=None, sft_examples_per_step=None)
    assert estimate(plain, eval_examples=0, history=only_rft).seconds == pytest.approx(10 * 6.4)
