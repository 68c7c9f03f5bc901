"""Batched decoding over one base model, each request with its own prefix adapter (or none).

The building block of the OpenAI-compatible server: requests for different adapters are decoded
together, one forward pass per token for the whole batch. A prefix adapter is nothing but key /
value tensors in front of the prompt, so rows of different adapters share every weight; only
their KV caches differ, and a KV cache is per row anyway.

Layout of row r in the batch cache (P = longest prefix, T = longest prompt):

    [ prefix padding | prefix_r (n_r) | prompt padding | prompt_r (t_r) | generated tokens ... ]
      mask 0           mask 1           mask 0           mask 1           mask 1

The 2-D attention mask hides both kinds of padding. Positions are those PEFT gives a lone
request: prompt token j of row r sits at n_r + j (the prefix takes positions 0..n_r-1), so
greedy outputs match `PeftModel.generate` on that adapter alone. Rows that finish leave the batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from core.rollout import left_pad, positions, stop_token_ids

FinishReason = Literal["stop", "length"]


class UnsupportedAdapter(ValueError):
    """The adapter cannot be served by the batched prefix engine."""


@dataclass(frozen=True)
class PrefixKV:
    """A prefix adapter in memory: its key/value tensors, [layers, 2 (key, value), kv_heads, n, head_dim]."""

    name: str
    kv: torch.Tensor

    @property
    def length(self) -> int:
        return self.kv.shape[3]


def prefix_kv_from_embedding(
    name: str, embedding: torch.Tensor, num_layers: int, kv_heads: int, head_dim: int
) -> PrefixKV:
    """Unpack PEFT's prefix embedding [n, layers * 2 * kv_heads * head_dim] into a PrefixKV.

    Row i of the embedding is [layer0 key, layer0 value, layer1 key, ...], each kv_heads * head_dim
    wide, heads major (the layout of `PeftModel.get_prompt` and `core.adapters.kv_prefix_activations`).
    """
    n = embedding.shape[0]
    if embedding.dim() != 2 or embedding.shape[1] != num_layers * 2 * kv_heads * head_dim:
        raise UnsupportedAdapter(
            f"adapter {name!r}: prefix width {tuple(embedding.shape)} does not match the base model "
            f"({num_layers} layers x 2 x {kv_heads} kv heads x {head_dim} head dim); "
            "was it trained on another base model?"
        )
    kv = embedding.view(n, num_layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)
    return PrefixKV(name, kv.reshape(num_layers, 2, kv_heads, n, head_dim).contiguous())


def load_prefix_adapter(directory: str | Path, model: PreTrainedModel, name: str | None = None) -> PrefixKV:
    """Read a directory written by `core.adapters.export_adapter` (safetensors only, never pickle)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    name = name or directory.name
    config_file, weights_file = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(
            f"{directory} is not an exported PEFT adapter (needs adapter_config.json and "
            "adapter_model.safetensors; pickled adapter_model.bin is not loaded)"
        )
    peft_type = json.loads(config_file.read_text()).get("peft_type")
    if peft_type != "PREFIX_TUNING":
        raise UnsupportedAdapter(
            f"adapter {name!r} is {peft_type}; the batched engine serves prefix-tuning adapters only "
            "(serve LoRA adapters with PeftModel.from_pretrained, one adapter per batch)"
        )
    weights = load_file(weights_file)
    if "prompt_embeddings" not in weights:
        raise UnsupportedAdapter(f"adapter {name!r}: no prompt_embeddings tensor in {weights_file}")
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return prefix_kv_from_embedding(
        name, weights["prompt_embeddings"].float(), config.num_hidden_layers, kv_heads, head_dim
    )


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings, with OpenAI's meanings."""

    max_tokens: int = 16  # completion tokens at most (an EOS token counts)
    temperature: float = 1.0  # 0 is greedy (argmax)
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens with at least this mass
    stop: tuple[str, ...] = ()  # the text ends before the first of these; the token that completes it is kept
    seed: int | None = None  # same seed and request, same completion (whatever else is in the batch)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    adapter: PrefixKV | None = None  # None: the base model
    params: SamplingParams = SamplingParams()


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


def nucleus_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest top set whose mass reaches `top_p`, renormalised.

    `probs` is one row [V]. The most likely token is always kept.
    """
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    sorted_probs = torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return kept / kept.sum()


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one row's logits [V] under the request's temperature and top_p."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = nucleus_filter(torch.softmax(logits.float() / params.temperature, dim=-1), params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


class _Row:
    """Decoding state of one request."""

    def __init__(self, request: GenerationRequest, device: torch.device) -> None:
        self.request = request
        self.tokens: list[int] = []
        self.text: str | None = None  # set when a stop string ends the completion
        self.finish_reason: FinishReason | None = None
        self.generator = None
        if request.params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(request.params.seed)

    def append(self, token: int, stop_ids: set[int], tokenizer: PreTrainedTokenizerBase) -> None:
        params = self.request.params
        self.tokens.append(token)
        if token in stop_ids:
            self.finish_reason = "stop"
            return
        if params.stop:
            text = tokenizer.decode(self.tokens, skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in params.stop) if i >= 0]
            if hits:
                self.text, self.finish_reason = text[: min(hits)], "stop"
                return
        if len(self.tokens) >= params.max_tokens:
            self.finish_reason = "length"

    def completion(self, tokenizer: PreTrainedTokenizerBase) -> Completion:
        text = self.text if self.text is not None else tokenizer.decode(self.tokens, skip_special_tokens=True)
        assert self.finish_reason is not None
        return Completion(
            text, list(self.tokens), self.finish_reason, len(self.request.prompt_ids), len(self.tokens)
        )


class BatchedPrefixEngine:
    """Decodes many requests at once over one frozen base model; each row carries its own prefix."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        prefix = request.adapter.length if request.adapter is not None else 0
        total = prefix + len(request.prompt_ids) + request.params.max_tokens
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(
                f"prefix ({prefix}) + prompt ({len(request.prompt_ids)}) + max_tokens "
                f"({request.params.max_tokens}) is {total} tokens, more than the model's {self.max_positions}"
            )

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Decode every request to its own end; completions come back in request order."""
        for request in requests:
            self.check(request)
        if not requests:
            return []
        device = self.device
        rows = [_Row(r, device) for r in requests]
        cache, prefix_mask, prefix_lengths = self._prefix_cache(requests)
        prompt_ids, prompt_mask = left_pad([r.prompt_ids for r in requests], self.pad_id, device)
        position = positions(prompt_mask) + prefix_lengths[:, None]
        mask = torch.cat([prefix_mask, prompt_mask], dim=1)
        out = self.model(
            input_ids=prompt_ids,
            attention_mask=mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache, logits, position = out.past_key_values, out.logits[:, -1], position[:, -1]
        active = list(range(len(rows)))  # the request of each batch row
        while True:
            greedy = logits.argmax(-1).tolist()
            next_tokens = []
            for batch_row, index in enumerate(active):
                row = rows[index]
                params = row.request.params
                token = greedy[batch_row] if params.temperature == 0 else None
                if token is None:
                    token = choose_token(logits[batch_row], params, row.generator)
                row.append(token, self.stop_ids, self.tokenizer)
                next_tokens.append(token)
            running = [i for i, index in enumerate(active) if rows[index].finish_reason is None]
            if not running:
                break
            if len(running) < len(active):
                keep = torch.tensor(running, device=device)
                cache.reorder_cache(keep)
                mask, position = mask.index_select(0, keep), position.index_select(0, keep)
                active = [active[i] for i in running]
                next_tokens = [next_tokens[i] for i in running]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = position + 1
            out = self.model(
                input_ids=torch.tensor(next_tokens, device=device)[:, None],
                attention_mask=mask,
                position_ids=position[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            cache, logits = out.past_key_values, out.logits[:, -1]
        return [row.completion(self.tokenizer) for row in rows]

    def _prefix_cache(
        self, requests: list[GenerationRequest]
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """The batch's prefixes right-aligned in one cache, their mask [B, P] and lengths [B]."""
        device, dtype = self.device, self.model.dtype
        lengths = [r.adapter.length if r.adapter is not None else 0 for r in requests]
        width = max(lengths)
        mask = torch.zeros((len(requests), width), dtype=torch.long, device=device)
        cache = DynamicCache(config=self.model.config)
        if width:
            shape = next(r.adapter.kv.shape for r in requests if r.adapter is not None)
            layers, _, kv_heads, _, head_dim = shape
            kv = torch.zeros(
                (layers, 2, len(requests), kv_heads, width, head_dim), dtype=dtype, device=device
            )
            for i, (request, n) in enumerate(zip(requests, lengths, strict=True)):
                if n:
                    kv[:, :, i, :, width - n :] = request.adapter.kv.to(device=device, dtype=dtype)
                    mask[i, width - n :] = 1
            for layer in range(layers):
                cache.update(kv[layer, 0], kv[layer, 1], layer)
        return cache, mask, torch.tensor(lengths, device=device)
