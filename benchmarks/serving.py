"""Batched multi-adapter decoding (core.serving) vs serving the same requests one by one with PEFT.

    python -m benchmarks.serving --out docs/benchmarks/serving.json

SmolLM2-135M-Instruct (float32, CPU), 16 chat requests spread over 4 prefix adapters of different
lengths (8, 12, 16, 20 virtual tokens, each initialised from the chat template's activations and
then perturbed, so every adapter decodes differently), greedy, 64 new tokens at most (a row also
stops at EOS). The baseline is what one would write without the engine: one `PeftModel`, each
adapter loaded with `load_adapter`, and `generate` per request, one after the other. The engine
decodes all 16 requests in one batch. Both run in this process, one after the other, after one
warm-up request each; adapter loading is not timed. Throughput is completion tokens / wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("benchmarks.serving")

MODEL = "smollm2-135m-instruct"
PREFIX_LENGTHS = (8, 12, 16, 20)
TARGET_SPEEDUP = 3.0
QUESTIONS = (
    "What is 17 + 25?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Explain what a prime number is.",
    "Give me a tip for learning to code.",
    "What is 9 times 7?",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
    "Suggest a name for a small bakery.",
    "What does a compiler do?",
    "List two fruits that are red.",
    "How many days are in a leap year?",
    "Translate 'good morning' into French.",
    "What is the boiling point of water in Celsius?",
    "Tell me a fun fact about octopuses.",
)


def make_adapters(directory: Path, noise: float, seed: int) -> list[Path]:
    """Prefix adapters of different lengths, perturbed so that each one decodes differently."""
    import torch

    from core.adapters import attach_adapter, export_adapter
    from core.config import PrefixAdapterConfig
    from core.models import load_base_model

    paths = []
    generator = torch.Generator().manual_seed(seed)
    for i, n in enumerate(PREFIX_LENGTHS):
        model, tokenizer = load_base_model(MODEL)
        policy = attach_adapter(model, tokenizer, PrefixAdapterConfig(num_virtual_tokens=n))
        with torch.no_grad():
            for p in policy.parameters():
                if p.requires_grad:
                    p.add_(noise * p.std() * torch.randn(p.shape, generator=generator))
        paths.append(export_adapter(policy, directory / f"adapter-{i}", MODEL))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request at most")
    parser.add_argument("--requests", type=int, default=16, help="chat requests (round-robin over adapters)")
    parser.add_argument("--noise", type=float, default=0.1, help="adapter perturbation, in parameter stds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import peft
    import torch
    import transformers
    from peft import PeftModel

    from core.models import load_base_model
    from core.rollout import stop_token_ids
    from core.serving import BatchedEngine, GenerationRequest, SamplingParams, load_adapter

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = make_adapters(Path(tmp), args.noise, args.seed)
        model, tokenizer = load_base_model(MODEL)
        eos = sorted(stop_token_ids(model, tokenizer))
        prompts = [
            list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                )["input_ids"]
            )
            for i in range(args.requests)
        ]
        which = [i % len(adapter_dirs) for i in range(args.requests)]

        # Sequential baseline: one PeftModel holding every adapter, `generate` per request.
        names = [f"adapter-{i}" for i in range(len(adapter_dirs))]
        peft_model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name=names[0])
        for name, directory in zip(names[1:], adapter_dirs[1:], strict=True):
            peft_model.load_adapter(directory, adapter_name=name)
        peft_model.eval()

        def one_by_one(indices: list[int]) -> list[list[int]]:
            outputs = []
            for i in indices:
                peft_model.set_adapter(names[which[i]])
                ids = torch.tensor([prompts[i]])
                with torch.inference_mode():
                    out = peft_model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=args.max_tokens,
                        do_sample=False,
                        eos_token_id=eos,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                outputs.append(out[0, len(prompts[i]) :].tolist())
            return outputs

        one_by_one([0])  # warm-up
        started = time.perf_counter()
        sequential = one_by_one(list(range(args.requests)))
        sequential_s = time.perf_counter() - started

        # The engine: the same requests in one batch over the plain base model.
        base = peft_model.get_base_model()
        engine = BatchedEngine(base, tokenizer)
        adapters = [load_adapter(d, base) for d in adapter_dirs]
        requests = [
            GenerationRequest(
                prompts[i], adapters[which[i]], SamplingParams(max_tokens=args.max_tokens, temperature=0)
            )
            for i in range(args.requests)
        ]
        engine.generate(requests[:1])  # warm-up
        started = time.perf_counter()
        batched = engine.generate(requests)
        batched_s = time.perf_counter() - started

    sequential_tokens = sum(len(t) for t in sequential)
    batched_tokens = sum(c.completion_tokens for c in batched)
    mismatched = [i for i, (s, b) in enumerate(zip(sequential, batched, strict=True)) if s != b.token_ids]
    sequential_tps, batched_tps = sequential_tokens / sequential_s, batched_tokens / batched_s
    speedup = batched_tps / sequential_tps
    result = {
        "benchmark": "serving",
        "command": "python -m benchmarks.serving " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": MODEL,
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "requests": args.requests,
        "adapters": len(adapter_dirs),
        "prefix_lengths": list(PREFIX_LENGTHS),
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "sequential": {
            "tokens": sequential_tokens,
            "seconds": round(sequential_s, 3),
            "tokens_per_s": round(sequential_tps, 2),
        },
        "batched": {
            "tokens": batched_tokens,
            "seconds": round(batched_s, 3),
            "tokens_per_s": round(batched_tps, 2),
        },
        "speedup": round(speedup, 2),
        "target_speedup": TARGET_SPEEDUP,
        "identical_outputs": not mismatched,
        "mismatched_requests": mismatched,
        "finish_reasons": {r: sum(c.finish_reason == r for c in batched) for r in ("stop", "length")},
        "distinct_outputs": len({tuple(c.token_ids) for c in batched}),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        # Other work on the same cores slows both runs (the longer sequential one more): check these.
        "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    log.info("%-22s %12s %12s", "", "one by one", "batched")
    log.info("%-22s %12d %12d", "completion tokens", sequential_tokens, batched_tokens)
    log.info("%-22s %12.2f %12.2f", "seconds", sequential_s, batched_s)
    log.info("%-22s %12.2f %12.2f", "tokens/s", sequential_tps, batched_tps)
    log.info("speedup %.2fx (target %.1fx); identical outputs: %s", speedup, TARGET_SPEEDUP, not mismatched)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
