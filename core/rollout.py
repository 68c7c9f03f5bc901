"""Token-level plumbing of the policy: encoding, batched sampling with a KV cache, scoring.

Two rules from measurement hold everywhere here:
- every forward gets `position_ids = cumsum(mask) - 1`, so a left-padded row is scored exactly as
  it was sampled (with a prefix adapter the positions change attention to the prefix);
- token ids are never re-tokenised from text: a hybrid response is `demo_ids[:L] + continuation`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.algorithm import per_token_log_probs, token_entropy
from core.data import Example

Policy = PreTrainedModel | PeftModel


@dataclass(frozen=True)
class EncodedExample:
    example: Example
    prompt_ids: list[int]
    demo_ids: list[int] | None  # the demonstration's tokens followed by EOS


def encode_example(tokenizer: PreTrainedTokenizerBase, example: Example, eos_id: int) -> EncodedExample:
    """Chat-format the prompt (as a generation prompt) and tokenize the demonstration on its own.

    The demonstration is tokenized without special tokens and ends with EOS, so training on it
    teaches the model to stop, and any cut `demo_ids[:L]` is exactly what the model continues.
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
    return EncodedExample(example, list(prompt_ids), demo_ids)


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


def _kv_prefix_length(model: Policy) -> int:
    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        return model.active_peft_config.num_virtual_tokens
    return 0


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
) -> list[list[int]]:
    """Continue every input row; returns each row's new tokens, cut after its first stop token.

    If `sampled_log_probs` is a list, it receives each kept token's log-prob under the sampler.

    Identical input rows are prefilled once and their KV cache is shared (a group's on-policy
    rollouts start from the same prompt). Sampling is plain softmax(logits / T): no top-k or
    top-p, so the sampler's distribution is exactly the one the trainer scores.
    `max_new_tokens` may differ per row (a hybrid row's budget is shortened by its prefix).
    """
    device = next(model.parameters()).device
    budgets = [max_new_tokens] * len(inputs) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    unique: dict[tuple[int, ...], int] = {}
    row_source = [unique.setdefault(tuple(row), len(unique)) for row in inputs]
    ids, mask = left_pad([list(key) for key in unique], pad_id, device)

    # Prefill through the full policy (PeftModel.forward puts the kv prefix into the cache).
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True, logits_to_keep=1
    )
    expand = torch.tensor(row_source, device=device)
    cache = out.past_key_values
    cache.reorder_cache(expand)
    logits = out.logits[:, -1].float().index_select(0, expand)
    mask = mask.index_select(0, expand)

    # Decode steps go to the backbone directly: its cache already holds the prefix, and
    # PeftModel.forward would replace that cache with a fresh prefix.
    backbone = model.get_base_model() if isinstance(model, PeftModel) else model
    n_virtual = _kv_prefix_length(model)
    virtual_mask = torch.ones((len(inputs), n_virtual), dtype=mask.dtype, device=device)
    next_position = positions(mask)[:, -1] + 1

    budget = torch.tensor(budgets, device=device)
    stop = torch.tensor(sorted(stop_ids), device=device)
    done = budget <= 0
    generated: list[torch.Tensor] = []
    token_log_probs: list[torch.Tensor] = []
    for step in range(max(budgets)):
        log_probs = torch.log_softmax(logits / temperature, dim=-1)
        token = logits.argmax(-1) if greedy else torch.multinomial(log_probs.exp(), 1).squeeze(1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        generated.append(token)
        if sampled_log_probs is not None:
            token_log_probs.append(log_probs.gather(1, token.unsqueeze(1)).squeeze(1))
        done = done | torch.isin(token, stop) | (budget <= step + 1)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = backbone(
            input_ids=token.unsqueeze(1),
            attention_mask=torch.cat([virtual_mask, mask], dim=1),
            position_ids=(next_position + n_virtual).unsqueeze(1),
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits = out.logits[:, -1].float()
        next_position = next_position + 1

    tokens = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in inputs]
    rows = [_cut(row, stop_ids, limit) for row, limit in zip(tokens, budgets, strict=True)]
    if sampled_log_probs is not None:
        values = torch.stack(token_log_probs, dim=1).tolist() if token_log_probs else [[] for _ in inputs]
        sampled_log_probs.extend(v[: len(r)] for v, r in zip(values, rows, strict=True))
    return rows


def _cut(row: list[int], stop_ids: set[int], limit: int) -> list[int]:
    row = row[: max(limit, 0)]
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[: i + 1]
    return row


@dataclass
class ScoringBatch:
    """Prompt + response rows as tensors: prompts left-padded to P, responses right-padded to R."""

    input_ids: torch.Tensor  # [S, P + R]
    attention_mask: torch.Tensor  # [S, P + R]
    response_ids: torch.Tensor  # [S, R]
    response_mask: torch.Tensor  # [S, R] bool: real response tokens

    @property
    def response_width(self) -> int:
        return self.response_ids.shape[1]


def scoring_batch(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device
) -> ScoringBatch:
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    width = max(1, max(len(r) for r in responses))
    response_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.bool)
    for i, row in enumerate(responses):
        response_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        response_mask[i, : len(row)] = True
    response_ids, response_mask = response_ids.to(device), response_mask.to(device)
    return ScoringBatch(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        response_ids=response_ids,
        response_mask=response_mask,
    )


def response_logits(model: Policy, batch: ScoringBatch, temperature: float = 1.0) -> torch.Tensor:
    """Logits that predict each response token, [S, R, V], from one forward of the full policy."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=positions(batch.attention_mask),
        use_cache=False,
        logits_to_keep=batch.response_width + 1,
    )
    return out.logits[:, :-1] / temperature


def score_responses(
    model: Policy, batch: ScoringBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs [S, R] (and entropies) of the response tokens under the model."""
    logits = response_logits(model, batch, temperature)
    log_probs = per_token_log_probs(logits, batch.response_ids)
    entropy = token_entropy(logits) if with_entropy else None
    return log_probs, entropy
