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


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived (raised by the CLI's signal handler).

    A ``BaseException`` like ``KeyboardInterrupt``, so ``except Exception`` blocks do not swallow it, but a
    type of its own, so libraries that turn ``KeyboardInterrupt`` into something else (typer maps it to a
    return code of 130 in non-standalone mode, which the caller cannot tell from success) leave it alone.
    ``exit_code`` is the shell convention 128 + signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by signal {signum}")


def warn(problem: str, fix: str | None = None) -> None:
    """Print one ``warning: <problem>. Fix: <fix>.`` line on stderr: for input that works but is probably not
    what the user meant (an adapter recorded for another base model, non-finite SAE weights)."""
    import sys

    print(f"warning: {LorascopeError(problem, fix).one_line()}", file=sys.stderr)
