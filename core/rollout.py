"""Token-level plumbing of the policy: encoding, batched sampling with a KV cache, log-probs of responses.

Two rules from measurement hold everywhere here:
- every forward gets `position_ids = cumsum(mask) - 1`, so a left-padded row is scored exactly as
  it was sampled (with a prefix adapter the positions change attention to the prefix);
- token ids are never re-tokenised from text: a hybrid response is `demo_ids[:L] + continuation`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from peft.helpers import disable_input_dtype_casting
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_layers import GradientCheckpointingLayer

from core.adapters import without_replaced_start
from core.algorithm import per_token_log_probs, sample_categorical, token_entropy
from core.config import ConfigError, Problem
from core.data import Example
from core.decoding import Decoder, lora_rows

Policy = PreTrainedModel | PeftModel


@dataclass(frozen=True)
class EncodedExample:
    example: Example
    prompt_ids: list[int]
    demo_ids: list[int] | None  # the demonstration's tokens followed by EOS


def encode_example(
    tokenizer: PreTrainedTokenizerBase, example: Example, eos_id: int, replaced_start: Sequence[int] = ()
) -> EncodedExample:
    """Chat-format the prompt (as a generation prompt) and tokenize the demonstration on its own.

    The demonstration is tokenized without special tokens and ends with EOS, so training on it
    teaches the model to stop, and any cut `demo_ids[:L]` is exactly what the model continues.
    `replaced_start`: the prompt tokens a prefix adapter stands in for, dropped from the prompt's
    start (`core.adapters.without_replaced_start`).
    """
    messages = (
        [{"role": "user", "content": example.prompt}] if isinstance(example.prompt, str) else example.prompt
    )
    if tokenizer.chat_template:
        prompt_ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    else:
        prompt_ids = tokenizer(example.prompt_text)["input_ids"]
    demo_ids = None
    if example.demonstration is not None:
        demo_ids = [*tokenizer(example.demonstration, add_special_tokens=False)["input_ids"], eos_id]
    return EncodedExample(example, without_replaced_start(prompt_ids, replaced_start), demo_ids)


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def distinct_rows(rows: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct rows, in first-seen order, and for each row the index of its distinct copy."""
    index: dict[tuple[int, ...], int] = {}
    row_index = [index.setdefault(tuple(row), len(index)) for row in rows]
    return [list(row) for row in index], row_index


def _backbone(model: Policy) -> PreTrainedModel:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _kv_prefix_length(model: Policy) -> int:
    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        return model.active_peft_config.num_virtual_tokens
    return 0


@dataclass
class SharedPrompts:
    """Distinct prompts run once through the policy, their KV cache expanded to every row."""

    last_logits: torch.Tensor  # [S, V] logits after each row's prompt
    cache: object  # transformers Cache holding kv prefix + prompt for every row
    mask: torch.Tensor  # [S, P] attention mask of the prompts
    next_position: torch.Tensor  # [S] position of each row's first new token


def prefill_prompts(
    model: Policy, unique_prompts: list[list[int]], row_prompt: list[int], pad_id: int
) -> SharedPrompts:
    """Prefill each distinct prompt once (through PeftModel.forward, which adds the kv prefix).

    A group's rollouts share their prompt, so this saves (N - 1) / N of the prompt compute, in
    sampling and, with gradients flowing back through the shared cache, in training.
    """
    device = next(model.parameters()).device
    ids, mask = left_pad(unique_prompts, pad_id, device)
    # The last position as an index tensor, not `logits_to_keep=1`: the slice that 1 makes is not
    # contiguous, and the output head then runs as a batched matmul over a copy of its weight per
    # row (measured: half the time of a LoRA update on SmolLM2 in bfloat16).
    last = torch.tensor([ids.shape[1] - 1], device=device)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True, logits_to_keep=last
    )
    index = torch.tensor(row_prompt, device=device)
    cache = out.past_key_values
    cache.reorder_cache(index)
    mask = mask.index_select(0, index)
    return SharedPrompts(out.logits[:, -1].index_select(0, index), cache, mask, positions(mask)[:, -1] + 1)


def continue_from(
    model: Policy,
    shared: SharedPrompts,
    ids: torch.Tensor,
    mask: torch.Tensor,
    first_position: torch.Tensor,
    hidden_states: bool = False,
) -> torch.Tensor:
    """Run `ids` [S, T] after the cached prompts and extend the cache.

    Returns logits [S, T, V], or the final hidden states [S, T, H] when `hidden_states` (so the
    caller can apply the output head to the tokens it needs, in chunks). Goes to the backbone
    directly: the cache already holds the kv prefix, and PeftModel.forward would replace that
    cache with a fresh prefix.
    """
    backbone = _backbone(model)
    n_virtual = _kv_prefix_length(model)
    virtual = torch.ones((mask.shape[0], n_virtual), dtype=mask.dtype, device=mask.device)
    position_ids = first_position[:, None] + torch.arange(ids.shape[1], device=ids.device)[None, :]
    out = (backbone.get_decoder() if hidden_states else backbone)(
        input_ids=ids,
        attention_mask=torch.cat([virtual, mask], dim=1),
        position_ids=position_ids + n_virtual,
        past_key_values=shared.cache,
        use_cache=True,
    )
    shared.cache = out.past_key_values
    return out.last_hidden_state if hidden_states else out.logits


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(model: Policy) -> Decoder:
    """The policy's decoder, built once (it references the weights, so training updates are seen)."""
    decoder = _DECODERS.get(model)
    if decoder is None:
        decoder = _DECODERS[model] = Decoder(model)
    return decoder


def release_decoder(model: Policy) -> None:
    """Drop the policy's decoder: its prepacked copy of the weights is rebuilt by the next `sample`.

    The trainer drops it for the policy update (256 MiB less at its peak for SmolLM2-135M in
    bfloat16; rebuilding costs about 0.1 s a step).
    """
    _DECODERS.pop(model, None)


def prefix_kv(model: Policy) -> torch.Tensor | None:
    """A prefix adapter's keys and values [layers, 2, kv_heads, n, head_dim] as they are now, or None."""
    if _kv_prefix_length(model) == 0 or _disabled(model):
        return None
    cache = model.get_prompt(batch_size=1)
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])


def active_lora(model: Policy) -> str | None:
    """The name of the LoRA adapter the policy runs with, or None (no LoRA, or disabled)."""
    if not isinstance(model, PeftModel) or model.active_peft_config.is_prompt_learning or _disabled(model):
        return None
    return model.active_adapter


def _disabled(model: PeftModel) -> bool:
    return getattr(model, "_adapters_disabled", False)  # inside PeftModel.disable_adapter()


@torch.inference_mode()
def sample(
    model: Policy,
    inputs: list[list[int]],
    max_new_tokens: int | list[int],
    stop_ids: set[int],
    pad_id: int,
    temperature: float = 1.0,
    greedy: bool = False,
    sampled_log_probs: list[list[float]] | None = None,
    row_seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """Continue every input row; returns each row's new tokens, cut after its first stop token.

    If `sampled_log_probs` is a list, it receives each kept token's log-prob under the sampler.
    `row_seeds`: one seed per row, from which that row's draws come (else from torch's global
    generator), so a row samples the same tokens whatever other rows share its batch or process.

    Identical input rows are prefilled once and their keys and values copied to every row that
    shares them (a group's on-policy rollouts start from the same prompt). Sampling is plain
    softmax(logits / T): no top-k or top-p, so the sampler's distribution is exactly the one the
    trainer scores. `max_new_tokens` may differ per row (a hybrid row's budget is shortened by its
    prefix).
    """
    budgets = [max_new_tokens] * len(inputs) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    longest = max(budgets, default=0)
    if longest <= 0:
        return [[] for _ in inputs]
    decoder = decoder_for(model)
    device = decoder.device
    unique, row_index = distinct_rows(inputs)
    rows = len(inputs)
    prefix = prefix_kv(model)
    cache = decoder.new_cache()
    # Exactly the room this call needs: rows, then the distinct prompts' slots that feed them.
    n_prefix = prefix.shape[3] if prefix is not None else 0
    cache.reserve(rows + len(unique), n_prefix + max(len(u) for u in unique) + longest)
    scratch = torch.arange(rows, rows + len(unique), device=device)
    if prefix is not None:
        for slot in scratch.tolist():
            cache.write_prefix(slot, prefix)
    lora = lora_rows([active_lora(model)], device)  # every row runs the same adapter, or none
    logits = decoder.prefill(cache, scratch, unique, lora)
    index = torch.tensor(row_index, device=device)
    cache.copy_rows(torch.arange(rows, device=device), scratch.index_select(0, index))
    logits = logits.index_select(0, index)

    tokens = torch.full((rows, longest), pad_id, dtype=torch.long, device=device)
    token_log_probs = torch.zeros((rows, longest), device=device)
    budget = torch.tensor(budgets, device=device)
    stop = torch.tensor(sorted(stop_ids), device=device)
    active = torch.arange(rows, device=device)  # original row of each batch position (= its slot)
    done = budget <= 0
    uniforms = None
    if row_seeds is not None and not greedy:
        uniforms = torch.stack(
            [
                torch.rand(longest, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
                for seed in row_seeds
            ]
        ).to(device)
    for step in range(longest):
        log_probs = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
        if greedy:
            token = logits.argmax(-1)
        else:
            token = sample_categorical(log_probs, uniforms[active, step] if uniforms is not None else None)
        tokens[active, step] = token
        token_log_probs[active, step] = log_probs.gather(1, token.unsqueeze(1)).squeeze(1)
        done = done | torch.isin(token, stop) | (budget <= step + 1)
        if bool(done.all()):
            break
        if int(done.sum()) * 4 >= len(done):
            # Drop finished rows once a quarter of the batch is done: their decode steps are
            # pure waste (response lengths vary a lot within a step's rollouts).
            keep = (~done).nonzero().squeeze(1)
            cache.copy_rows(torch.arange(len(keep), device=device), keep)
            active, token, budget = (t.index_select(0, keep) for t in (active, token, budget))
            done = done.index_select(0, keep)
        logits = decoder.step(cache, token, lora)

    rows_out = [_cut(row, stop_ids, limit) for row, limit in zip(tokens.tolist(), budgets, strict=True)]
    if sampled_log_probs is not None:
        sampled_log_probs.extend(v[: len(r)] for v, r in zip(token_log_probs.tolist(), rows_out, strict=True))
    return rows_out


def _cut(row: list[int], stop_ids: set[int], limit: int) -> list[int]:
    row = row[: max(limit, 0)]
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[: i + 1]
    return row


@dataclass
class ResponseBatch:
    """Rows of prompt + response: distinct prompts left-padded, responses right-padded to R."""

    prompts: list[list[int]]  # distinct prompts
    row_prompt: list[int]  # [S] which distinct prompt each row continues
    response_ids: torch.Tensor  # [S, R]
    response_mask: torch.Tensor  # [S, R] bool: real response tokens
    pad_id: int

    @property
    def response_width(self) -> int:
        return self.response_ids.shape[1]

    def concatenated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same rows as one left-padded [S, P + R] batch (ids, mask), for reference forwards."""
        prompt_ids, prompt_mask = left_pad(
            [self.prompts[i] for i in self.row_prompt], self.pad_id, self.response_ids.device
        )
        return (
            torch.cat([prompt_ids, self.response_ids], dim=1),
            torch.cat([prompt_mask, self.response_mask.long()], dim=1),
        )


def response_batch(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device
) -> ResponseBatch:
    unique, row_prompt = distinct_rows(prompts)
    width = max(1, max(len(r) for r in responses))
    response_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.bool)
    for i, row in enumerate(responses):
        response_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        response_mask[i, : len(row)] = True
    return ResponseBatch(unique, row_prompt, response_ids.to(device), response_mask.to(device), pad_id)


# Tokens per chunk of the output head: [128, vocab] fp32 logits stay under glibc's 32 MB mmap
# threshold, so chunks reuse heap memory instead of page-faulting fresh mappings every time.
HEAD_CHUNK_TOKENS = 128


def response_log_probs(
    model: Policy, batch: ResponseBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs [S, R] (and entropies, without gradient) of the response tokens.

    Each distinct prompt runs once; the responses continue from its cache. The output head is
    applied only to real response tokens (not padding), in chunks, so the full [S, R, V] logits
    tensor is never built; with gradients, a chunk's logits are recomputed in the backward pass
    instead of being kept.
    """
    with _adapters_in_base_dtype(model):
        return _response_log_probs(model, batch, temperature, with_entropy)


@contextlib.contextmanager
def _adapters_in_base_dtype(model: Policy):
    """Under a bfloat16 (or float16) base, LoRA's matmuls run in that dtype too (autocast).

    Its parameters, gradients and optimizer state stay float32. PEFT's own rule, casting a
    layer's input to float32 for its LoRA matmuls, makes a float32 copy of every projection's
    input per layer and keeps it for the backward pass: measured, 43% of the activations a LoRA
    micro-batch keeps (659 of 1526 MiB for 16 rows of SmolLM2-135M). The LoRA delta is added to a
    bfloat16 result either way.
    """
    dtype = _backbone(model).get_input_embeddings().weight.dtype
    if dtype == torch.float32 or active_lora(model) is None:
        # A prefix adapter's encoder keeps float32: the sampler computes the prefix that way.
        yield
        return
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=dtype), disable_input_dtype_casting(model):
        yield


def _response_log_probs(
    model: Policy, batch: ResponseBatch, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    shared = prefill_prompts(model, batch.prompts, batch.row_prompt, batch.pad_id)
    # The first response token is predicted by the prompt's last logits, every later one by the
    # hidden state of the token before it.
    first = _head_log_probs(shared.last_logits, batch.response_ids[:, 0], temperature, with_entropy)
    if batch.response_width == 1:
        return first[0][:, None], first[1][:, None] if with_entropy else None

    full_mask = torch.cat([shared.mask, batch.response_mask.long()], dim=1)
    hidden = continue_from(
        model, shared, batch.response_ids[:, :-1], full_mask[:, :-1], shared.next_position, hidden_states=True
    )
    real = batch.response_mask[:, 1:]
    states, targets = hidden[real], batch.response_ids[:, 1:][real]
    head = _backbone(model).get_output_embeddings()
    chunks = [
        _chunk_log_probs(
            head,
            states[i : i + HEAD_CHUNK_TOKENS],
            targets[i : i + HEAD_CHUNK_TOKENS],
            temperature,
            with_entropy,
        )
        for i in range(0, targets.shape[0], HEAD_CHUNK_TOKENS)
    ]

    def assemble(column: int) -> torch.Tensor:
        rest = torch.zeros(real.shape, dtype=torch.float32, device=real.device)
        if chunks:
            rest = rest.masked_scatter(real, torch.cat([c[column] for c in chunks]))
        return torch.cat([first[column][:, None], rest], dim=1)

    return assemble(0), assemble(1) if with_entropy else None


def _chunk_log_probs(
    head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output head and log-probs of a chunk of hidden states.

    With gradients, checkpointed: a chunk's float32 logits ([128, vocab], 24 MiB for SmolLM2)
    would otherwise be kept for the backward pass, every chunk of the micro-batch at once.
    """

    def run(chunk: torch.Tensor):
        return _head_log_probs(head(chunk), targets, temperature, with_entropy)

    if torch.is_grad_enabled() and states.requires_grad:
        return checkpoint(run, states, use_reentrant=False)
    return run(states)


def _head_log_probs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = per_token_log_probs(logits, targets)
    if not with_entropy:
        return log_probs, None
    with torch.no_grad():
        return log_probs, token_entropy(logits)


def enable_gradient_checkpointing(model: Policy) -> int:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    transformers' own checkpointing drops the KV cache in training mode, but the forwards here
    read the prompts from a cache (prefilled once, continued per row), and a prefix adapter is a
    cache. So each layer is checkpointed with its cache layer put back, before the recompute, as
    the forward found it: the recompute reads what the forward read and writes what it wrote, and
    the gradients are those of the plain forward. Returns the number of layers wrapped.
    """
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        index = getattr(getattr(layer, "self_attn", None), "layer_idx", None)
        if index is None:
            problem = (
                f"not supported for this model's layers ({type(layer).__name__} has no self_attn.layer_idx)"
            )
            raise ConfigError([Problem("training.gradient_checkpointing", problem)])
        layer.forward = _checkpointed(layer, layer.forward, index)
    return len(layers)


def _checkpointed(layer: torch.nn.Module, forward, index: int):
    def run(*args: Any, **kwargs: Any):
        if not (layer.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        cache = kwargs.get("past_key_values")
        found = dict(vars(cache.layers[index])) if cache is not None and index < len(cache.layers) else None
        runs = 0

        def replay(*a: Any, **kw: Any):
            nonlocal runs
            if runs and cache is not None:  # the recompute: the cache layer as the forward found it
                if found is None:
                    cache.layers[index].reset()
                else:
                    vars(cache.layers[index]).update(found)
            runs += 1
            return forward(*a, **kw)

        return checkpoint(replay, *args, use_reentrant=False, **kwargs)

    return run
