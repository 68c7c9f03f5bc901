"""`calculate_output` of a `multi` grader: arithmetic over the sub-graders' scores, never `eval`.

    0.5 * correct + 0.5 * min(1, similarity ^ 2)

Numbers, the sub-graders' names, `+ - * /`, `^` or `**` for powers, parentheses, and the
functions min, max, abs, floor, ceil, exp, sqrt, log. The formula is parsed once into Python's
syntax tree and every node checked against that list; evaluation walks the tree with floats.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

MAX_FORMULA_CHARS = 1000
_FUNCTIONS: dict[str, tuple[Callable[..., float], int | None]] = {  # name -> (function, arity; None: 1+)
    "min": (min, None),
    "max": (max, None),
    "abs": (abs, 1),
    "floor": (math.floor, 1),
    "ceil": (math.ceil, 1),
    "exp": (math.exp, 1),
    "sqrt": (math.sqrt, 1),
    "log": (math.log, 1),
}
_OPERATORS: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}


class FormulaError(ValueError):
    """The formula cannot be parsed, names something unknown, or cannot be computed."""


@dataclass(frozen=True)
class Formula:
    text: str
    tree: ast.expr
    names: frozenset[str]

    def __call__(self, scores: Mapping[str, float]) -> float:
        try:
            value = _evaluate(self.tree, scores)
        except (ArithmeticError, ValueError) as exc:  # 1/0, log(0), sqrt(-1), overflow
            raise FormulaError(f"calculate_output {self.text!r}: {type(exc).__name__}: {exc}") from None
        if isinstance(value, complex) or not math.isfinite(value):
            raise FormulaError(f"calculate_output {self.text!r} is not a finite number here: {value}")
        return float(value)


def parse_formula(text: str, names: set[str]) -> Formula:
    """The checked formula; FormulaError naming what is wrong (and where) if it is not allowed."""
    if len(text) > MAX_FORMULA_CHARS:
        raise FormulaError(
            f"calculate_output is {len(text)} characters, over the limit of {MAX_FORMULA_CHARS}"
        )
    try:
        tree = ast.parse(text.replace("^", "**"), mode="eval").body
    except (SyntaxError, RecursionError, MemoryError) as exc:
        where = f" at column {exc.offset}" if isinstance(exc, SyntaxError) and exc.offset else ""
        raise FormulaError(f"calculate_output {text!r} is not a formula{where}") from None
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and id(node) not in called:
            if node.id not in names:
                known = ", ".join(sorted(names)) or "none"
                raise FormulaError(
                    f"calculate_output names {node.id!r}, which is no grader here (graders: {known})"
                )
            used.add(node.id)
        elif isinstance(node, ast.Call):
            _check_call(node, text)
        elif isinstance(node, ast.Constant) and not _is_number(node.value):
            raise FormulaError(f"calculate_output {text!r}: {_describe(node)} is not a number")
        elif not isinstance(node, _ALLOWED_NODES) and not (isinstance(node, ast.Name) and id(node) in called):
            raise FormulaError(
                f"calculate_output {text!r}: {_describe(node)} is not allowed "
                "(numbers, grader names, + - * / ^, parentheses and min max abs floor ceil exp sqrt log)"
            )
    return Formula(text, tree, frozenset(used))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_ALLOWED_NODES = (ast.BinOp, ast.UnaryOp, ast.Constant, ast.Load, ast.UAdd, ast.USub, *_OPERATORS)


def _check_call(node: ast.Call, text: str) -> None:
    name = node.func.id if isinstance(node.func, ast.Name) else None
    if name not in _FUNCTIONS:
        raise FormulaError(
            f"calculate_output {text!r}: only min max abs floor ceil exp sqrt log can be called"
        )
    if node.keywords:
        raise FormulaError(f"calculate_output {text!r}: {name}() takes no keyword arguments")
    arity = _FUNCTIONS[name][1]
    if (arity is None and not node.args) or (arity is not None and len(node.args) != arity):
        wanted = "at least one argument" if arity is None else f"{arity} argument"
        raise FormulaError(f"calculate_output {text!r}: {name}() takes {wanted}, got {len(node.args)}")


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Constant):
        return f"the constant {node.value!r}"
    return f"`{ast.unparse(node)}`" if isinstance(node, ast.expr) else type(node).__name__


def _evaluate(node: ast.expr, scores: Mapping[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(scores[node.id])
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, scores)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        return _OPERATORS[type(node.op)](_evaluate(node.left, scores), _evaluate(node.right, scores))
    if isinstance(node, ast.Call):
        function = _FUNCTIONS[node.func.id][0]  # type: ignore[union-attr]
        return float(function(*(_evaluate(a, scores) for a in node.args)))
    raise ValueError(f"unexpected {type(node).__name__}")
