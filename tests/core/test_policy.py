"""The prefix-tuning pitfalls (shared docs, prefix-tuning-pitfalls.md), each caught by a test.

All run on a tiny random Llama with GQA and head_dim != hidden / heads.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel

from core.adapters import attach_adapter, kv_prefix_init_ids, replaced_prompt_start, without_replaced_start
from core.config import LoraAdapterConfig, PrefixAdapterConfig
from core.data import Example
from core.models import load_base_model
from core.rollout import (
    enable_gradient_checkpointing,
    encode_example,
    left_pad,
    positions,
    response_batch,
    response_log_probs,
    sample,
    stop_token_ids,
)


@pytest.fixture
def base():
    model, tokenizer = load_base_model("tiny-random")
    return model, tokenizer


def prefix_policy(base, projection: bool = False, n: int = 6, noise: float = 0.0) -> PeftModel:
    model, tokenizer = base
    policy = attach_adapter(
        model, tokenizer, PrefixAdapterConfig(num_virtual_tokens=n, prefix_projection=projection)
    )
    if noise:
        torch.manual_seed(1)
        with torch.no_grad():
            for p in policy.parameters():
                if p.requires_grad:
                    p.add_(noise * torch.randn_like(p))
    return policy


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_scoring_is_invariant_to_left_padding(base):
    policy = prefix_policy(base, noise=2.0)
    tokenizer = base[1]
    short, long = encode(tokenizer, "ab"), encode(tokenizer, "a much longer prompt")
    response = encode(tokenizer, "xyz")
    alone, _ = response_log_probs(policy, response_batch([short], [response], 0, torch.device("cpu")))
    batched, _ = response_log_probs(
        policy, response_batch([short, long], [response, response], 0, torch.device("cpu"))
    )
    assert torch.allclose(alone[0], batched[0], atol=1e-5)

    # The same forward without position_ids drifts: this is the trap the test guards.
    batch = response_batch([short, long], [response, response], 0, torch.device("cpu"))
    input_ids, attention_mask = batch.concatenated()
    logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
    naive = torch.log_softmax(logits[0, -4:-1], -1).gather(-1, batch.response_ids[0, :, None]).squeeze(-1)
    assert (naive - alone[0]).abs().max() > 1e-3


@pytest.mark.parametrize("adapter", ["prefix", "lora"])
def test_sampler_and_learner_agree_on_log_probs(base, adapter):
    tokenizer = base[1]
    if adapter == "prefix":
        policy = prefix_policy(base, noise=2.0)
    else:
        policy = attach_adapter(base[0], tokenizer, LoraAdapterConfig(r=4))
    prompts = [encode(tokenizer, "hi"), encode(tokenizer, "a longer prompt here"), encode(tokenizer, "hi")]
    demo_prefix = encode(tokenizer, "the answer")
    inputs = [*prompts, prompts[0] + demo_prefix]  # a hybrid row continues a demonstration cut
    torch.manual_seed(0)
    sampled: list[list[float]] = []
    continuations = sample(policy, inputs, 6, stop_ids={2}, pad_id=0, sampled_log_probs=sampled)
    assert [len(c) for c in continuations] == [len(v) for v in sampled]
    responses = [*continuations[:3], demo_prefix + continuations[3]]
    batch = response_batch([*prompts, prompts[0]], responses, 0, torch.device("cpu"))
    scored, _ = response_log_probs(policy, batch)
    for row, values in enumerate(sampled):
        offset = len(demo_prefix) if row == 3 else 0
        got = scored[row, offset : offset + len(values)]
        assert torch.allclose(got, torch.tensor(values), atol=1e-4), row


def test_token_boundary_of_a_demo_prefix_is_kept_as_ids(base):
    # A hybrid input is prompt ids + demonstration ids[:L]; re-tokenising the joined text can merge
    # across the boundary. The trainer never does: the response it scores starts with demo_ids[:L].
    _, tokenizer = base
    prompt, demo = encode(tokenizer, "Q: "), encode(tokenizer, "answer")
    cut = 3
    joined = prompt + demo[:cut]
    assert joined[len(prompt) :] == demo[:cut]


def test_only_the_prefix_encoder_receives_gradients(base):
    policy = prefix_policy(base)
    base_before = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    prefix_before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    assert prefix_before and all("prompt_encoder" in n for n in prefix_before)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    batch = response_batch([[5, 6, 7]], [[8, 9, 10]], 0, torch.device("cpu"))
    log_probs, _ = response_log_probs(policy, batch)
    (-log_probs.sum()).backward()
    optimizer.step()
    for name, tensor in base_before.items():
        assert torch.equal(dict(policy.named_parameters())[name], tensor), name
    changed = [n for n, t in prefix_before.items() if not torch.equal(dict(policy.named_parameters())[n], t)]
    assert changed


def test_kv_prefix_param_count_matches_gqa_shapes(base):
    model, _ = base
    config = model.config
    policy = prefix_policy(base, n=5)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert config.head_dim != config.hidden_size // config.num_attention_heads  # the case that broke PEFT
    assert trainable == 5 * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim


def test_fresh_prefix_adapter_behaves_like_the_base_model_reading_its_init_text(base):
    model, tokenizer = base
    init_ids = kv_prefix_init_ids(tokenizer, None, None)
    prompt = encode(tokenizer, "<|im_start|>user\nwhat is 2+2?<|im_end|>\n")
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([init_ids + prompt])).logits[0, len(init_ids) :]
    policy = attach_adapter(model, tokenizer, PrefixAdapterConfig())
    with torch.no_grad():
        got = policy(
            input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long)
        ).logits[0]
    assert torch.allclose(got, reference, atol=1e-4)


def test_a_fresh_prefix_adapter_standing_in_for_the_system_turn_is_the_base_model(base):
    """The neutral init: the prompt fed without the system turn the prefix holds is the base model's
    sequence, so logits match and greedy outputs are the base model's token for token."""
    model, tokenizer = base
    config = PrefixAdapterConfig()
    replaced = replaced_prompt_start(tokenizer, config)
    questions = ["what is 2+2?", "name a colour", "hello", "count to five", "why is the sky blue?"]
    prompts = [
        encode_example(tokenizer, Example(q, None, {}, 1), tokenizer.eos_token_id).prompt_ids
        for q in questions
    ]
    assert replaced and all(tuple(p[: len(replaced)]) == replaced for p in prompts)
    with torch.no_grad():
        reference_logits = model(input_ids=torch.tensor([prompts[0]])).logits[0, len(replaced) :]
    stops = stop_token_ids(model, tokenizer)
    reference = sample(model, prompts, 12, stops, tokenizer.pad_token_id, greedy=True)

    policy = attach_adapter(model, tokenizer, config)
    fed = [without_replaced_start(p, replaced) for p in prompts]
    assert [len(f) for f in fed] == [len(p) - len(replaced) for p in prompts]
    with torch.no_grad():
        logits = policy(input_ids=torch.tensor([fed[0]]), attention_mask=torch.ones(1, len(fed[0]))).logits[0]
    assert torch.allclose(logits, reference_logits, atol=1e-4)
    assert sample(policy, fed, 12, stops, tokenizer.pad_token_id, greedy=True) == reference
    # Fed whole, the model reads the system turn twice and is another model.
    with torch.no_grad():
        repeated = policy(input_ids=torch.tensor([prompts[0]]), attention_mask=torch.ones(1, len(prompts[0])))
    assert (repeated.logits[0, len(replaced) :] - reference_logits).abs().max() > 1e-3


def test_only_a_prefix_made_of_its_init_tokens_as_they_are_stands_in_for_them(base):
    _, tokenizer = base
    system_turn = replaced_prompt_start(tokenizer, PrefixAdapterConfig())
    assert tokenizer.decode(system_turn) == "<|im_start|>user\n"  # the tiny template adds no system turn
    assert (
        replaced_prompt_start(tokenizer, PrefixAdapterConfig(num_virtual_tokens=len(system_turn)))
        == system_turn
    )
    assert replaced_prompt_start(tokenizer, PrefixAdapterConfig(num_virtual_tokens=3)) == ()  # cut
    assert replaced_prompt_start(tokenizer, LoraAdapterConfig()) == ()
    own = replaced_prompt_start(tokenizer, PrefixAdapterConfig(init_text="Answer briefly."))
    assert own == tuple(encode(tokenizer, "Answer briefly."))


def test_without_replaced_start():
    assert without_replaced_start([1, 2, 3, 4], (1, 2)) == [3, 4]
    assert without_replaced_start([1, 3, 2, 4], (1, 2)) == [1, 3, 2, 4]  # another start: whole
    assert without_replaced_start([1, 2], (1, 2)) == [1, 2]  # nothing would be left to continue from
    assert without_replaced_start([1, 2, 3], ()) == [1, 2, 3]


def test_prefix_projection_initialisation_is_exact(base):
    model, tokenizer = base
    plain = attach_adapter(
        load_base_model("tiny-random")[0], tokenizer, PrefixAdapterConfig(num_virtual_tokens=4)
    )
    projected = attach_adapter(
        model, tokenizer, PrefixAdapterConfig(num_virtual_tokens=4, prefix_projection=True)
    )
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(
            plain(input_ids=ids, attention_mask=mask).logits,
            projected(input_ids=ids, attention_mask=mask).logits,
            atol=1e-5,
        )


def test_zero_initialisation_is_not_neutral(base):
    # Why the adapter is initialised from real activations: zero keys still take attention mass.
    from peft import PrefixTuningConfig, get_peft_model

    model, _ = base
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        zero = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
        zero.prompt_encoder["default"].embedding.weight.zero_()
        shifted = zero(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert (plain - shifted).abs().max() > 1e-3


def test_disable_adapter_changes_the_output_and_restores_generation(base):
    policy = prefix_policy(base, noise=2.0)
    batch = response_batch([[5, 6, 7]], [[8, 9, 10]], 0, torch.device("cpu"))
    with torch.no_grad():
        with_adapter, _ = response_log_probs(policy, batch)
        with policy.disable_adapter():
            without, _ = response_log_probs(policy, batch)
    assert (with_adapter - without).abs().max() > 1e-3  # scoring goes through the adapter
    before = sample(policy, [[5, 6, 7]], 8, {2}, 0, greedy=True)
    with policy.disable_adapter():
        sample(policy, [[5, 6, 7]], 8, {2}, 0, greedy=True)
    assert sample(policy, [[5, 6, 7]], 8, {2}, 0, greedy=True) == before


def test_repeated_calls_use_a_fresh_cache(base):
    policy = prefix_policy(base, noise=1.0)
    batch = response_batch([[5, 6, 7]], [[8, 9, 10]], 0, torch.device("cpu"))
    with torch.no_grad():
        first, _ = response_log_probs(policy, batch)
        second, _ = response_log_probs(policy, batch)
    assert torch.equal(first, second)
    torch.manual_seed(3)
    a = sample(policy, [[5, 6, 7], [9, 9]], 10, {2}, 0)
    torch.manual_seed(3)
    b = sample(policy, [[5, 6, 7], [9, 9]], 10, {2}, 0)
    assert a == b


def test_batched_sampling_maps_rows_to_their_prompts(base):
    policy = prefix_policy(base, noise=1.0)
    prompts = [[5, 6, 7], [40, 41], [5, 6, 7], [100, 101, 102, 103]]
    together = sample(policy, prompts, 8, {2}, 0, greedy=True)
    alone = [sample(policy, [p], 8, {2}, 0, greedy=True)[0] for p in prompts]
    assert together == alone
    assert together[0] == together[2]


def test_sampling_stops_at_the_first_stop_token_and_respects_per_row_budgets(base):
    model, _ = base
    every_token = set(range(model.config.vocab_size))
    rows = sample(model, [[5, 6], [7]], [4, 1], every_token, 0)
    assert [len(r) for r in rows] == [1, 1]  # whatever comes first stops the row, and is kept
    rows = sample(model, [[5, 6], [7]], [3, 1], set(), 0)
    assert [len(r) for r in rows] == [3, 1]
    assert sample(model, [[5, 6]], 0, set(), 0) == [[]]


def test_shared_prompt_scoring_equals_a_full_forward(base):
    # Scoring runs each distinct prompt once and continues from its cache; a full forward of the
    # concatenated rows (with padding-aware positions) must give the same log-probs and gradients.
    policy = prefix_policy(base, noise=1.0)
    prompts = [[5, 6, 7], [5, 6, 7], [40, 41], [5, 6, 7]]
    responses = [[8, 9, 10], [11], [12, 13], [14, 15, 16]]
    batch = response_batch(prompts, responses, 0, torch.device("cpu"))
    assert len(batch.prompts) == 2
    shared, _ = response_log_probs(policy, batch)
    input_ids, mask = batch.concatenated()
    logits = policy(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -4:-1]
    full = torch.log_softmax(logits, -1).gather(-1, batch.response_ids[..., None]).squeeze(-1)
    assert torch.allclose(shared[batch.response_mask], full[batch.response_mask], atol=1e-5)
    params = [p for p in policy.parameters() if p.requires_grad]
    grad_shared = torch.autograd.grad(shared[batch.response_mask].sum(), params)
    logits = policy(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -4:-1]
    full = torch.log_softmax(logits, -1).gather(-1, batch.response_ids[..., None]).squeeze(-1)
    grad_full = torch.autograd.grad(full[batch.response_mask].sum(), params)
    for a, b in zip(grad_shared, grad_full, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_padding_helpers():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    batch = response_batch([[1, 2], [3]], [[7], [8, 9]], 0, torch.device("cpu"))
    assert batch.concatenated()[0].tolist() == [[1, 2, 7, 0], [0, 3, 8, 9]]
    assert batch.prompts == [[1, 2], [3]] and batch.row_prompt == [0, 1]
    assert batch.response_mask.tolist() == [[True, False], [True, True]]


def test_bfloat16_base_keeps_the_prefix_in_float32(base):
    model, tokenizer = load_base_model("tiny-random", dtype=torch.bfloat16)
    policy = attach_adapter(model, tokenizer, PrefixAdapterConfig(num_virtual_tokens=4))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)
    batch = response_batch([[5, 6, 7]], [[8, 9, 10]], 0, torch.device("cpu"))
    log_probs, entropy = response_log_probs(policy, batch, with_entropy=True)
    loss = -log_probs.sum()
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(entropy).all()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


@pytest.mark.parametrize(
    "adapter", [PrefixAdapterConfig(num_virtual_tokens=4), LoraAdapterConfig(r=4)], ids=["prefix", "lora"]
)
def test_gradient_checkpointing_recomputes_each_layer_and_keeps_the_gradients(adapter):
    # Rows share a prompt (one cache, prefilled once, continued per row), and a prefix adapter is a
    # cache of its own: the recompute must read exactly what the forward read.
    prompts, responses = (
        [[5, 6, 7, 8], [9, 10, 11], [5, 6, 7, 8]],
        [[12, 13, 14, 15, 16], [17, 18], [19, 20, 21]],
    )

    def run(checkpointed: bool):
        torch.manual_seed(0)
        model, tokenizer = load_base_model("tiny-random")
        policy = attach_adapter(model, tokenizer, adapter)
        if checkpointed:
            assert enable_gradient_checkpointing(policy) == model.config.num_hidden_layers
        calls = []
        model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
        batch = response_batch(prompts, responses, 0, torch.device("cpu"))
        with torch.no_grad():
            response_log_probs(policy, batch)  # no gradient: nothing to recompute
        policy.train()
        log_probs, _ = response_log_probs(policy, batch)
        (log_probs * batch.response_mask).sum().backward()
        grads = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
        return log_probs.detach(), grads, len(calls)

    plain_log_probs, plain_grads, plain_calls = run(False)
    log_probs, grads, calls = run(True)
    assert torch.equal(log_probs, plain_log_probs)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, plain_grads[name], atol=1e-6), name
    assert sum(g.abs().sum() for g in grads.values()) > 0  # (LoRA's A gets none while B is zero)
    # Prefill and continuation run each layer twice without gradients and twice with them; the
    # backward recomputes the second pair.
    assert (plain_calls, calls) == (4, 6)
