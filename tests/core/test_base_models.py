"""Registering base models: their facts read from the files without loading them, the refusals,
and the registry the API, the worker and the model server read."""

from __future__ import annotations

import json
import logging

import pytest

from core.base_models import (
    BUILT_IN,
    TRAINING_BYTES_PER_PARAMETER,
    BaseModelInfo,
    ModelDirectoryError,
    base_models,
    chat_template_of,
    check_name,
    default_model_name,
    describe_model_dir,
    published_name,
    read_registry,
    register_model,
    safetensors_parameters,
    too_big_reason,
    unregister_model,
    untrainable_reason,
)
from core.errors import InvalidInput
from core.models import load_base_model, resolve_model_dir, tiny_random_dir
from tests.model_dirs import fake_model_dir, second_model_dir


def test_parameters_are_summed_from_every_safetensors_header(tmp_path):
    directory = fake_model_dir(tmp_path / "m")
    assert safetensors_parameters(directory) == 3 * 4 + 5 + 2 * 3 * 7


def test_a_directory_is_described_without_loading_it(tmp_path):
    info = describe_model_dir(fake_model_dir(tmp_path / "m"), "mine")
    assert (info.name, info.architecture, info.parameters, info.context_length, info.chat_template) == (
        "mine",
        "LlamaForCausalLM",
        59,
        4096,
        True,
    )
    assert info.path == str(tmp_path / "m")


def test_the_built_in_facts_are_those_read_from_its_files():
    info = describe_model_dir(tiny_random_dir(), "tiny-random")
    built_in = BUILT_IN["tiny-random"]
    assert (info.architecture, info.parameters, info.context_length, info.chat_template) == (
        built_in.architecture,
        built_in.parameters,
        built_in.context_length,
        built_in.chat_template,
    )


def test_the_second_model_s_facts_are_the_loaded_model_s():
    directory = second_model_dir()
    info = describe_model_dir(directory, "mine")
    model, tokenizer = load_base_model(str(directory))
    assert info.architecture == type(model).__name__
    assert info.parameters == sum(p.numel() for p in model.parameters())
    assert info.context_length == model.config.max_position_embeddings
    assert info.chat_template == bool(tokenizer.chat_template)


def test_a_chat_template_is_found_where_transformers_looks(tmp_path):
    plain = fake_model_dir(tmp_path / "plain", template=None)
    assert chat_template_of(plain) is None
    (plain / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]}
        )
    )
    assert chat_template_of(plain) == "d"
    (plain / "chat_template.jinja").write_text("j")
    assert chat_template_of(plain) == "j"


def info(architecture: str = "LlamaForCausalLM", chat_template: bool = True, parameters: int = 1000):
    return BaseModelInfo("m", "", architecture, parameters, 2048, chat_template)


def test_what_cannot_be_trained_is_refused_with_why():
    assert untrainable_reason(info()) is None
    assert "is a GPT2LMHeadModel; this service trains and serves LlamaForCausalLM" in untrainable_reason(
        info("GPT2LMHeadModel")
    )
    assert "has no chat template" in untrainable_reason(info(chat_template=False))


def test_a_model_too_big_for_the_workers_names_the_numbers():
    seven_b = info(parameters=7_000_000_000)
    assert TRAINING_BYTES_PER_PARAMETER == 4
    assert too_big_reason(seven_b, 40 * 10**9) is None
    assert too_big_reason(seven_b, None) is None  # unknown: not checked
    reason = too_big_reason(seven_b, 16 * 10**9)
    assert "7,000,000,000 parameters" in reason and "at least 28.0 GB" in reason and "have 16.0 GB" in reason


def test_names(tmp_path):
    assert default_model_name("/models/SmolLM2-360M-Instruct/") == "smollm2-360m-instruct"
    assert default_model_name("HuggingFaceTB/SmolLM2-360M-Instruct") == "smollm2-360m-instruct"
    assert default_model_name("/x/My Model Q4_K_M.gguf") == "my-model-q4_k_m"
    for bad in ("ft:x", "a/b", "", "-x", "UPPER"):
        with pytest.raises(InvalidInput, match="must be 1-64 characters"):
            check_name(bad)
    with pytest.raises(InvalidInput, match="built-in"):
        check_name("tiny-random")


def test_registering_records_the_model_for_every_process(tmp_path):
    data = tmp_path / "data"
    source = fake_model_dir(tmp_path / "My-Llama")
    recorded = register_model(str(source), directory=data)
    assert recorded.name == "my-llama" and recorded.parameters == 59
    assert read_registry(data) == {"my-llama": {"path": str(source), "hub_id": None}}
    models = base_models(data, listed={})
    assert set(BUILT_IN) < set(models) and models["my-llama"] == recorded
    assert resolve_model_dir("my-llama", models) == source
    assert published_name("my-llama", models) == str(source)  # a local directory: as the run named it
    assert unregister_model("my-llama", data) and not unregister_model("my-llama", data)
    assert "my-llama" not in base_models(data, listed={})


def test_registering_refuses_what_cannot_be_trained(tmp_path):
    data = tmp_path / "data"
    with pytest.raises(InvalidInput, match=r"not registered: .*GPT2LMHeadModel"):
        register_model(str(fake_model_dir(tmp_path / "gpt2", "GPT2LMHeadModel")), directory=data)
    with pytest.raises(InvalidInput, match=r"not registered: .*no chat template"):
        register_model(str(fake_model_dir(tmp_path / "base", template=None)), directory=data)
    with pytest.raises(InvalidInput, match="neither a local model directory nor a hub id in the local cache"):
        register_model("nobody/nothing", directory=data)
    with pytest.raises(InvalidInput, match=r"no config\.json"):
        register_model(str(tmp_path), "empty", directory=data)
    assert read_registry(data) == {}


def test_listed_models_come_from_the_environment_and_unreadable_ones_are_left_out(
    tmp_path, monkeypatch, caplog
):
    listed = fake_model_dir(tmp_path / "listed")
    monkeypatch.setenv(
        "PREFIX_RFT_BASE_MODELS", json.dumps({"listed": str(listed), "gone": str(tmp_path / "gone")})
    )
    with caplog.at_level(logging.WARNING):
        models = base_models(tmp_path / "data")
    assert models["listed"].path == str(listed) and "gone" not in models
    assert "registered model 'gone'" in caplog.text


@pytest.mark.parametrize(
    ("content", "complaint"),
    [("{not json", "is not valid JSON"), ('["a list"]', "must hold an object of model names")],
)
def test_a_corrupt_registry_leaves_the_built_in_models(tmp_path, caplog, content, complaint):
    registry = tmp_path / "data" / "models" / "registry.json"
    registry.parent.mkdir(parents=True)
    registry.write_text(content)
    with caplog.at_level(logging.WARNING):
        assert base_models(tmp_path / "data", listed={}) == BUILT_IN
    assert f"registry.json {complaint}" in caplog.text and "fix or remove it" in caplog.text


@pytest.mark.parametrize(
    "weights", [b"\x01", b"\x08" + bytes(7) + b"[1, 2]  ", b"\x08" + bytes(7) + b'{"w": 1}']
)
def test_weights_that_are_no_safetensors_file_are_the_model_s_problem(tmp_path, weights):
    directory = fake_model_dir(tmp_path / "m")
    (directory / "model.safetensors").write_bytes(weights)
    with pytest.raises(ModelDirectoryError, match="is no readable safetensors file"):
        safetensors_parameters(directory)


def test_a_hub_id_in_the_local_cache_is_registered_by_its_snapshot(tmp_path, monkeypatch):
    # The Hugging Face cache's layout: models--org--name/refs/main names the snapshot's commit.
    repo = tmp_path / "hub" / "models--org--My-Model"
    snapshot = fake_model_dir(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    recorded = register_model("org/My-Model", directory=tmp_path / "data")
    assert (recorded.name, recorded.hub_id, recorded.path) == ("my-model", "org/My-Model", str(snapshot))
    models = base_models(tmp_path / "data", listed={})
    assert published_name("my-model", models) == "org/My-Model"  # adapters name the published model
