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

import math
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


def cell_rows(st: RunState, store, layer: int, adapter: Adapter, per_doc: Path | None = None) -> list[ResultRow]:
    """The density rows of one (layer, adapter) cell; with ``per_doc``, also write the fixed-coefficient SAE's
    per-document L0 sums there (document ids, sums, token counts: the trend rows' paired bootstrap reads them)."""
    from lorascope.geometry.bootstrap import document_bootstrap_mean_ci
    from lorascope.saes.density import density_at_coefficient, density_at_matched_fvu, density_rows
    from lorascope.study.trends import per_document

    cfg, d = st.config, st.config.density
    holdout = study_holdout(cfg)
    train = store.training_stream(layer, "delta", adapter.name, d.batch_size, cfg.seed, holdout)
    rows_held = store.held_out(layer, adapter.name, holdout)
    held = rows_held.delta[: cfg.geometry.eval_tokens]
    docs = rows_held.doc_index[: cfg.geometry.eval_tokens]
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
    l0_ci = document_bootstrap_mean_ci(fixed.per_token_l0, docs, cfg.geometry.bootstrap, seed=cfg.seed)
    if per_doc is not None:
        ids, sums, counts = per_document(fixed.per_token_l0, docs)
        write_json(per_doc, {"ids": ids.tolist(), "sums": sums.tolist(), "counts": counts.tolist()})
    where = dict(layer=layer, adapter=adapter.name, rank=adapter.rank, n=int(held.shape[0]))
    rows = density_rows(fixed, matched, spec.d_sae, l0_ci, **where)
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
                rows = cell_rows(st, store, layer, a, sd.path / "per_doc" / f"L{layer}__{a.name}.json")
                write_json(part, [r.as_record() for r in rows])
    write_json(parts / "trends.json", [r.as_record() for r in density_trend_rows(st, sd.path / "per_doc", adapters)])
    sd.mark_done({"cells": len(cfg.extraction.layers) * len(adapters)})
    st.finished("density", t0)
    return sd.path


def density_trend_rows(st: RunState, per_doc: Path, adapters: list[Adapter]) -> list[ResultRow]:
    """The free-L0 SAE's L0 over rank (per layer; trained adapters only, one recipe) and over depth (per adapter),
    as slopes with paired document-bootstrap CIs and permutation p-values (lorascope.study.trends)."""
    import torch

    from lorascope.study.trends import trend_rows

    cfg = st.config
    points = {}
    for layer in cfg.extraction.layers:
        for a in adapters:
            f = per_doc / f"L{layer}__{a.name}.json"
            if f.is_file():
                r = read_json(f)
                points[(layer, a.name)] = tuple(
                    torch.tensor(r[k], dtype=torch.float64 if k != "ids" else torch.long)
                    for k in ("ids", "sums", "counts")
                )
    common = dict(n_boot=cfg.geometry.bootstrap, seed=cfg.seed, family=schema.DENSITY)
    rows: list[ResultRow] = []
    trained = sorted((a for a in adapters if a.training is not None and a.rank > 0), key=lambda a: a.rank)
    for layer in cfg.extraction.layers:
        cell = [points.get((layer, a.name)) for a in trained]
        if all(c is not None for c in cell):
            x = [math.log2(a.rank) for a in trained]
            rows += trend_rows(x, cell, schema.TREND_FREE_L0_RANK, schema.TREND_FREE_L0_RANK_P, layer=layer, **common)
    for a in adapters:
        layers = [v for v in cfg.extraction.layers if (v, a.name) in points]
        cell = [points[(v, a.name)] for v in layers]
        where = dict(adapter=a.name, rank=a.rank)
        rows += trend_rows(
            [float(v) for v in layers],
            cell,
            schema.TREND_FREE_L0_DEPTH,
            schema.TREND_FREE_L0_DEPTH_P,
            **where,
            **common,
        )
    return rows


def read_rows(stage_dir: Path) -> list[ResultRow]:
    """The rows the density stage wrote."""
    return [row_from_record(r) for f in sorted((stage_dir / "parts").glob("*.json")) for r in read_json(f)]
