"""Give freed heap memory back to the operating system between stages.

PyTorch on CPU allocates tensors with the C library's ``malloc``; glibc keeps memory freed by a finished stage
(e.g. a LoRA training's activations) in its heap, so the process's resident set keeps the earlier stage's peak
and every later stage stacks on top of it. ``malloc_trim(0)`` returns the free pages (measured on the embedded
model: resident memory after a LoRA training at batch 4 × 192 tokens fell from 3.4 GB to 1.0 GB). A no-op on
platforms without glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from functools import cache


@cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Collect garbage and return free heap pages to the OS; True where ``malloc_trim`` exists (glibc)."""
    gc.collect()
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True
