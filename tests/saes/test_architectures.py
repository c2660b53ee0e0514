"""Architectures: config validation, inference semantics, and recovery of a planted dictionary.

Planted data: 128 random unit atoms in R^64, 4 active per sample with coefficients U(0.5, 1.5), 16,384
samples, batch 256 (64 steps), lr 3e-3, seed 0. Measured here (torch 2.13 CPU): TopK MMCS 0.995 / FVU 0.070;
BatchTopK 0.993 / 0.097; ReLU (l1 1.0) FVU 0.144 at L0 46, MMCS 0.973; JumpReLU (threshold_init 1, l0 1)
FVU 0.12 at L0 6.5, MMCS 0.977. The assertions below leave margin around these numbers.
"""

from __future__ import annotations

import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.saes import TrainerConfig, create_sae, known_architectures, train_sae
from lorascope.saes.base import TrainContext

D_IN, D_SAE, K_TRUE = 64, 128, 4


def planted(n: int = 16384, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    atoms = torch.randn(D_SAE, D_IN, generator=torch.Generator().manual_seed(0))
    atoms /= atoms.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, D_SAE, generator=g).argsort(1)[:, :K_TRUE]
    codes = torch.zeros(n, D_SAE).scatter_(1, idx, torch.rand(n, K_TRUE, generator=g) + 0.5)
    return codes @ atoms, atoms


def mmcs_from_truth(atoms: torch.Tensor, W_dec: torch.Tensor) -> float:
    """Mean over true atoms of the max cosine to any learned decoder row."""
    w = W_dec / W_dec.norm(dim=1, keepdim=True)
    return float((atoms @ w.T).max(1).values.mean())


def train_planted(arch: str, **kw):
    x, atoms = planted()
    sae = create_sae(arch, D_IN, D_SAE, seed=0, **kw)
    res = train_sae(sae, x, TrainerConfig(batch_size=256, lr=3e-3, warmup_steps=10, log_every=16), progress=False)
    return res, mmcs_from_truth(atoms, res.sae.W_dec.detach())


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_topk_family_recovers_planted_dictionary(arch):
    res, mmcs = train_planted(arch, k=K_TRUE)
    assert mmcs >= 0.9
    assert res.final["fvu"] < 0.2
    assert res.final["l0"] == pytest.approx(K_TRUE, abs=1e-9)  # exact k per token / on average per batch
    assert res.log[-1]["fvu"] < res.log[0]["fvu"]  # the learning curve goes down


def test_relu_l1_reaches_stated_fvu_and_l0():
    res, mmcs = train_planted("relu", l1_coefficient=1.0)
    assert res.final["fvu"] <= 0.25
    assert 20 <= res.final["l0"] <= 64
    assert mmcs >= 0.9
    res_strong, _ = train_planted("relu", l1_coefficient=3.0)
    assert res_strong.final["l0"] < res.final["l0"]  # a larger L1 coefficient gives sparser codes


def test_jumprelu_reaches_stated_fvu_and_l0():
    res, mmcs = train_planted("jumprelu", l0_coefficient=1.0, threshold_init=1.0)
    assert res.final["fvu"] <= 0.2
    assert 3 <= res.final["l0"] <= 12
    assert mmcs >= 0.9
    assert bool((res.sae.threshold > 0).all())


def test_validate_config_rejects_impossible_values():
    with pytest.raises(LorascopeError, match="larger than d_sae"):
        create_sae("topk", 8, 16, k=17)
    with pytest.raises(LorascopeError, match="k: Input should be greater than 0"):
        create_sae("topk", 8, 16, k=0)
    with pytest.raises(LorascopeError, match="needs k"):
        create_sae("batchtopk", 8, 16)
    with pytest.raises(LorascopeError, match="l1_coefficient: Input should be greater than or equal to 0"):
        create_sae("relu", 8, 16, l1_coefficient=-1.0)
    with pytest.raises(LorascopeError, match="l0_coefficient"):
        create_sae("jumprelu", 8, 16, l0_coefficient=-0.5)
    with pytest.raises(LorascopeError, match="bandwidth"):
        create_sae("jumprelu", 8, 16, bandwidth=0.0)
    with pytest.raises(LorascopeError, match="auxk_coefficient"):
        create_sae("topk", 8, 16, k=2, auxk_coefficient=-1)


def test_unknown_architecture_lists_known():
    with pytest.raises(LorascopeError) as exc:
        create_sae("gated-ish", 8, 16)
    for name in ("relu", "topk", "batchtopk", "jumprelu"):
        assert name in known_architectures()
        assert name in str(exc.value)


def test_inference_semantics_match_formulas():
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    topk = create_sae("topk", 8, 16, k=3, seed=1)
    pre = (x - topk.b_dec) @ topk.W_enc + topk.b_enc
    codes = topk.encode(x)
    assert ((codes != 0).sum(1) <= 3).all()
    top3 = pre.topk(3, dim=1).values.clamp_min(0)
    assert torch.equal(codes.sort(1, descending=True).values[:, :3], top3)

    jump = create_sae("jumprelu", 8, 16, seed=2, threshold_init=0.3)
    pre = (x - jump.b_dec) @ jump.W_enc + jump.b_enc
    assert torch.equal(jump.encode(x), torch.relu(pre) * (pre > 0.3))
    assert torch.equal(jump.forward(x), jump.encode(x) @ jump.W_dec + jump.b_dec)

    btk = create_sae("batchtopk", 8, 16, k=3, seed=3)
    btk.threshold.data.fill_(0.2)
    pre = (x - btk.b_dec) @ btk.W_enc + btk.b_enc
    assert torch.equal(btk.encode(x), torch.relu(pre) * (pre > 0.2))

    relu = create_sae("relu", 8, 16, seed=4)
    assert torch.equal(relu.encode(x), torch.relu((x - relu.b_dec) @ relu.W_enc + relu.b_enc))


def test_batchtopk_keeps_n_times_k_and_tracks_threshold():
    torch.manual_seed(0)
    sae = create_sae("batchtopk", 8, 32, k=4, seed=0, threshold_momentum=0.5)
    x = torch.randn(64, 8)
    out = sae.training_loss(x, TrainContext(0, 10, 1.0, None))
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    kept = pre.detach().flatten().topk(64 * 4).values
    assert out.active.numel() == 64 * 4
    first = float(sae.threshold[0])
    assert first == pytest.approx(float(kept.min()))  # the first update sets the smallest kept value
    sae.training_loss(2 * x, TrainContext(1, 10, 1.0, None))
    pre2 = torch.relu((2 * x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    second_min = float(pre2.flatten().topk(64 * 4).values.min())
    assert float(sae.threshold[0]) == pytest.approx(0.5 * first + 0.5 * second_min, rel=1e-6)
    assert torch.all(sae.threshold == sae.threshold[0])


def test_relu_penalty_weights_by_decoder_norm():
    sae = create_sae("relu", 8, 16, seed=0, l1_coefficient=2.0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 16)[:, None])
    x = torch.randn(20, 8)
    out = sae.training_loss(x, TrainContext(0, 10, 0.5, None))
    f = sae.encode(x)
    l1 = (f * sae.W_dec.norm(dim=1)).sum(1).mean()
    mse = (f @ sae.W_dec + sae.b_dec - x).pow(2).sum(1).mean()
    assert torch.allclose(out.loss, mse + 2.0 * 0.5 * l1, rtol=1e-5)
