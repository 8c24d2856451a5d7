"""Typed errors: raised in the library, turned into one-line messages in cli.py.

Every expected failure is a :class:`DeepfuseError` carrying an exit code and a hint,
so the command boundary can print ``error: <message>`` / ``hint: <hint>`` without a
traceback (set ``DEEPFUSE_DEBUG=1`` to see one).
"""

from __future__ import annotations


def _one_line(text: str) -> str:
    """Control characters (names and paths from untrusted files may hold newlines) escaped, so that a
    message stays one line whatever it quotes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class DeepfuseError(Exception):
    """A user-facing error. ``exit_code`` follows DESIGN section 7."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        message = _one_line(message)
        super().__init__(message)
        self.message = message
        self.hint = None if hint is None else _one_line(hint)

    def __str__(self) -> str:  # one line, the hint appended
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class InputError(DeepfuseError):
    """Bad input: unreadable/invalid file, mismatched sources, refused pickle (exit 2)."""


class UsageError(DeepfuseError):
    """Bad options or arguments (exit 2)."""


class RuleError(DeepfuseError):
    """A rules file is invalid, or tensors and rules do not match one-to-one (exit 2)."""


class VerificationFailed(DeepfuseError):
    """The checkpoint was examined and is not what it claims (exit 1)."""

    exit_code = 1
