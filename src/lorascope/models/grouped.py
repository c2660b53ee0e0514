"""Batches whose rows belong to different adapters, run one adapter at a time instead of as a PEFT mixed batch.

A PEFT mixed batch (``adapter_names=[...]``, one name per row) computes every LoRA layer's base output on all rows,
then for each adapter gathers its rows (``x[indices]``), applies B·A and scatters the result back
(``result[indices] += ...``). When each adapter's rows form one contiguous run — as in lorascope's batches, which
stack base rows, then each adapter's rows — the same numbers come from one forward per run with only that adapter
active: the base weights see the same rows, the LoRA factors see the same rows, and no gather or scatter is needed.
On this project's 2-core CPU the quickstart's extraction forward (SmolLM2-135M, base + 4 adapters, 16 documents)
takes 0.85× the time (benchmarks/grouped.py; the rows bitwise equal, tests/models/test_grouped.py), so on CPU the
grouped path is the default. On a GPU one launch sequence for all rows may be the better trade (not measured
here); PEFT's mixed batch stays the default there.

Adapters with auxiliary wrappers (``modules_to_save``, trainable tokens) keep PEFT's mixed batch: their per-row
routing lives in wrappers this module does not switch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from lorascope.errors import LorascopeError

BASE = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch


def contiguous_runs(names: Sequence[str]) -> list[tuple[str, int, int]] | None:
    """[(name, first row, row after the last)] of ``names`` when every name occupies one contiguous run of rows
    (in first-appearance order); None when some name appears in two separate runs."""
    runs: list[tuple[str, int, int]] = []
    for i, n in enumerate(names):
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1], i + 1)
        else:
            runs.append((n, i, i + 1))
    return runs if len({r[0] for r in runs}) == len(runs) else None


def grouping_supported(model: torch.nn.Module, modules: Sequence[torch.nn.Module] | None = None) -> bool:
    """Whether rows of this PeftModel can run adapter by adapter (no auxiliary wrappers such as
    ``modules_to_save``, whose per-row routing only PEFT's mixed batch does). ``modules``: the model's modules,
    when the caller already holds them (a walk of a PeftModel's module tree is not free)."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    return not any(isinstance(m, AuxiliaryTrainingWrapper) for m in (modules or model.modules()))


def prefer_groups(model: torch.nn.Module) -> bool:
    """The default: grouped forwards on CPU (measured faster here, module docstring), PEFT's mixed batch elsewhere."""
    return next(model.parameters()).device.type == "cpu"


def adapter_runs(
    model: torch.nn.Module,
    names: Sequence[str],
    grouped: bool | None = None,
    modules: Sequence[torch.nn.Module] | None = None,
):
    """The contiguous runs of ``names`` (:func:`contiguous_runs`) when the rows should run adapter by adapter:
    ``grouped`` True, or None and :func:`prefer_groups`; None when they should run as one PEFT mixed batch
    (grouping off or unsupported, or an adapter's rows not contiguous). ``modules``: as for
    :func:`grouping_supported`."""
    if grouped is False or (grouped is None and not prefer_groups(model)):
        return None
    if not grouping_supported(model, modules):
        return None
    known = set(getattr(model, "peft_config", {})) | {BASE}
    unknown = sorted(set(names) - known)
    if unknown:  # PEFT's mixed batch refuses these too; one forward per adapter would silently run the base
        raise LorascopeError(
            f"unknown adapter name(s) {unknown}", fix=f"use {BASE!r} or one of {sorted(known - {BASE})}"
        )
    return contiguous_runs(names)


@contextmanager
def only_adapter(model: torch.nn.Module, name: str, modules: Sequence[torch.nn.Module] | None = None) -> Iterator[None]:
    """Within it every LoRA-style layer of ``model`` runs ``name`` alone (:data:`BASE`: none), whatever was active;
    each layer's previous state is restored on exit. Unlike PEFT's ``set_adapter`` it leaves ``requires_grad``
    alone. A layer that does not hold ``name`` computes its base output. ``modules``: the model's modules, when
    the caller already holds them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lorascope.models.lora_switch import set_active

    layers = [m for m in (modules or model.modules()) if isinstance(m, BaseTunerLayer)]
    with set_active(layers, lambda _m: [] if name == BASE else [name]):
        yield


__all__ = ["BASE", "adapter_runs", "contiguous_runs", "grouping_supported", "only_adapter", "prefer_groups"]
