"""OpenAI's `method` read into ours: the mapping of each hyperparameter, worked by hand."""

from __future__ import annotations

import pytest

from api.fine_tuning_methods import resolve_method
from protocol.errors import APIError

GRADER = {
    "type": "string_check",
    "name": "s",
    "input": "{{sample.output_text}}",
    "reference": "x",
    "operation": "eq",
}
PREFIX_LR, LORA_LR = 1e-2, 3e-4  # the adapters' default learning rates (core/config.py)


def test_supervised_with_auto_everything():
    resolved = resolve_method({"type": "supervised", "supervised": {}}, None, training_examples=640)
    assert resolved.method == "sft" and resolved.grader is None
    # batch: our default sequences per step, 8 prompts x 8 rollouts = 64; 3 epochs of 640 = 30 steps
    assert resolved.training == {"sft_examples_per_step": 64, "steps": 30}
    assert resolved.evaluation == {"every": 3, "max_examples": 200}
    assert resolved.echo == {
        "type": "supervised",
        "supervised": {"hyperparameters": {"batch_size": 64, "n_epochs": 3, "learning_rate_multiplier": 1.0}},
    }


def test_supervised_hyperparameters_map_onto_ours():
    method = {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {"batch_size": 16, "n_epochs": 2, "learning_rate_multiplier": 0.5},
            "adapter": {"type": "lora"},
        },
    }
    resolved = resolve_method(method, None, training_examples=100)
    # ceil(2 x 100 / 16) = 13 steps; half of LoRA's 3e-4
    assert resolved.training == {
        "sft_examples_per_step": 16,
        "steps": 13,
        "learning_rate": pytest.approx(1.5e-4),
    }
    assert resolved.adapter == {"type": "lora"}


def test_the_deprecated_top_level_hyperparameters_mean_supervised():
    resolved = resolve_method(None, {"n_epochs": 1, "batch_size": 10}, training_examples=25)
    assert resolved.method == "sft" and resolved.training["steps"] == 3  # ceil(25 / 10)
    assert resolved.echo["type"] == "supervised"


def test_reinforcement_hyperparameters_map_onto_ours():
    method = {
        "type": "reinforcement",
        "reinforcement": {
            "grader": GRADER,
            "hyperparameters": {
                "batch_size": 4,
                "n_epochs": "auto",
                "compute_multiplier": 1.5,
                "eval_interval": 5,
                "eval_samples": 50,
                "reasoning_effort": "low",
            },
        },
    }
    resolved = resolve_method(method, None, training_examples=42)
    assert resolved.method == "rft" and resolved.grader == GRADER
    # one epoch of 42 prompts at 4 a step: 11 steps; 1.5 x 8 rollouts = 12
    assert resolved.training == {"prompts_per_step": 4, "steps": 11, "rollouts_per_prompt": 12}
    assert resolved.evaluation == {"every": 5, "max_examples": 50}
    assert resolved.echo["reinforcement"]["hyperparameters"] == {
        "batch_size": 4,
        "n_epochs": 1,
        "learning_rate_multiplier": 1.0,
        "compute_multiplier": 1.5,
        "eval_interval": 5,
        "eval_samples": 50,
        "reasoning_effort": "low",
    }
    assert resolved.echo["reinforcement"]["grader"] == GRADER


def test_our_methods_take_the_same_layout_and_our_own_settings():
    method = {
        "type": "prefix_rft",
        "prefix_rft": {
            "grader": GRADER,
            "hyperparameters": {"steps": 20, "hybrid_rollouts_per_prompt": 2, "learning_rate_multiplier": 2},
        },
    }
    resolved = resolve_method(method, None, training_examples=1000)
    assert resolved.method == "prefix_rft"
    assert resolved.training == {
        "steps": 20,
        "hybrid_rollouts_per_prompt": 2,
        "prompts_per_step": 8,
        "learning_rate": pytest.approx(2 * PREFIX_LR),
    }
    assert resolved.echo["prefix_rft"]["hyperparameters"]["n_epochs"] == pytest.approx(20 * 8 / 1000)
    assert resolve_method({"type": "psft", "psft": {}}, None, 64).method == "psft"


@pytest.mark.parametrize(
    ("method", "code", "param", "message"),
    [
        (
            {"type": "dpo", "dpo": {}},
            "unsupported_method",
            "method.type",
            "supported: supervised, reinforcement",
        ),
        ({"type": "distill"}, "invalid_request", "method.type", "unknown method type 'distill'"),
        (
            {"type": "reinforcement", "reinforcement": {}},
            "invalid_request",
            "method.reinforcement.grader",
            "needs a grader",
        ),
        (
            {"type": "supervised", "supervised": {"grader": GRADER}},
            "invalid_request",
            "method.supervised.grader",
            "takes no grader",
        ),
        (
            {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}},
            "invalid_request",
            "method.supervised.hyperparameters.n_epochs",
            "at least 1",
        ),
        (
            {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2.5}}},
            "invalid_request",
            "method.supervised.hyperparameters.batch_size",
            'must be "auto" or an integer',
        ),
        (
            {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": 0}}},
            "invalid_request",
            "method.supervised.hyperparameters.learning_rate_multiplier",
            "must be over 0",
        ),
        (
            {
                "type": "reinforcement",
                "reinforcement": {"grader": GRADER, "hyperparameters": {"steps": "many"}},
            },
            "invalid_job",
            "method.reinforcement.hyperparameters.steps",
            "valid integer",
        ),
        (
            {
                "type": "reinforcement",
                "reinforcement": {"grader": GRADER, "hyperparameters": {"compute_multiplier": float("inf")}},
            },
            "invalid_request",
            "method.reinforcement.hyperparameters.compute_multiplier",
            'must be "auto" or a number',
        ),
        (
            {"type": "supervised", "supervised": {"hyperparameters": {"warp": 9}}},
            "invalid_request",
            "method.supervised.hyperparameters.warp",
            "unknown hyperparameter 'warp'",
        ),
        (
            {"type": "supervised", "supervised": {"hyperparameters": {"steps": 5, "n_epochs": 2}}},
            "invalid_request",
            "method.supervised.hyperparameters.n_epochs",
            "not both",
        ),
        (
            {"type": "supervised", "supervised": {"adapter": {"type": "adapterless"}}},
            "invalid_request",
            "method.supervised.adapter",
            "invalid adapter",
        ),
    ],
)
def test_what_cannot_be_used_is_refused_naming_the_field(method, code, param, message):
    with pytest.raises(APIError) as caught:
        resolve_method(method, None, training_examples=10)
    error = caught.value
    assert (error.status, error.code, error.param) == (400, code, param)
    assert message in error.message


def test_a_null_training_setting_is_its_default():
    method = {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate": None}}}
    resolved = resolve_method(method, None, 100)
    assert "learning_rate" not in resolved.training
    assert resolved.echo["supervised"]["hyperparameters"]["learning_rate_multiplier"] == 1.0
