"""A plausible, deterministic fake run folder, for tests and for previewing the report without a model.

The numbers follow the shapes the study expects (Δ norm and L0 grow with rank, the adapter SAE reconstructs Δ far
better than the reference SAE, weak decoder alignment above a random null); they are synthetic, not measurements.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lorascope.io import atomic_open, atomic_path, write_json
from lorascope.results import ResultRow, rows_to_frame

D_MODEL = 64
F_ADAPTER = 256
F_REF = 512
K_SUBSPACE = 8


def _ci(rng: np.random.Generator, v: float, rel: float = 0.04) -> tuple[float, float]:
    w = abs(v) * rel * (0.5 + rng.random())
    return v - w, v + w


class _Rows:
    """Collects the fake rows of one (layer, adapter) cell; every value draws its CI from the shared generator."""

    def __init__(self, rng: np.random.Generator, layer: int, adapter: str, rank: int) -> None:
        self.rng, self.layer, self.adapter, self.rank = rng, layer, adapter, rank
        self.rows: list[ResultRow] = []

    def add(
        self,
        family: str,
        metric: str,
        value: float,
        ci: bool = True,
        null: float = float("nan"),
        null_name: str = "",
        rel: float = 0.04,
    ) -> None:
        lo, hi = _ci(self.rng, value, rel) if ci else (float("nan"), float("nan"))
        self.rows.append(
            ResultRow(
                family,
                metric,
                float(value),
                layer=self.layer,
                adapter=self.adapter,
                rank=self.rank,
                ci_low=lo,
                ci_high=hi,
                null_value=null,
                null_name=null_name,
                n=2048,
                d=D_MODEL,
            )
        )


def _delta_norm_rows(out: _Rows, depth: float) -> None:
    base_norm = 10.0 * depth
    dn = 0.4 * np.sqrt(out.rank) * depth * (1 + 0.05 * out.rng.standard_normal())
    out.add("delta_norm", "delta_norm_mean", dn)
    out.add("delta_norm", "delta_norm_median", 0.9 * dn, ci=False)
    out.add("delta_norm", "delta_norm_p99", 2.5 * dn, ci=False)
    out.add("delta_norm", "rel_delta_norm_mean", dn / base_norm)
    out.add("delta_norm", "base_norm_mean", base_norm, ci=False)
    out.add("delta_norm", "effective_rank_pr", 1.6 * out.rank + 2 * out.rng.random(), ci=False)
    out.add("delta_norm", "pca_k90", float(int(1.3 * out.rank) + 1), ci=False)


def _reconstruction_rows(out: _Rows) -> None:
    rng = out.rng
    fvu = {
        "fvu_adapter_sae": 0.05 + 0.03 * rng.random(),
        "fvu_ref_on_delta": 0.6 + 0.1 * rng.random(),
        "fvu_ref_diff": 0.45 + 0.05 * rng.random(),
        "fvu_ref_lstsq_active": 0.3 + 0.05 * rng.random(),
        "fvu_noise": 2.0 + 0.02 * rng.standard_normal(),
    }
    for m, v in fvu.items():
        null = (1.0, "mean_predictor") if m != "fvu_noise" else (2.0, "analytic_expectation")
        out.add("reconstruction", m, v, null=null[0], null_name=null[1])
        out.add("reconstruction", "cos_" + m.removeprefix("fvu_"), float(np.sqrt(max(0.0, 1 - min(v, 1.0)))))
    imp = 100 * (fvu["fvu_ref_on_delta"] - fvu["fvu_adapter_sae"]) / fvu["fvu_ref_on_delta"]
    out.add("reconstruction", "recon_improvement_pct", imp, ci=False)
    gap = fvu["fvu_adapter_sae"] - fvu["fvu_ref_lstsq_active"]
    out.add("reconstruction", "fvu_gap_adapter_sae_vs_best_control", gap, null=0.0, null_name="best_control")


def _splice_and_density_rows(out: _Rows, depth: float) -> None:
    rng, zero = out.rng, {"null": 0.0, "null_name": "zero_splice"}
    out.add("splice", "kl_adapted_vs_base", 0.02 * out.rank * depth)
    out.add("splice", "kl_recovered_rel_adapter_sae", 0.85 + 0.1 * rng.random(), rel=0.02, **zero)
    out.add("splice", "kl_recovered_rel_ref_diff", 0.35 + 0.1 * rng.random(), **zero)
    out.add("splice", "kl_recovered_rel_mean_delta", 0.1 + 0.05 * rng.random(), **zero)
    out.add("splice", "kl_recovered_raw_zero", 0.5 + 0.1 * rng.random(), ci=False)

    l0 = 6 + 3 * np.log2(out.rank) + rng.random()
    out.add("density", "l0_adapter_sae", l0)
    dead = 0.05 + 0.1 * rng.random()
    out.add("density", "dead_fraction_adapter_sae", dead, ci=False)
    out.add("density", "alive_latents_adapter_sae", float(round(F_ADAPTER * (1 - dead))), ci=False)
    out.add("density", "mean_density_adapter_sae", l0 / F_ADAPTER, ci=False)
    out.add("density", "l0_ref_on_delta", 3 + rng.random())


def _similarity_rows(out: _Rows) -> None:
    rng, fam = out.rng, "decoder_similarity"
    null_mmcs = float(np.sqrt(2 * np.log(F_REF) / D_MODEL))
    strongest = {"null": null_mmcs + 0.02, "null_name": "strongest_alignment_null"}
    out.add(fam, "mmcs_adapter_to_ref", 0.55 + 0.05 * rng.random(), **strongest)
    out.add(fam, "mmcs_ref_to_adapter", 0.5 + 0.05 * rng.random(), null=null_mmcs, null_name="random_isotropic")
    out.add(fam, "mmcs_null_isotropic", null_mmcs, ci=False, null_name="random_isotropic")
    out.add(fam, "mmcs_null_cov_matched", null_mmcs + 0.02, ci=False, null_name="cov_matched_random")
    out.add(fam, "mmcs_null_sae_init", null_mmcs + 0.01, ci=False, null_name="SAE at initialisation")
    out.add(fam, "mmcs_seed_vs_seed", 0.85 + 0.05 * rng.random(), null_name="seed_vs_seed")
    for tau, frac in ((0.5, 0.6), (0.7, 0.2), (0.9, 0.03)):
        out.add(fam, f"overlap_adapter_to_ref@{tau}", frac * (0.8 + 0.4 * rng.random()))
    out.add(fam, "hungarian_mean_cos", 0.4 + 0.05 * rng.random(), ci=False)


def _subspace_and_cka_rows(out: _Rows, adapters: dict[str, int]) -> None:
    rng, kd = out.rng, K_SUBSPACE / D_MODEL
    out.add("subspace", "mean_cos2_pca_delta_vs_ref_topk", kd + 0.2 + 0.1 * rng.random(), ci=False)
    selected = 3 * kd + 0.2 + 0.1 * rng.random()
    null = {"null": 3 * kd, "null_name": "selected_random_dictionary"}
    out.add("subspace", "selected_cos2_pca_delta_vs_ref_topk", selected, ci=False, **null)
    out.add("subspace", "selected_cos2_null_q95_pca_delta_vs_ref_topk", 3.5 * kd, ci=False)
    out.add("subspace", "max_angle_pca_delta_vs_ref_topk", 1.2 + 0.2 * rng.random(), ci=False)

    perm = {"null": 0.0, "null_name": "document_permutation"}
    for other, r2 in adapters.items():
        if other != out.adapter:
            cka = 0.9 - 0.1 * abs(np.log2(out.rank) - np.log2(r2))
            out.add("cka", f"cka_delta_vs_{other}", cka, ci=False, **perm)
            out.add("cka", f"cka_p__cka_delta_vs_{other}", 0.02, ci=False)
    out.add("cka", "cka_codes_adapter_vs_ref", 0.3 + 0.1 * rng.random(), ci=False, **perm)


def _rows_for(
    rng: np.random.Generator, layer: int, adapter: str, rank: int, adapters: dict[str, int], n_layers: int
) -> list[ResultRow]:
    depth = 1.0 + layer / max(n_layers, 1)
    out = _Rows(rng, layer, adapter, rank)
    _delta_norm_rows(out, depth)
    _reconstruction_rows(out)
    _splice_and_density_rows(out, depth)
    _similarity_rows(out)
    _subspace_and_cka_rows(out, adapters)
    return out.rows


def _arrays_for(rng: np.random.Generator, rank: int) -> dict[str, np.ndarray]:
    null_mean = float(np.sqrt(2 * np.log(F_REF) / D_MODEL))
    dens = 10 ** rng.normal(-2.0 + 0.05 * np.log2(rank), 0.7, F_ADAPTER)
    dens[rng.random(F_ADAPTER) < 0.08] = 0.0
    angles = np.sort(rng.uniform(0.2, 1.5, K_SUBSPACE))
    dn = rng.lognormal(np.log(0.4 * np.sqrt(rank)), 0.4, 400)
    return {
        "best_cos_adapter_to_ref": np.clip(rng.beta(6, 5, F_ADAPTER), 0, 1).astype(np.float32),
        "best_cos_null": np.clip(rng.normal(null_mean, 0.04, F_ADAPTER), 0, 1).astype(np.float32),
        "best_cos_seed": np.clip(rng.beta(20, 3, F_ADAPTER), 0, 1).astype(np.float32),
        "density_adapter": dens.astype(np.float32),
        "density_ref_on_delta": (10 ** rng.normal(-3, 0.8, F_REF)).astype(np.float32),
        "principal_angles_pca_delta_vs_ref_topk": angles.astype(np.float32),
        "delta_norms": dn.astype(np.float32),
        "rel_delta_norms": (dn / 12.0).astype(np.float32),
    }


_WORDS = (
    "the ship sailed north & the crew sang <script>alert('x')</script> \"arr\" matey a b < c > d "
    "yo ho ho and a bottle of rum\nnew line here"
).split(" ")


def _contexts_for(rng: np.random.Generator, layer: int, adapter: str) -> list[dict]:
    out = []
    for feature in sorted(rng.choice(F_ADAPTER, 2, replace=False).tolist()):
        acts = np.sort(rng.uniform(1.0, 6.0, 3))[::-1]
        ctxs = []
        for a in acts:
            i = int(rng.integers(3, len(_WORDS) - 3))
            ctxs.append(
                {
                    "doc_id": int(rng.integers(0, 100)),
                    "text_before": " ".join(_WORDS[max(0, i - 6) : i]) + " ",
                    "token": _WORDS[i],
                    "text_after": " " + " ".join(_WORDS[i + 1 : i + 7]),
                    "activation": float(round(a, 4)),
                }
            )
        out.append(
            {
                "layer": layer,
                "adapter": adapter,
                "feature": int(feature),
                "density": float(round(rng.uniform(1e-3, 5e-2), 5)),
                "max_act": float(round(acts[0], 4)),
                "contexts": ctxs,
            }
        )
    return out


def _lora_rows(adapters: dict[str, int]) -> list[ResultRow]:
    rows = []
    for name, rank in adapters.items():
        for metric, v in (
            ("train_loss_start", 3.2),
            ("train_loss_end", 0.4 + 1.0 / rank),
            ("heldout_loss_base", 3.1),
            ("heldout_loss_adapted", 0.5 + 1.0 / rank),
        ):
            rows.append(ResultRow("lora", metric, v, adapter=name, rank=rank))
    return rows


def _absorption_rows(rng: np.random.Generator, adapters: dict[str, int], layer: int) -> list[ResultRow]:
    rows = []
    for name in adapters:
        for metric, v in (
            ("absorption_fraction", 0.1 + 0.1 * rng.random()),
            ("full_absorption_rate", 0.05),
            ("splitting_k", 1.0 + rng.random()),
            ("probe_letters_passing", 24.0),
        ):
            rows.append(ResultRow("absorption", metric, v, layer=layer, adapter=f"base_sae/{name}"))
    return rows


def _meta(seed: int, layers: Sequence[int], n_layers: int, adapters: dict[str, int]) -> dict:
    return {
        "name": f"demo-seed{seed}",
        "model": "demo/fake-smollm2",
        "d_model": D_MODEL,
        "n_layers": n_layers,
        "layers": list(layers),
        "adapters": adapters,
        "config": {
            "sae": {"architecture": "topk", "k": 32, "width": F_ADAPTER},
            "tokens": 200_000,
            "seed": seed,
            "exclude_positions": "first 4 (attention sinks)",
        },
        "timings": {"lora": 31.2, "extract": 84.5, "sae": 120.9, "geometry": 12.3},
        "created": "2025-01-01T00:00:00",
    }


def write_fake_run(
    folder: str | Path,
    seed: int = 0,
    layers: Sequence[int] = (3, 6),
    ranks: Sequence[int] = (4, 16),
    with_absorption: bool = False,
) -> Path:
    """Write a deterministic fake run folder (results table, arrays, contexts, meta) under ``folder``.

    Same ``seed`` and arguments give byte-identical tables, arrays and JSON. Returns ``folder`` as a Path.
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    n_layers = max(layers) + 2
    adapters = {f"rank_{r}": int(r) for r in ranks}
    rows: list[ResultRow] = []
    contexts: list[dict] = []
    arrays_dir = folder / "results" / "arrays"
    for layer in layers:
        rows.append(
            ResultRow("reconstruction", "fvu_ref_on_base", 0.12 + 0.02 * rng.random(), layer=layer, n=2048, d=D_MODEL)
        )
        for name, rank in adapters.items():
            rows += _rows_for(rng, layer, name, rank, adapters, n_layers)
            with atomic_open(arrays_dir / f"L{layer}__{name}.npz", "wb") as fh:
                np.savez(fh, **_arrays_for(rng, rank))
            contexts += _contexts_for(rng, layer, name)
    rows += _lora_rows(adapters)
    if with_absorption:
        rows += _absorption_rows(rng, adapters, layers[-1])
    df = rows_to_frame(rows)
    res = folder / "results"
    with atomic_path(res / "results.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(res / "results.csv") as tmp:
        df.to_csv(tmp, index=False)
    write_json(res / "contexts.json", contexts)
    meta = _meta(seed, layers, n_layers, adapters)
    write_json(res / "meta.json", json.loads(json.dumps(meta)))
    return folder
