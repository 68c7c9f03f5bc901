"""Two-digit addition with worked demonstrations: the example job and the learning benchmark's task.

    python examples/addition/make_data.py [--train 2000] [--eval 200] [--seed 0] [--out DIR]

Writes train.jsonl (every example has a demonstration) and eval.jsonl (200 held-out problems,
none of which appears in train). The reward reads the `answer` field.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def worked_solution(a: int, b: int) -> str:
    """Column addition written out, ending with the answer as the last number."""
    ones = a % 10 + b % 10
    carry, digit = divmod(ones, 10)
    tens = a // 10 + b // 10 + carry
    steps = f"Ones: {a % 10} + {b % 10} = {ones}"
    steps += f", write {digit} and carry {carry}." if carry else "."
    steps += f" Tens: {a // 10} + {b // 10}" + (f" + {carry}" if carry else "") + f" = {tens}."
    return f"{steps} So {a} + {b} = {a + b}. The answer is {a + b}."


def addition_example(a: int, b: int) -> dict:
    return {"prompt": f"What is {a} + {b}?", "demonstration": worked_solution(a, b), "answer": str(a + b)}


def addition_splits(train_size: int, eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out problems over all pairs of two-digit numbers."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    if train_size + eval_size > len(pairs):
        raise ValueError(f"at most {len(pairs)} distinct problems")
    heldout = [addition_example(a, b) for a, b in pairs[:eval_size]]
    train = [addition_example(a, b) for a, b in pairs[eval_size : eval_size + train_size]]
    return train, heldout


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    train, heldout = addition_splits(args.train, args.eval, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", heldout)
    print(f"wrote {len(train)} training and {len(heldout)} held-out examples to {args.out}")


if __name__ == "__main__":
    main()
