"""Helper processes started with multiprocessing's "spawn" method, without re-running the caller's script.

A spawned child re-imports the parent's ``__main__`` module (by name after ``python -m``, else by path) before it
runs its target, so a script that calls lorascope at top level without an ``if __name__ == "__main__":`` guard
would run again in every helper. lorascope's helpers need nothing from ``__main__`` (their targets are functions
of this package), so :func:`spawned` hides it while the children start: they import only what their target needs.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def spawned() -> Iterator[Any]:
    """A "spawn" multiprocessing context for starting processes or pools inside the block; children started in it
    do not re-import the parent's ``__main__``."""
    import multiprocessing

    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")  # no __spec__, no __file__: nothing to re-import
    try:
        yield multiprocessing.get_context("spawn")
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


__all__ = ["cpu_cores", "spawned"]
