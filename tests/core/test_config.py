"""Training config: defaults, derived properties, ConfigError messages and YAML loading."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.config import (
    METHODS,
    ConfigError,
    LoraAdapterConfig,
    PrefixAdapterConfig,
    TrainConfig,
    load_config,
    parse_config,
)
from core.rewards.graders import NumericMatch

MINIMAL: dict[str, Any] = {
    "model": "tiny-random",
    "data": {"train": "train.jsonl"},
    "reward": {"graders": [{"type": "numeric"}]},
}


def _config(**sections: Any) -> dict[str, Any]:
    raw = copy.deepcopy(MINIMAL)
    for key, value in sections.items():
        if value is None:
            raw.pop(key, None)
        elif isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return raw


def _error(raw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return str(info.value)


def test_minimal_config_defaults():
    config = parse_config(copy.deepcopy(MINIMAL))
    assert isinstance(config, TrainConfig)
    assert config.model == "tiny-random"
    assert config.method == "prefix_rft"
    assert isinstance(config.adapter, PrefixAdapterConfig)
    assert config.adapter.type == "prefix"
    assert config.data.train == Path("train.jsonl")  # no base_dir: left as given
    assert config.data.eval is None
    assert config.data.eval_size == 0
    assert isinstance(config.reward.graders[0], NumericMatch)
    assert config.training.steps == 100
    assert config.training.rollouts_per_prompt == 8
    assert config.training.hybrid_rollouts_per_prompt == 1
    assert config.hybrid_rollouts_per_prompt == 1
    assert config.sft_steps == 0
    assert config.learning_rate == 1e-2
    assert config.seed == 0
    assert config.output_dir == Path("runs/latest")


def test_hybrid_rollouts_only_for_prefix_rft():
    assert parse_config(_config(method="rft")).hybrid_rollouts_per_prompt == 0
    assert parse_config(_config(method="sft_then_rft")).hybrid_rollouts_per_prompt == 0
    config = parse_config(_config(training={"hybrid_rollouts_per_prompt": 3}))
    assert config.hybrid_rollouts_per_prompt == 3


def test_sft_steps_property():
    assert parse_config(_config(method="sft", reward=None, training={"steps": 40})).sft_steps == 40
    assert parse_config(_config(method="sft_then_rft", training={"steps": 41})).sft_steps == 20
    assert parse_config(_config(method="sft_then_rft", training={"steps": 40, "sft_steps": 7})).sft_steps == 7
    assert parse_config(_config(method="prefix_rft")).sft_steps == 0
    assert parse_config(_config(method="rft")).sft_steps == 0


def test_sft_and_psft_need_no_reward_but_the_others_do():
    for method in ("sft", "psft"):
        assert parse_config(_config(method=method, reward=None)).reward is None
    for method in set(METHODS) - {"sft", "psft"}:
        message = _error(_config(method=method, reward=None))
        assert f"method {method!r} needs a `reward`" in message


def test_unknown_field_suggests_the_close_one():
    message = _error(_config(training={"lerning_rate": 0.1}))
    assert "training.lerning_rate: unknown field; did you mean 'learning_rate'?" in message
    assert "allowed:" in message


def test_unknown_top_level_field():
    message = _error(_config(metod="rft"))
    assert "metod: unknown field; did you mean 'method'?" in message


def test_unknown_adapter_field_suggests_the_close_one():
    message = _error(_config(adapter={"type": "lora", "rr": 4}))
    assert "adapter.rr: unknown field; did you mean 'r'?" in message


def test_wrong_method_lists_allowed_values():
    message = _error(_config(method="ppo"))
    assert "method:" in message
    for method in METHODS:
        assert repr(method) in message


def test_errors_are_collected():
    with pytest.raises(ConfigError) as info:
        parse_config(_config(method="ppo", training={"steps": 0}))
    assert len(info.value.problems) == 2
    assert any(p.startswith("training.steps:") for p in info.value.problems)


def test_config_must_be_a_mapping():
    assert "must be a mapping" in _error(["not", "a", "mapping"])
    assert "must be a mapping" in _error(None)


def test_gradient_checkpointing_works_with_either_adapter():
    for adapter in ({"type": "prefix"}, {"type": "lora"}):
        assert parse_config(
            _config(adapter=adapter, training={"gradient_checkpointing": True})
        ).training.gradient_checkpointing


@pytest.mark.parametrize("field", ["cache_implementation", "generation_backend"])
def test_retired_fields_are_unknown(field):
    # They never did anything; a config that sets one is told so instead of silently ignored.
    message = _error(_config(training={field: "dynamic"}))
    assert f"training.{field}: unknown field" in message


def test_hybrid_must_be_smaller_than_rollouts():
    message = _error(_config(training={"rollouts_per_prompt": 4, "hybrid_rollouts_per_prompt": 4}))
    assert "training:" in message
    assert "hybrid_rollouts_per_prompt must be smaller than rollouts_per_prompt" in message
    assert "hybrid_rollouts_per_prompt" in _error(
        _config(training={"rollouts_per_prompt": 4, "hybrid_rollouts_per_prompt": 5})
    )
    config = parse_config(_config(training={"rollouts_per_prompt": 4, "hybrid_rollouts_per_prompt": 3}))
    assert config.training.hybrid_rollouts_per_prompt == 3


def test_learning_rate_defaults_by_adapter_and_override():
    lora = parse_config(_config(adapter={"type": "lora"}))
    prefix = parse_config(_config(adapter={"type": "prefix"}))
    assert isinstance(lora.adapter, LoraAdapterConfig)
    assert lora.learning_rate == 3e-4
    assert prefix.learning_rate == 1e-2
    assert lora.learning_rate != prefix.learning_rate
    override = parse_config(_config(adapter={"type": "lora"}, training={"learning_rate": 5e-4}))
    assert override.learning_rate == 5e-4
    assert override.adapter.learning_rate == 3e-4


def test_adapter_section_without_type_defaults_to_prefix():
    config = parse_config(_config(adapter={"num_virtual_tokens": 32}))
    assert config.adapter.type == "prefix"
    assert config.adapter.num_virtual_tokens == 32


def test_bad_reward_is_a_config_error():
    message = _error(_config(reward={"graders": [{"type": "regex", "pattern": "("}]}))
    assert "reward.graders.0" in message
    assert "regular expression" in message


# --- YAML -------------------------------------------------------------------------------------


def _write_yaml(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_load_config_resolves_data_paths_against_the_yaml_folder(tmp_path: Path):
    folder = tmp_path / "job"
    folder.mkdir()
    absolute_eval = tmp_path / "elsewhere" / "eval.jsonl"
    raw = _config(data={"train": "data/train.jsonl", "eval": str(absolute_eval)})
    config = load_config(_write_yaml(folder / "config.yaml", raw))
    assert config.data.train == folder / "data" / "train.jsonl"
    assert config.data.eval == absolute_eval


def test_load_config_resolves_relative_eval(tmp_path: Path):
    raw = _config(data={"train": "t.jsonl", "eval": "../e.jsonl"})
    config = load_config(_write_yaml(tmp_path / "c.yaml", raw))
    assert config.data.eval == tmp_path / ".." / "e.jsonl"


def test_load_config_applies_dotted_overrides(tmp_path: Path):
    path = _write_yaml(tmp_path / "c.yaml", _config(training={"steps": 10}))
    config = load_config(
        path,
        overrides={
            "training.steps": 5,
            "training.learning_rate": 0.01,
            "eval.every": 2,  # a section absent from the file
            "method": "rft",
        },
    )
    assert config.training.steps == 5
    assert config.learning_rate == 0.01
    assert config.eval.every == 2
    assert config.method == "rft"
    assert config.data.train == tmp_path / "train.jsonl"


def test_load_config_override_errors(tmp_path: Path):
    path = _write_yaml(tmp_path / "c.yaml", copy.deepcopy(MINIMAL))
    with pytest.raises(ConfigError, match="not a section"):
        load_config(path, overrides={"model.name": "x"})
    with pytest.raises(ConfigError, match=r"training\.lerning_rate"):
        load_config(path, overrides={"training.lerning_rate": 0.1})


def test_load_config_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_load_config_invalid_yaml(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\ndata: {train: x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_load_config_non_mapping_yaml(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)
