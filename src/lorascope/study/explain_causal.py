"""The explain stage's model-running part, per adapter at the explain layer L: module attribution of the top
features, steering of the base model / ablation from the adapted model with controls, demo-task generations; per
layer: latent scaling of the reference dictionary and intruder dimensions of block L.

Steering edits (added to block L's output of the base model): the top-n features' decoder directions × their
activations on each token (``top_features``), the same for n random alive features (``random_features``, the
control beside it), Δ projected onto its top-n principal directions (``pca``, fitted on the activation store's
held-out rows, other documents), the SAE's whole reconstruction of Δ (``sae_reconstruction``: every feature, so
the gap to the top-n says how many features the effect needs), the constant mean-Δ vector (``mean_delta``) and Δ
itself (``exact_delta``, the ceiling: it closes all of KL only when no block after L is adapted). Ablation subtracts
the top-n (and random) feature edits from the adapted model. In the demo task's greedy generations the same edits
are applied token by token as functions of the adapter's own Δ (``patch_*``; an adapted twin row reads the tokens
the patched row generates), with the mean-Δ vector as the constant run. See :mod:`lorascope.models.steering`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorascope import results_schema as schema
from lorascope.errors import LorascopeError
from lorascope.io import write_json
from lorascope.results import ResultRow
from lorascope.study.adapters import Adapter
from lorascope.study.cache import RunState
from lorascope.study.splits import study_holdout

STRENGTHENED_RATIO = 0.5  # β_base/β_ft below this: the fine-tune strengthened the latent
WEAKENED_RATIO = 2.0  # above this: weakened


def _examples(st: RunState):
    """Held-out fine-tuning examples (the split the adapters stage held out), tokenised under the data's
    long-example policy (an example whose prompt alone does not fit is skipped, as in training) and collated."""
    from lorascope.data.chat import tokenize_examples
    from lorascope.models.lora import collate
    from lorascope.study.adapters import finetune_examples

    cfg = st.config
    train, held = finetune_examples(cfg)  # the adapters' own split (same columns, same seed)
    tok = st.base().tokenizer
    docs, _ = tokenize_examples(tok, held or train, cfg.data.max_length, cfg.data.long_examples)
    docs = docs[: cfg.explain.docs]
    if not docs:
        raise LorascopeError(
            f"no held-out fine-tuning example fits in data.max_length {cfg.data.max_length}",
            fix="raise data.max_length or set explain.enabled: false",
        )
    by_id = {ex.id: ex for ex in held or train}
    return [by_id[d.doc_id] for d in docs], collate(docs, tok.pad_token_id)


def _codes(sae, delta: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    B, T, d = delta.shape
    with torch.no_grad():
        codes = sae.encode(delta.reshape(-1, d)).reshape(B, T, -1)
    return codes * att.unsqueeze(-1)


def _feature_patch(sae, dec: torch.Tensor, features: list[int]):
    """Δ [N, d] -> Σ_f a_f(Δ)·d_f over ``features`` (their decoder directions times their activations on Δ)."""
    from lorascope.models import steering

    def edit(delta: torch.Tensor) -> torch.Tensor:
        return steering.feature_edit(sae.encode(delta.to(dec.dtype)), dec, features)

    return edit


def _reconstruction(sae, delta: torch.Tensor) -> torch.Tensor:
    """The SAE's reconstruction of Δ (every feature plus the decoder bias), in Δ's shape and dtype."""
    d = delta.shape[-1]
    with torch.no_grad():
        return sae(delta.reshape(-1, d).float()).reshape(delta.shape).to(delta.dtype)


def _edits(feats: dict, probe, att: torch.Tensor, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """(per-token edits of the probe batch for KL/behaviour; generation runs: the same edits as functions of Δ,
    applied token by token to the base model's generations, and the constant mean-Δ vector)."""
    from lorascope.models import steering

    sae, top = feats["sae"], feats["top"]
    delta = probe.delta() * att.unsqueeze(-1)
    codes = _codes(sae, delta, att)
    dec = sae.W_dec.detach()
    alive = torch.zeros(dec.shape[0], dtype=torch.bool)
    alive[torch.as_tensor(feats["table"].feature.to_numpy().copy(), dtype=torch.long)] = True
    rand = steering.random_features(alive, len(top), exclude=top, seed=seed)
    basis = steering.principal_directions(feats["delta_rows"], min(len(top), *feats["delta_rows"].shape))
    mean = feats["delta_rows"].double().mean(0).float()
    return {
        "top_features": steering.feature_edit(codes, dec, top) * att.unsqueeze(-1),
        "random_features": steering.feature_edit(codes, dec, rand) * att.unsqueeze(-1),
        "pca": steering.projection_edit(delta, basis) * att.unsqueeze(-1),
        "sae_reconstruction": _reconstruction(sae, delta) * att.unsqueeze(-1),
        "mean_delta": mean,
        "exact_delta": delta,
    }, {
        "patch_top_features": _feature_patch(sae, dec, top),
        "patch_random_features": _feature_patch(sae, dec, rand),
        "patch_pca": lambda d: steering.projection_edit(d, basis.to(d.dtype)),
        "patch_sae_reconstruction": lambda d: _reconstruction(sae, d),
        "steer_mean_delta": mean,
    }


def _row(metric: str, value, where: dict, null: float | None = None, n: int = 0) -> ResultRow:
    v = float("nan") if value is None else float(value)
    if null is None:
        return ResultRow(schema.EXPLAIN, metric, v, n=n, **where)
    return ResultRow(
        schema.EXPLAIN,
        metric,
        v,
        null_value=float("nan") if null is None else float(null),
        null_name=schema.NULL_RANDOM_FEATURES,
        n=n,
        **where,
    )


def steering_rows(probe, edits: dict[str, torch.Tensor], where: dict, n_tok: int) -> tuple[list[ResultRow], dict]:
    """KL closed / behaviour recovered for every steering edit and the ablations, controls as null columns."""
    steer, ablate = probe.effects(edits, {k: edits[k] for k in ("top_features", "random_features")})
    rows = []
    for k, eff in steer.items():
        null = steer["random_features"] if k == "top_features" else None
        rows.append(
            _row(
                schema.steer_kl_closed(k),
                eff.fraction_closed,
                where,
                None if null is None else null.fraction_closed,
                n_tok,
            )
        )
        rows.append(
            _row(
                schema.steer_behaviour(k),
                eff.behaviour_recovered,
                where,
                None if null is None else null.behaviour_recovered,
                n_tok,
            )
        )
    lost = {k: 1.0 - e.fraction_closed for k, e in ablate.items()}
    blost = {k: (None if e.behaviour_recovered is None else 1.0 - e.behaviour_recovered) for k, e in ablate.items()}
    rows.append(_row(schema.ABLATE_EFFECT_LOST, lost["top_features"], where, lost["random_features"], n_tok))
    rows.append(
        _row(
            schema.ABLATE_BEHAVIOUR_LOST,
            blost["top_features"],
            where,
            float("nan") if blost["random_features"] is None else blost["random_features"],
            n_tok,
        )
    )
    rows.append(_row(schema.STEER_KL_BASE, probe.kl_base, where, n=n_tok))
    summary = {"steer": {k: vars(v) for k, v in steer.items()}, "ablate": {k: vars(v) for k, v in ablate.items()}}
    return rows, summary


def generation_runs(generators: dict, scales: list[float]) -> dict:
    """{run name: generation run}: base, adapted, the patched runs (``patch_*``: a function of Δ applied token by
    token, :class:`~lorascope.models.steering.PatchRun`) and constant vectors (``steer_*``), each at every scale
    (the name carries the scale when it is not 1, as ``marker_rate`` names it), and Δ itself (the ceiling)."""
    from lorascope.models.steering import PatchRun

    runs: dict = {"base": (None, False), "adapted": (None, True)}
    for c in scales:
        for k, g in generators.items():
            name = k if c == 1.0 else f"{k}_x{c:g}"
            if callable(g):
                runs[name] = PatchRun(g if c == 1.0 else (lambda d, g=g, c=c: c * g(d)))
            else:
                runs[name] = (c * g, False)
    runs["patch_exact_delta"] = PatchRun(lambda d: d)
    return runs


def generation_rows(
    st: RunState, peft, adapter: str, layer: int, prompts: list[str], generators: dict, where: dict
) -> tuple[list[ResultRow], dict]:
    """Demo-task marker rates of greedy answers: base, adapted, and the base model patched at block ``layer``
    while it generates — with the top features' decoder directions times their activations on the adapter's own
    Δ at each token (Δ read from an adapted twin on the same tokens), as many random features (the control), the
    top principal directions of Δ, the SAE's whole reconstruction, Δ itself (the ceiling: what this one layer can
    carry) — and with the constant mean-Δ vector; the feature, PCA, reconstruction and mean-Δ runs also at every
    ``explain.steer_scales``. One batched generation."""
    from lorascope.models import steering

    ex = st.config.explain
    runs = generation_runs(generators, list(ex.steer_scales))
    texts = steering.generate_with_edits(
        peft, st.base().tokenizer, adapter, prompts, layer, runs, max_new_tokens=ex.max_new_tokens
    )
    rates = {k: steering.demo_marker_rates(t)["any_marker"] for k, t in texts.items()}
    control = {k: k.replace("patch_top_features", "patch_random_features") for k in rates}
    rows = [
        _row(
            schema.marker_rate(k),
            r,
            where,
            rates[control[k]] if k.startswith("patch_top_features") else None,
            len(prompts),
        )
        for k, r in rates.items()
    ]
    return rows, {"prompts": prompts, "generations": texts, "marker_rates": rates}


def attribution_rows(peft, adapter: Adapter, layer: int, feats: dict, batch: dict, out: Path) -> list[ResultRow]:
    """Direct-write shares of the top features (tidy CSV) and the modules that write most of Δ_L."""
    import pandas as pd

    from lorascope.models.attribution import attribute_features

    sae, top = feats["sae"], feats["top"]
    att = batch["attention_mask"]
    res = attribute_features(peft, adapter.name, batch["input_ids"], att, layer, sae.W_enc.detach()[:, top].T)
    pd.DataFrame(res.table(top)).to_csv(out / f"attribution_{adapter.name}.csv", index=False)
    mods = pd.DataFrame(res.top_modules(len(res.modules)))
    mods.to_csv(out / f"modules_{adapter.name}.csv", index=False)
    where = {"layer": layer, "adapter": adapter.name, "rank": adapter.rank}
    rem = (res.remainder.abs() / res.total.abs().clamp_min(1e-30)).mean()
    return [
        ResultRow(
            schema.EXPLAIN,
            schema.TOP_MODULE_DELTA_SHARE,
            float(mods.delta_share.iloc[0]),
            n=res.n_tokens,
            note=str(mods.module.iloc[0]),
            **where,
        ),
        ResultRow(schema.EXPLAIN, schema.ATTRIBUTION_REMAINDER, float(rem), n=res.n_tokens, **where),
    ]


def first_position_rows(delta: torch.Tensor, att: torch.Tensor, where: dict, n_positions: int = 8) -> list[ResultRow]:
    """The first-positions control (Minder et al. 2025): ‖mean Δ‖ at each of the first positions across the
    examples, beside the mean ‖Δ‖ of all later positions (as the null column)."""
    from lorascope.activations.template import first_position_means

    means = first_position_means(delta, att, n_positions)
    later = delta[:, n_positions:][att[:, n_positions:].bool()]
    ref = float(later.norm(dim=-1).mean()) if len(later) else float("nan")
    return [
        ResultRow(
            schema.EXPLAIN,
            schema.first_position_delta(p),
            float(means.norm[p]),
            null_value=ref,
            null_name=schema.NULL_LATER_POSITIONS,
            n=int(means.count[p]),
            **where,
        )
        for p in range(min(n_positions, delta.shape[1]))
        if int(means.count[p]) > 0
    ]


def causal_rows(st: RunState, adapter: Adapter, layer: int, feats: dict, out: Path) -> list[ResultRow]:
    """Attribution, steering/ablation and (demo task) generations of one adapter; details to ``out``."""
    from lorascope.models.steering import CausalProbe

    ex = st.config.explain
    peft = st.peft({})  # loaded with every adapter by the stage
    held, batch = _examples(st)
    where = {"layer": layer, "adapter": adapter.name, "rank": adapter.rank}
    rows = []
    if ex.attribution:
        with st.timed("explain/attribution"):
            rows += attribution_rows(peft, adapter, layer, feats, batch, out)
    labels, att = batch["labels"], batch["attention_mask"]
    with st.timed("explain/steering"):
        probe = CausalProbe(
            peft,
            adapter.name,
            batch["input_ids"],
            att,
            layer,
            labels=labels,
            token_mask=torch.roll(labels != -100, -1, dims=1),
        )
        edits, vectors = _edits(feats, probe, att, st.config.seed)
        srows, summary = steering_rows(probe, edits, where, int(probe.token_mask.sum()))
    rows += srows + first_position_rows(edits["exact_delta"], att, where)
    if ex.generations and st.config.data.finetune == "demo":
        prompts = [e.user_message for e in held[: ex.generations]]
        with st.timed("explain/generation"):
            grows, gen = generation_rows(st, peft, adapter.name, layer, prompts, vectors, where)
        rows += grows
        summary["generations"] = gen
    if ex.intruders:
        with st.timed("explain/intruders"):
            rows += intruder_rows(peft, adapter, layer, feats, out, st.memo.setdefault("intruder_base_left", {}))
    write_json(out / f"causal_{adapter.name}.json", summary)
    return rows


def intruder_rows(
    peft, adapter: Adapter, layer: int, feats: dict, out: Path, base_left: dict | None = None
) -> list[ResultRow]:
    """Intruder dimensions of the LoRA modules of block L and the top features aligned with them. ``base_left``:
    {module: left singular vectors of its base weight}, filled here and reused by the next adapter (one base)."""
    import pandas as pd

    from lorascope.models.intruders import align_features, intruder_dimensions, residual_intruders
    from lorascope.models.lora_switch import block_lora_layers

    found = {}
    for name, mod in block_lora_layers(peft, adapter.name)[layer].items():
        W, dW = mod.get_base_layer().weight.detach(), mod.get_delta_weight(adapter.name).detach()
        if getattr(mod, "fan_in_fan_out", False):
            W, dW = W.T, dW.T
        key = f"{layer}.{name}"
        if base_left is not None and key not in base_left:
            base_left[key] = torch.linalg.svd(W.double(), full_matrices=False)[0]
        found[key] = intruder_dimensions(W, dW, base_left=None if base_left is None else base_left[key])
    counts = pd.DataFrame(
        [{"adapter": adapter.name, "module": m, "n_intruders": len(x.indices)} for m, x in found.items()]
    )
    counts.to_csv(out / f"intruders_{adapter.name}.csv", index=False)
    dec = feats["sae"].W_dec.detach()
    vecs, labels = residual_intruders(found, dec.shape[1])
    aligned = align_features(dec, vecs, labels)
    aligned.to_csv(out / f"intruder_alignment_{adapter.name}.csv", index=False)
    where = {"layer": layer, "adapter": adapter.name, "rank": adapter.rank}
    n_al = int(aligned["aligned"].sum()) if len(aligned) else 0
    return [
        ResultRow(schema.EXPLAIN, schema.INTRUDER_DIMENSIONS, float(counts.n_intruders.sum()), n=len(found), **where),
        ResultRow(schema.EXPLAIN, schema.INTRUDERS_ALIGNED, float(n_al), n=len(labels), **where),
    ]


def reference_rows(st: RunState, store, layer: int, saes, out: Path) -> list[ResultRow]:
    """Latent scaling (Minder et al. 2025) of the reference dictionary per adapter: β of every latent on h_base
    vs h_ft over held-out rows; the table to CSV, counts of strengthened / weakened latents as rows."""
    from lorascope.geometry.latent_scaling import LatentScaling
    from lorascope.saes import load_sae

    cfg = st.config
    if not cfg.explain.latent_scaling:
        return []
    ref = load_sae(saes.reference[layer], allow_pickle=cfg.reference_sae.allow_pickle)
    names = list(store.manifest["config"]["adapters"]["names"])
    rows = []
    for name in names:
        if not any(a == name for (lyr, a) in saes.adapter if lyr == layer):
            continue
        held = store.held_out(layer, name, study_holdout(cfg))
        n = min(len(held.delta), cfg.explain.tokens)
        h_ft = held.base[:n] + held.delta[:n]
        acc = LatentScaling(ref.W_dec.detach())
        with torch.no_grad():
            acc.update(ref.encode(h_ft), ft=h_ft, base=held.base[:n])
        table = acc.table()
        table.to_csv(out / f"latent_scaling_{name}.csv", index=False)
        fired = table.dropna(subset=["ratio"])
        where = {"layer": layer, "adapter": name, "n": len(fired)}
        rows += [
            ResultRow(
                schema.EXPLAIN, schema.LATENTS_STRENGTHENED, float((fired.ratio < STRENGTHENED_RATIO).sum()), **where
            ),
            ResultRow(schema.EXPLAIN, schema.LATENTS_WEAKENED, float((fired.ratio > WEAKENED_RATIO).sum()), **where),
        ]
    return rows
