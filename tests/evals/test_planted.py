"""Planted-feature metrics (evals/planted.py): exact values on oracle dictionaries, then SASA vs TopK."""

from __future__ import annotations

import pytest
import torch

import lorascope.saes.sasa  # noqa: F401  (registers "sasa")
import lorascope.saes.topk  # noqa: F401  (registers "topk")
from lorascope.evals.planted import planted_report, sae_planted_report
from lorascope.evals.synthetic import PlantedConfig, PlantedFeatures
from lorascope.saes.base import TrainContext, create_sae


def _oracle_group_codes(gen, batch, r):
    """One unit (size r) per feature: rows = the feature's basis (zero-padded), codes = its coordinates."""
    n_feat, d = gen.cfg.n_features, gen.cfg.d
    w = torch.zeros(n_feat, r, d, dtype=torch.float64)
    codes = torch.zeros(batch.x.shape[0], n_feat, r, dtype=torch.float64)
    for i, b in enumerate(gen.bases):
        w[i, : b.shape[0]] = b
    rows = torch.arange(batch.x.shape[0])[:, None].expand_as(batch.active)
    codes[rows, batch.active, : gen.d_max] = batch.coords.double()
    return codes.view(-1, n_feat * r), w.view(n_feat * r, d)


@pytest.fixture(scope="module")
def small():
    gen = PlantedFeatures(PlantedConfig(d=24, n_features=8, dims=(1, 2, 3), active=2, seed=0))
    return gen, gen.sample(2000, seed=5)


def test_oracle_one_unit_per_feature_scores_perfectly(small):
    gen, batch = small
    codes, w = _oracle_group_codes(gen, batch, 3)
    rep = planted_report(codes, w, 3, gen, batch)
    assert rep.split.tolist() == [1] * 8 and rep.merged.sum() == 0
    assert rep.best_unit.tolist() == list(range(8))
    torch.testing.assert_close(rep.recovery_best, torch.ones(8, dtype=torch.float64))
    assert float(rep.leakage.max()) < 0.05  # only random overlap of independent subspaces in R^24
    assert torch.equal(rep.rank_data, gen.dims) and torch.equal(rep.rank_decoder, gen.dims)
    assert rep.summary()["rank_exact"] == 1.0


def test_oracle_one_latent_per_basis_direction_splits_by_dimension(small):
    gen, batch = small
    codes, w = _oracle_group_codes(gen, batch, 3)  # read the same dictionary as 24 single-latent units
    rep = planted_report(codes, w, 1, gen, batch)
    assert torch.equal(rep.split, gen.dims)  # isotropic coordinates: every basis direction is needed for 90%
    torch.testing.assert_close(rep.recovery_cover, torch.ones(8, dtype=torch.float64))
    # the best single latent is one direction of a d_i-dim subspace
    torch.testing.assert_close(rep.recovery_best, 1.0 / gen.dims.double())


def test_merged_features_are_flagged_and_leak(small):
    gen, batch = small
    codes, w = _oracle_group_codes(gen, batch, 3)
    # put feature 3 (1-D) into feature 0's unit (1-D, room for 2 more rows): both are carried by unit 0
    c = codes.view(-1, 8, 3).clone()
    wv = w.view(8, 3, -1).clone()
    wv[0, 1] = wv[3, 0]
    c[:, 0, 1] = c[:, 3, 0]
    c[:, 3] = 0
    rep = planted_report(c.view(-1, 24), wv.view(24, -1), 3, gen, batch)
    assert rep.merged.tolist() == [True, False, False, True, False, False, False, False]
    assert rep.best_unit[3] == 0 and rep.unit_feature[0] in (0, 3)
    loser = 3 if int(rep.unit_feature[0]) == 0 else 0
    assert float(rep.leakage[loser]) > 0.95 and rep.recovery_best[3] > 0.999


def _fit(sae, batches, steps, lr=3e-3):
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sae.init_b_dec(next(batches))
    last = torch.zeros(sae.d_sae, dtype=torch.long)
    for step in range(steps):
        out = sae.training_loss(next(batches), TrainContext(step, steps, 1.0, (step - last) > 50))
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.post_step()
        last[out.active.flatten().unique()] = step


def test_sasa_recovers_subspaces_with_one_group_while_topk_splits():
    """d=32, 10 features of dims 1-3, 2 active; SASA 15 rank-3 groups, s=2 vs TopK k=6, same width 45."""
    gen = PlantedFeatures(PlantedConfig(d=32, n_features=10, dims=(1, 2, 3), active=2, seed=2))
    batch = gen.sample(4096, seed=12345)
    torch.manual_seed(0)
    # lorascope recipe, λ=1e-3 on the map (with its default 1e-4, feature 1 ends split over 2 groups here)
    sasa = create_sae("sasa", 32, 45, seed=2, groups=15, rank=3, s=2, nuclear_coefficient=1e-3, recipe="lorascope")
    _fit(sasa, gen.batches(256, seed=1), 1200)
    topk = create_sae("topk", 32, 45, seed=2, k=6)
    _fit(topk, gen.batches(256, seed=1), 1200)
    rs, rt = sae_planted_report(sasa, gen, batch), sae_planted_report(topk, gen, batch)
    assert float(rs.recovery_best.min()) >= 0.9, rs.recovery_best
    assert rs.split.tolist() == [1] * 10, rs.split  # one group per feature
    multi = gen.dims >= 2
    assert float(rt.split[multi].double().mean()) > 1.5, rt.split
    assert float(rt.recovery_cover[multi].mean()) >= 0.9  # TopK spans the subspace too, with several latents
    assert float(rs.split[multi].double().mean()) < float(rt.split[multi].double().mean())
