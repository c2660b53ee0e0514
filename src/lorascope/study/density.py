"""Stage: feature density with a free-L0 SAE (the ``density:`` section), so the claim "density rises with rank and
depth" (arXiv 2605.28896) is tested where L0 can move (a TopK adapter SAE pins it at k).

Per (layer, adapter): one SAE of ``density.architecture`` (``paper_a`` by default: ReLU + plain L1 on Δ divided
by its mean norm, so one coefficient means the same sparsity pressure at every layer and rank) trained on the
training documents' Δ at the fixed ``density.l1_coefficient``; L0 and FVU on the held-out documents' Δ. With
``density.matched_fvu_target`` set, also L0 at the coefficient whose held-out FVU equals the target
(:func:`lorascope.saes.density.density_at_matched_fvu`). Rows go to ``parts/L{layer}__{adapter}.json`` as each
cell finishes (an interrupted stage resumes by cell); the publish step merges them into the results table.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from lorascope import results_schema as schema
from lorascope.io import read_json, write_json
from lorascope.results import ResultRow, row_from_record
from lorascope.study.adapters import Adapter
from lorascope.study.cache import RunState, StageDir
from lorascope.study.extract import Extracted
from lorascope.study.splits import study_holdout

FIXED_METRICS = (schema.L0_FIXED_COEFFICIENT, schema.FVU_FIXED_COEFFICIENT)


def density_spec(st: RunState, d_model: int):
    """The DensitySpec of the ``density`` section (trainer on the section's budget; σ over its training rows)."""
    from lorascope.saes.density import DensitySpec
    from lorascope.saes.trainer import TrainerConfig

    d = st.config.density
    steps = max(1, d.tokens // d.batch_size)
    trainer = TrainerConfig(
        total_tokens=d.tokens,
        batch_size=d.batch_size,
        lr=d.lr,
        seed=st.config.seed,
        warmup_steps=min(100, max(1, steps // 10)),
        init_tokens=min(d.tokens, 65_536),
        device=st.config.model.device,
    )
    return DensitySpec(d_sae=d.expansion * d_model, architecture=d.architecture, trainer=trainer, seed=st.config.seed)


def cell_rows(st: RunState, store, layer: int, adapter: Adapter) -> list[ResultRow]:
    """The density rows of one (layer, adapter) cell."""
    from lorascope.saes.density import density_at_coefficient, density_at_matched_fvu, density_rows

    cfg, d = st.config, st.config.density
    holdout = study_holdout(cfg)
    train = store.training_stream(layer, "delta", adapter.name, d.batch_size, cfg.seed, holdout)
    held = store.held_out(layer, adapter.name, holdout).delta
    held = held[: cfg.geometry.eval_tokens]
    if held.shape[0] == 0:
        return []
    spec = density_spec(st, store.d_model)
    st.log(f"density: layer {layer}, {adapter.name} ({d.architecture}, coefficient {d.l1_coefficient:g})")
    fixed = density_at_coefficient(train, held, d.l1_coefficient, spec)
    matched = None
    if d.matched_fvu_target is not None:
        matched = density_at_matched_fvu(
            train, held, d.matched_fvu_target, spec, start=d.l1_coefficient, max_runs=d.max_runs
        )
    rows = density_rows(
        fixed, matched, spec.d_sae, layer=layer, adapter=adapter.name, rank=adapter.rank, n=int(held.shape[0])
    )
    # the fixed-coefficient rows name their SAE, which the report's density finding quotes
    label = f"{d.architecture}, λ={fixed.coefficient:g}"
    return [replace(r, note=label) if r.metric in FIXED_METRICS else r for r in rows]


def stage_density(st: RunState, extracted: Extracted, adapters: list[Adapter]) -> Path | None:
    """Every cell's density rows (resuming from the part files already written); the stage folder, or None when
    ``density.enabled`` is false."""
    cfg = st.config
    if not cfg.density.enabled:
        return None
    inputs = {
        "store": extracted.key,
        "held_out_fraction": cfg.data.held_out_fraction,
        "seed": cfg.seed,
        "eval_tokens": cfg.geometry.eval_tokens,
        "device": cfg.model.device,
        **cfg.density.model_dump(),
    }
    sd = StageDir.make(st.out, "density", "free_l0", inputs)
    if sd.done:
        return sd.path
    t0 = time.perf_counter()
    store = extracted.open()
    parts = sd.path / "parts"
    for layer in cfg.extraction.layers:
        for a in adapters:
            part = parts / f"L{layer}__{a.name}.json"
            if not part.is_file():
                write_json(part, [r.as_record() for r in cell_rows(st, store, layer, a)])
    sd.mark_done({"cells": len(cfg.extraction.layers) * len(adapters)})
    st.finished("density", t0)
    return sd.path


def read_rows(stage_dir: Path) -> list[ResultRow]:
    """The rows the density stage wrote."""
    return [row_from_record(r) for f in sorted((stage_dir / "parts").glob("*.json")) for r in read_json(f)]
