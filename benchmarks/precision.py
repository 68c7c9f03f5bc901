"""Greedy outputs of SmolLM2-135M-Instruct with bfloat16 base weights vs float32, on a probe set.

    python -m benchmarks.precision --out docs/benchmarks/precision.json

The probe set is 64 chat prompts: the held-out addition questions of the example (seeded) and
the serving benchmark's questions. Each is decoded greedily for up to 48 tokens by the trainer's
sampler (`core.rollout.sample`), once per dtype. Reported: the share of outputs that are
identical, and for each one that differs, the first token where it does and the float32 margin
between the top two logits there (a near-tie that bfloat16 rounding can flip shows as a small margin).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

log = logging.getLogger("benchmarks.precision")

MODEL = "smollm2-135m-instruct"


def probe_prompts(count: int) -> list[str]:
    from benchmarks.serving import QUESTIONS
    from examples.addition.make_data import addition_splits

    _, heldout = addition_splits(0, count, seed=0)
    questions = [row["prompt"] for row in heldout]
    return (list(QUESTIONS) + questions)[:count]


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """One user turn through the chat template, ready for the assistant's answer."""
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from benchmarks.provenance import provenance, write_report
    from core.models import load_base_model
    from core.rollout import sample, stop_token_ids

    texts = probe_prompts(args.prompts)
    outputs, models = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = load_base_model(MODEL, dtype=dtype)
        prompts = [chat_prompt_ids(tokenizer, t) for t in texts]
        stops = stop_token_ids(model, tokenizer)
        outputs[dtype] = sample(model, prompts, args.max_tokens, stops, tokenizer.pad_token_id, greedy=True)
        models[dtype] = model

    differing = []
    for i, (full, half) in enumerate(zip(outputs[torch.float32], outputs[torch.bfloat16], strict=True)):
        if full == half:
            continue
        at = next(
            (j for j, (a, b) in enumerate(zip(full, half, strict=False)) if a != b), min(len(full), len(half))
        )
        with torch.inference_mode():
            ids = torch.tensor([prompts[i] + full[:at]])
            logits = models[torch.float32](input_ids=ids).logits[0, -1].float()
        top = logits.topk(2).values
        differing.append(
            {"prompt": i, "first_difference": at, "float32_top2_margin": round(float(top[0] - top[1]), 4)}
        )
    identical = len(texts) - len(differing)
    margins = [d["float32_top2_margin"] for d in differing]
    summary = {
        "prompts": len(texts),
        "identical": identical,
        "identical_share": round(identical / len(texts), 3),
        "median_first_difference": statistics.median([d["first_difference"] for d in differing])
        if differing
        else None,
        "median_margin_where_they_differ": statistics.median(margins) if margins else None,
    }
    log.info(
        "identical greedy outputs: %d of %d (%.0f%%)", identical, len(texts), 100 * identical / len(texts)
    )
    if differing:
        log.info(
            "where they differ: first differing token at median %s, float32 top-2 logit margin there median %.3f",
            summary["median_first_difference"],
            summary["median_margin_where_they_differ"],
        )
    command = "python -m benchmarks.precision " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.out is not None:
        record = {
            "benchmark": "precision",
            **provenance(command, args.out),
            "model": MODEL,
            "max_tokens": args.max_tokens,
            "summary": summary,
            "differing": differing,
        }
        write_report(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
