"""Base models: preparing one leaves the caller's random stream alone; exported adapters name
the base model where it is published."""

from __future__ import annotations

import json

import torch

from core.adapters import attach_adapter, export_adapter
from core.config import LoraAdapterConfig
from core.models import build_tiny_random, load_base_model


def test_building_the_tiny_model_does_not_move_the_global_random_stream():
    """A run seeds, then loads its base model; the first load in a deployment builds it. If that
    reseeded the global stream, a job's first run would sample differently from its reruns."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first, _ = build_tiny_random()
    assert torch.equal(torch.rand(4), expected)
    second, _ = build_tiny_random()  # and the model itself is the same every time
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_exported_adapters_name_the_published_base_model_where_there_is_one(tmp_path):
    model, tokenizer = load_base_model("tiny-random")
    policy = attach_adapter(model, tokenizer, LoraAdapterConfig(r=2))
    for base, named in (
        ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),  # AutoPeftModel finds it anywhere
        ("tiny-random", "tiny-random"),  # published nowhere
        ("/models/my-llama", "/models/my-llama"),  # a local directory, as the run named it
    ):
        directory = export_adapter(policy, tmp_path / base.strip("/").replace("/", "-"), base)
        config = json.loads((directory / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == named


def test_the_registry_s_facts_are_the_loaded_model_s():
    from core.base_models import REGISTRY

    info = next(i for i in REGISTRY if i.name == "tiny-random")
    model, tokenizer = load_base_model("tiny-random")
    assert info.architecture == type(model).__name__
    assert info.parameters == sum(p.numel() for p in model.parameters())
    assert info.context_length == model.config.max_position_embeddings
    assert info.chat_template == bool(tokenizer.chat_template)
