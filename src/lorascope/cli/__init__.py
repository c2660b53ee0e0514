"""The ``lorascope`` command. Thin: every subcommand parses options and calls a Python function.

Each stage's commands live in their own module here and register onto ``app``. ``main`` is the one place that
turns failures into what a user sees, one line on stderr (``--debug`` shows the traceback instead):

- :class:`~lorascope.errors.LorascopeError`: ``error: <problem>. Fix: <fix>.``, exit 2;
- a pydantic ``ValidationError`` (an option value outside its settings model's constraints) and a click usage
  error (unknown option, not an integer): one line naming the option, exit 2;
- SIGINT / SIGTERM: ``interrupted: re-run the same command to resume``, exit 130 / 143. A signal handler raises
  :class:`~lorascope.errors.Interrupted` wherever the process is (progress bars, training or worker loops);
  every writer leaves its resumable state (finished shards, the last checkpoint, finished stages) and removes
  its temporary files on the way out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import typer

from lorascope.errors import Interrupted, LorascopeError

app = typer.Typer(
    name="lorascope",
    help="What did this LoRA adapter change inside the model? Train/load adapters, extract delta activations, "
    "train adapter SAEs, compare dictionaries with controls, and report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_STATE = {"command": "lorascope"}  # the subcommand being run, for error messages
RESUME_LINE = "interrupted: re-run the same command to resume"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@app.callback()
def _root(
    ctx: typer.Context, debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")
) -> None:
    """``--debug`` is declared here for the help text; :func:`main` reads it from the arguments."""
    _STATE["command"] = f"lorascope {ctx.invoked_subcommand}" if ctx.invoked_subcommand else "lorascope"


def _load_commands() -> None:
    """Import the command modules: each registers its commands on ``app``."""
    from lorascope.cli import activations, evals, evaluate, info, models, pipeline, saes  # noqa: F401


@contextlib.contextmanager
def signals_raise_interrupted() -> Iterator[None]:
    """While active, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (then a second signal ends
    the process at once). Restores the previous handlers on exit; does nothing outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in _SIGNALS}

    def handler(signum: int, frame: Any) -> None:
        for s in _SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        raise Interrupted(signum)

    for s in _SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _command_name() -> str:
    return str(_STATE.get("command") or "lorascope")


def option_name(field: str) -> str:
    """The command-line spelling of a settings field: ``batch_size`` -> ``--batch-size``."""
    return "--" + str(field).replace("_", "-")


def option_error(exc: Any, rename: dict[str, str] | None = None, command: str = "lorascope") -> LorascopeError:
    """The user-facing error for a pydantic ``ValidationError`` raised by option values: the option, its value,
    the rule it breaks (first error only), and where to look up the option."""
    from lorascope.saes import known_architectures

    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if str(p) not in known_architectures()]  # drop a union's architecture tag
    field = loc[0] if loc else ""
    name = (rename or {}).get(field, option_name(field)) if field else "an option"
    value = err.get("input")
    got = f" {value}" if field and isinstance(value, (int, float, str)) else ""
    rule = err["msg"].removeprefix("Value error, ")
    return LorascopeError(f"{name}{got}: {rule}", fix=f"change {name} (see `{command} --help`)")


def check_options(model: Any, rename: dict[str, str] | None = None, **values: Any) -> Any:
    """Validate command-line option values through a settings model (pydantic) before any expensive work.

    ``model`` is a pydantic model class (only the given fields are set; the rest keep their defaults) or a
    dict ``{field: (type, pydantic.Field(...))}`` for options that no settings model holds. ``rename`` maps a
    field to its option name where they differ (``{"shard_docs": "--docs-per-shard"}``). A bad value raises a
    LorascopeError naming the option, its value and the constraint.
    """
    from pydantic import BaseModel, ValidationError, create_model

    cls = model if isinstance(model, type) and issubclass(model, BaseModel) else create_model("Options", **model)
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise option_error(exc, rename, _command_name()) from exc


def _usage_error_line(exc: Any) -> str:
    ctx = getattr(exc, "ctx", None)
    command = f"lorascope {ctx.info_name}" if ctx is not None and ctx.parent is not None else "lorascope"
    return LorascopeError(exc.format_message(), fix=f"see `{command} --help`").one_line()


def _fail(line: str, code: int) -> None:
    print(f"error: {line}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    from lorascope._memory import keep_freed_memory

    keep_freed_memory()  # freed tensors reused, not unmapped and page-faulted again (lorascope._memory)
    _load_commands()
    _STATE["command"] = "lorascope"
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("LORASCOPE_DEBUG") == "1"
    try:
        with signals_raise_interrupted():
            code = app(args=argv, standalone_mode=False)
    except Interrupted as exc:
        print(RESUME_LINE, file=sys.stderr)
        sys.exit(exc.exit_code)
    except LorascopeError as exc:
        if debug:
            raise
        _fail(exc.one_line(), 2)
    except SystemExit:
        raise
    except Exception as exc:  # usage errors (typer ships its own copy of click) and the like
        if debug:
            raise
        if type(exc).__name__ == "ValidationError" and hasattr(exc, "errors"):  # pydantic: an option's value
            _fail(option_error(exc, command=_command_name()).one_line(), 2)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # a click/typer usage error
            _fail(_usage_error_line(exc), exc.exit_code)
        if type(exc).__name__ == "Abort":
            sys.exit(1)
        _fail(f"unexpected {type(exc).__name__}: {exc} (re-run with --debug for the traceback)", 1)
    if isinstance(code, int) and code:  # typer returns an exit code in non-standalone mode (130: Ctrl-C)
        if code == 130:
            print(RESUME_LINE, file=sys.stderr)
        sys.exit(code)
