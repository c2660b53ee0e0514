"""Stage 5: measure. For every (layer, adapter): the statistics of :mod:`lorascope.study.analysis` on held-out
tokens, the adapter's training losses, the top-activating contexts of its SAE's strongest features and the
splice test; per layer: the reference SAE on base activations and Δ's CKA across adapters.

Work is saved as part files (``parts/L{layer}__{adapter}.json`` and friends) as it finishes, so an interrupted
stage resumes where it stopped; the stage is done when every part exists and the table is written.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorascope.io import atomic_path, read_json, write_json
from lorascope.results import ResultRow, row_from_record
from lorascope.study.adapters import Adapter
from lorascope.study.cache import RunState, StageDir
from lorascope.study.checkpoints import checkpoint_rows
from lorascope.study.extract import Extracted
from lorascope.study.saes import StudySAEs
from lorascope.study.splits import study_holdout


@dataclass(frozen=True)
class Measured:
    """The measure stage's folder (parts/ and results/) and its rows."""

    path: Path
    rows: list[ResultRow]


def lora_rows(adapter: Adapter) -> list[ResultRow]:
    """The adapter's fine-tuning losses (trained adapters only)."""
    t = adapter.training
    if t is None:
        return []
    values = {
        "train_loss_start": t.loss_start,
        "train_loss_end": t.loss_end,
        "heldout_loss_base": t.heldout_loss_base,
        "heldout_loss_adapted": t.heldout_loss_adapted,
    }
    return [
        ResultRow("lora", name, float(v), layer=-1, adapter=adapter.name, rank=adapter.rank)
        for name, v in values.items()
    ]


def contexts(st: RunState, store, inp, held, n: int) -> list[dict]:
    """Top-activating held-out contexts of the adapter SAE's strongest features (by total activation mass)."""
    from lorascope.report.contexts import TokenSource, top_activating_contexts

    r = st.config.report
    if r.top_features == 0 or n == 0:
        return []
    sae = inp.adapter_saes[0]
    with torch.no_grad():
        codes = torch.cat([sae.encode(inp.delta[i : i + 4096]) for i in range(0, n, 4096)])
    top = torch.argsort(codes.clamp_min(0).sum(0), descending=True)[: r.top_features].tolist()
    codes = codes[:, top]  # only the shown features' columns go on (not a float64 copy of every latent)
    used = sorted(set(held.doc_index[:n].tolist()))
    docs = {i: store.doc_tokens(i) for i in used}
    doc_list = [docs.get(i, []) for i in range(max(used) + 1)]
    tok = st.tokenizer()
    column = {f: c for c, f in enumerate(top)}
    source = TokenSource(held.token_id[:n], held.doc_index[:n], held.position[:n], doc_list, tok.decode)
    return top_activating_contexts(
        codes,
        source,
        top,
        r.contexts_per_feature,
        layer=inp.layer,
        adapter=inp.adapter,
        column_of=column.__getitem__,
    )


def _measure_pair(st: RunState, store, adapter: Adapter, layer: int, saes: StudySAEs, reference, parts: Path) -> None:
    """Statistics, LoRA rows, contexts and arrays of one (layer, adapter) into its part files."""
    from lorascope.models.peft_weights import lora_update
    from lorascope.saes import load_sae
    from lorascope.study.analysis import LayerAdapterInputs, analyse_layer_adapter

    cfg, g = st.config, st.config.geometry
    held = store.held_out(layer, adapter.name, study_holdout(cfg))
    n = min(held.base.shape[0], g.eval_tokens)
    st.log(f"geometry: layer {layer}, {adapter.name} ({n} held-out tokens)")
    _, train_cov = train_delta_moments(st, store, layer, adapter.name)
    inp = LayerAdapterInputs(
        layer,
        adapter.name,
        adapter.rank,
        held.base[:n],
        held.delta[:n],
        [load_sae(p) for p in saes.adapter[(layer, adapter.name)]],
        reference,
        lora_update(adapter.path, layer),
        doc_index=held.doc_index[:n],
        train_delta_cov=train_cov,
    )
    with st.timed("geometry/analysis"):
        res = analyse_layer_adapter(inp, analysis_settings(st))
    res.rows.extend(lora_rows(adapter))
    stem = f"L{layer}__{adapter.name}"
    with st.timed("geometry/contexts"):
        write_json(parts / f"{stem}__contexts.ctx", contexts(st, store, inp, held, n))
    with atomic_path(parts / f"{stem}.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **res.arrays)
    write_json(parts / f"{stem}.json", [r.as_record() for r in res.rows])


def analysis_settings(st: RunState):
    from lorascope.study.analysis import Settings

    g = st.config.geometry
    return Settings(
        taus=tuple(g.taus),
        subspace_k=g.subspace_k,
        n_boot=g.bootstrap,
        cka_max_tokens=g.cka_max_tokens,
        seed=st.config.seed,
        cka_permutations=g.cka_permutations,
        subspace_draws=g.subspace_draws,
    )


def train_delta_moments(
    st: RunState, store, layer: int, adapter: str, max_rows: int = 50_000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [d] and covariance [d, d] (float64) of Δ over the *training* documents (the first ``max_rows`` rows
    in store order): the mean-Δ splice baseline and the covariance-matched alignment null must not look at the
    held-out documents they are evaluated on (the store's extraction statistics cover every document)."""
    cfg = st.config
    from lorascope.activations import ReadOrder

    reader = store.reader(layer, "delta", adapter, "train", 4096, study_holdout(cfg), ReadOrder(shuffle=False))
    d = store.d_model
    total, outer, n = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64), 0
    for x in reader:
        x = x.double()[: max_rows - n]
        total += x.sum(0)
        outer += x.T @ x
        n += x.shape[0]
        if n >= max_rows:
            break
    if n < 2:
        return torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)
    mean = total / n
    return mean, (outer - n * torch.outer(mean, mean)) / (n - 1)


def reference_rows(st: RunState, store, reference, layer: int, adapters: list[Adapter]) -> list[ResultRow]:
    """The reference SAE on held-out base activations: FVU and L0."""
    from lorascope.saes.trainer import evaluate_sae

    cfg = st.config
    held = store.held_out(layer, adapters[0].name, study_holdout(cfg))
    ev = evaluate_sae(reference, held.base[: cfg.geometry.eval_tokens])
    where = {"layer": layer, "n": int(ev["n_tokens"]), "d": store.d_model}
    return [
        ResultRow("reconstruction", "fvu_ref_on_base", ev["fvu"], **where),
        ResultRow("density", "l0_ref_on_base", ev["l0"], **where),
    ]


def overlap_row(check, layer: int) -> ResultRow:
    """The reference-overlap check of a path reference SAE (with a split record) as a row: the evaluation
    documents it was trained on; a value > 0 was allowed by ``reference_sae.allow_overlap`` and the report flags
    it beside the findings that use the reference."""
    from lorascope import results_schema as schema

    n = float(check.n_overlap)
    return ResultRow(schema.SPLIT, schema.REFERENCE_EVAL_OVERLAP, n, layer=layer, note=check.message)


def _measure_layer(st: RunState, store, layer: int, adapters: list[Adapter], saes: StudySAEs, parts: Path) -> None:
    from lorascope.saes import load_sae
    from lorascope.study.analysis import cross_adapter_cka
    from lorascope.study.splits import check_reference

    cfg, g = st.config, st.config.geometry
    reference = load_sae(saes.reference[layer], allow_pickle=cfg.reference_sae.allow_pickle)
    if cfg.reference_sae.source == "path":  # a study-trained reference uses this store's own training split
        check = check_reference(
            reference, store, study_holdout(cfg), allow_overlap=getattr(cfg.reference_sae, "allow_overlap", False)
        )
        if check.message:
            st.log(f"warning: {check.message}")
        rows = [] if check.status == "unknown" else [overlap_row(check, layer).as_record()]
        write_json(parts / f"L{layer}__reference_overlap.json", rows)
    for a in adapters:
        if not (parts / f"L{layer}__{a.name}.json").is_file():
            _measure_pair(st, store, a, layer, saes, reference, parts)
    cka_part = parts / f"L{layer}__cka.json"
    if not cka_part.is_file() and len(adapters) > 1:
        helds = {a.name: store.held_out(layer, a.name, study_holdout(cfg)) for a in adapters}
        deltas = {name: h.delta[: g.cka_max_tokens] for name, h in helds.items()}
        doc_index = next(iter(helds.values())).doc_index[: g.cka_max_tokens]  # same rows for every adapter
        rows = cross_adapter_cka(
            layer, deltas, {a.name: a.rank for a in adapters}, doc_index, g.cka_max_tokens, analysis_settings(st)
        )
        write_json(cka_part, [r.as_record() for r in rows])
    ref_part = parts / f"L{layer}__reference.json"
    if not ref_part.is_file():
        write_json(ref_part, [r.as_record() for r in reference_rows(st, store, reference, layer, adapters)])


def _splice_docs(st: RunState, store) -> tuple[list, list[int]]:
    """The first ``geometry.splice_docs`` held-out documents, tokenised as at extraction and kept in store order,
    with their store document index."""
    from lorascope.activations.extract import tokenize_docs
    from lorascope.study.extract import activation_examples

    cfg = st.config
    examples = activation_examples(st)
    mask = store.split_docs("held_out", study_holdout(cfg))
    index = {doc: i for i, (doc, keep) in enumerate(zip(store.doc_ids, mask.tolist(), strict=True)) if keep}
    docs = [
        d
        for d in tokenize_docs(st.tokenizer(), examples, cfg.data.max_length, cfg.data.long_examples)
        if d.doc_id in index
    ]
    docs = sorted(docs, key=lambda d: index[d.doc_id])[: cfg.geometry.splice_docs]
    return docs, [index[d.doc_id] for d in docs]


def kept_positions(held, doc_indices: list[int]) -> list[list[int]]:
    """Per document (store index), the positions the store kept for it, in order: the splice scores exactly the
    tokens the SAEs were measured on (the extraction's token rule, outlier-norm filter included)."""
    by_doc: dict[int, list[int]] = {}
    for doc, pos in zip(held.doc_index.tolist(), held.position.tolist(), strict=True):
        by_doc.setdefault(doc, []).append(pos)
    return [sorted(by_doc.get(i, [])) for i in doc_indices]


def splice_rows(res, n_boot: int, seed: int, **where) -> list[ResultRow]:
    """Rows of one splice: KL recovered relative to the Δ̂ = 0 splice (document-bootstrap CI), the raw recovery
    (labelled extra) and the mean KL of every reconstructor and baseline."""
    from lorascope import results_schema as schema
    from lorascope.geometry import document_bootstrap_ratio_ci

    n_docs = len(res.doc_tokens)
    common = dict(family=schema.SPLICE, n=int(res.n_tokens), **where)
    rows = [ResultRow(metric=schema.KL_ADAPTED_VS_BASE, value=res.kl_adapted_vs_base, **common)]
    for name in res.kl:
        rel = ResultRow(
            metric=schema.kl_recovered_rel(name),
            value=res.recovered[name],
            null_value=0.0,
            null_name=schema.NULL_ZERO_SPLICE,
            note="1 − KL(ft‖splice)/KL(ft‖splice with Δ̂ = 0)",
            **common,
        )
        if n_boot and n_docs >= 2 and sum(res.doc_kl["zero"]) > 0:
            ci = document_bootstrap_ratio_ci(
                res.doc_kl[name], res.doc_kl["zero"], list(range(n_docs)), n_boot=n_boot, seed=seed
            )
            rel.ci_low, rel.ci_high, rel.ci_unit = 1.0 - ci.high, 1.0 - ci.low, ci.ci_unit
        rows += [
            rel,
            ResultRow(
                metric=schema.kl_recovered_raw(name),
                value=res.recovered_raw[name],
                note="extra: 1 − KL(ft‖splice)/KL(ft‖base); Δ̂ = 0 already scores > 0 before the last layer",
                **common,
            ),
            ResultRow(metric=schema.kl(name), value=res.kl[name], note="nats per selected token", **common),
        ]
    return rows


def splice_parts(st: RunState, store, adapters: list[Adapter], saes: StudySAEs, parts: Path) -> None:
    """KL of the adapted forward run on h_base + Δ̂ at each layer, for the adapter SAE's and the reference SAE's
    difference reconstruction and the Δ̂ = 0 and Δ̂ = mean Δ (training documents) baselines, per (layer,
    adapter) not yet measured; recovery is reported relative to the Δ̂ = 0 splice."""
    from lorascope.models.variants import mixed_batch_support
    from lorascope.study.splice import SpliceOptions, splice_cells

    cfg = st.config
    adapters = [a for a in adapters if a.kind == "peft"]  # the splice runs a PeftModel: none for whole models
    todo = [
        (layer, a)
        for layer in cfg.extraction.layers
        for a in adapters
        if not (parts / f"L{layer}__{a.name}__splice.json").is_file()
    ]
    if not todo:
        return
    base = st.base()
    peft = st.peft({a.name: a.path for a in adapters})
    unserved = {n: why for n, why in mixed_batch_support(peft, [a.name for a in adapters]).items() if why}
    for name, why in unserved.items():  # the splice runs base and adapted rows in one mixed batch
        st.log(f"splice test skipped for {name}: {why}")
    todo = [(layer, a) for layer, a in todo if a.name not in unserved]
    docs, doc_indices = _splice_docs(st, store)
    options = SpliceOptions(skip_first=cfg.extraction.skip_first)
    for a in adapters:  # one shared forward per adapter (all its layers); resumes by adapter
        cells = [_splice_cell(st, store, saes, layer, a, doc_indices) for layer, b in todo if b.name == a.name]
        if not cells:
            continue
        st.log(f"splice test: {a.name}, layers {[c.layer for c in cells]} ({len(docs)} docs)")
        results = splice_cells(peft, base.tokenizer.pad_token_id, docs, cells, options)
        for (layer, _), res in results.items():
            rows = splice_rows(res, cfg.geometry.bootstrap, cfg.seed, layer=layer, adapter=a.name, rank=a.rank)
            write_json(parts / f"L{layer}__{a.name}__splice.json", [r.as_record() for r in rows])


def _splice_cell(st: RunState, store, saes: StudySAEs, layer: int, a: Adapter, doc_indices: list[int]):
    """The splice of one (layer, adapter): the adapter SAE's reconstruction of Δ and the reference SAE's difference
    of reconstructions, the mean Δ of the training documents, the positions the store kept."""
    from lorascope.saes import load_sae
    from lorascope.study.splice import SpliceCell

    cfg = st.config
    sae = load_sae(saes.adapter[(layer, a.name)][0])
    reference = load_sae(saes.reference[layer], allow_pickle=cfg.reference_sae.allow_pickle)

    def recon_adapter(hb, hf, sae=sae):
        return sae(hf - hb)

    def recon_ref_diff(hb, hf, reference=reference):
        return reference(hf) - reference(hb)

    held = store.held_out(layer, a.name, study_holdout(cfg))
    mean_delta, _ = train_delta_moments(st, store, layer, a.name)
    recons = {"adapter_sae": recon_adapter, "ref_diff": recon_ref_diff}
    return SpliceCell(layer, a.name, recons, mean_delta.float(), kept_positions(held, doc_indices))


def trend_part(st: RunState, store, adapters: list[Adapter], saes: StudySAEs, parts: Path) -> None:
    """Rank trends (per layer, trained adapters only: one recipe) of mean ‖Δ‖ and L0, and depth trends (per
    adapter) of mean ‖Δ‖, as slopes with paired document-bootstrap CIs (lorascope.study.trends)."""
    from lorascope import results_schema as schema
    from lorascope.saes import load_sae
    from lorascope.study.analysis import _codes
    from lorascope.study.trends import per_document, trend_rows

    path = parts / "trends.json"
    if path.is_file():
        return
    cfg, g = st.config, st.config.geometry
    norms, l0 = {}, {}
    for layer in cfg.extraction.layers:
        for a in adapters:
            held = store.held_out(layer, a.name, study_holdout(cfg))
            n = min(held.base.shape[0], g.eval_tokens)
            docs = held.doc_index[:n]
            norms[(layer, a.name)] = per_document(held.delta[:n].double().norm(dim=1), docs)
            sae = load_sae(saes.adapter[(layer, a.name)][0])
            l0[(layer, a.name)] = per_document(_codes(sae, held.delta[:n]).ne(0).sum(1).double(), docs)
    rows: list[ResultRow] = []
    trained = sorted((a for a in adapters if a.training is not None and a.rank > 0), key=lambda a: a.rank)
    common = dict(n_boot=g.bootstrap, seed=cfg.seed)
    for layer in cfg.extraction.layers:
        x = [math.log2(a.rank) for a in trained]
        rows += trend_rows(
            x,
            [norms[(layer, a.name)] for a in trained],
            schema.TREND_DELTA_NORM_RANK,
            schema.TREND_DELTA_NORM_RANK_P,
            family=schema.DELTA_NORM,
            layer=layer,
            **common,
        )
        rows += trend_rows(
            x,
            [l0[(layer, a.name)] for a in trained],
            schema.TREND_L0_RANK,
            schema.TREND_L0_RANK_P,
            family=schema.DENSITY,
            layer=layer,
            **common,
        )
    for a in adapters:
        layers = list(cfg.extraction.layers)
        rows += trend_rows(
            [float(v) for v in layers],
            [norms[(v, a.name)] for v in layers],
            schema.TREND_DELTA_NORM_DEPTH,
            schema.TREND_DELTA_NORM_DEPTH_P,
            family=schema.DELTA_NORM,
            adapter=a.name,
            rank=a.rank,
            **common,
        )
    write_json(path, [r.as_record() for r in rows])


def stage_measure(
    st: RunState, extracted: Extracted, adapters: list[Adapter], saes: StudySAEs, upstream: dict[str, Any]
) -> Measured:
    """Every part of the measure stage (resuming from those already written), then the results table."""
    from lorascope.study.publish import write_results

    g = st.config.geometry
    sd = StageDir.make(st.out, "geometry", "tables", {"upstream": upstream, **g.model_dump()})
    if sd.done:
        return Measured(sd.path, [])
    t0 = time.perf_counter()
    store = extracted.open()
    parts = sd.path / "parts"
    for layer in st.config.extraction.layers:
        _measure_layer(st, store, layer, adapters, saes, parts)
    trend_part(st, store, adapters, saes, parts)
    if g.splice:
        with st.timed("geometry/splice"):
            splice_parts(st, store, adapters, saes, parts)
    rows = [row_from_record(r) for f in sorted(parts.glob("*.json")) for r in read_json(f)]
    rows += checkpoint_rows(adapters)
    write_results(st, sd.path, rows, adapters, store)
    sd.mark_done({"rows": len(rows)})
    st.finished("geometry", t0)
    return Measured(sd.path, rows)
