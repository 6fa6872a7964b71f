"""Typed errors with fixed exit codes.

Every error a user can cause is a ``SparsekitError`` whose message is one line: what went wrong,
where, and how to fix it. The CLI prints that line (and, with ``--json``, a JSON object) and exits
with the class's ``exit_code``; the codes are part of the public contract (README, "Exit codes").
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_GATE = 3
EXIT_VALIDATION = 4
EXIT_TRAINING = 5


class SparsekitError(Exception):
    """Base class: a user-facing error with a one-line message and an exit code."""

    exit_code: int = EXIT_INTERNAL
    kind: str = "internal"

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [self.what.rstrip(".")]
        if self.where:
            parts[0] += f" ({self.where})"
        if self.fix:
            parts.append(f"fix: {self.fix.rstrip('.')}")
        return "; ".join(parts).replace("\n", " ")

    def to_json(self) -> dict[str, Any]:
        return {
            "error": {"type": self.kind, "message": self.message, "what": self.what,
                      "where": self.where, "fix": self.fix},
            "exit_code": self.exit_code,
        }


class InputError(SparsekitError):
    """Bad input or usage: unknown names, malformed specs or files, invalid option values."""

    exit_code = EXIT_USAGE
    kind = "input"


class GateError(SparsekitError):
    """A CI gate (``--min-accuracy``, ``--min-speedup``, ...) was not met."""

    exit_code = EXIT_GATE
    kind = "gate"


class ValidationError(SparsekitError):
    """An exported artifact failed validation against the torch model."""

    exit_code = EXIT_VALIDATION
    kind = "validation"


class TrainingError(SparsekitError):
    """Training failed: non-finite loss, interrupted, diverged."""

    exit_code = EXIT_TRAINING
    kind = "training"


def close_matches(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A 'did you mean' suffix listing close matches (or all choices) for unknown-name errors."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    if close:
        return f"did you mean {', '.join(repr(c) for c in close)}? (choices: {', '.join(choices)})"
    return f"choices: {', '.join(choices)}"
