"""Tokens/s of LoRA training per rank on the embedded SmolLM2-135M, fp32 vs bf16 autocast.

    python benchmarks/lora_train.py [--ranks 4 8 16 32] [--steps 6] [--batch-size 8]

Prints one table; ratios are within this run (same machine load). The first step of each setting is a warm-up
and is not timed.
"""

from __future__ import annotations

import argparse
import time

import torch

from lorascope.data import make_demo_dataset
from lorascope.models import LoraSettings, load_base, train_lora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32", "bf16"],
        choices=["fp32", "bf16"],
        help="bf16 = autocast; on CPUs without AVX512-BF16/AMX it is far slower than fp32",
    )
    ap.add_argument("--bf16-steps", type=int, default=None, help="timed steps for bf16 (default: --steps)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base("embedded")
    data = make_demo_dataset(128, seed=0)
    rows = []
    for rank in args.ranks:
        for prec in args.precisions:
            bf16 = prec == "bf16"
            steps = (args.bf16_steps or args.steps) if bf16 else args.steps
            warm = LoraSettings(rank=rank, steps=1, batch_size=args.batch_size, autocast_bf16=bf16)
            train_lora(base, data, warm, progress=False)
            s = LoraSettings(rank=rank, steps=steps, batch_size=args.batch_size, autocast_bf16=bf16)
            t0 = time.perf_counter()
            res = train_lora(base, data, s, progress=False)
            dt = time.perf_counter() - t0
            rows.append(
                (
                    rank,
                    "bf16 autocast" if bf16 else "fp32",
                    res.tokens_seen / dt,
                    dt / steps,
                    res.losses[0],
                    res.losses[-1],
                )
            )
    fp32 = {r[0]: r[2] for r in rows if r[1] == "fp32"}
    print(f"\nLoRA training on SmolLM2-135M, batch {args.batch_size}, {args.steps} timed steps, {args.threads} threads")
    print(f"{'rank':>5} {'precision':>14} {'tokens/s':>10} {'s/step':>8} {'vs fp32':>8} {'loss first->last':>18}")
    for rank, prec, tps, sps, l0, l1 in rows:
        ratio = f"{tps / fp32[rank]:>7.2f}x" if rank in fp32 else f"{'-':>8}"
        print(f"{rank:>5} {prec:>14} {tps:>10.0f} {sps:>8.2f} {ratio} {l0:>8.3f} -> {l1:.3f}")


if __name__ == "__main__":
    main()
