"""Reading what users and checkpoints hand us, without letting it crash, hang or wander.

Everything the tool reads from outside goes through these few helpers, so that a bad input is one
:class:`~deepfuse_cli.errors.DeepfuseError` instead of a traceback:

* :func:`parse_json` / :func:`read_json`: JSON whose nesting is measured (without recursion) before
  it is parsed, so that 100,000 nested brackets are refused instead of exhausting the stack, here
  or in the code that walks the result.
* :func:`resolve` / :func:`resolves_inside`: ``Path.resolve`` where a symlink loop (or a name too
  long) is a refusal naming the path, and "inside this directory" is decided on real paths.
* :func:`validation_summary`: a pydantic ``ValidationError`` as one line (first problem, location).

Only the standard library and :mod:`errors` are imported: the CLI uses this at start-up.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path
from typing import Any

from .errors import DeepfuseError, InputError

#: deepest JSON nesting accepted; real files nest a handful of levels (rules files and manifests ~6)
MAX_JSON_DEPTH = 64

# a JSON string (skipped whole: brackets inside it do not nest) or a bracket
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def json_depth_exceeds(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``text`` nests arrays/objects deeper than ``limit``; a linear scan, no recursion."""
    if text.count("[") + text.count("{") <= limit:  # cannot nest deeper than it has brackets
        return False
    depth = 0
    for m in _STRING_OR_BRACKET.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth -= 1
    return False


class InvalidJSON(ValueError):
    """Text that is not JSON, or nests too deeply; the message is a short reason."""


def loads(text: str | bytes, **kwargs: Any) -> Any:
    """``json.loads`` that refuses excessive nesting before parsing. Raises :class:`InvalidJSON` with a
    short reason ("invalid JSON at line 3 column 5: Expecting value", "JSON nested deeper than 64
    levels"); bytes that are not UTF-8 raise UnicodeDecodeError, a hook's own ValueError passes through."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")
    if json_depth_exceeds(text):
        raise InvalidJSON(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, **kwargs)
    except json.JSONDecodeError as exc:
        raise InvalidJSON(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:  # unreachable below the limit; kept so no input can turn into a traceback
        raise InvalidJSON("JSON nested too deeply") from None


def parse_json(text: str | bytes, origin: str, *, error: type[DeepfuseError] = InputError, hint: str | None = None,
               expect: type | None = dict) -> Any:
    """Parse JSON read from ``origin`` (named in messages); a problem is one ``error``."""
    try:
        data = loads(text)
    except ValueError as exc:  # includes UnicodeDecodeError
        raise error(f"{origin}: {exc}", hint) from None
    if expect is not None and not isinstance(data, expect):
        raise error(f"{origin}: expected a JSON {'object' if expect is dict else expect.__name__}, "
                    f"found {type(data).__name__}", hint)
    return data


def read_text(path: Path, *, what: str = "", error: type[DeepfuseError] = InputError) -> str:
    """A UTF-8 text file; unreadable (missing, a loop, a directory, not UTF-8) is one ``error``."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise error(f"{path}: cannot read{' ' + what if what else ''} ({reason})") from None


def read_json(path: Path, *, what: str = "", error: type[DeepfuseError] = InputError, hint: str | None = None,
              expect: type | None = dict) -> Any:
    """A JSON file (``what`` it is, for messages), refused cleanly when unreadable, invalid or too deep."""
    return parse_json(read_text(path, what=what, error=error), str(path), error=error, hint=hint, expect=expect)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP or isinstance(exc, RuntimeError):
        return "a symlink loop"  # Python < 3.13 raises RuntimeError("Symlink loop from ...")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)


def resolve(path: Path, *, error: type[DeepfuseError] = InputError, hint: str | None = None) -> Path:
    """``Path.resolve()``; a symlink loop or an unresolvable name is one ``error`` naming ``path``."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as exc:
        raise error(f"{path}: cannot resolve the path ({_why(exc)})",
                    hint or "remove the symlink loop, or choose another path") from None


def resolves_inside(path: Path, root: Path) -> bool:
    """Whether ``path``, with every symlink followed, stays inside directory ``root`` (already resolved,
    e.g. by :func:`resolve`). A path that cannot be resolved (a symlink loop) is not inside."""
    try:
        return Path(path).resolve().is_relative_to(root)
    except (OSError, RuntimeError):
        return False


def require_inside(path: Path, root: Path, *, where: str, shown: str, hint: str) -> None:
    """Refuse (InputError) to go on with ``path`` unless it stays inside ``root`` (resolved): a checkpoint's
    internal files must not lead elsewhere. ``shown``: the path as messages show it."""
    if not resolves_inside(path, root):
        raise InputError(f"{where}: {shown} resolves outside the checkpoint directory (a link out, or a symlink loop)",
                         hint)


def validation_summary(exc: Any) -> str:
    """A pydantic ``ValidationError`` as one line: the first problem's location and message."""
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in first["loc"]).replace(".[", "[")
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{loc or 'top level'}: {msg}{more}"
