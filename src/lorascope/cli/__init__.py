"""The ``lorascope`` command. Thin: every subcommand parses options and calls a Python function.

Each stage's commands live in their own module here and register onto ``app``; ``main`` turns any
:class:`~lorascope.errors.LorascopeError` into one line on stderr and exit status 2 (``--debug`` shows the
traceback instead).
"""

from __future__ import annotations

import os
import sys

import typer

from lorascope.errors import LorascopeError

app = typer.Typer(
    name="lorascope",
    help="What did this LoRA adapter change inside the model? Train/load adapters, extract delta activations, "
    "train adapter SAEs, compare dictionaries with controls, and report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")) -> None:
    """``--debug`` is declared here for the help text; :func:`main` reads it from the arguments."""


def _load_commands() -> None:
    """Import the command modules: each registers its commands on ``app``."""
    from lorascope.cli import activations, evals, info, models, pipeline, saes  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    _load_commands()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("LORASCOPE_DEBUG") == "1"
    try:
        app(args=argv, standalone_mode=False)
    except LorascopeError as exc:
        if debug:
            raise
        print(f"error: {exc.one_line()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # usage errors (typer ships its own copy of click) and the like
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # a click/typer usage error: it prints itself
            exc.show()
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            sys.exit(1)
        if debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (re-run with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)
