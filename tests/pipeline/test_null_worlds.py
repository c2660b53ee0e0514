"""Calibration of the findings on null worlds (synthetic tensors through the study's analysis and the report's
verdict rules): where nothing is there, the report must almost never say "holds".

Null world: held-out documents whose tokens share a document effect (within-document correlation, as real text
has), Δ independent of everything, an "adapter SAE" (two seeds) and a reference SAE that are independent random
TopK dictionaries at initialisation, and two adapters whose Δ are independent. Over N_WORLDS seeds the fraction of
worlds where a finding says it holds (alignment: "weak" or "at ceiling") must be at most MAX_FALSE_RATE.
Measured (seeds 0-19): reconstruction 0/20, alignment 0/20, subspace 0/20, CKA 1/20 (5%).
"""

from __future__ import annotations

import torch

from lorascope.report.findings import HOLDS, compute_findings
from lorascope.results import rows_to_frame
from lorascope.saes import create_sae
from lorascope.study.analysis import LayerAdapterInputs, Settings, analyse_layer_adapter, cross_adapter_cka

N_WORLDS = 20
MAX_FALSE_RATE = 0.10  # at most 2 of 20 worlds
D, F, K, DOCS, TOKENS = 16, 32, 4, 24, 8


def _docs_tensor(g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """[DOCS·TOKENS, D]: a per-document offset plus token noise (tokens of a document are correlated)."""
    doc = torch.randn(DOCS, 1, D, generator=g) * scale
    return (doc + 0.5 * torch.randn(DOCS, TOKENS, D, generator=g)).reshape(-1, D)


def null_world_rows(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    hb = _docs_tensor(g, 3.0)
    deltas = {"rank_2": _docs_tensor(g), "rank_4": _docs_tensor(g)}
    doc_index = torch.arange(DOCS).repeat_interleave(TOKENS)
    ref = create_sae("topk", D, F, seed=10_000 + seed, k=K)
    s = Settings(subspace_k=3, n_boot=200, cka_max_tokens=DOCS * TOKENS, seed=seed, cka_permutations=49,
                 subspace_draws=10)
    rows = []
    for i, (name, delta) in enumerate(deltas.items()):
        saes = [create_sae("topk", D, F, seed=1000 * seed + 10 * i + j, k=K) for j in range(2)]
        cov = torch.cov(_docs_tensor(g).double().T)  # Δ's covariance on other ("training") documents
        inp = LayerAdapterInputs(1, name, 2 * (i + 1), hb, delta, saes, ref, doc_index=doc_index,
                                 train_delta_cov=cov)
        rows += analyse_layer_adapter(inp, s).rows
    rows += cross_adapter_cka(1, deltas, {"rank_2": 2, "rank_4": 4}, doc_index, DOCS * TOKENS, s)
    return rows


def _claims(rows) -> dict[str, bool]:
    found = {f.key: f.verdict for f in compute_findings(rows_to_frame(rows))}
    return {"reconstruction": found["reconstruction"] == HOLDS,
            "alignment": found["alignment"] in ("weak", "at ceiling"),
            "subspace": found["subspace"] == HOLDS, "cka": found["cka"] == HOLDS}


def test_null_worlds_rarely_hold():
    counts = {"reconstruction": 0, "alignment": 0, "subspace": 0, "cka": 0}
    for seed in range(N_WORLDS):
        for key, held in _claims(null_world_rows(seed)).items():
            counts[key] += held
    rates = {k: v / N_WORLDS for k, v in counts.items()}
    assert all(r <= MAX_FALSE_RATE for r in rates.values()), rates
