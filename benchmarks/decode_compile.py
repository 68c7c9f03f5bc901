"""The decode step eager vs `torch.compile`d, on this CPU: is compiling worth keeping?

    python -m benchmarks.decode_compile --out docs/benchmarks/decode_compile.json

SmolLM2-135M-Instruct in bfloat16, 16 chat prompts prefilled, then 64 greedy decode steps of the
shared decoder (`core.decoding.Decoder.step`), timed per step after a warm-up pass. Variants:
- `eager`: the decoder as it runs (projections prepacked for oneDNN);
- `eager-unpacked`: the same with plain `F.linear` on the weights (what the compiler gets: it
  cannot lower the prepacked oneDNN weights, which are opaque tensors);
- `compiled`: `torch.compile(dynamic=True)` of the forward, unpacked weights (the rows and cache
  columns change every step, so shapes are dynamic).
Each variant's tokens are compared with eager's.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

log = logging.getLogger("benchmarks.decode_compile")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from benchmarks.provenance import provenance, spread, write_report
    from core.decoding import Decoder
    from core.models import load_base_model

    origin = provenance(shlex.join(["python", "-m", "benchmarks.decode_compile", *argv]), args.out)
    model, tokenizer = load_base_model("smollm2-135m-instruct", dtype=torch.bfloat16)
    prompts = [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": f"What is {10 + i} + {30 + 2 * i}?"}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        for i in range(args.rows)
    ]

    def decode(decoder: Decoder) -> tuple[torch.Tensor, float]:
        """Greedy tokens [rows, steps] and the mean seconds per decode step."""
        cache = decoder.new_cache()
        logits = decoder.prefill(cache, torch.arange(len(prompts)), prompts)
        tokens = []
        started = time.perf_counter()
        for _ in range(args.steps):
            token = logits.argmax(-1)
            tokens.append(token)
            logits = decoder.step(cache, token)
        return torch.stack(tokens, 1), (time.perf_counter() - started) / args.steps

    def unpacked() -> Decoder:
        decoder = Decoder(model)
        for projection in [
            decoder.head,
            *(p for layer in decoder.layers for p in layer.projections.values()),
        ]:
            projection.packed = None
        return decoder

    variants = {"eager": Decoder(model), "eager-unpacked": unpacked()}
    compiled = unpacked()
    compiled._forward = torch.compile(compiled._forward, dynamic=True)
    variants["compiled"] = compiled

    reference = None
    results = {}
    for name, decoder in variants.items():
        started = time.perf_counter()
        tokens, _ = decode(decoder)  # warm-up (for `compiled`, the compilation)
        warmup = time.perf_counter() - started
        times = [decode(decoder)[1] for _ in range(args.repeats)]
        reference = tokens if reference is None else reference
        results[name] = {
            "step_ms": spread(1000 * t for t in times),
            "warmup_s": round(warmup, 2),
            "tokens_equal_to_eager": float((tokens == reference).float().mean()),
        }
        log.info(
            "%-15s %6.1f ms/step [%.1f-%.1f], warm-up %.1f s, %.0f%% of tokens equal to eager's",
            name,
            results[name]["step_ms"]["median"],
            results[name]["step_ms"]["min"],
            results[name]["step_ms"]["max"],
            warmup,
            100 * results[name]["tokens_equal_to_eager"],
        )
    if args.out is not None:
        report = {
            **origin,
            "settings": {
                "rows": args.rows,
                "steps": args.steps,
                "repeats": args.repeats,
                "dtype": "bfloat16",
            },
            "torch": torch.__version__,
            "variants": results,
        }
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
