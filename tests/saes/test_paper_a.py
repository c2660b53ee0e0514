"""The paper_a adapter SAE (arXiv 2605.28896): one test per recipe element.

- normalisation: σ is exactly the mean ‖Δ‖ over the training tokens, and the SAE trains on Δ/σ (mean norm 1);
- loss: ‖h̃ − ĥ‖² + λ₁‖z‖₁ with the *plain* L1 (hand-computed case), the decoder-norm weighting kept as an option;
- fold-back: the saved SAE applied to raw Δ equals the in-training model applied to Δ/σ, rescaled by σ.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.saes import TrainContext, TrainerConfig, create_sae, load_sae, save_sae, train_sae
from lorascope.saes.paper_a import PaperASAE

CTX = TrainContext(step=5, total_steps=10, sparsity_scale=1.0, dead_mask=None)


def delta(n: int = 600, d: int = 12, seed: int = 0) -> torch.Tensor:
    """Δ-like rows: small, off-centre, a few dominant directions (not unit scale)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(4, d, generator=g)
    return 0.03 * (torch.randn(n, 4, generator=g).relu() @ basis) + 0.004 * torch.randn(n, d, generator=g) + 0.01


def quick_cfg(n: int, **kw) -> TrainerConfig:
    return TrainerConfig(batch_size=100, lr=5e-3, warmup_steps=2, init_tokens=n, log_every=3, **kw)


def test_defaults_are_the_papers_recipe():
    sae = create_sae("paper_a", 12, 24)
    assert isinstance(sae, PaperASAE)
    assert (sae.l1_penalty, sae.unit_decoder, sae.input_norm) == ("plain", True, "mean_norm")
    with pytest.raises(LorascopeError, match="l1_penalty"):
        create_sae("paper_a", 12, 24, l1_penalty="squared")


def test_sigma_is_exactly_the_mean_norm_over_the_training_tokens(monkeypatch):
    x = delta()
    seen: list[torch.Tensor] = []
    original = PaperASAE.training_loss

    def spy(self, xs, ctx):
        seen.append(xs.detach().clone())
        return original(self, xs, ctx)

    monkeypatch.setattr(PaperASAE, "training_loss", spy)
    res = train_sae(create_sae("paper_a", 12, 24, seed=0), x, quick_cfg(x.shape[0]), progress=False)
    sigma = float(x.double().norm(dim=1).mean())
    assert res.input_scale == 1.0 / sigma  # σ = (1/N) Σ ‖h_Δ⁽ⁱ⁾‖₂ over all N training rows
    trained_on = torch.cat(seen).double()
    assert trained_on.shape[0] == x.shape[0]  # one epoch, every row once, in order
    assert torch.allclose(trained_on, x.double() / sigma, rtol=1e-6, atol=0)
    assert float(trained_on.norm(dim=1).mean()) == pytest.approx(1.0, abs=1e-6)


def test_input_norm_option_on_other_architectures_and_its_check():
    x = delta()
    sigma = float(x.double().norm(dim=1).mean())
    relu = train_sae(create_sae("relu", 12, 24), x, quick_cfg(600, input_norm="mean_norm"), progress=False)
    assert relu.input_scale == 1.0 / sigma
    default = train_sae(create_sae("relu", 12, 24), x, quick_cfg(600), progress=False)
    assert default.input_scale == pytest.approx(12**0.5 / sigma, rel=1e-12)  # unchanged default: sqrt(d_in)
    with pytest.raises(LorascopeError, match="input_norm"):
        TrainerConfig(input_norm="rms").validate()


def _hand_sae(penalty: str) -> PaperASAE:
    sae = create_sae("paper_a", 2, 3, l1_coefficient=0.5, l1_penalty=penalty)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -1.0, 0.5]))
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 4.0]]))  # row norms 2, 1, 5
        sae.b_dec.copy_(torch.tensor([1.0, 0.0]))
    return sae


def test_plain_l1_loss_on_a_hand_computed_case():
    x = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    # row 1: x - b_dec = (2, 1); pre = (2, 2-1, -2+1+0.5) = (2, 1, -0.5); z = (2, 1, 0)
    #        x_hat = 2*(2,0) + 1*(0,1) + (1,0) = (5, 1); err = (−2, 0) -> 4;  ‖z‖₁ = 3
    # row 2: x - b_dec = (0, 2); pre = (0, 3, 2.5); z = (0, 3, 2.5)
    #        x_hat = 3*(0,1) + 2.5*(3,4) + (1,0) = (8.5, 13); err = (7.5, 11) -> 56.25 + 121 = 177.25;  ‖z‖₁ = 5.5
    out = _hand_sae("plain").training_loss(x, CTX)
    mse, l1 = (4.0 + 177.25) / 2, (3.0 + 5.5) / 2
    assert float(out.parts["mse"]) == pytest.approx(mse, rel=1e-7)
    assert float(out.parts["l1"]) == pytest.approx(l1, rel=1e-7)
    assert float(out.loss.detach()) == pytest.approx(mse + 0.5 * l1, rel=1e-7)
    # the option: decoder-norm-weighted L1 = Σ z_i ‖d_i‖ -> row 1: 2*2 + 1*1 = 5; row 2: 3*1 + 2.5*5 = 15.5
    weighted = _hand_sae("decoder_norm").training_loss(x, CTX)
    assert float(weighted.parts["l1"]) == pytest.approx((5.0 + 15.5) / 2, rel=1e-7)


def test_saved_sae_applies_to_raw_delta(tmp_path, monkeypatch):
    """Round trip: save, load, encode/decode raw Δ == in-training model on Δ/σ (then ×σ)."""
    x = delta()
    captured: dict = {}
    original = PaperASAE.fold_input_scale

    def spy(self, scale):
        captured["model"], captured["scale"] = copy.deepcopy(self), scale
        original(self, scale)

    monkeypatch.setattr(PaperASAE, "fold_input_scale", spy)
    res = train_sae(create_sae("paper_a", 12, 24, seed=1), x, quick_cfg(600), progress=False)
    sigma = 1.0 / captured["scale"]
    assert sigma == pytest.approx(float(x.double().norm(dim=1).mean()), rel=1e-15)
    save_sae(res.sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["lorascope"]["architecture"]) == ("standard", "paper_a")
    loaded = load_sae(tmp_path / "sae")
    assert isinstance(loaded, PaperASAE)
    trained = captured["model"].eval()
    with torch.no_grad():
        z_raw = loaded.encode(x)
        z_norm = trained.encode(x / sigma)
        assert (z_raw > 0).float().mean() > 0.01  # the comparison is about live codes
        assert torch.allclose(z_raw, z_norm, rtol=1e-4, atol=1e-6)
        assert torch.allclose(loaded.decode(z_raw), sigma * trained.decode(z_norm), rtol=1e-4, atol=1e-7)
