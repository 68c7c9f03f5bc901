"""The batched multi-adapter engine decodes exactly what PEFT decodes for each request alone,
whether requests start together or join a running batch, for prefix and LoRA adapters alike."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from core.adapters import attach_adapter, export_adapter
from core.config import LoraAdapterConfig, PrefixAdapterConfig
from core.models import load_base_model
from inference.engine import (
    BatchedEngine,
    GenerationRequest,
    LoraWeights,
    PrefixKV,
    SamplingParams,
    UnsupportedAdapter,
    _Row,
    held_back,
    load_adapter,
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


def make_lora_adapter(directory, seed: int):
    """A LoRA adapter whose B matrices are not zero (a fresh one would decode as the base model)."""
    model, tokenizer = load_base_model("tiny-random")
    policy = attach_adapter(model, tokenizer, LoraAdapterConfig(r=4))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=generator))
    return export_adapter(policy, directory, "tiny-random")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = {
        "a": make_prefix_adapter(root / "a", n=3, projection=False, noise=2.0, seed=1),
        "b": make_prefix_adapter(root / "b", n=7, projection=True, noise=0.05, seed=2),
        "c": make_prefix_adapter(root / "c", n=5, projection=False, noise=1.0, seed=3),
        "l1": make_lora_adapter(root / "l1", seed=4),
        "l2": make_lora_adapter(root / "l2", seed=5),
    }
    model, tokenizer = load_base_model("tiny-random")
    engine = BatchedEngine(model, tokenizer)
    adapters = {name: load_adapter(d, model) for name, d in dirs.items()}
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
    stop = next(
        full_text[i : i + 2]
        for i in range(3, len(full_text))
        if full_text[i : i + 2].isprintable() and "\ufffd" not in full_text[i : i + 2]  # settled text only
    )
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


def test_adapter_kinds_are_told_apart_and_foreign_ones_refused_clearly(setup, tmp_path):
    engine, adapters, _ = setup
    assert isinstance(adapters["a"], PrefixKV) and isinstance(adapters["l1"], LoraWeights)
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "ia3" / "adapter_model.safetensors")
    with pytest.raises(UnsupportedAdapter, match=r"IA3; prefix-tuning and LoRA adapters are served"):
        load_adapter(tmp_path / "ia3", engine.model)
    model = engine.model
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"pickled adapter_model\.bin is not loaded"):
        load_adapter(tmp_path / "empty", model)
    with pytest.raises(UnsupportedAdapter, match="another base model"):
        prefix_kv_from_embedding("x", torch.zeros(4, 100), num_layers=2, kv_heads=2, head_dim=24)


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


def test_requests_joining_a_running_batch_decode_as_if_alone(setup):
    """Rows admitted mid-decode (other adapters, other prompt lengths) and a cancelled row."""
    engine, adapters, dirs = setup
    tokenizer = engine.tokenizer
    cases = {  # key: adapter, prompt, max_tokens, the step at which it is admitted
        "first": ("a", "a first request that starts the batch", 18, 0),
        "base": (None, "hi", 12, 0),
        "late": ("b", "one that comes later with a longer prompt than the others had", 10, 3),
        "later": ("c", "x", 9, 7),
        "lora": ("l1", "a LoRA row among prefix rows", 11, 2),
    }
    prompts = {key: encode(tokenizer, text) for key, (_, text, _, _) in cases.items()}
    expected = {
        key: reference(dirs[name] if name else None, prompts[key], n)
        for key, (name, _, n, _) in cases.items()
    }
    doomed = GenerationRequest(
        encode(tokenizer, "cancel me"), adapters["c"], SamplingParams(max_tokens=50, temperature=0)
    )

    text = {key: "" for key in cases}
    done = {}
    step = 0
    widths = []
    while len(done) < len(cases):
        arriving = [
            (
                key,
                GenerationRequest(
                    prompts[key],
                    adapters[name] if name else None,
                    SamplingParams(max_tokens=n, temperature=0),
                ),
            )
            for key, (name, _, n, at) in cases.items()
            if at == step
        ]
        if step == 0:
            arriving.append(("doomed", doomed))
        progress = engine.add(arriving) if arriving else []
        if step == 5:
            assert engine.cancel("doomed") and not engine.cancel("doomed")
        progress += engine.step()
        for p in progress:
            assert p.key != "doomed" or step < 5
            text[p.key] = text.get(p.key, "") + p.text
            if p.completion is not None:
                done[p.key] = p.completion
        widths.append(engine.cache_width)
        step += 1

    assert engine.running == 0 and "doomed" not in done
    for key, completion in done.items():
        assert completion.token_ids == expected[key], key
        assert text[key] == completion.text == tokenizer.decode(expected[key], skip_special_tokens=True)
    assert max(widths) > widths[-2]  # columns of rows that left are dropped, not kept forever


def test_lora_and_prefix_rows_share_a_batch(setup):
    engine, adapters, dirs = setup
    tokenizer = engine.tokenizer
    cases = [
        ("l1", "hello", 10),
        ("a", "hello", 10),
        ("l2", "hello", 10),
        (None, "hello", 10),
        ("l1", "other", 6),
    ]
    prompts = [encode(tokenizer, text) for _, text, _ in cases]
    results = engine.generate(
        [
            GenerationRequest(
                prompt, adapters[name] if name else None, SamplingParams(max_tokens=n, temperature=0)
            )
            for (name, _, n), prompt in zip(cases, prompts, strict=True)
        ]
    )
    for (name, _, n), prompt, result in zip(cases, prompts, results, strict=True):
        assert result.token_ids == reference(dirs[name] if name else None, prompt, n), name
    assert len({tuple(r.token_ids) for r in results[:4]}) == 4  # four adapters, four different outputs
    assert engine.installed_lora == {"l1", "l2"}
    engine.remove_lora("l2")
    assert engine.installed_lora == {"l1"}
    again = engine.generate(
        [GenerationRequest(prompts[0], adapters["l1"], SamplingParams(max_tokens=10, temperature=0))]
    )
    assert again[0].token_ids == results[0].token_ids


def test_held_back_by_hand():
    assert held_back("hello wor", ("world",)) == 3
    assert held_back("hello", ("world",)) == 0
    assert held_back("abc", ("c", "bcd")) == 2  # a whole stop string is found elsewhere; "bc" may start "bcd"
    assert held_back("xx#", ("##", "#!")) == 1
    assert held_back("", ("ab",)) == 0


def test_streamed_text_adds_up_to_the_completion_and_never_shows_half_a_character(setup):
    """Byte-level tokens: a multi-byte character arrives over several tokens."""
    engine, _, _ = setup
    tokenizer = engine.tokenizer
    generator = torch.Generator().manual_seed(0)
    samples = ["héllo wörld €5 ✓ 日本", "plain", "ends in half: é"]
    for text in samples:
        ids = encode(tokenizer, text)
        for stop in ((), ("wör",), ("日",)):
            row = _Row(
                "k",
                GenerationRequest([1], None, SamplingParams(max_tokens=len(ids), stop=stop)),
                torch.device("cpu"),
            )
            shown = ""
            for token in ids[:-1] if text.startswith("ends") else ids:
                progress = row.append(token, set(), tokenizer)
                assert "\ufffd" not in progress.text
                shown += progress.text
                if progress.completion is not None:
                    break
            if row.finish_reason is None:  # cut short: what is pending comes with the last progress
                row.request = GenerationRequest(
                    [1], None, SamplingParams(max_tokens=len(row.tokens) + 1, stop=stop)
                )
                shown += row.append(EOS, {EOS}, tokenizer).text
            full = tokenizer.decode(row.tokens, skip_special_tokens=True)
            cut = min([full.find(s) for s in stop if s in full], default=len(full))
            assert shown == row.text == full[:cut], (text, stop)
    random_ids = torch.randint(
        3, 200, (300,), generator=generator
    ).tolist()  # arbitrary bytes, invalid UTF-8 too
    row = _Row("k", GenerationRequest([1], None, SamplingParams(max_tokens=300)), torch.device("cpu"))
    shown = "".join(row.append(t, set(), tokenizer).text for t in random_ids)
    assert shown == tokenizer.decode(random_ids, skip_special_tokens=True)
