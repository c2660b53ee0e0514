"""SASA (saes/sasa.py), recipe="lorascope": config checks, Top-s gating, nuclear norm, effective rank, resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorascope.saes.sasa  # noqa: F401  (registers "sasa")
from lorascope.errors import LorascopeError
from lorascope.evals.synthetic import PlantedConfig, PlantedFeatures
from lorascope.saes.base import TrainContext, create_sae
from lorascope.saes.sasa import entropy_rank, reset_optimizer_rows


def _sasa(d=16, groups=6, rank=3, s=2, seed=0, **kw):
    """lorascope's earlier recipe (the tests below pin it; tests/saes/test_sasa_published.py pins the paper's)."""
    kw.setdefault("recipe", "lorascope")
    return create_sae("sasa", d, groups * rank, seed=seed, groups=groups, rank=rank, s=s, **kw)


def fit(sae, batches, steps: int, lr: float = 3e-3, dead_window: int = 50):
    """Small reference loop: Adam, unit-norm decoder rows, dead-latent mask for AuxK."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sae.init_b_dec(next(batches))
    last = torch.zeros(sae.d_sae, dtype=torch.long)
    for step in range(steps):
        x = next(batches)
        ctx = TrainContext(step, steps, min(1.0, step / (0.05 * steps + 1)), (step - last) > dead_window)
        out = sae.training_loss(x, ctx)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.post_step()
        last[out.active.flatten().unique()] = step
    return opt


def test_config_rejections_are_clear():
    with pytest.raises(LorascopeError, match="s=5 exceeds groups=4"):
        create_sae("sasa", 16, 12, groups=4, rank=3, s=5)
    with pytest.raises(LorascopeError, match="rank=20 exceeds d_in=16"):
        create_sae("sasa", 16, 80, groups=4, rank=20, s=1)
    with pytest.raises(LorascopeError, match="must equal groups·rank"):
        create_sae("sasa", 16, 13, groups=4, rank=3, s=1)
    with pytest.raises(LorascopeError, match="'rank'"):
        create_sae("sasa", 16, 12, groups=4, s=1)
    with pytest.raises(LorascopeError, match="nuclear_form"):
        create_sae("sasa", 16, 12, groups=4, rank=3, s=1, nuclear_form="bogus")
    sae = create_sae("sasa", 16, 12, rank=3, s=2)  # groups inferred; defaults recorded for cfg.json
    assert sae.groups == 4 and sae.cfg.arch["score"] == "coords" and sae.cfg.arch["nuclear_form"] == "svd"


@pytest.mark.parametrize("score", ["coords", "output"])
def test_encode_keeps_top_s_groups_with_signed_linear_coords(score):
    sae = _sasa(score=score)
    with torch.no_grad():
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    codes = sae.encode(x)
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).view(64, 6, 3)
    if score == "coords":
        want = pre.norm(dim=-1)
    else:
        w = sae.W_dec.view(6, 3, 16)
        want = torch.einsum("ngr,grd->ngd", pre, w).norm(dim=-1)
    top = want.topk(2, dim=1).indices
    mask = torch.zeros(64, 6, dtype=torch.bool).scatter_(1, top, True)
    expect = (pre * mask[..., None]).view(64, 18)
    torch.testing.assert_close(codes, expect.detach(), rtol=1e-5, atol=1e-6)
    assert int((codes != 0).sum(1).min()) == 6 == int((codes != 0).sum(1).max())  # s·r latents per token
    assert bool((codes < 0).any())  # signed codes
    # training path (sparse decode) reconstructs exactly what forward does
    out = sae.training_loss(x, TrainContext(0, 1, 1.0, None))
    torch.testing.assert_close(out.x_hat.detach(), sae(x).detach(), rtol=1e-5, atol=1e-5)
    assert out.active_is_indices and out.active.shape == (64, 6)
    assert torch.equal(torch.zeros(64, 18, dtype=torch.bool).scatter_(1, out.active, True), codes != 0)


def test_nuclear_norm_forms_agree_with_numpy():
    sae = _sasa(d=10, groups=4, rank=3, nuclear_target="decoder")
    blocks = sae.W_dec.detach().double().view(4, 3, 10).numpy()
    want = np.array([np.linalg.svd(b, compute_uv=False).sum() for b in blocks])
    np.testing.assert_allclose(sae.nuclear_norms().detach().numpy(), want, rtol=1e-5)
    gram = _sasa(d=10, groups=4, rank=3, nuclear_target="decoder", nuclear_form="gram")
    np.testing.assert_allclose(gram.nuclear_norms().detach().numpy(), want, rtol=1e-3)
    mapped = _sasa(d=10, groups=4, rank=3)  # default target: the encode-decode map
    with torch.no_grad():
        mapped.W_enc.normal_(generator=torch.Generator().manual_seed(1))
    enc = mapped.W_enc.detach().double().numpy()
    maps = [enc[:, 3 * g : 3 * g + 3] @ blocks[g] for g in range(4)]
    want_map = np.array([np.linalg.svd(m, compute_uv=False)[:3] for m in maps])
    np.testing.assert_allclose(mapped.map_singular_values().numpy(), want_map, rtol=1e-4)
    np.testing.assert_allclose(mapped.nuclear_norms().detach().numpy(), want_map.sum(1), rtol=1e-4)
    for m in (sae, mapped):
        m.nuclear_norms().sum().backward()
        assert torch.isfinite(m.W_dec.grad).all() and float(m.W_dec.grad.abs().sum()) > 0


def test_effective_rank_of_known_blocks():
    sae = _sasa(d=8, groups=3, rank=4)
    e = torch.eye(8)
    with torch.no_grad():
        sae.W_dec[0:4] = e[0]  # rank 1
        sae.W_dec[4:8] = e[:4]  # orthonormal: rank 4
        sae.W_dec[8:12] = torch.stack([e[0], e[0], e[1], e[1]])  # rank 2, equal singular values
    r = sae.group_effective_rank()
    assert r["threshold_rank"].tolist() == [1, 4, 2]
    np.testing.assert_allclose(r["entropy_rank"].numpy(), [1.0, 4.0, 2.0], rtol=1e-9)
    np.testing.assert_allclose(
        entropy_rank(torch.tensor([3.0, 1.0])).item(), np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    )


def test_auxk_trains_dead_groups_only_through_dead_mask():
    sae = _sasa()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    dead = torch.zeros(18, dtype=torch.bool)
    dead[15:18] = True  # group 5 dead
    out = sae.training_loss(x, TrainContext(0, 10, 1.0, dead))
    assert "auxk" in out.parts and float(out.parts["auxk"]) > 0
    none_dead = TrainContext(0, 10, 1.0, torch.zeros(18, dtype=torch.bool))
    assert "auxk" not in sae.training_loss(x, none_dead).parts


def test_resample_rare_groups_resets_rows_and_optimizer_state():
    sae = _sasa()
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(4))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.training_loss(x, TrainContext(0, 1, 1.0, None)).loss.backward()
    opt.step()
    sae.post_step()
    before = sae.W_dec.detach().clone()
    rate = torch.tensor([0.3, 1e-5, 0.3, 0.3, 0.0, 0.3], dtype=torch.float64)
    done = sae.resample_groups(x, rate, threshold=2e-4, optimizer=opt, generator=torch.Generator().manual_seed(0))
    assert done.tolist() == [1, 4]
    lat = torch.tensor([3, 4, 5, 12, 13, 14])
    keep = torch.tensor([i for i in range(18) if i not in lat.tolist()])
    assert torch.equal(sae.W_dec[keep], before[keep]) and not torch.equal(sae.W_dec[lat], before[lat])
    torch.testing.assert_close(sae.W_dec[lat].norm(dim=1), torch.ones(6))
    assert float(sae.b_enc.detach()[lat].abs().sum()) == 0
    st = opt.state[sae.W_dec]
    assert float(st["exp_avg"][lat].abs().sum()) == 0 and float(st["exp_avg"][keep].abs().sum()) > 0
    assert float(opt.state[sae.W_enc]["exp_avg_sq"][:, lat].abs().sum()) == 0
    fresh = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))])
    reset_optimizer_rows(fresh, sae.W_dec, lat, 0)  # no state for W_dec there: a no-op, no error


def test_state_dict_round_trip_is_exact():
    sae = _sasa(seed=5)
    with torch.no_grad():
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(6))
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(7))
    cfg = sae.cfg
    other = create_sae("sasa", cfg.d_in, cfg.d_sae, seed=99, **cfg.arch)
    other.load_state_dict(sae.state_for_save())
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(8))
    assert torch.equal(other.encode(x), sae.encode(x)) and torch.equal(other(x), sae(x))
    assert other.cfg.arch == cfg.arch


def test_nuclear_penalty_lowers_effective_rank_of_oversized_groups():
    """rank-4 groups on 1-2-D features: the penalty shrinks unused directions of each used group's map."""
    gen = PlantedFeatures(PlantedConfig(d=24, n_features=8, dims=(1, 2), active=2, seed=0))
    x_eval = gen.sample(2048, seed=77).x
    ranks = {}
    for lam in (0.0, 1e-3):
        torch.manual_seed(0)
        sae = _sasa(d=24, groups=12, rank=4, s=2, nuclear_coefficient=lam)
        fit(sae, gen.batches(128, seed=1), 400)
        used = sae.group_firing_rate(x_eval) > 0.01
        ranks[lam] = float(sae.group_effective_rank()["map_entropy_rank"][used].mean())
    assert ranks[1e-3] < ranks[0.0] - 0.3, ranks  # measured 3.25 vs 3.86


def test_trained_with_trainer_then_saved_and_loaded_gives_identical_codes(tmp_path):
    """train_sae (input scaling folded back) -> save_sae -> load_sae: same cfg.arch, identical encode/decode."""
    from lorascope.saes.formats import load_sae, save_sae
    from lorascope.saes.trainer import TrainerConfig, train_sae

    gen = PlantedFeatures(PlantedConfig(d=16, n_features=6, dims=(1, 2), active=2, seed=1))
    sae = _sasa(groups=8, rank=2, s=2)
    res = train_sae(
        sae,
        gen.batches(128, seed=2),
        TrainerConfig(total_tokens=128 * 60, batch_size=128, lr=3e-3, warmup_steps=5, init_tokens=256),
        progress=False,
    )
    assert res.final["fvu"] < 0.5 and "nuclear" in res.log[-1]
    loaded = load_sae(save_sae(res.sae, tmp_path / "sasa"))
    assert loaded.architecture == "sasa" and loaded.cfg.arch == res.sae.cfg.arch
    x = gen.sample(64, seed=3).x
    assert torch.equal(loaded.encode(x), res.sae.encode(x)) and torch.equal(loaded(x), res.sae(x))
