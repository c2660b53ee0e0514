"""SASA recipe="published" (the authors' code, github.com/arshandalili/sasa): one test per recipe element."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lorascope.saes.sasa  # noqa: F401  (registers "sasa")
from lorascope.saes.base import TrainContext, create_sae
from lorascope.saes.sasa import LN_EPS, PUBLISHED_TRAINER


def _pub(d=12, groups=5, rank=2, s=2, seed=0, **kw):
    return create_sae("sasa", d, groups * rank, seed=seed, groups=groups, rank=rank, s=s, **kw)


def _raw(n=40, d=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 7.0 * torch.randn(n, d, generator=g, dtype=torch.float64).float() + 3.0  # offset and scale


def _identity_sasa(d=6):
    """All groups active, W_enc = W_dec = I, zero biases: reconstructs its (normalised) input exactly."""
    sae = _pub(d=d, groups=d // 2, rank=2, s=d // 2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_published_is_the_default_and_records_its_settings():
    sae = _pub()
    a = sae.cfg.arch
    assert a["recipe"] == "published" and a["input_norm"] == "layer_norm" and a["encoder_renorm"] is True
    assert (a["nuclear_target"], a["nuclear_reduce"], a["nuclear_coefficient"]) == ("decoder", "mean", 100.0)
    assert (a["recon_loss"], a["auxk_over"], a["auxk_coefficient"], a["k_aux"]) == ("sse", "latents", 1.0, 512)
    assert a["nuclear_warmup"] is False
    assert sae.trainer_defaults() == PUBLISHED_TRAINER
    lor = _pub(recipe="lorascope")
    assert lor.trainer_defaults() == {} and lor.cfg.arch["nuclear_target"] == "map"
    assert _pub(nuclear_coefficient=3.0).cfg.arch["nuclear_coefficient"] == 3.0  # explicit values win
    from lorascope.errors import LorascopeError

    with pytest.raises(LorascopeError, match="recipe"):
        _pub(recipe="paper")
    with pytest.raises(LorascopeError, match="encoder_renorm"):
        _pub(encoder_renorm="yes")


def test_layernorm_round_trip_gives_raw_units():
    sae = _identity_sasa()
    x = _raw(d=6)
    codes = sae.encode(x)
    mu = x.mean(1, keepdim=True)
    std = (x - mu).std(1, keepdim=True)  # unbiased, as SAELens
    torch.testing.assert_close(codes, (x - mu) / (std + LN_EPS))  # codes live in normalised units
    out = sae.decode(codes)
    # y·std + mu with y = (x − mu)/(std + eps): raw x up to the eps SAELens adds to the std
    torch.testing.assert_close(out, (x - mu) * std / (std + LN_EPS) + mu, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sae(x), out)
    # per-token LN: the SAE is equivariant to a per-token affine map of its input
    torch.testing.assert_close(sae(2.5 * x + 4.0), 2.5 * sae(x) + 4.0, rtol=1e-5, atol=1e-4)


def test_trainer_input_scale_is_not_folded_with_layernorm():
    sae = _pub(seed=3)
    x = _raw(seed=4)
    before = sae(x)
    sae.fold_input_scale(3.0)
    torch.testing.assert_close(sae(x), before)
    lor = _pub(seed=3, recipe="lorascope")
    w = lor.W_enc.detach().clone()
    lor.fold_input_scale(3.0)
    torch.testing.assert_close(lor.W_enc.detach(), 3.0 * w)


def test_saved_sae_is_saelens_topk_sasa_and_applies_to_raw_activations(tmp_path):
    from lorascope.saes.formats import load_sae, save_sae

    sae = _pub(seed=5)
    with torch.no_grad():
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(6))
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(7))
    folder = save_sae(sae, tmp_path / "sasa")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk_sasa" and cfg["normalize_activations"] == "layer_norm"
    assert (cfg["n_groups"], cfg["group_rank"], cfg["k_groups"]) == (5, 2, 2)
    assert cfg["apply_b_dec_to_input"] is True and cfg["lorascope"]["arch"]["recipe"] == "published"
    loaded = load_sae(folder)
    x = _raw(seed=8)
    assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded(x), sae(x))
    # SAELens's layer_norm inference by hand from the saved tensors: LN -> −b_dec -> top-s groups -> decode -> undo
    from safetensors.torch import load_file

    t = load_file(str(folder / "sae_weights.safetensors"))
    mu = x.mean(1, keepdim=True)
    std = (x - mu).std(1, keepdim=True)
    pre = (((x - mu) / (std + LN_EPS) - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).view(-1, 5, 2)
    keep = torch.zeros(x.shape[0], 5).scatter_(1, pre.norm(dim=-1).topk(2, dim=1).indices, 1.0)
    want = ((pre * keep[..., None]).view(-1, 10) @ t["W_dec"] + t["b_dec"]) * std + mu
    torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)


def _one_step(sae, x, lr=0.05):
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    out = sae.training_loss(x, TrainContext(0, 10, 1.0, None))
    out.loss.backward()
    sae.remove_parallel_grad()
    opt.step()
    sae.post_step()


def test_encoder_columns_are_renormalised_every_step():
    x = _raw(seed=9)
    sae = _pub(seed=1)
    _one_step(sae, x)
    torch.testing.assert_close(sae.W_enc.norm(dim=0), torch.ones(10))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(10))
    lor = _pub(seed=1, recipe="lorascope")
    _one_step(lor, x)
    assert float((lor.W_enc.detach().norm(dim=0) - 1).abs().max()) > 1e-3  # the earlier recipe leaves them free


def test_no_decoder_gradient_projection_in_published():
    sae = _pub(seed=2)
    sae.training_loss(_raw(seed=10), TrainContext(0, 10, 1.0, None)).loss.backward()
    g = sae.W_dec.grad.clone()
    sae.remove_parallel_grad()
    assert torch.equal(sae.W_dec.grad, g)


def test_penalty_is_mean_over_groups_of_decoder_block_nuclear_norms_times_coefficient():
    sae = _pub(d=12, groups=5, rank=3, s=2, seed=11, nuclear_coefficient=100.0)
    blocks = sae.W_dec.detach().double().view(5, 3, 12).numpy()
    want = np.mean([np.linalg.svd(b, compute_uv=False).sum() for b in blocks])
    for ramp in (0.0, 0.3, 1.0):  # no warm-up of λ in the published recipe
        pen, nuc = (t.detach() for t in sae.nuclear_penalty(TrainContext(0, 10, ramp, None)))
        np.testing.assert_allclose(float(nuc), want, rtol=1e-5)
        np.testing.assert_allclose(float(pen), 100.0 * want, rtol=1e-5)
    with torch.no_grad():  # the target is the decoder block, not the encoder
        sae.W_enc.normal_(generator=torch.Generator().manual_seed(12))
    np.testing.assert_allclose(float(sae.nuclear_penalty(TrainContext(0, 10, 1.0, None))[1].detach()), want, rtol=1e-5)
    # total loss = Σ_d (x − x̂)² averaged over tokens (raw units) + λ·mean_g ‖D_g‖_*
    x = _raw(seed=13)
    out = sae.training_loss(x, TrainContext(0, 10, 1.0, None))
    with torch.no_grad():
        recon = (sae(x) - x).pow(2).sum() / x.shape[0]
    np.testing.assert_allclose(float(out.loss), float(recon) + 100.0 * want, rtol=1e-5)
    lor = _pub(d=12, groups=5, rank=3, s=2, seed=11, recipe="lorascope", nuclear_target="decoder")
    pen, nuc = lor.nuclear_penalty(TrainContext(0, 10, 0.5, None))  # earlier recipe: summed and ramped
    np.testing.assert_allclose(float(pen), 1e-4 * 0.5 * 5 * want, rtol=1e-5)


@pytest.mark.parametrize("n_dead", [3, 8])
def test_auxk_over_dead_latents_matches_the_definition(n_dead):
    sae = _pub(d=12, groups=6, rank=2, s=2, seed=14, nuclear_coefficient=0.0)
    x = _raw(n=30, seed=15)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[torch.randperm(12, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
    ctx = TrainContext(0, 10, 1.0, dead)
    out = sae.training_loss(x, ctx)
    base = sae.training_loss(x, TrainContext(0, 10, 1.0, None))
    with torch.no_grad():
        mu = x.mean(1, keepdim=True)
        std = (x - mu).std(1, keepdim=True)
        pre = ((x - mu) / (std + LN_EPS) - sae.b_dec) @ sae.W_enc + sae.b_enc
        k_aux = min(512, n_dead, 12 // 2)
        vals, lat = pre.masked_fill(~dead, -float("inf")).topk(k_aux, dim=1)
        assert bool(dead[lat].all())  # latents, not groups: any dead latent can be picked
        e_hat = torch.einsum("nk,nkd->nd", vals, sae.W_dec[lat]) * std
        resid = x - sae(x)
        want = min(n_dead / k_aux, 1.0) * (e_hat - resid).pow(2).sum() / x.shape[0]
    np.testing.assert_allclose(float(out.parts["auxk"]), float(want), rtol=1e-4)
    np.testing.assert_allclose(float(out.loss - base.loss), float(want), rtol=1e-4)  # coefficient 1.0
    out.loss.backward()
    assert float(sae.W_dec.grad[dead].abs().sum()) > 0


def test_trainer_uses_published_defaults_only_for_published_sasa():
    from lorascope.evals.synthetic import PlantedConfig, PlantedFeatures
    from lorascope.saes.base import lr_for_width
    from lorascope.saes.trainer import TrainerConfig, train_sae

    gen = PlantedFeatures(PlantedConfig(d=12, n_features=4, dims=(1, 2), active=2, seed=0))
    tc = TrainerConfig(total_tokens=64 * 3, batch_size=64, init_tokens=64)
    res = train_sae(_pub(), gen.batches(64, seed=1), tc, progress=False)
    assert (res.config["lr"], res.config["warmup_steps"], res.config["decay_fraction"]) == (2e-4, 1000, 0.2)
    assert res.config["scale_inputs"] is False and res.config["b_dec_init"] == "zeros" and res.input_scale == 1.0
    mine = TrainerConfig(total_tokens=64 * 3, batch_size=64, init_tokens=64, lr=1e-3, warmup_steps=7)
    res = train_sae(_pub(), gen.batches(64, seed=1), mine, progress=False)
    assert (res.config["lr"], res.config["warmup_steps"]) == (1e-3, 7)  # explicit values win
    topk = create_sae("topk", 12, 16, k=2)
    res = train_sae(topk, gen.batches(64, seed=1), tc, progress=False)
    assert res.config["lr"] == lr_for_width(16) and res.config["warmup_steps"] == 100 and res.config["scale_inputs"]
    res = train_sae(_pub(recipe="lorascope"), gen.batches(64, seed=1), tc, progress=False)
    assert res.config["warmup_steps"] == 100 and res.config["scale_inputs"]


def test_published_recipe_learns_planted_subspaces():
    """A short run of the published recipe (own trainer, LR scaled up for 300 steps) reconstructs planted data."""
    from lorascope.evals.synthetic import PlantedConfig, PlantedFeatures
    from lorascope.saes.trainer import TrainerConfig, evaluate_sae, train_sae

    gen = PlantedFeatures(PlantedConfig(d=24, n_features=8, dims=(1, 2), active=2, seed=0))
    sae = _pub(d=24, groups=12, rank=2, s=2, nuclear_coefficient=1.0)
    tc = TrainerConfig(total_tokens=128 * 300, batch_size=128, lr=5e-3, warmup_steps=20, init_tokens=256)
    res = train_sae(sae, gen.batches(128, seed=1), tc, progress=False)
    ev = evaluate_sae(res.sae, gen.sample(2048, seed=5).x)
    assert ev["fvu"] < 0.25, ev["fvu"]


def test_explicit_trainer_values_equal_to_the_standard_are_kept_for_the_published_recipe():
    """A value set explicitly wins even when it equals the trainer's standard value (it used to be taken for
    'unset' and replaced by the recipe's); fields left None take the recipe's value, or the standard one."""
    from lorascope.saes.trainer import RECIPE_FIELDS, TrainerConfig, with_arch_defaults

    standard = {k: v for k, v in RECIPE_FIELDS.items() if k != "lr"}
    explicit = with_arch_defaults(TrainerConfig(lr=2e-4, **standard), _pub())
    assert {k: getattr(explicit, k) for k in standard} == standard
    unset = with_arch_defaults(TrainerConfig(), _pub())
    assert {k: getattr(unset, k) for k in PUBLISHED_TRAINER} == PUBLISHED_TRAINER
    plain = with_arch_defaults(TrainerConfig(), create_sae("topk", 12, 16, k=2))
    assert {k: getattr(plain, k) for k in RECIPE_FIELDS} == RECIPE_FIELDS
    half = with_arch_defaults(TrainerConfig(warmup_steps=100), _pub())
    assert half.warmup_steps == 100 and half.scale_inputs is False and half.b_dec_init == "zeros"
