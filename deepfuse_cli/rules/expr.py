"""Config expressions: the small arithmetic a family file uses to say derived values as data.

A family file writes, for example::

    "derived": {"head_dim": "head_dim or hidden_size // num_attention_heads"}
    "widths":  {"kv": "num_key_value_heads * head_dim"}
    "output":  {"scale": "d_model ** -0.5 if scale_decoder_outputs else 1.0"}

Names are config fields (absent fields are ``None``); numbers, ``True``/``False``/``None``,
``+ - * / // % **``, comparisons, ``and``/``or``/``not`` and ``x if c else y`` are allowed.
Arithmetic on ``None`` gives ``None`` (a value that cannot be derived from this config).
Nothing else parses: no calls, attributes or subscripts, so an expression cannot do anything
but compute a value from the config.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not}
MAX_LENGTH = 500


class ExprError(ValueError):
    """An expression outside the allowed grammar."""


@lru_cache(maxsize=512)
def parse(text: str) -> ast.expr:
    """The checked syntax tree of ``text`` (ExprError if it uses anything not allowed)."""
    if len(text) > MAX_LENGTH:
        raise ExprError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise ExprError(f"{text!r} is not an expression ({exc.msg})") from None
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Name, ast.Constant,
                               ast.Load, ast.And, ast.Or, ast.Not, ast.USub, ast.UAdd, *_BINARY, *_COMPARE))
        if not ok or (isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, bool, type(None)))):
            raise ExprError(f"{text!r}: {type(node).__name__} is not allowed (only arithmetic on config fields)")
    return tree


def names(text: str) -> set[str]:
    """The config fields ``text`` reads."""
    return {n.id for n in ast.walk(parse(text)) if isinstance(n, ast.Name)}


def evaluate(text: str, config: Mapping[str, Any]) -> Any:
    """The value of ``text`` over ``config`` (``None`` where a field it needs is absent)."""
    return _eval(parse(text), config)


def _eval(node: ast.expr, cfg: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return {"True": True, "False": False, "None": None}.get(node.id, cfg.get(node.id))
    if isinstance(node, ast.BoolOp):
        value = None
        for v in node.values:
            value = _eval(v, cfg)
            if isinstance(node.op, ast.Or) and value:
                return value
            if isinstance(node.op, ast.And) and not value:
                return value
        return value
    if isinstance(node, ast.IfExp):
        return _eval(node.body, cfg) if _eval(node.test, cfg) else _eval(node.orelse, cfg)
    if isinstance(node, ast.UnaryOp):
        v = _eval(node.operand, cfg)
        if isinstance(node.op, ast.Not):
            return not v
        if v is None or not isinstance(v, (int, float)):
            return None
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Compare):
        left = _eval(node.left, cfg)
        for op, comp in zip(node.ops, node.comparators, strict=True):
            right = _eval(comp, cfg)
            if not isinstance(op, (ast.Is, ast.IsNot, ast.Eq, ast.NotEq)) and (left is None or right is None):
                return None
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, cfg), _eval(node.right, cfg)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
            return None
        if isinstance(node.op, ast.Pow) and abs(b) > 64:
            return None  # no huge powers: config arithmetic never needs them
        try:
            return _BINARY[type(node.op)](a, b)
        except (ZeroDivisionError, OverflowError, ValueError):
            return None
    raise ExprError(f"{type(node).__name__} is not allowed")  # unreachable after parse()
