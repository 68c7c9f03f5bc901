"""How close a fresh prefix adapter is to the base model, for several initialisations.

    python -m benchmarks.prefix_init --out docs/benchmarks/prefix_init.json [--dtype float32]

SmolLM2-135M-Instruct, 50 probe prompts (the precision benchmark's: addition questions and
general ones), 48 greedy tokens each. For each initialisation of a fresh prefix adapter:
the share of greedy outputs identical to the base model's (token for token, through the
trainer's sampler), and the per-token KL(base || adapted) on the base model's greedy outputs
(teacher-forced, positions as the trainer computes them). Target: KL <= 1e-3 per token.

Initialisations:
- `default`: the product's fresh adapter: the system turn's key/value activations, standing in
  for the system turn each prompt starts with. Prompts are fed as the trainer and the model
  server feed them (`core.adapters.without_replaced_start`), and PEFT places them after the
  prefix, so the model reads exactly the base model's sequence.
- `base_model_itself`: no adapter, the floor of rounding: KL of the base model reading the chat
  start into its KV cache first, and the share of prompts decoded alone that match the batch.
- `system_turn`: the same activations as `default`, with each prompt fed whole, so the model reads the system
  turn twice (the default before the prefix stood in for it).
- `im_start`: the activations of the first token alone (the attention sink of most heads).
- `newline`: the activations of a single newline.
- `zero_keys`: the system turn's values with zero keys (each slot takes softmax weight exp(0)).
- `anti_sink`: the first token's values with its keys negated and scaled by 4: most heads put
  their largest logit on that token, so this slot gets close to none of their attention.
- `distilled_K`: `system_turn`, then K Adam steps (lr `--distill-lr`) on KL(base || adapted) over
  the completions of 32 generic prompts, none of them a probe prompt.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

log = logging.getLogger("benchmarks.prefix_init")

MODEL = "smollm2-135m-instruct"
DISTILL_PROMPTS = (
    "Tell me a joke about computers.", "How do plants make food?", "Translate 'good morning' into Spanish.",
    "What is 23 times 4?", "Write one sentence about autumn.", "What is 81 minus 27?",
    "Who wrote Romeo and Juliet?", "Give two reasons to exercise.", "How many days are in a leap year?",
    "Summarise the water cycle in a sentence.", "What is the square root of 144?", "Name a famous painter.",
    "What is 345 + 678?", "Explain gravity to a child.", "Write a short poem about rain.",
    "What is the boiling point of water?", "Recommend a book for a long trip.", "What is 7 * 8 + 2?",
    "How does a bicycle work?", "What is a noun?", "List three planets.", "Divide 96 by 8.",
    "What should I cook tonight?", "Why do cats purr?", "What is 1234 - 567?", "Describe the colour blue.",
    "How do I make tea?", "What is an atom?", "Give me a word that rhymes with light.",
    "What is 15% of 200?", "Write a greeting for a birthday card.", "What language is spoken in Brazil?",
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--distill-steps", type=int, nargs="*", default=[20, 40])
    parser.add_argument("--distill-lr", type=float, default=1e-3)
    parser.add_argument("--only-default", action="store_true", help="measure the product default alone")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import torch

    from benchmarks.precision import chat_prompt_ids, probe_prompts
    from benchmarks.provenance import provenance, write_report
    from core.adapters import (
        attach_adapter,
        kv_prefix_activations,
        kv_prefix_init_ids,
        replaced_prompt_start,
        without_replaced_start,
    )
    from core.config import PrefixAdapterConfig
    from core.models import load_base_model
    from core.rollout import sample, stop_token_ids

    argv = sys.argv[1:] if argv is None else argv
    origin = provenance("python -m benchmarks.prefix_init " + " ".join(argv), args.out)
    dtype = getattr(torch, args.dtype)
    base, tokenizer = load_base_model(MODEL, dtype=dtype)
    stops = stop_token_ids(base, tokenizer)

    prompts = [chat_prompt_ids(tokenizer, t) for t in probe_prompts(args.prompts)]
    reference = sample(base, prompts, args.max_tokens, stops, tokenizer.pad_token_id, greedy=True)

    def log_probs(model, rows: list[list[int]], seqs_prompts: list[list[int]]) -> list[torch.Tensor]:
        out = []
        for prompt, row in zip(seqs_prompts, rows, strict=True):
            ids = torch.tensor([prompt + row])
            logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits
            out.append(torch.log_softmax(logits[0, len(prompt) - 1 : -1].float(), -1))
        return out

    with torch.no_grad():
        base_log_probs = log_probs(base, reference, prompts)
    config = base.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_key_value_heads * head_dim

    def adapter_with(rows: torch.Tensor):
        fresh, _ = load_base_model(MODEL, dtype=dtype)
        model = attach_adapter(fresh, tokenizer, PrefixAdapterConfig(num_virtual_tokens=rows.shape[0]))
        model.prompt_encoder["default"].embedding.weight.data.copy_(rows)
        return model

    results = {}

    def measure(name: str, model, fed: list[list[int]] | None = None) -> None:
        """`fed`: the prompts as the adapted model reads them (default: as the base model does)."""
        started, fed = time.perf_counter(), fed or prompts
        with torch.no_grad():
            adapted = log_probs(model, reference, fed)
        kl = sum((b.exp() * (b - a)).sum().item() for a, b in zip(adapted, base_log_probs, strict=True))
        kl /= sum(len(r) for r in reference)
        outputs = sample(model, fed, args.max_tokens, stops, tokenizer.pad_token_id, greedy=True)
        same = sum(o == r for o, r in zip(outputs, reference, strict=True)) / len(reference)
        results[name] = {"kl_per_token": kl, "greedy_identical": same}
        log.info("%-22s KL/token %.2e  greedy identical %.0f%%  (%.0f s)", name, kl, 100 * same,
                 time.perf_counter() - started)  # fmt: skip

    def measure_default() -> None:
        """The product's fresh adapter, its prompts fed as the trainer and model server feed them."""
        adapter = PrefixAdapterConfig()
        fresh, _ = load_base_model(MODEL, dtype=dtype)
        model = attach_adapter(fresh, tokenizer, adapter)
        replaced = replaced_prompt_start(tokenizer, adapter)
        assert all(tuple(p[: len(replaced)]) == replaced for p in prompts), (
            "probes start with the system turn"
        )
        measure("default", model, [without_replaced_start(p, replaced) for p in prompts])

    def measure_floor() -> None:
        """The base model against itself: the rounding `default` cannot get below.

        KL: the base model reading the chat start into its KV cache first, then the rest (what
        the prefix does, without an adapter). Greedy: each prompt decoded alone, not in the batch.
        """
        started, n = time.perf_counter(), len(kv_prefix_init_ids(tokenizer, None, None))
        kl = 0.0
        with torch.no_grad():
            for prompt, row, b in zip(prompts, reference, base_log_probs, strict=True):
                cache = base(input_ids=torch.tensor([prompt[:n]]), use_cache=True).past_key_values
                rest = prompt[n:] + row
                positions = torch.arange(n, n + len(rest))[None]
                logits = base(
                    input_ids=torch.tensor([rest]), past_key_values=cache, position_ids=positions
                ).logits
                a = torch.log_softmax(logits[0, len(prompt) - n - 1 : -1].float(), -1)
                kl += (b.exp() * (b - a)).sum().item()
        kl /= sum(len(r) for r in reference)
        alone = [
            sample(base, [p], args.max_tokens, stops, tokenizer.pad_token_id, greedy=True)[0] for p in prompts
        ]
        same = sum(o == r for o, r in zip(alone, reference, strict=True)) / len(reference)
        results["base_model_itself"] = {"kl_per_token": kl, "greedy_identical": same}
        log.info("%-22s KL/token %.2e  greedy identical %.0f%%  (%.0f s)", "base_model_itself", kl, 100 * same,
                 time.perf_counter() - started)  # fmt: skip

    system_turn = kv_prefix_activations(base, kv_prefix_init_ids(tokenizer, None, None))
    measure_floor()
    measure_default()
    if args.only_default:
        args.distill_steps = []
    else:
        measure("system_turn", adapter_with(system_turn))
        measure("im_start", adapter_with(kv_prefix_activations(base, prompts[0][:1])))
        measure("newline", adapter_with(kv_prefix_activations(base, tokenizer("\n")["input_ids"])))
        zero_keys = system_turn.clone()
        for layer in range(config.num_hidden_layers):
            zero_keys[:, 2 * layer * width : (2 * layer + 1) * width] = 0
        measure("zero_keys", adapter_with(zero_keys))
        anti_sink = kv_prefix_activations(base, prompts[0][:1])
        for layer in range(config.num_hidden_layers):
            anti_sink[:, 2 * layer * width : (2 * layer + 1) * width] *= -4
        measure("anti_sink", adapter_with(anti_sink))

    if args.distill_steps:
        generic = [chat_prompt_ids(tokenizer, t) for t in DISTILL_PROMPTS]
        torch.manual_seed(0)
        continuations = sample(base, generic, args.max_tokens, stops, tokenizer.pad_token_id)
        with torch.no_grad():
            teacher = log_probs(base, continuations, generic)
        model = adapter_with(system_turn)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=args.distill_lr)
        for step in range(1, max(args.distill_steps) + 1):
            batch = random.Random(step).sample(range(len(generic)), 8)
            for i in batch:
                (student,) = log_probs(model, [continuations[i]], [generic[i]])
                kl = (teacher[i].exp() * (teacher[i] - student)).sum(-1).mean() / len(batch)
                kl.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step in args.distill_steps:
                measure(f"distilled_{step}", model)

    report = {**origin, "model": MODEL, "dtype": args.dtype, "prompts": len(prompts),
              "max_tokens": args.max_tokens, "distill_lr": args.distill_lr, "target_kl_per_token": 1e-3,
              "results": results}  # fmt: skip
    if args.out is not None:
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
