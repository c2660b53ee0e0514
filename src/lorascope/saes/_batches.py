"""Batch sources for the trainer: any stream of [n, d_in] chunks, re-cut into fixed-size batches, restartable.

The trainer sees the data as ONE stream of rows. Batch ``i`` is rows ``[i*B, (i+1)*B)`` of that stream,
whatever the chunk sizes, so "resume after ``tokens_seen`` rows" is well defined. What can be passed:

- a tensor / numpy array [N, d_in]: sliced in place;
- an object with ``iter_from(row) -> Iterator[chunk]``: asked to start at ``row`` (a store reader can seek);
- a callable ``() -> Iterable[chunk]`` (a factory): re-opened and the first ``row`` rows are skipped;
- a re-iterable (list of chunks, any object whose ``__iter__`` returns a fresh iterator): likewise;
- a one-shot iterator or generator: works, but cannot be resumed (its rows are gone).

Resuming is exact only if the source yields the same rows in the same order every time it is opened.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from lorascope.errors import LorascopeError


def _as_chunk(chunk: Any) -> torch.Tensor:
    if isinstance(chunk, np.ndarray):
        chunk = torch.from_numpy(np.ascontiguousarray(chunk))
    if not isinstance(chunk, torch.Tensor):
        raise LorascopeError(
            f"the batch source yielded a {type(chunk).__name__}, not a tensor",
            fix="yield torch tensors or numpy arrays of shape [rows, d_in]",
        )
    if chunk.ndim != 2:
        raise LorascopeError(
            f"the batch source yielded shape {tuple(chunk.shape)}, expected [rows, d_in]",
            fix="flatten batch and sequence dimensions into rows first",
        )
    if not chunk.is_floating_point():
        raise LorascopeError(
            f"the batch source yielded {str(chunk.dtype).removeprefix('torch.')} rows; activations are floating point",
            fix="pass residual-stream activations (float32 or bfloat16), not token ids or indices",
        )
    return chunk


def _skip(chunks: Iterator[Any], rows: int) -> Iterator[torch.Tensor]:
    """Drop the first ``rows`` rows of a chunk stream."""
    for raw in chunks:
        chunk = _as_chunk(raw)
        if rows >= chunk.shape[0]:
            rows -= chunk.shape[0]
            continue
        yield chunk[rows:]
        rows = 0
    if rows > 0:
        raise LorascopeError(
            f"the batch source ended {rows} rows before the resume position",
            fix="resume with the same data the checkpoint was trained on",
        )


class BatchSource:
    """Wraps what the user passed; ``open(row)`` streams chunks starting at stream row ``row``."""

    def __init__(self, batches: Any):
        self.obj = batches
        if isinstance(batches, np.ndarray):
            self.obj = torch.from_numpy(np.ascontiguousarray(batches))
        self.one_shot = (
            not isinstance(self.obj, torch.Tensor)
            and not hasattr(self.obj, "iter_from")
            and not callable(self.obj)
            and iter(self.obj) is self.obj
        )
        self._opened = False

    def total_rows(self) -> int | None:
        """Row count when it can be known without reading (tensor, list of chunks)."""
        if isinstance(self.obj, torch.Tensor):
            return int(self.obj.shape[0])
        if isinstance(self.obj, list | tuple):
            return sum(int(_as_chunk(c).shape[0]) for c in self.obj)
        n_rows = getattr(self.obj, "n_rows", None)  # e.g. an activation-store reader
        if isinstance(n_rows, int):
            return n_rows - int(getattr(self.obj, "skip_rows", 0))
        return None

    def open(self, row: int = 0) -> Iterator[torch.Tensor]:
        obj = self.obj
        if isinstance(obj, torch.Tensor):
            return iter([_as_chunk(obj)[row:]])
        if hasattr(obj, "iter_from"):
            return (_as_chunk(c) for c in obj.iter_from(row))
        if self.one_shot:
            if self._opened or row:
                raise LorascopeError(
                    "cannot restart or resume from a one-shot iterator of batches",
                    fix="pass a tensor, a list, a callable returning a fresh iterator, "
                    "or an object with iter_from(row)",
                )
            self._opened = True
            return (_as_chunk(c) for c in obj)
        chunks: Iterable[Any] = obj() if callable(obj) else obj
        return _skip(iter(chunks), row)


def rebatch(
    chunks: Iterator[torch.Tensor],
    batch_size: int,
    limit_rows: int | None = None,
) -> Iterator[torch.Tensor]:
    """Cut a chunk stream into [batch_size, d] batches (the last one may be smaller), up to ``limit_rows``."""
    pending: list[torch.Tensor] = []
    have = 0
    left = limit_rows
    if left is not None and left <= 0:
        return
    for chunk in chunks:
        while chunk.shape[0]:
            target = batch_size if left is None else min(batch_size, left)
            take, chunk = chunk[: target - have], chunk[target - have :]
            pending.append(take)
            have += take.shape[0]
            if have == target:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, have = [], 0
                if left is not None:
                    left -= target
                    if left == 0:
                        return
    if have:
        yield pending[0] if len(pending) == 1 else torch.cat(pending)


def take_rows(chunks: Iterator[torch.Tensor], rows: int) -> tuple[torch.Tensor | None, Iterator[torch.Tensor]]:
    """Read the first ``rows`` rows (fewer if the stream is shorter) and return them with the untouched stream
    (the rows read are put back in front)."""
    head: list[torch.Tensor] = []
    have = 0
    for chunk in chunks:
        head.append(chunk)
        have += chunk.shape[0]
        if have >= rows:
            break
    if not head:
        return None, iter(())
    cat = torch.cat(head) if len(head) > 1 else head[0]

    def rest() -> Iterator[torch.Tensor]:
        yield cat
        yield from chunks

    return cat[:rows], rest()
