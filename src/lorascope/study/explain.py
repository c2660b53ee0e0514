"""Stage 5b: "what the adapter changed", per adapter at one layer (``explain.layer``).

* **sanity gate** (:func:`gate_adapters`, right after the adapters stage): non-finite or all-zero LoRA weights
  exclude an adapter with a one-line message; "did not learn" and recipe mismatches across the rank trend warn;
* **features**: the adapter SAE's alive features ranked by seed stability × Δ energy (families across seeds,
  :mod:`lorascope.geometry.families`), features whose activation mass sits mainly on chat-template scaffolding
  flagged and ranked last, de-duplicated top windows exported as feature-browser JSON;
* **module attribution, steering, ablation, generations**: :mod:`lorascope.study.explain_causal`;
* **latent scaling** of the reference dictionary and **intruder dimensions** of the adapted block.

The stage writes into its own folder ``explain/tables-<hash>/results``: the measure stage's results with the
explain rows added (family ``explain``), plus ``results/explain/`` (sanity.json, features_<adapter>.json, tidy CSVs,
generations). Publishing mirrors that folder, so the report reads everything from ``output_dir/results``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from lorascope import results_schema as schema
from lorascope.errors import LorascopeError
from lorascope.io import read_json, write_json
from lorascope.results import ResultRow, row_from_record
from lorascope.study.adapters import Adapter
from lorascope.study.cache import RESULTS, RunState, StageDir
from lorascope.study.extract import Extracted
from lorascope.study.saes import StudySAEs
from lorascope.study.splits import study_holdout

EXPLAIN_DIR = "explain"
TEMPLATE_SHARE_FLAG = 0.5  # features with more than this share of activation mass on scaffolding are flagged


# ---- sanity gate ------------------------------------------------------------------------------------------------
def _adapter_weights(path: Path) -> tuple[dict[str, torch.Tensor], float] | None:
    """(LoRA tensors, scaling α/r or α/√r) of a saved PEFT folder; None when no safetensors file is there."""
    from safetensors.torch import load_file

    f = path / "adapter_model.safetensors"
    if not f.is_file():
        return None
    cfg = json.loads((path / "adapter_config.json").read_text())
    r, alpha = float(cfg.get("r") or 1), float(cfg.get("lora_alpha") or 1)
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return load_file(str(f)), scaling


def sanity_warnings(adapters: list[Adapter]) -> list:
    """Every sanity warning of the adapters (see :mod:`lorascope.models.sanity`)."""
    from lorascope.models import sanity

    out = []
    for a in adapters:
        w = _adapter_weights(a.path)
        if w is not None:
            out += sanity.check_weights(a.name, *w)
        if a.training is not None:
            out += sanity.check_learning(a.name, a.training.heldout_loss_base, a.training.heldout_loss_adapted)
    if len(adapters) > 1:
        out += sanity.check_recipes({a.name: sanity.recipe_from_folder(a.path) for a in adapters})
    return out


def gate_adapters(st: RunState, adapters: list[Adapter]) -> tuple[list[Adapter], list]:
    """The adapters that pass the gate and every warning; warnings are printed, an excluded adapter is dropped with
    its one-line reason. Raises when no adapter is left."""
    from lorascope.models.sanity import excluded

    warnings = sanity_warnings(adapters)
    for w in warnings:
        st.log(f"[yellow]sanity warning[/]: {w.message}")
    drop = excluded(warnings)
    kept = [a for a in adapters if a.name not in drop]
    if not kept:
        raise LorascopeError(
            f"every adapter failed the sanity gate: {'; '.join(drop.values())}",
            fix="check the adapters' training (or weights) and run again",
        )
    return kept, warnings


# ---- features ---------------------------------------------------------------------------------------------------
def explain_layer(config) -> int:
    """The layer the stage explains (``explain.layer``, or the middle of the extracted layers); raises early for a
    layer that is not extracted."""
    layers = list(config.extraction.layers)
    chosen = config.explain.layer
    if chosen is None:
        return sorted(layers)[len(layers) // 2]
    if chosen not in layers:
        raise LorascopeError(
            f"explain.layer {chosen} is not among extraction.layers {layers}",
            fix="choose one of the extracted layers, or leave it empty",
        )
    return chosen


def scaffold_flags(store, doc_index: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """bool [N]: held-out rows on chat-template scaffolding (detected on the store's documents)."""
    from lorascope.activations.template import detect_template_positions

    info = read_json(store.path / "docs.json")
    n = len(info["doc_ids"])
    if n < 2:
        return torch.zeros(len(doc_index), dtype=torch.bool)
    docs = [store.doc_tokens(i) for i in range(n)]
    masks = detect_template_positions(docs, info["response_start"]).masks
    return torch.tensor(
        [bool(masks[d][p]) for d, p in zip(doc_index.tolist(), position.tolist(), strict=True)], dtype=torch.bool
    )


def rank_features(saes: list, delta: torch.Tensor, scaffold: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Alive features of ``saes[0]`` ranked by stability × Δ energy, template-flagged ones last; and the codes."""
    import pandas as pd

    from lorascope.activations.template import template_activation_share
    from lorascope.geometry.families import rank_by_stability, seed_stability

    sae = saes[0]
    with torch.no_grad():
        codes = torch.cat([sae.encode(delta[i : i + 4096]) for i in range(0, len(delta), 4096)])
    alive = (codes > 0).any(0)
    if not alive.any():
        raise LorascopeError("the adapter SAE has no feature active on held-out Δ", fix="train the SAE longer")
    dec = sae.W_dec.detach()
    energy = (codes.double() ** 2).sum(0) * (dec.double() ** 2).sum(1)
    idx = torch.nonzero(alive).flatten().numpy()
    if len(saes) > 1:
        others = [s.W_dec.detach() for s in saes[1:]]
        stability = seed_stability(dec, others, alive_ref=alive)
    else:
        stability = pd.Series(float("nan"), index=idx, name="stability")
    table = rank_by_stability(stability.fillna(1.0) if len(saes) == 1 else stability, energy)
    share = template_activation_share(codes, scaffold)
    feats = torch.as_tensor(table["feature"].to_numpy().copy(), dtype=torch.long)
    table["template_share"] = share[feats].numpy()
    table["template_flag"] = table["template_share"] > TEMPLATE_SHARE_FLAG
    table["density"] = (codes[:, feats] > 0).double().mean(0).numpy()
    # stability × energy first; among equal scores (e.g. no feature reproduced by another seed) the energy decides
    table = table.sort_values(
        ["template_flag", "score", "delta_energy", "feature"], ascending=[True, False, False, True], ignore_index=True
    )
    return table, codes


def feature_windows(
    st: RunState, store, codes: torch.Tensor, held, feature: int, doc_cache: dict[int, list[str]]
) -> list[dict]:
    """De-duplicated top windows of one feature over the held-out documents (activating token highlighted);
    ``doc_cache`` keeps each document's decoded tokens across features."""
    from lorascope.activations.feature_export import top_windows

    tok = st.base().tokenizer
    col = codes[:, feature]
    docs = sorted(set(held.doc_index[col > 0].tolist()))[:200]
    if not docs:
        return []
    strings, acts = [], []
    for d in docs:
        if d not in doc_cache:
            doc_cache[d] = [tok.decode([t]) for t in store.doc_tokens(d)]
        strings.append(doc_cache[d])
        a = [0.0] * len(doc_cache[d])
        rows = torch.nonzero(held.doc_index == d).flatten()
        for r in rows.tolist():
            a[int(held.position[r])] = float(col[r])
        acts.append(a)
    ids = [store.doc_ids[d] for d in docs]
    return top_windows(strings, acts, st.config.explain.contexts_per_feature, doc_ids=ids)


def _feature_rows(table, top, adapter: Adapter, layer: int) -> list[ResultRow]:
    where = {"layer": layer, "adapter": adapter.name, "rank": adapter.rank}
    stab = table.loc[table.feature.isin(top), "stability"]
    return [
        ResultRow(schema.EXPLAIN, schema.TOP_FEATURE_STABILITY, float(stab.mean()), n=len(top), **where),
        ResultRow(
            schema.EXPLAIN, schema.TEMPLATE_FLAGGED_FEATURES, float(table.template_flag.sum()), n=len(table), **where
        ),
    ]


def explain_features(st: RunState, store, adapter: Adapter, layer: int, saes: StudySAEs, out: Path) -> dict:
    """Ranking, windows and the feature-browser export of one adapter; returns what the causal part needs."""
    from lorascope.activations.feature_export import export_features_json, feature_record
    from lorascope.saes import load_sae

    cfg, ex = st.config, st.config.explain
    held = store.held_out(layer, adapter.name, study_holdout(cfg))
    n = min(len(held.delta), ex.tokens)
    held = replace(
        held,
        base=held.base[:n],
        delta=held.delta[:n],
        doc_index=held.doc_index[:n],
        position=held.position[:n],
        token_id=held.token_id[:n],
    )
    sae_list = [load_sae(p) for p in saes.adapter[(layer, adapter.name)]]
    scaffold = scaffold_flags(store, held.doc_index[:n], held.position[:n])
    table, codes = rank_features(sae_list, held.delta[:n], scaffold)
    top = table.feature[: ex.top_features].astype(int).tolist()
    dec = sae_list[0].W_dec.detach()
    records, doc_cache = [], {}
    for f in top:
        info = table[table.feature == f].iloc[0]
        extra = {
            k: (bool(info[k]) if k == "template_flag" else float(info[k]))
            for k in ("stability", "delta_energy", "score", "template_share", "template_flag", "density")
        }
        records.append(feature_record(f, dec[f], feature_windows(st, store, codes, held, f, doc_cache), extra))
    export_features_json(out / f"features_{adapter.name}.json", cfg.model.spec, layer, adapter.name, records)
    table.to_csv(out / f"ranking_{adapter.name}.csv", index=False)
    return {
        "top": top,
        "table": table,
        "sae": sae_list[0],
        "delta_rows": held.delta[:n],
        "base_rows": held.base[:n],
        "rows": _feature_rows(table, top, adapter, layer),
    }


# ---- stage ------------------------------------------------------------------------------------------------------
def _merge_results(st: RunState, measured: Path, sd: StageDir, rows: list[ResultRow]) -> None:
    """The measure stage's results plus ``rows`` into ``sd.path/results`` (table re-sorted, files copied)."""
    import pandas as pd

    from lorascope.io import atomic_path
    from lorascope.results import rows_to_frame
    from lorascope.study.publish import SORT_KEY

    dst = sd.path / RESULTS
    if dst.exists():
        shutil.rmtree(dst / "arrays", ignore_errors=True)
    shutil.copytree(measured / RESULTS, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(EXPLAIN_DIR))
    old = pd.read_parquet(measured / RESULTS / "results.parquet")
    df = pd.concat([old, rows_to_frame(rows)], ignore_index=True) if rows else old
    df = df.sort_values(SORT_KEY, kind="stable")
    with atomic_path(dst / "results.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(dst / "results.csv") as tmp:
        df.to_csv(tmp, index=False)


def _explain_adapter(st: RunState, store, adapter: Adapter, layer: int, saes: StudySAEs, out: Path) -> None:
    from lorascope.study.explain_causal import causal_rows

    part = out / f"rows_{adapter.name}.json"
    if part.is_file():
        return
    st.log(f"explain: layer {layer}, {adapter.name}")
    with st.timed("explain/features"):
        feats = explain_features(st, store, adapter, layer, saes, out)
    rows = feats["rows"] + causal_rows(st, adapter, layer, feats, out)
    write_json(part, [r.as_record() for r in rows])
    st.log(summary_line(adapter.name, rows, feats["top"]))


def summary_line(adapter: str, rows: list[ResultRow], top: list[int]) -> str:
    """One line of the run's output with the causal numbers of an adapter (value vs the random-feature control)."""
    by = {r.metric: r for r in rows}
    parts = [f"explain {adapter}: top features {top}"]
    for name, label in (
        (schema.steer_kl_closed("top_features"), "KL closed by steering"),
        (schema.ABLATE_EFFECT_LOST, "effect lost by ablation"),
    ):
        if name in by:
            parts.append(f"{label} {by[name].value:.3g} (random features {by[name].null_value:.3g})")
    patched = [m for m in by if m.startswith(schema.marker_rate("patch_top_features"))]
    if patched:
        parts.append(
            "marker rate of the base patched with the top features "
            + ", ".join(
                f"{m.removeprefix(schema.marker_rate('patch_top_features')).lstrip('_') or 'x1'} {by[m].value:.3g} "
                f"(random {by[m].null_value:.3g})"
                for m in patched
            )
        )
    marks = [
        (label, by[schema.marker_rate(run)].value)
        for run, label in (
            ("base", "base"),
            ("adapted", "adapted"),
            ("patch_sae_reconstruction", "patched with the SAE's reconstruction"),
            ("patch_exact_delta", "patched with Δ"),
            ("steer_mean_delta", "base + mean Δ"),
        )
        if schema.marker_rate(run) in by
    ]
    if marks:
        parts.append("marker rate " + ", ".join(f"{label} {v:.3g}" for label, v in marks))
    return "; ".join(parts)


def _explainable(st: RunState, adapters: list[Adapter]) -> list[Adapter]:
    """The adapters module attribution and steering can serve: plain PEFT LoRA (whole-model fine-tunes and LoRA
    variants such as DoRA, whose update is not B·A·x, are skipped with one log line each)."""
    from lorascope.models.variants import mixed_batch_support

    peft_ones = [a for a in adapters if a.kind == "peft"]
    for a in adapters:
        if a.kind != "peft":
            st.log(f"explain: {a.name} skipped (a whole-model fine-tune has no LoRA modules to attribute)")
    if not peft_ones:
        return []
    why = mixed_batch_support(st.peft({a.name: a.path for a in peft_ones}), [a.name for a in peft_ones])
    for name, reason in why.items():
        if reason:
            st.log(f"explain: {name} skipped ({reason})")
    return [a for a in peft_ones if not why.get(a.name)]


def stage_explain(
    st: RunState, extracted: Extracted, adapters: list[Adapter], saes: StudySAEs, measured: Path, warnings: list
) -> Path:
    """Run (or re-use) the explain stage; returns the folder to publish (the measure stage's when disabled)."""
    from lorascope.study.explain_causal import reference_rows

    ex = st.config.explain
    if not ex.enabled:
        return measured
    layer = explain_layer(st.config)
    inputs = {
        "measured": measured.name,
        "explain": ex.model_dump(),
        "layer": layer,
        "warnings": [asdict(w) for w in warnings],
        "finetune": st.config.data.finetune,
    }
    sd = StageDir.make(st.out, "explain", "tables", inputs)
    if sd.done:
        return sd.path
    t0 = time.perf_counter()
    out = sd.path / "parts"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sanity.json", [asdict(w) for w in warnings])
    store = extracted.open()
    adapters = _explainable(st, adapters)
    if any(not (out / f"rows_{a.name}.json").is_file() for a in adapters):
        st.peft({a.name: a.path for a in adapters})  # every adapter in one PeftModel (re-used if loaded)
    for a in adapters:
        _explain_adapter(st, store, a, layer, saes, out)
    if not (out / "rows_reference.json").is_file():
        with st.timed("explain/latent_scaling"):
            ref_rows = reference_rows(st, store, layer, saes, out)
        write_json(out / "rows_reference.json", [r.as_record() for r in ref_rows])
    rows = [row_from_record(r) for f in sorted(out.glob("rows_*.json")) for r in read_json(f)]
    _merge_results(st, measured, sd, rows)
    shutil.copytree(
        out, sd.path / RESULTS / EXPLAIN_DIR, dirs_exist_ok=True, ignore=shutil.ignore_patterns("rows_*.json")
    )
    sd.mark_done({"rows": len(rows), "layer": layer})
    st.finished("explain", t0)
    return sd.path
