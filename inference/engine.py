"""Continuous batched decoding over one base model, each request with its own adapter (or none).

The engine of the OpenAI-compatible model server: requests for different adapters are decoded
together, one forward pass per token for the whole batch, and a request that arrives while
others decode joins the running batch at the next step. A prefix adapter is nothing but key /
value tensors in front of the prompt, so rows of different prefix adapters share every weight;
only their KV caches differ, and a KV cache is per row anyway. LoRA adapters are installed into
the base model once and chosen per row with PEFT's mixed-batch `adapter_names`.

Layout of row r in the batch cache (P = longest prefix, T = longest prompt):

    [ prefix padding | prefix_r (n_r) | prompt padding | prompt_r (t_r) | generated tokens ... ]
      mask 0           mask 1           mask 0           mask 1           mask 1

The 2-D attention mask hides both kinds of padding. Positions are those PEFT gives a lone
request: prompt token j of row r sits at n_r + j (the prefix takes positions 0..n_r-1), so
greedy outputs match `PeftModel.generate` on that adapter alone. Rows that finish leave the batch,
and rows admitted later are left-padded to the running batch's width (the mask hides the gap).
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from core.rollout import left_pad, positions, stop_token_ids

FinishReason = Literal["stop", "length"]


class UnsupportedAdapter(ValueError):
    """The adapter cannot be served (an unknown PEFT type, or made for another base model)."""


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
    # A view, no copy: the model server loads adapters off the decode thread, and a copy there
    # would start a second OpenMP team that slows every decode step (inference/scheduler.py).
    return PrefixKV(name, kv.reshape(num_layers, 2, kv_heads, n, head_dim))


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA adapter in memory, ready to be installed into the engine's base model."""

    name: str
    config: Any  # peft.LoraConfig
    state: dict[str, torch.Tensor]


Adapter = PrefixKV | LoraWeights


def adapter_bytes(adapter: Adapter) -> int:
    """Memory an adapter holds (what the model server's adapter cache counts)."""
    if isinstance(adapter, PrefixKV):
        return adapter.kv.nbytes
    return sum(t.nbytes for t in adapter.state.values())


def load_adapter(directory: str | Path, model: PreTrainedModel, name: str | None = None) -> Adapter:
    """Read a directory written by `core.adapters.export_adapter` (safetensors only, never pickle)."""
    from peft import LoraConfig
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
    weights = load_file(weights_file)
    if peft_type == "LORA":
        config = LoraConfig.from_pretrained(directory)
        config.inference_mode = True
        return LoraWeights(name, config, {k: v.float() for k, v in weights.items()})
    if peft_type != "PREFIX_TUNING":
        raise UnsupportedAdapter(
            f"adapter {name!r} is {peft_type}; prefix-tuning and LoRA adapters are served"
        )
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
    adapter: Adapter | None = None  # None: the base model
    params: SamplingParams = SamplingParams()


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Progress:
    """What one step did for one row: its new text, and its completion once it has finished."""

    key: Hashable  # the caller's name for the row, given to `BatchedEngine.add`
    text: str  # text not reported before (text that may begin a stop string is held back)
    completion: Completion | None  # set on the row's last progress


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


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop string.

    A stream must not show them yet: the next token may complete the stop string, and the
    completion ends before it.
    """
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class _Row:
    """Decoding state of one request: its tokens, its text so far, and the token to feed next."""

    def __init__(self, key: Hashable, request: GenerationRequest, device: torch.device) -> None:
        self.key = key
        self.request = request
        self.tokens: list[int] = []
        self.next_token = -1  # the last chosen token, fed at the next step
        self.text = ""
        self.finish_reason: FinishReason | None = None
        self.reported = 0  # characters of `text` given out in Progress
        self.stop_checked = 0  # characters of `text` searched for stop strings
        # Incremental detokenisation: text is decoded in a window of the last tokens, and a token
        # that ends in the middle of a character waits for the next (no "\ufffd" is ever shown).
        self.window_start = 0
        self.window_read = 0
        self.generator = None
        if request.params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(request.params.seed)

    @property
    def lora(self) -> str:
        adapter = self.request.adapter
        return adapter.name if isinstance(adapter, LoraWeights) else "__base__"

    def append(self, token: int, stop_ids: set[int], tokenizer: PreTrainedTokenizerBase) -> Progress:
        params = self.request.params
        self.tokens.append(token)
        if token in stop_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= params.max_tokens:
            self.finish_reason = "length"
        self.text += self._new_text(tokenizer, flush=self.finish_reason is not None)
        if params.stop:
            self._cut_at_stop_string()
        end = len(self.text) if self.finish_reason else len(self.text) - held_back(self.text, params.stop)
        delta, self.reported = self.text[self.reported : end], max(self.reported, end)
        return Progress(self.key, delta, self._completion() if self.finish_reason else None)

    def _new_text(self, tokenizer: PreTrainedTokenizerBase, flush: bool) -> str:
        before = tokenizer.decode(self.tokens[self.window_start : self.window_read], skip_special_tokens=True)
        after = tokenizer.decode(self.tokens[self.window_start :], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not flush):
            return ""
        self.window_start, self.window_read = self.window_read, len(self.tokens)
        return after[len(before) :]

    def _cut_at_stop_string(self) -> None:
        stops = self.request.params.stop
        start = max(0, self.stop_checked - max(len(s) for s in stops) + 1)  # only new text can complete one
        hits = [i for i in (self.text.find(s, start) for s in stops) if i >= 0]
        if hits:
            self.text, self.finish_reason = self.text[: min(hits)], "stop"
        self.stop_checked = len(self.text)

    def _completion(self) -> Completion:
        assert self.finish_reason is not None
        prompt = len(self.request.prompt_ids)
        return Completion(self.text, list(self.tokens), self.finish_reason, prompt, len(self.tokens))


class BatchedEngine:
    """Decodes many requests at once over one frozen base model; each row carries its own adapter.

    `add` admits requests (one prefill forward for them) and `step` decodes one token for every
    running row; both return each row's `Progress`. A caller serving a stream of requests calls
    `add` whenever requests arrive and `step` while anything runs (`inference.scheduler` does);
    `generate` does both for one fixed list of requests. Not thread-safe: one thread drives it.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self._peft: Any = None  # a PeftModel around `model` once a LoRA adapter is installed
        # The running batch: rows, their KV cache [B, kv_heads, L, head_dim] per layer, the mask
        # [B, L] over the cache, and the position of each row's last fed token [B].
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.empty(0, 0, dtype=torch.long)
        self._position = torch.empty(0, dtype=torch.long)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def cache_width(self) -> int:
        """Columns of the running batch's KV cache (rows that left take their columns with them)."""
        return self._mask.shape[1] if self._rows else 0

    @property
    def installed_lora(self) -> set[str]:
        return set(self._peft.peft_config) if self._peft is not None else set()

    @property
    def lora_in_use(self) -> set[str]:
        return {row.lora for row in self._rows} - {"__base__"}

    def check(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        prefix = request.adapter.length if isinstance(request.adapter, PrefixKV) else 0
        total = prefix + len(request.prompt_ids) + request.params.max_tokens
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(
                f"prefix ({prefix}) + prompt ({len(request.prompt_ids)}) + max_tokens "
                f"({request.params.max_tokens}) is {total} tokens, more than the model's {self.max_positions}"
            )

    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Decode every request to its own end; completions come back in request order."""
        if self.running:
            raise RuntimeError("generate needs an idle engine; a batch is running")
        done: dict[Hashable, Completion] = {}
        progress = self.add(list(enumerate(requests)))
        while True:
            done.update((p.key, p.completion) for p in progress if p.completion is not None)
            if not self.running:
                break
            progress = self.step()
        return [done[i] for i in range(len(requests))]

    @torch.inference_mode()
    def add(self, requests: list[tuple[Hashable, GenerationRequest]]) -> list[Progress]:
        """Prefill new rows and choose their first tokens; the unfinished ones join the batch."""
        for _, request in requests:
            self.check(request)
        if not requests:
            return []
        device = self.device
        rows = [_Row(key, request, device) for key, request in requests]
        for row in rows:
            if isinstance(row.request.adapter, LoraWeights):
                self._install_lora(row.request.adapter)
        cache, prefix_mask, prefix_lengths = self._prefix_cache([row.request for row in rows])
        prompt_ids, prompt_mask = left_pad([row.request.prompt_ids for row in rows], self.pad_id, device)
        position = positions(prompt_mask) + prefix_lengths[:, None]
        mask = torch.cat([prefix_mask, prompt_mask], dim=1)
        out = self._forward(rows, prompt_ids, mask, position, cache, logits_to_keep=1)
        progress = self._choose(rows, out.logits[:, -1])
        self._join(rows, out.past_key_values, mask, position[:, -1])
        return progress

    @torch.inference_mode()
    def step(self) -> list[Progress]:
        """Feed every running row its last token and choose the next one."""
        if not self._rows:
            return []
        device = self.device
        tokens = torch.tensor([row.next_token for row in self._rows], device=device)[:, None]
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        self._position = self._position + 1
        out = self._forward(self._rows, tokens, self._mask, self._position[:, None], self._cache)
        self._cache = out.past_key_values
        progress = self._choose(self._rows, out.logits[:, -1])
        self._keep([i for i, row in enumerate(self._rows) if row.finish_reason is None])
        return progress

    def cancel(self, key: Hashable) -> bool:
        """Drop a running row (its client went away); True if it was running."""
        kept = [i for i, row in enumerate(self._rows) if row.key != key]
        if len(kept) == len(self._rows):
            return False
        self._keep(kept)
        return True

    def remove_lora(self, name: str) -> None:
        """Uninstall a LoRA adapter; it must not be in use by a running row."""
        if name in self.lora_in_use:
            raise RuntimeError(f"LoRA adapter {name!r} is in use by a running request")
        if self.installed_lora == {name}:  # the last one: give the model its plain layers back
            self._peft.unload()
            self._peft = None
        elif name in self.installed_lora:
            self._peft.delete_adapter(name)

    # ----- internals ------------------------------------------------------------------------

    def _forward(self, rows: list[_Row], input_ids, mask, position, cache, **kwargs):
        if self._peft is None:
            model = self.model
        else:  # every row names its LoRA adapter, or __base__ (prefix and base-model rows)
            model, kwargs = self._peft, {**kwargs, "adapter_names": [row.lora for row in rows]}
        return model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
            **kwargs,
        )

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[Progress]:
        greedy = logits.argmax(-1).tolist()
        progress = []
        for i, row in enumerate(rows):
            params = row.request.params
            token = greedy[i] if params.temperature == 0 else choose_token(logits[i], params, row.generator)
            row.next_token = token
            progress.append(row.append(token, self.stop_ids, self.tokenizer))
        return progress

    def _join(
        self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, position: torch.Tensor
    ) -> None:
        """Add freshly prefilled rows to the running batch; those already finished leave again."""
        if not self._rows:
            self._rows, self._cache, self._mask, self._position = rows, cache, mask, position
        else:
            # Left-pad the narrower of the two to the other's width; the mask hides the padding.
            width = max(self._mask.shape[1], mask.shape[1])
            layers = []
            for old, new in zip(self._cache.layers, cache.layers, strict=True):
                layers.append(
                    (
                        torch.cat([_left_pad_to(old.keys, width), _left_pad_to(new.keys, width)]),
                        torch.cat([_left_pad_to(old.values, width), _left_pad_to(new.values, width)]),
                    )
                )
            self._cache = self._cache_of(layers)
            self._mask = torch.cat([_left_pad_to(self._mask, width, dim=1), _left_pad_to(mask, width, dim=1)])
            self._position = torch.cat([self._position, position])
            self._rows = self._rows + rows
        self._keep([i for i, row in enumerate(self._rows) if row.finish_reason is None])

    def _keep(self, kept: list[int]) -> None:
        """Keep these rows of the batch; drop the cache columns no remaining row attends to."""
        if len(kept) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in kept]
        if not kept:
            self._cache, self._mask, self._position = None, self._mask[:0, :0], self._position[:0]
            return
        index = torch.tensor(kept, device=self._mask.device)
        self._mask, self._position = self._mask.index_select(0, index), self._position.index_select(0, index)
        first = int(self._mask.any(0).int().argmax())  # leading columns that are padding in every row
        self._mask = self._mask[:, first:]
        self._cache = self._cache_of(
            [
                (
                    layer.keys.index_select(0, index)[:, :, first:],
                    layer.values.index_select(0, index)[:, :, first:],
                )
                for layer in self._cache.layers
            ]
        )

    def _cache_of(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
        cache = DynamicCache(config=self.model.config)
        for i, (keys, values) in enumerate(layers):
            cache.update(keys, values, i)
        return cache

    def _install_lora(self, adapter: LoraWeights) -> None:
        if adapter.name in self.installed_lora:
            return
        from peft import PeftModel
        from peft.utils import set_peft_model_state_dict

        if self._peft is None:  # wraps `model` in place: from now on every forward names its adapter
            self._peft = PeftModel(self.model, adapter.config, adapter_name=adapter.name)
        else:
            self._peft.add_adapter(adapter.name, adapter.config)
        set_peft_model_state_dict(self._peft, adapter.state, adapter_name=adapter.name)
        self._peft.eval()

    def _prefix_cache(
        self, requests: list[GenerationRequest]
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """The batch's prefixes right-aligned in one cache, their mask [B, P] and lengths [B]."""
        device, dtype = self.device, self.model.dtype
        prefixes = [r.adapter if isinstance(r.adapter, PrefixKV) else None for r in requests]
        lengths = [p.length if p is not None else 0 for p in prefixes]
        width = max(lengths)
        mask = torch.zeros((len(requests), width), dtype=torch.long, device=device)
        cache = DynamicCache(config=self.model.config)
        if width:
            layers, _, kv_heads, _, head_dim = next(p.kv.shape for p in prefixes if p is not None)
            kv = torch.zeros(
                (layers, 2, len(requests), kv_heads, width, head_dim), dtype=dtype, device=device
            )
            for i, (prefix, n) in enumerate(zip(prefixes, lengths, strict=True)):
                if n:
                    kv[:, :, i, :, width - n :] = prefix.kv.to(device=device, dtype=dtype)
                    mask[i, width - n :] = 1
            for layer in range(layers):
                cache.update(kv[layer, 0], kv[layer, 1], layer)
        return cache, mask, torch.tensor(lengths, device=device)


def _left_pad_to(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zeros in front along `dim` (the sequence axis) up to `width`."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
