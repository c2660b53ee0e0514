"""User-facing errors.

Every error a user can cause with bad input is a :class:`LorascopeError`: one line naming the problem and the
fix. The CLI prints it without a traceback (unless ``--debug``) and exits with status 2.
"""

from __future__ import annotations


class LorascopeError(Exception):
    """A problem with the user's input or files, with the fix in the message.

    >>> raise LorascopeError("layer 40 is out of range", fix="choose a layer in 0..29")
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.rstrip(". ")
        self.fix = fix.rstrip(". ") if fix else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem if not self.fix else f"{self.problem}. Fix: {self.fix}."
        return " ".join(text.split())  # never more than one line


class IntegrityError(LorascopeError):
    """Stored data failed a check (checksum mismatch, truncated file, NaN activations)."""
