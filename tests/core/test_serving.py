"""The batched multi-adapter engine decodes exactly what PEFT decodes for each request alone."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from core.adapters import attach_adapter, export_adapter
from core.config import LoraAdapterConfig, PrefixAdapterConfig
from core.models import load_base_model
from core.serving import (
    BatchedPrefixEngine,
    GenerationRequest,
    SamplingParams,
    UnsupportedAdapter,
    load_prefix_adapter,
    nucleus_filter,
    prefix_kv_from_embedding,
)

EOS = 2


def make_prefix_adapter(directory, n: int, projection: bool, noise: float, seed: int):
    model, tokenizer = load_base_model("tiny-random")
    policy = attach_adapter(
        model, tokenizer, PrefixAdapterConfig(num_virtual_tokens=n, prefix_projection=projection)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(noise * torch.randn(p.shape, generator=generator))
    return export_adapter(policy, directory, "tiny-random")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = {
        "a": make_prefix_adapter(root / "a", n=3, projection=False, noise=2.0, seed=1),
        "b": make_prefix_adapter(root / "b", n=7, projection=True, noise=0.05, seed=2),
        "c": make_prefix_adapter(root / "c", n=5, projection=False, noise=1.0, seed=3),
    }
    model, tokenizer = load_base_model("tiny-random")
    engine = BatchedPrefixEngine(model, tokenizer)
    adapters = {name: load_prefix_adapter(d, model) for name, d in dirs.items()}
    return engine, adapters, dirs


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference(directory, prompt: list[int], max_tokens: int) -> list[int]:
    """Plain greedy `generate` of one request, on a fresh base model with the adapter loaded by PEFT."""
    model, _ = load_base_model("tiny-random")
    if directory is not None:
        model = PeftModel.from_pretrained(model, directory)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def test_mixed_batch_is_token_identical_to_peft_generate_alone(setup):
    engine, adapters, dirs = setup
    tokenizer = engine.tokenizer
    cases = [  # adapter, prompt, max_tokens
        ("a", "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n", 12),
        ("b", "hi", 20),
        (None, "a somewhat longer prompt for the base model", 9),
        ("c", "what is 2+2?", 16),
        ("a", "x", 5),
        (None, "yo", 14),
        ("b", "another prompt with the projected prefix", 3),
    ]
    prompts = [encode(tokenizer, text) for _, text, _ in cases]
    expected = [
        reference(dirs[name] if name else None, prompt, n)
        for (name, _, n), prompt in zip(cases, prompts, strict=True)
    ]
    # A stop string on row 1: two characters in the middle of what it would say.
    full_text = tokenizer.decode(expected[1], skip_special_tokens=True)
    stop = next(full_text[i : i + 2] for i in range(3, len(full_text)) if full_text[i : i + 2].isprintable())
    cut = next(j for j in range(len(expected[1])) if stop in tokenizer.decode(expected[1][: j + 1]))
    stopped_tokens, stopped_text = expected[1][: cut + 1], full_text[: full_text.index(stop)]

    requests = [
        GenerationRequest(
            prompt,
            adapters[name] if name else None,
            SamplingParams(max_tokens=n, temperature=0.0, stop=(stop,) if i == 1 else ()),
        )
        for i, ((name, _, n), prompt) in enumerate(zip(cases, prompts, strict=True))
    ]
    results = engine.generate(requests)

    for i, (result, want, (_, _, n), prompt) in enumerate(
        zip(results, expected, cases, prompts, strict=True)
    ):
        if i == 1:
            assert result.token_ids == stopped_tokens
            assert result.text == stopped_text and stop not in result.text
            assert result.finish_reason == "stop"
        else:
            assert result.token_ids == want, i
            assert result.text == tokenizer.decode(want, skip_special_tokens=True)
            assert result.finish_reason == ("stop" if want[-1] == EOS else "length"), i
            assert len(want) == n or want[-1] == EOS
        assert result.prompt_tokens == len(prompt)
        assert result.completion_tokens == len(result.token_ids)
    assert {r.finish_reason for r in results} == {"stop", "length"}
    # The adapters do change what is decoded: the test would not notice a row given another prefix.
    assert len({tuple(r.token_ids[:3]) for r in results[:4]}) == 4


def test_every_row_stops_at_eos_and_reports_it(setup):
    engine, adapters, _ = setup
    saved = engine.stop_ids
    engine.stop_ids = {*range(engine.model.config.vocab_size)}  # every token is a stop token
    try:
        results = engine.generate(
            [GenerationRequest([5, 6, 7], adapters["a"], SamplingParams(max_tokens=4, temperature=0))]
        )
    finally:
        engine.stop_ids = saved
    assert results[0].completion_tokens == 1 and results[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible_whatever_else_is_in_the_batch(setup):
    engine, adapters, _ = setup
    seeded = GenerationRequest([5, 6, 7, 8], adapters["c"], SamplingParams(max_tokens=24, seed=7))
    others = [
        GenerationRequest([9, 10], adapters["a"], SamplingParams(max_tokens=5)),
        GenerationRequest([40, 41, 42, 43, 44, 45, 46], None, SamplingParams(max_tokens=30, temperature=0.7)),
    ]
    alone = engine.generate([seeded])[0]
    assert engine.generate([seeded])[0] == alone
    assert engine.generate([others[0], seeded, others[1]])[1] == alone
    other_seed = GenerationRequest(seeded.prompt_ids, seeded.adapter, SamplingParams(max_tokens=24, seed=8))
    assert engine.generate([other_seed])[0].token_ids != alone.token_ids


def test_tiny_top_p_is_greedy(setup):
    engine, adapters, _ = setup
    greedy = GenerationRequest([5, 6, 7], adapters["b"], SamplingParams(max_tokens=10, temperature=0))
    nucleus = GenerationRequest([5, 6, 7], adapters["b"], SamplingParams(max_tokens=10, top_p=1e-6, seed=0))
    a, b = engine.generate([greedy, nucleus])
    assert a.token_ids == b.token_ids


def test_nucleus_filter_by_hand():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    # Sorted: 0.5, 0.25, 0.15, 0.1; the mass before each is 0, 0.5, 0.75, 0.9.
    assert torch.allclose(nucleus_filter(probs, 0.6), torch.tensor([0, 0.5, 0, 0.25]) / 0.75)
    assert torch.allclose(nucleus_filter(probs, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.equal(nucleus_filter(probs, 1.0), probs)


def test_prefix_layout_matches_peft(setup):
    _, adapters, dirs = setup
    peft_model = PeftModel.from_pretrained(load_base_model("tiny-random")[0], dirs["c"])
    cache = peft_model.get_prompt(batch_size=1)
    for layer, (keys, values) in enumerate((layer.keys, layer.values) for layer in cache.layers):
        assert torch.equal(adapters["c"].kv[layer, 0], keys[0])
        assert torch.equal(adapters["c"].kv[layer, 1], values[0])
    assert adapters["c"].length == 5


def test_lora_and_foreign_adapters_are_refused_clearly(tmp_path):
    model, tokenizer = load_base_model("tiny-random")
    lora = attach_adapter(model, tokenizer, LoraAdapterConfig(r=2))
    export_adapter(lora, tmp_path / "lora", "tiny-random")
    with pytest.raises(UnsupportedAdapter, match=r"LORA.*prefix-tuning adapters only"):
        load_prefix_adapter(tmp_path / "lora", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"pickled adapter_model\.bin is not loaded"):
        load_prefix_adapter(tmp_path / "empty", model)
    with pytest.raises(UnsupportedAdapter, match="another base model"):
        prefix_kv_from_embedding("x", torch.zeros(4, 100), num_layers=2, kv_heads=2, head_dim=24)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_requests_are_validated(setup):
    engine, _, _ = setup
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="prompt token"):
        engine.generate([GenerationRequest([])])
    with pytest.raises(ValueError, match="more than the model"):
        engine.generate([GenerationRequest([5] * 10, None, SamplingParams(max_tokens=2000))])
    assert engine.generate([]) == []
