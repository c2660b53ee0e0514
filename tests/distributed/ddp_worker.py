"""Worker for tests/distributed/test_ddp.py: data-parallel SAE training cases on CPU/Gloo, launched by torchrun.

Also imported by the test (``CASES``, ``build``, ``data``) to run the same cases in a single process.
Usage: python -m torch.distributed.run --nproc_per_node 2 ddp_worker.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lorascope.distributed import batch_denominator, batch_topk
from lorascope.saes.base import SAEConfig, sae_class
from lorascope.saes.batchtopk import BatchTopKSAE
from lorascope.saes.topk import TopKSAE
from lorascope.saes.trainer import TrainerConfig, train_sae

D, D_SAE, N = 16, 48, 358  # 7 batches of 51 rows (split 25 / 26) and a last batch of 1 row (whole on every rank)


BASE = dict(batch_size=51, lr=1e-2, warmup_steps=3, log_every=2, init_tokens=120, final_window_steps=3)
# name -> (class, arch fields, trainer overrides)
CASES = {
    "topk": (TopKSAE, {"k": 4}, {"dead_window_tokens": 10**9}),  # no dead latents: AuxK never runs
    "topk_aux_global": (TopKSAE, {"k": 4, "k_aux": 8}, {"dead_window_tokens": 60}),
    "batchtopk_global": (BatchTopKSAE, {"k": 4}, {"dead_window_tokens": 10**9}),
    "relu": (sae_class("relu"), {"l1_coefficient": 1.0}, {}),
    "batchtopk": (BatchTopKSAE, {"k": 4}, {"dead_window_tokens": 10**9}),
}


def data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return 3.0 * torch.randn(N, D, generator=g) + 1.0


def build(name: str):
    cls, arch, _ = CASES[name]
    sae = cls(SAEConfig(cls.architecture, D, D_SAE, arch=dict(arch)))
    sae.reset_parameters(torch.Generator().manual_seed(0))
    return sae


def config(name: str, **kw) -> TrainerConfig:
    return TrainerConfig(**{**BASE, **CASES[name][2], **kw})


def main(out: Path) -> None:
    from lorascope.distributed import cleanup, get_rank, get_world_size, init_distributed

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    assert info.world_size == get_world_size() == 2 and info.backend == "gloo"
    rank, x = get_rank(), data()
    results = {}
    for name in CASES:
        res = train_sae(build(name), x, config(name), progress=False)
        results[name] = {"weights": res.sae.state_for_save(), "log": res.log, "final": res.final}
    # resume: a run that checkpointed every 3 steps, continued by a fresh SAE from its last checkpoint
    ck = out / "ckpt"
    full = train_sae(build("topk"), x, config("topk", checkpoint_every=3), checkpoint_dir=ck, progress=False)
    resumed = train_sae(
        build("topk"), x, config("topk", checkpoint_every=3, resume=True), checkpoint_dir=ck, progress=False
    )
    results["resume"] = {
        "full": full.sae.state_for_save(),
        "resumed": resumed.sae.state_for_save(),
        "was_resumed": resumed.config["resumed"],
        "ckpt_files": sorted(p.name for p in ck.iterdir()),
    }
    # the global-batch helpers against the same computation on the concatenated batch
    g = torch.Generator().manual_seed(1)
    full_pre = torch.randn(10, D_SAE, generator=g).relu()
    from lorascope.distributed import StepShare, rank_bounds

    lo, hi = rank_bounds(10, rank, 2)
    share = StepShare(hi - lo, 10, True)  # what the trainer passes in TrainContext.share
    v, i = batch_topk(full_pre[lo:hi].reshape(-1), 3, hi - lo, share)
    den = batch_denominator(full_pre[lo:hi], share)
    results["helpers"] = {"values": v, "flat": i + lo * D_SAE, "denominator": den, "weight": (hi - lo) / 10}
    torch.save(results, out / f"rank{rank}.pt")
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
