"""How close a fresh prefix adapter is to the base model, for several initialisations.

    python -m benchmarks.prefix_init --out docs/benchmarks/prefix_init.json [--dtype float32]

SmolLM2-135M-Instruct, 50 probe prompts (the precision benchmark's: addition questions and
general ones), 48 greedy tokens each. For each initialisation of a fresh prefix adapter:
the share of greedy outputs identical to the base model's (token for token, through the
trainer's sampler), and the per-token KL(base || adapted) on the base model's greedy outputs
(teacher-forced, positions as the trainer computes them). Target: KL <= 1e-3 per token.

Initialisations:
- `system_turn`: key/value activations of the chat template's system turn (the default). Every
  prompt already starts with that turn, so the model reads it twice.
- `im_start`: the activations of the first token alone (the attention sink of most heads).
- `newline`: the activations of a single newline.
- `zero_keys`: the system turn's values with zero keys (each slot takes softmax weight exp(0)).
- `anti_sink`: the first token's values with its keys negated and scaled by 4: most heads put
  their largest logit on that token, so this slot gets close to none of their attention.
- `system_turn_replaced`: the default prefix, and each prompt fed without the system turn it
  starts with, at the positions that follow it: the prefix stands in for those tokens instead of
  repeating them (KL and greedy decoding by a plain loop here; the trainer does not do this yet).
  PEFT places a prompt after its prefix (it adds num_virtual_tokens to the position ids), so the
  model then reads exactly the base model's sequence.
- `distilled_K`: the default, then K Adam steps (lr `--distill-lr`) on KL(base || adapted) over
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
    parser.add_argument("--only-replaced", action="store_true", help="measure system_turn_replaced alone")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import torch

    from benchmarks.precision import chat_prompt_ids, probe_prompts
    from benchmarks.provenance import provenance, write_report
    from core.adapters import attach_adapter, kv_prefix_activations, kv_prefix_init_ids
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

    def measure(name: str, model) -> None:
        started = time.perf_counter()
        with torch.no_grad():
            adapted = log_probs(model, reference, prompts)
        kl = sum((b.exp() * (b - a)).sum().item() for a, b in zip(adapted, base_log_probs, strict=True))
        kl /= sum(len(r) for r in reference)
        outputs = sample(model, prompts, args.max_tokens, stops, tokenizer.pad_token_id, greedy=True)
        same = sum(o == r for o, r in zip(outputs, reference, strict=True)) / len(reference)
        results[name] = {"kl_per_token": kl, "greedy_identical": same}
        log.info("%-22s KL/token %.2e  greedy identical %.0f%%  (%.0f s)", name, kl, 100 * same,
                 time.perf_counter() - started)  # fmt: skip

    def measure_replaced(rows: torch.Tensor) -> None:
        """The prefix in place of the prompt's first tokens (which it was made from)."""
        started, n = time.perf_counter(), rows.shape[0]
        model = adapter_with(rows)
        head = kv_prefix_init_ids(tokenizer, None, None)
        assert all(prompt[:n] == head for prompt in prompts), "every probe prompt starts with the system turn"

        def logits_of(ids: list[int]) -> torch.Tensor:
            # PEFT moves prompt positions past the prefix itself: these land at n, n + 1, ...
            positions = torch.arange(len(ids))[None]
            return model(input_ids=torch.tensor([ids]), position_ids=positions).logits[0].float()

        kl, same = 0.0, 0
        with torch.no_grad():
            for prompt, row, b in zip(prompts, reference, base_log_probs, strict=True):
                rest = prompt[n:]
                a = torch.log_softmax(logits_of(rest + row)[len(rest) - 1 : -1], -1)
                kl += (b.exp() * (b - a)).sum().item()
                out: list[int] = []
                while len(out) < args.max_tokens and not (out and out[-1] in stops):
                    out.append(int(logits_of(rest + out)[-1].argmax()))
                same += out == row
        kl /= sum(len(r) for r in reference)
        results["system_turn_replaced"] = {"kl_per_token": kl, "greedy_identical": same / len(reference)}
        log.info("%-22s KL/token %.2e  greedy identical %.0f%%  (%.0f s)", "system_turn_replaced", kl,
                 100 * same / len(reference), time.perf_counter() - started)  # fmt: skip

    system_turn = kv_prefix_activations(base, kv_prefix_init_ids(tokenizer, None, None))
    measure_replaced(system_turn)
    if args.only_replaced:
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
