"""Stacked training of M SAEs (saes.multi) equals training them one by one with train_sae: bit for bit on CPU.

Every member's operations are the ones train_sae performs, with the same kernels where the rounding would
otherwise differ (per-member sorts in the sparse backward, per-member matrix-vector products and means), so the
tests assert exact equality (torch.equal) of every weight, every log entry and the final statistics (except wall
time). On a GPU, a batched GEMM may round differently from one GEMM per SAE; there the expected agreement is float
tolerance (~1e-6 relative), not bit identity.
"""

from __future__ import annotations

import pytest
import torch

from lorascope.saes import TrainerConfig, create_sae, train_sae
from lorascope.saes.multi import train_saes
from lorascope.saes.trainer import CHECKPOINT_NAME

D, F, B = 16, 32, 100
CFG = dict(batch_size=B, lr=1e-2, warmup_steps=3, log_every=2, dead_window_tokens=100, init_tokens=200)
ARCHS = {"topk": dict(k=3), "paper_a": {}, "relu": dict(l1_coefficient=0.5)}


def streams(m: int, n: int = 1200) -> list[torch.Tensor]:
    """Member i's rows: different tensors of different scales (like Δ of different adapters), nearly rank 3 so
    that a third or more of the latents go dead within the 100-token window and AuxK runs."""
    g = torch.Generator().manual_seed(0)
    low = [torch.randn(n, 3, generator=g) @ torch.randn(3, D, generator=g) for _ in range(m)]
    return [(1.0 + i) * (x + 0.1 * torch.randn(n, D, generator=g)) + i for i, x in enumerate(low)]


def members(arch: str, m: int) -> list:
    return [create_sae(arch, D, F, seed=10 + i, **ARCHS[arch]) for i in range(m)]


def assert_same(one, many) -> None:
    for a, b in zip(one, many, strict=True):
        for name, p in a.sae.state_dict().items():
            assert torch.equal(b.sae.state_dict()[name], p), name
        assert a.input_scale == b.input_scale
        assert a.log == b.log
        timeless = lambda f: {k: v for k, v in f.items() if k not in ("seconds", "tokens_per_s")}  # noqa: E731
        assert timeless(a.final) == timeless(b.final)
        same = lambda c: {k: v for k, v in c.items() if k not in ("checkpoint_every", "resume", "resumed")}  # noqa: E731
        assert same(a.config) == same(b.config)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_stacked_training_equals_one_by_one(arch):
    xs = streams(3)
    cfg = TrainerConfig(**CFG)
    one = [train_sae(s, x, cfg, progress=False) for s, x in zip(members(arch, 3), xs, strict=True)]
    logged: list[str] = []
    many = train_saes(members(arch, 3), xs, cfg, progress=False, log=logged.append)
    assert logged == []  # really stacked, no fallback
    assert_same(one, many)
    if arch == "topk":  # the short dead window made AuxK run, with different dead sets per member
        assert any("auxk" in e for r in many for e in r.log)


def test_members_may_read_the_same_tensor():
    x = streams(1)[0]
    cfg = TrainerConfig(**CFG)
    one = [train_sae(s, x, cfg, progress=False) for s in members("topk", 2)]
    assert_same(one, train_saes(members("topk", 2), [x, x], cfg, progress=False, log=print))


class Killed(Exception):
    pass


def _killing(x: torch.Tensor):
    def gen():
        for i in range(0, x.shape[0], 70):
            if i >= 490:  # after the checkpoint at step 4 (row 400)
                raise Killed
            yield x[i : i + 70]

    return gen


@pytest.mark.parametrize("arch", ["topk", "paper_a"])
def test_resume_from_stacked_checkpoints_equals_one_by_one(arch, tmp_path):
    xs = streams(2)
    cfg = TrainerConfig(total_tokens=1200, checkpoint_every=2, **CFG)
    dirs = [tmp_path / "a", tmp_path / "b"]
    plain = TrainerConfig(total_tokens=1200, **CFG)
    one = [train_sae(s, x, plain, progress=False) for s, x in zip(members(arch, 2), xs, strict=True)]
    with pytest.raises(Killed):
        train_saes(members(arch, 2), [xs[0], _killing(xs[1])], cfg, dirs, progress=False)
    assert all((d / CHECKPOINT_NAME).exists() for d in dirs)
    resume = TrainerConfig(total_tokens=1200, checkpoint_every=2, resume=True, **CFG)
    fresh = [create_sae(arch, D, F, seed=99, **ARCHS[arch]) for _ in range(2)]  # weights come from the checkpoints
    many = train_saes(fresh, xs, resume, dirs, progress=False, log=print)
    assert all(r.config["resumed"] for r in many)
    assert_same(one, [r for r in many])
    # the checkpoints are train_sae's own format: one member resumed alone gives the same SAE
    with pytest.raises(Killed):
        train_saes(members(arch, 2), [xs[0], _killing(xs[1])], cfg, dirs, progress=False)
    alone = train_sae(create_sae(arch, D, F, seed=5, **ARCHS[arch]), xs[0], resume, dirs[0], progress=False)
    assert_same(one[:1], [alone])


def test_stacked_checkpoints_follow_the_clock(tmp_path):
    xs = streams(2)
    one = [train_sae(s, x, TrainerConfig(**CFG), progress=False) for s, x in zip(members("topk", 2), xs, strict=True)]
    dirs = [tmp_path / "a", tmp_path / "b"]
    cfg = TrainerConfig(checkpoint_every=1, checkpoint_min_seconds=1e9, **CFG)  # every step is due, none in time
    many = train_saes(members("topk", 2), xs, cfg, dirs, progress=False)
    assert not any((d / CHECKPOINT_NAME).exists() for d in dirs)
    for a, b in zip(one, many, strict=True):
        for name, p in a.sae.state_dict().items():
            assert torch.equal(b.sae.state_dict()[name], p), name


def test_unsupported_architecture_and_mixed_checkpoints_fall_back_to_one_by_one(tmp_path):
    xs = streams(2)
    cfg = TrainerConfig(**CFG)
    logged: list[str] = []
    saes = [create_sae("batchtopk", D, F, seed=i, k=3) for i in range(2)]
    one = [train_sae(create_sae("batchtopk", D, F, seed=i, k=3), x, cfg, progress=False) for i, x in enumerate(xs)]
    many = train_saes(saes, xs, cfg, progress=False, log=logged.append)
    assert logged == [
        "training 2 batchtopk SAEs one by one: stacked training covers topk, relu, paper_a, not batchtopk"
    ]
    for a, b in zip(one, many, strict=True):  # the fallback is train_sae itself: bit-identical
        for name, p in a.sae.state_dict().items():
            assert torch.equal(p, b.sae.state_dict()[name])
    ck = TrainerConfig(total_tokens=1200, checkpoint_every=2, resume=True, **CFG)
    train_sae(members("topk", 1)[0], xs[0], ck, tmp_path / "a", progress=False)  # finished: checkpoint at step 10
    logged.clear()
    train_saes(members("topk", 2), xs, ck, [tmp_path / "a", tmp_path / "b"], progress=False, log=logged.append)
    assert logged == ["training 2 topk SAEs one by one: their checkpoints are at different steps [0, 10]"]


def test_streams_of_different_lengths_are_refused():
    from lorascope.errors import LorascopeError

    xs = streams(2)
    with pytest.raises(LorascopeError, match="different rows"):
        train_saes(members("topk", 2), [xs[0], xs[1][:700]], TrainerConfig(total_tokens=1200, **CFG), progress=False)


def test_quickstart_groups_per_layer_are_the_seed_groups(tmp_path):
    """The quickstart's 27 SAEs train in 6 passes: per layer, the 4 adapter SAEs and the reference SAE of seed 0
    (same recipe: topk, 576→2304, k 16, 40k tokens, batch 512, lr 0.01) and the 4 adapter SAEs of seed 1."""
    from pathlib import Path
    from types import SimpleNamespace

    from lorascope.config import load_config
    from lorascope.study.cache import RunState
    from lorascope.study.saes import SAEJob, _group_key, _plan

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")
    st = RunState(cfg, tmp_path, progress=False)
    ext = SimpleNamespace(key="store")
    adapters = [f"rank_{r}" for r in cfg.adapters.train.ranks]
    plans = [
        _plan(st, ext, SAEJob(layer, "delta", a, seed, 0.2, 0), cfg.adapter_sae, f"L{layer}__{a}__seed{seed}")
        for layer in cfg.extraction.layers
        for a in adapters
        for seed in cfg.adapter_sae.seeds
    ]
    plans += [
        _plan(st, ext, SAEJob(layer, "base", None, 0, 0.2, 0), cfg.reference_sae, f"L{layer}__reference")
        for layer in cfg.extraction.layers
    ]
    groups: dict = {}
    for p in plans:
        groups.setdefault(_group_key(p), []).append(p.label)
    assert len(plans) == 27
    assert sorted(len(g) for g in groups.values()) == [4, 4, 4, 5, 5, 5]
    assert all(any("reference" in label for label in g) == (len(g) == 5) for g in groups.values())
    assert len({p.stage.path for p in plans}) == 27  # each SAE keeps its own stage folder (cache key)
