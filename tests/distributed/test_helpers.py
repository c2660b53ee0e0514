"""lorascope.distributed without launching processes: device and rank resolution, job split, batch-size formula,
and the global-batch helpers reducing to the single-process expressions."""

from __future__ import annotations

import pytest
import torch

from lorascope import distributed as D
from lorascope.errors import LorascopeError
from lorascope.saes import create_sae
from lorascope.saes.trainer import TrainerConfig, train_sae

pytestmark = pytest.mark.dist


def test_env_ranks_and_single_process_init(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert D.env_ranks() == (0, 1, 0) and not D.launched_by_torchrun()
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.backend, info.is_main, info.is_distributed) == (0, 1, None, True, False)
    assert not D.is_initialized() and D.get_world_size() == 1 and D.is_main_process()
    D.barrier()  # no-op
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.env_ranks() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(LorascopeError, match="RANK=4"):
        D.env_ranks()


def test_select_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.select_device("cpu") == D.select_device(None) == D.select_device("auto") == torch.device("cpu")
    for bad, msg in (("cuda", "no CUDA GPU"), ("cuda:1", "no CUDA GPU"), ("tpu", "unknown device")):
        with pytest.raises(LorascopeError, match=msg):
            D.select_device(bad)
    assert D.choose_backend(torch.device("cpu")) == "gloo"


def test_rank_bounds_cover_the_batch_once():
    for n in (1, 2, 7, 51, 64):
        for w in (1, 2, 3, 8):
            bounds = [D.rank_bounds(n, r, w) for r in range(w)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_my_jobs_rejects_bad_rank():
    assert D.my_jobs(["a", "b", "c"], 1, 2) == ["b"]
    with pytest.raises(LorascopeError):
        D.my_jobs([1, 2], 2, 2)


def test_max_batch_size_formula():
    gib = 2**30
    # fixed = 16·(2·2304·16384 + 16384 + 2304) = 1 208 258 560 B; per row = 4·(4·16384 + 8·2304) = 335 872 B
    assert D.max_batch_size(2304, 16384, "float32", free_bytes=8 * gib) == 16384  # 16 862 rows fit
    assert D.max_batch_size(2304, 16384, "bfloat16", free_bytes=8 * gib) == 32768  # 33 725 rows fit
    assert D.max_batch_size(2304, 16384, free_bytes=80 * gib) == 65536  # capped at max_batch
    assert D.max_batch_size(2304, 16384, free_bytes=80 * gib, max_batch=1 << 20) == 131072
    with pytest.raises(LorascopeError, match="GiB"):
        D.max_batch_size(2304, 16384, free_bytes=gib)
    assert D.available_memory("cpu") > 0
    assert D.max_batch_size(16, 64) >= 1


def test_global_helpers_are_the_plain_expressions_outside_a_process_group():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(9, 5, generator=g)
    assert torch.equal(D.batch_denominator(t), (t - t.mean(0)).pow(2).sum())
    flat = torch.randn(9 * 12, generator=g)
    v, i = D.batch_topk(flat, 3, 9)
    ref_v, ref_i = flat.topk(27, sorted=False)
    assert torch.equal(v, ref_v) and torch.equal(i, ref_i)
    share = D.StepShare(4, 9, True)  # a share but no process group: still the single-process expressions
    assert torch.equal(D.batch_denominator(t, share), (t - t.mean(0)).pow(2).sum())
    assert torch.equal(D.batch_topk(flat, 3, 9, share)[0], ref_v)


def test_trainer_device_and_cpu_bf16_autocast():
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0)) * 2
    kw = dict(batch_size=64, lr=1e-2, warmup_steps=1, init_tokens=64)
    fp32 = train_sae(create_sae("topk", 16, 32, k=4, seed=0), x, TrainerConfig(device="cpu", **kw), progress=False)
    bf16 = train_sae(
        create_sae("topk", 16, 32, k=4, seed=0),
        x,
        TrainerConfig(device="cpu", autocast_dtype="bfloat16", **kw),
        progress=False,
    )
    assert bf16.sae.W_dec.dtype == torch.float32  # master weights stay float32
    assert 0 < bf16.final["fvu"] < 1 and abs(bf16.final["fvu"] - fp32.final["fvu"]) < 0.05
    assert not torch.equal(bf16.sae.W_dec, fp32.sae.W_dec)  # the matmuls really ran in bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(LorascopeError, match="no CUDA GPU"):
            train_sae(create_sae("topk", 16, 32, k=4, seed=0), x, TrainerConfig(device="cuda", **kw), progress=False)
