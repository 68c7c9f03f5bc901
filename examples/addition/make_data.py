"""Addition with worked column-by-column demonstrations: the example jobs and the learning study's tasks.

    python examples/addition/make_data.py [--digits 2] [--train 2000] [--eval 200] [--seed 0] [--out DIR]

Writes train.jsonl (every example has a demonstration) and eval.jsonl (held-out problems). The
splits are disjoint as unordered pairs: when 37 + 45 is held out, 45 + 37 is not trained on.
Training prompts use the first phrasing; the held-out problems cycle through all four. The
reward reads the `answer` field. `examples/addition3` is the same with three-digit numbers.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PHRASINGS = (
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
    "What do you get when you add {a} and {b}?",
)
COLUMNS = ("Ones", "Tens", "Hundreds", "Thousands", "Ten-thousands")


def worked_solution(a: int, b: int) -> str:
    """Column addition written out, ending with the answer as the last number.

    Every column but the last says which digit it writes and whether it carries; the last column's
    sum is written whole (it leads the answer).
    """
    width = max(len(str(a)), len(str(b)))
    parts, carry = [], 0
    for column in range(width):
        x, y = a // 10**column % 10, b // 10**column % 10
        total = x + y + carry
        text = f"{COLUMNS[column]}: {x} + {y}" + (f" + {carry}" if carry else "") + f" = {total}"
        if column < width - 1:
            carry, digit = divmod(total, 10)
            text += f", write {digit} and carry {carry}." if carry else "."
        else:
            text += "."
        parts.append(text)
    return f"{' '.join(parts)} So {a} + {b} = {a + b}. The answer is {a + b}."


def addition_example(a: int, b: int, phrasing: int = 0) -> dict:
    return {
        "prompt": PHRASINGS[phrasing].format(a=a, b=b),
        "demonstration": worked_solution(a, b),
        "answer": str(a + b),
        "phrasing": phrasing,
    }


def unordered_pair_splits(digits: int, sizes: tuple[int, ...], seed: int) -> list[list[tuple[int, int]]]:
    """Disjoint lists of problems (a, b) with `digits`-digit operands, one list per size.

    Disjoint as unordered pairs: a pair and its commuted twin always land in the same list.
    Each problem's operand order is drawn at random.
    """
    low, high = 10 ** (digits - 1), 10**digits - 1
    count = (high - low + 1) * (high - low + 2) // 2
    if sum(sizes) > count:
        raise ValueError(f"at most {count} distinct unordered pairs of {digits}-digit numbers")
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    pairs: list[tuple[int, int]] = []
    if sum(sizes) > count // 2:  # dense: enumerate and shuffle
        pairs = [(a, b) for a in range(low, high + 1) for b in range(a, high + 1)]
        rng.shuffle(pairs)
    else:  # sparse: draw without replacement
        while len(pairs) < sum(sizes):
            a, b = sorted((rng.randint(low, high), rng.randint(low, high)))
            if (a, b) not in seen:
                seen.add((a, b))
                pairs.append((a, b))
    ordered = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in pairs]
    splits, start = [], 0
    for size in sizes:
        splits.append(ordered[start : start + size])
        start += size
    return splits


def addition_splits(
    train_size: int, eval_size: int, seed: int, digits: int = 2
) -> tuple[list[dict], list[dict]]:
    """Training examples (first phrasing) and held-out examples (the four phrasings in turn)."""
    heldout, train = unordered_pair_splits(digits, (eval_size, train_size), seed)
    return (
        [addition_example(a, b) for a, b in train],
        [addition_example(a, b, i % len(PHRASINGS)) for i, (a, b) in enumerate(heldout)],
    )


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main(digits: int = 2, out: Path = Path(__file__).parent) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--digits", type=int, default=digits)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=out)
    args = parser.parse_args()
    train, heldout = addition_splits(args.train, args.eval, args.seed, args.digits)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", heldout)
    print(f"wrote {len(train)} training and {len(heldout)} held-out examples to {args.out}")


if __name__ == "__main__":
    main()
