"""Pull the answer out of a completion before grading it. Pure string functions."""

from __future__ import annotations

import re
from typing import Literal

import regex

Extractor = Literal["none", "last_number", "boxed", "last_line", "answer_tag"]

_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# User patterns run with the `regex` module, which can stop a match: with `re`, one pattern such as
# (x+x+)+y backtracks for hours while holding the GIL, freezing the API (reward tests) or the worker.
USER_PATTERN_TIMEOUT_SECONDS = 1.0


def user_pattern_matches(pattern: str, text: str, how: str = "finditer"):
    """regex.<how>(pattern, text) with DOTALL, stopped by TimeoutError after USER_PATTERN_TIMEOUT_SECONDS.

    `concurrent` lets other threads run while it matches.
    """
    match = getattr(regex, how)
    return match(pattern, text, flags=regex.DOTALL, timeout=USER_PATTERN_TIMEOUT_SECONDS, concurrent=True)


def last_number(text: str) -> str | None:
    """The last number in the text, thousands separators removed: 'so 1,024.5 total' -> '1024.5'."""
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


def last_boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...}, braces balanced: r'\boxed{\frac{1}{2}}' -> r'\frac{1}{2}'."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def last_line(text: str) -> str | None:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def answer_tag(text: str) -> str | None:
    matches = _ANSWER_TAG.findall(text)
    return matches[-1].strip() if matches else None


def extract_answer(text: str, how: Extractor = "none", pattern: str | None = None) -> str | None:
    """Apply `pattern` (first capture group, last match) if given, else the named extractor.

    None means nothing could be extracted, which every grader scores as 0.
    """
    if pattern is not None:
        matches = list(user_pattern_matches(pattern, text))
        if not matches:
            return None
        last = matches[-1]
        return last.group(1) if last.groups() else last.group(0)
    if how == "none":
        return text
    return {
        "last_number": last_number,
        "boxed": last_boxed,
        "last_line": last_line,
        "answer_tag": answer_tag,
    }[how](text)
