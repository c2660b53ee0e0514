"""Many SAEs at once: tok/s of M SAEs trained one by one (train_sae) vs stacked (saes.multi.train_saes).

    python benchmarks/multi_sae.py [--m 2 8 --steps 12 --arch topk paper_a --threads 0]

The quickstart's shapes: d_in 576 -> d_sae 2304, TopK k 16, batch 512; member m trains on its own in-memory
tensor (like Δ of adapter m at one layer). Both ways run the same number of steps per SAE; tok/s counts the rows of
all M SAEs (M × steps × batch / wall seconds). The two ways are interleaved per M and arch, so machine load hits
both alike: compare the ratio within one run. The script also checks that the stacked SAEs equal the one-by-one
ones bit for bit (max |Δw| column).
"""

from __future__ import annotations

import argparse
import time

import torch

from lorascope.saes import TrainerConfig, create_sae, train_sae
from lorascope.saes.multi import train_saes

SETTINGS = {"topk": {"k": 16}, "paper_a": {}, "relu": {}}


def data(m: int, rows: int, d: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [(1.0 + i) * torch.randn(rows, d, generator=g) + 0.1 * i for i in range(m)]


def saes(arch: str, m: int, d: int, f: int) -> list:
    return [create_sae(arch, d, f, seed=i, **SETTINGS[arch]) for i in range(m)]


def run(arch: str, m: int, args: argparse.Namespace) -> tuple[float, float, float]:
    """(one-by-one tok/s, stacked tok/s, max |w_stacked - w_one|) for M = m SAEs."""
    rows = args.steps * args.batch
    xs = data(m, rows, args.d_in)
    cfg = TrainerConfig(batch_size=args.batch, lr=1e-3, warmup_steps=2, init_tokens=args.batch, log_every=10**9)
    t = time.perf_counter()
    one = [train_sae(s, x, cfg, progress=False) for s, x in zip(saes(arch, m, args.d_in, args.d_sae), xs, strict=True)]
    t_one = time.perf_counter() - t
    t = time.perf_counter()
    many = train_saes(saes(arch, m, args.d_in, args.d_sae), xs, cfg, progress=False, log=print)
    t_many = time.perf_counter() - t
    diff = max(
        float((a.sae.state_dict()[k] - b.sae.state_dict()[k]).abs().max())
        for a, b in zip(one, many, strict=True)
        for k in a.sae.state_dict()
    )
    return m * rows / t_one, m * rows / t_many, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--arch", nargs="+", default=["topk", "paper_a"], choices=sorted(SETTINGS))
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12, help="training steps per SAE")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"d_in {args.d_in} -> d_sae {args.d_sae}, batch {args.batch}, {args.steps} steps per SAE, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'arch':<8} {'M':>3} {'one-by-one tok/s':>17} {'stacked tok/s':>14} {'ratio':>6} {'max |Δw|':>9}")
    for arch in args.arch:
        for m in args.m:
            one, many, diff = run(arch, m, args)
            print(f"{arch:<8} {m:>3} {one:>17,.0f} {many:>14,.0f} {many / one:>6.2f} {diff:>9.1e}")


if __name__ == "__main__":
    main()
