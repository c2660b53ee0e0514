"""Checkpoint sequences in the results table: one ``checkpoint/checkpoint_step`` row per checkpoint adapter.

``adapters.load: {run: {checkpoints: DIR}}`` expands into adapters ``run_step_<N>`` (one per ``checkpoint-<N>/``
folder, :func:`lorascope.models.finetunes.expand_load_specs`), each measured like any adapter; these rows give each
one its step as a number (``value``) and its sequence's name (``note``), so the per-checkpoint table
(:mod:`lorascope.report.checkpoints`) is a pivot of the ordinary rows by step.
"""

from __future__ import annotations

from lorascope.results import ResultRow
from lorascope.results_schema import CHECKPOINT, CHECKPOINT_STEP
from lorascope.study.adapters import Adapter


def sequence_name(adapter: Adapter) -> str:
    """``run`` for the adapter ``run_step_500`` of step 500 (the name given in ``adapters.load``)."""
    return adapter.name.removesuffix(f"_step_{adapter.step}")


def checkpoint_rows(adapters: list[Adapter]) -> list[ResultRow]:
    """One row per adapter that is a checkpoint of a sequence (none when the run has no sequence)."""
    return [
        ResultRow(
            CHECKPOINT, CHECKPOINT_STEP, float(a.step), layer=-1, adapter=a.name, rank=a.rank, note=sequence_name(a)
        )
        for a in adapters
        if a.step is not None
    ]
