"""Intruder dimensions: planted intruders, agreement with PEFT's criterion, feature alignment."""

from __future__ import annotations

import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.models import load_base
from lorascope.models.intruders import (
    adapter_intruders,
    align_features,
    intruder_counts,
    intruder_dimensions,
    residual_intruders,
)


def _base(out=16, inp=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g, dtype=torch.float64))
    S = torch.linspace(5.0, 0.5, inp, dtype=torch.float64)
    return U[:, :inp] @ torch.diag(S) @ V.T, U, V, g


def test_planted_intruder_outside_the_base_column_space():
    W, U, V, g = _base()
    u_new = U[:, 13]  # orthogonal to all 12 base left singular vectors
    dW = 50.0 * torch.outer(u_new, V[:, 5])
    found = intruder_dimensions(W, dW)
    # W + ΔW maps v5 to s5·u5 + 50·u_new: one new top direction, nearly u_new, singular value √(s5² + 50²)
    s5 = float(torch.linalg.svdvals(W)[5])
    assert len(found.indices) == 1 and found.indices == [0]
    assert torch.abs(found.vectors[0] @ u_new).item() == pytest.approx(50.0 / (s5**2 + 2500) ** 0.5, abs=1e-9)
    assert found.singular_values[0].item() == pytest.approx((s5**2 + 2500) ** 0.5, abs=1e-9)
    # the same update along an existing direction is not an intruder
    assert intruder_dimensions(W, 50.0 * torch.outer(U[:, 2], V[:, 5])).indices == []
    assert intruder_dimensions(W, torch.zeros_like(W)).indices == []


def test_planted_intruder_spread_over_base_directions_in_a_square_weight():
    W, U, V, _ = _base(12, 12)
    u_new = U.sum(1) / 12**0.5  # |cos| = 0.29 with every base singular vector
    v_new = V.sum(1) / 12**0.5
    found = intruder_dimensions(W, 20.0 * torch.outer(u_new, v_new))
    assert found.indices == [0] and float(found.max_cos[0]) < 0.5
    assert float((found.vectors[0] @ u_new).abs()) > 0.95
    with pytest.raises(LorascopeError, match="equal-shaped"):
        intruder_dimensions(W, W[:3])


def test_agrees_with_peft_intruder_criterion(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    torch.manual_seed(0)
    pm = get_peft_model(
        load_base(tiny_llama_dir).model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj", "q_proj"], init_lora_weights=False),
        adapter_name="default",
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(40.0)  # large updates so that some modules get intruders
    cache = {}
    found = adapter_intruders(pm, "default", base_cache=cache)
    assert set(cache) == set(found)
    again = adapter_intruders(pm, "default", base_cache=cache)  # cached base SVDs give the same intruders
    assert {m: x.indices for m, x in again.items()} == {m: x.indices for m, x in found.items()}
    counts = intruder_counts(found, "r4")
    assert counts["n_intruders"].sum() > 0 and set(counts["adapter"]) == {"r4"}
    lines = []
    reduce_intruder_dimension(pm, "default", "mitigated", logging_sink=lines.append)
    peft_counts = {}
    for line in lines:
        if ": Intruders: " in line or ": No intruders" in line:
            name, _, rest = line.partition(": ")
            peft_counts[name] = int(rest.split(": ")[1]) if "Intruders:" in rest else 0
    assert peft_counts == {m: len(x.indices) for m, x in found.items()}


def test_alignment_of_decoder_directions_with_residual_intruders():
    d = 16
    W, U, V, g = _base(d, d)
    found = {
        "model.layers.0.self_attn.o_proj": intruder_dimensions(W, 20.0 * torch.outer(U.sum(1) / 4.0, V[:, 0])),
        "model.layers.0.self_attn.q_proj": intruder_dimensions(W, 20.0 * torch.outer(U.sum(1) / 4.0, V[:, 1])),
    }
    vecs, labels = residual_intruders(found, d)
    assert vecs.shape == (1, d) and labels == ["model.layers.0.self_attn.o_proj#0"]  # q_proj is not a writer
    decoder = torch.randn(30, d, generator=g, dtype=torch.float64)
    decoder[7] = -3.0 * vecs[0]  # a feature along the intruder (sign and scale do not matter)
    table = align_features(decoder, vecs, labels)
    assert table.iloc[0]["feature"] == 7 and table.iloc[0]["abs_cos"] == pytest.approx(1.0)
    assert table["aligned"].tolist() == [True, False, False]
