"""The README's benchmark figures are the committed results: every figure in bold in a bullet of
its Benchmarks section must be found in the JSON result of the benchmark that bullet names.

A bullet names its benchmark by command: `python -m benchmarks.NAME` or `make benchmark-NAME`
(resolved through the Makefile). Its results are the JSON files under docs/benchmarks whose
recorded command runs that module. A figure is found when a number in those files, or in the
text they hold, rounds to it at the figure's own precision (read as a percentage of a fraction,
milliseconds of seconds or GiB of MiB where the figure says so).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def benchmark_bullets() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Benchmarks\n", 1)[1].split("\n## ", 1)[0]
    return [b.replace("\n", " ") for b in re.split(r"\n- ", section)[1:]]


def make_targets() -> dict[str, str]:
    """make target -> benchmarks module it runs."""
    targets, current = {}, None
    for line in (REPO / "Makefile").read_text().splitlines():
        if match := re.match(r"^([\w-]+):", line):
            current = match[1]
        elif current and (module := re.search(r"-m (benchmarks\.\w+)", line)):
            targets.setdefault(current, module[1])
    return targets


def module_of(bullet: str) -> str:
    if match := re.search(r"`python -m (benchmarks\.\w+)", bullet):
        return match[1]
    match = re.search(r"`make (benchmark-[\w-]+)`", bullet)
    assert match, f"the bullet names no benchmark command: {bullet[:80]}"
    return make_targets()[match[1]]


def results_of(module: str) -> list[object]:
    found = []
    for path in sorted((REPO / "docs" / "benchmarks").rglob("*.json")):
        data = json.loads(path.read_text())
        command = str(data.get("command", "")) if isinstance(data, dict) else ""
        script = re.escape(module.replace(".", "/")) + r"\.py"
        if re.search(rf"(-m {re.escape(module)}|{script})\b", command):
            found.append(data)
    return found


def numbers_in(value: object) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, str):
        return [float(n.replace(",", "")) for n in NUMBER.findall(value)]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [n for item in value for n in numbers_in(item)]
    return []


def figures(bullet: str) -> list[tuple[str, str]]:
    """(figure, the text after it) for every number in bold."""
    out = []
    for bold in re.findall(r"\*\*(.+?)\*\*", bullet):
        for match in NUMBER.finditer(bold):
            out.append((match[0], bold[match.end() :].lstrip()))
    return out


def is_found(figure: str, unit: str, values: list[float]) -> bool:
    target = float(figure.replace(",", ""))
    digits = len(figure.split(".")[1]) if "." in figure else 0
    scales = [1.0]
    if unit.startswith("%"):
        scales.append(100.0)
    if unit.startswith("ms"):
        scales.append(1000.0)
    if unit.startswith("GiB"):
        scales.append(1 / 1024)
    return any(round(v * s, digits) == round(target, digits) for v in values for s in scales)


@pytest.mark.parametrize(
    "bullet", benchmark_bullets(), ids=lambda b: b.split("**")[1] if "**" in b else b[:20]
)
def test_every_bold_figure_is_in_the_committed_result(bullet):
    results = results_of(module_of(bullet))
    assert results, f"no committed JSON under docs/benchmarks records the command of: {bullet[:80]}"
    values = numbers_in(results)
    bold = figures(bullet)
    assert bold, f"the bullet shows no figure in bold: {bullet[:80]}"
    missing = [figure for figure, unit in bold if not is_found(figure, unit, values)]
    assert not missing, f"figures not in the committed results: {missing} ({bullet[:60]})"


def test_the_checker_refuses_a_figure_that_is_not_there():
    assert is_found("149.24", "tokens/s", [149.2412])
    assert is_found("37", "% less", [0.3701])
    assert is_found("480", "ms", [0.48])
    assert not is_found("150.0", "tokens/s", [149.24])
    assert not is_found("2.38", "x", [2.37])
