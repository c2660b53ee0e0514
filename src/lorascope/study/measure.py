"""Stage 5: measure. For every (layer, adapter): the statistics of :mod:`lorascope.study.analysis` on held-out
tokens, the adapter's training losses, the top-activating contexts of its SAE's strongest features and the
splice test; per layer: the reference SAE on base activations and Δ's CKA across adapters.

Work is saved as part files (``parts/L{layer}__{adapter}.json`` and friends) as it finishes, so an interrupted
stage resumes where it stopped; the stage is done when every part exists and the table is written.
"""

from __future__ import annotations

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
    values = {"train_loss_start": t.loss_start, "train_loss_end": t.loss_end,
              "heldout_loss_base": t.heldout_loss_base, "heldout_loss_adapted": t.heldout_loss_adapted}
    return [ResultRow("lora", name, float(v), layer=-1, adapter=adapter.name, rank=adapter.rank)
            for name, v in values.items()]


def contexts(st: RunState, store, inp, held, n: int) -> list[dict]:
    """Top-activating held-out contexts of the adapter SAE's strongest features (by total activation mass)."""
    from lorascope.report import top_activating_contexts

    r = st.config.report
    if r.top_features == 0 or n == 0:
        return []
    sae = inp.adapter_saes[0]
    with torch.no_grad():
        codes = torch.cat([sae.encode(inp.delta[i: i + 4096]) for i in range(0, n, 4096)])
    top = torch.argsort(codes.clamp_min(0).sum(0), descending=True)[: r.top_features].tolist()
    used = sorted(set(held.doc_index[:n].tolist()))
    docs = {i: store.doc_tokens(i) for i in used}
    doc_list = [docs.get(i, []) for i in range(max(used) + 1)]
    tok = st.tokenizer()
    return top_activating_contexts(codes, held.token_id[:n], held.doc_index[:n], held.position[:n], doc_list,
                                   lambda ids: tok.decode(ids), top, r.contexts_per_feature, layer=inp.layer,
                                   adapter=inp.adapter)


def _measure_pair(st: RunState, store, adapter: Adapter, layer: int, saes: StudySAEs, reference,
                  parts: Path) -> None:
    """Statistics, LoRA rows, contexts and arrays of one (layer, adapter) into its part files."""
    from lorascope.models.peft_weights import lora_update
    from lorascope.saes import load_sae
    from lorascope.study.analysis import LayerAdapterInputs, analyse_layer_adapter

    cfg, g = st.config, st.config.geometry
    held = store.held_out(layer, adapter.name, held_out_fraction=cfg.data.held_out_fraction, split_seed=cfg.seed)
    n = min(held.base.shape[0], g.eval_tokens)
    st.log(f"geometry: layer {layer}, {adapter.name} ({n} held-out tokens)")
    inp = LayerAdapterInputs(layer, adapter.name, adapter.rank, held.base[:n], held.delta[:n],
                             [load_sae(p) for p in saes.adapter[(layer, adapter.name)]], reference,
                             lora_update(adapter.path, layer))
    res = analyse_layer_adapter(inp, analysis_settings(st))
    res.rows.extend(lora_rows(adapter))
    stem = f"L{layer}__{adapter.name}"
    write_json(parts / f"{stem}__contexts.ctx", contexts(st, store, inp, held, n))
    with atomic_path(parts / f"{stem}.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **res.arrays)
    write_json(parts / f"{stem}.json", [r.as_record() for r in res.rows])


def analysis_settings(st: RunState):
    from lorascope.study.analysis import Settings

    g = st.config.geometry
    return Settings(taus=tuple(g.taus), subspace_k=g.subspace_k, n_boot=g.bootstrap,
                    cka_max_tokens=g.cka_max_tokens, seed=st.config.seed)


def reference_rows(st: RunState, store, reference, layer: int, adapters: list[Adapter]) -> list[ResultRow]:
    """The reference SAE on held-out base activations: FVU and L0."""
    from lorascope.saes.trainer import evaluate_sae

    cfg = st.config
    held = store.held_out(layer, adapters[0].name, held_out_fraction=cfg.data.held_out_fraction,
                          split_seed=cfg.seed)
    ev = evaluate_sae(reference, held.base[: cfg.geometry.eval_tokens])
    where = {"layer": layer, "n": int(ev["n_tokens"]), "d": store.d_model}
    return [ResultRow("reconstruction", "fvu_ref_on_base", ev["fvu"], **where),
            ResultRow("density", "l0_ref_on_base", ev["l0"], **where)]


def _measure_layer(st: RunState, store, layer: int, adapters: list[Adapter], saes: StudySAEs, parts: Path) -> None:
    from lorascope.saes import load_sae
    from lorascope.study.analysis import cross_adapter_cka

    cfg, g = st.config, st.config.geometry
    reference = load_sae(saes.reference[layer], allow_pickle=cfg.reference_sae.allow_pickle)
    for a in adapters:
        if not (parts / f"L{layer}__{a.name}.json").is_file():
            _measure_pair(st, store, a, layer, saes, reference, parts)
    cka_part = parts / f"L{layer}__cka.json"
    if not cka_part.is_file() and len(adapters) > 1:
        deltas = {a.name: store.held_out(layer, a.name, held_out_fraction=cfg.data.held_out_fraction,
                                         split_seed=cfg.seed).delta[: g.cka_max_tokens] for a in adapters}
        rows = cross_adapter_cka(layer, deltas, {a.name: a.rank for a in adapters}, g.cka_max_tokens)
        write_json(cka_part, [r.as_record() for r in rows])
    ref_part = parts / f"L{layer}__reference.json"
    if not ref_part.is_file():
        write_json(ref_part, [r.as_record() for r in reference_rows(st, store, reference, layer, adapters)])


def _splice_docs(st: RunState, store) -> list:
    """The first ``geometry.splice_docs`` held-out documents, tokenised as at extraction."""
    from lorascope.activations.extract import tokenize_docs
    from lorascope.study.extract import activation_examples

    cfg = st.config
    examples = activation_examples(st)
    mask = store.split_docs("held_out", cfg.data.held_out_fraction, cfg.seed)
    held_ids = {doc for doc, keep in zip(store.doc_ids, mask.tolist(), strict=True) if keep}
    docs = [d for d in tokenize_docs(st.tokenizer(), examples, cfg.data.max_length, cfg.data.long_examples)
            if d.doc_id in held_ids]
    return docs[: cfg.geometry.splice_docs]


def splice_parts(st: RunState, store, adapters: list[Adapter], saes: StudySAEs, parts: Path) -> None:
    """KL recovered when the adapted forward runs on h_base + Δ̂, for the adapter SAE's and the reference SAE's
    difference reconstruction, per (layer, adapter) not yet measured."""
    from lorascope.models.variants import mixed_batch_support
    from lorascope.saes import load_sae
    from lorascope.study.splice import splice_kl

    cfg = st.config
    adapters = [a for a in adapters if a.kind == "peft"]  # the splice runs a PeftModel: none for whole models
    todo = [(layer, a) for layer in cfg.extraction.layers for a in adapters
            if not (parts / f"L{layer}__{a.name}__splice.json").is_file()]
    if not todo:
        return
    base = st.base()
    peft = st.peft({a.name: a.path for a in adapters})
    unserved = {n: why for n, why in mixed_batch_support(peft, [a.name for a in adapters]).items() if why}
    for name, why in unserved.items():  # the splice runs base and adapted rows in one mixed batch
        st.log(f"splice test skipped for {name}: {why}")
    todo = [(layer, a) for layer, a in todo if a.name not in unserved]
    docs = _splice_docs(st, store)
    for layer, a in todo:
        st.log(f"splice test: layer {layer}, {a.name} ({len(docs)} docs)")
        sae = load_sae(saes.adapter[(layer, a.name)][0])
        reference = load_sae(saes.reference[layer], allow_pickle=cfg.reference_sae.allow_pickle)

        def recon_adapter(hb, hf, sae=sae):
            return sae(hf - hb)

        def recon_ref_diff(hb, hf, reference=reference):
            return reference(hf) - reference(hb)

        res = splice_kl(peft, base.tokenizer.pad_token_id, docs, layer, a.name,
                        {"adapter_sae": recon_adapter, "ref_diff": recon_ref_diff},
                        skip_first=cfg.extraction.skip_first)
        rows = [ResultRow("splice", k, v, layer=layer, adapter=a.name, rank=a.rank, n=int(res["n_tokens"]))
                for k, v in res.items() if k != "n_tokens"]
        write_json(parts / f"L{layer}__{a.name}__splice.json", [r.as_record() for r in rows])


def stage_measure(st: RunState, extracted: Extracted, adapters: list[Adapter], saes: StudySAEs,
                  upstream: dict[str, Any]) -> Measured:
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
    if g.splice:
        splice_parts(st, store, adapters, saes, parts)
    rows = [row_from_record(r) for f in sorted(parts.glob("*.json")) for r in read_json(f)]
    rows += checkpoint_rows(adapters)
    write_results(st, sd.path, rows, adapters, store)
    sd.mark_done({"rows": len(rows)})
    st.finished("geometry", t0)
    return Measured(sd.path, rows)
