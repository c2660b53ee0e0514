"""TopK SAE training throughput: lorascope vs EleutherAI sparsify vs SAELens, same data, same optimiser.

    python benchmarks/sae_train.py [--d-in 384 --d-sae 6144 --k 32 --batch 4096 --steps 6]

Every library trains a TopK SAE (d_in -> d_sae, k) with torch Adam (fused when available) on the same
in-memory planted data (unit-norm random atoms, k-sparse non-negative codes, scaled to mean norm sqrt(d_in)),
fp32 and bf16 autocast. Steps are timed one by one (after one warm-up step) and interleaved across libraries,
so machine load hits them alike; ratios within one run are what to compare. Competitors are optional.

FLOP model per token of a TopK training step: encoder forward 2*d*F + encoder backward for dW 2*d*F (dense
formula) + sparse decode and its backward ~6*d*k (negligible). The "ceiling" is the measured fp32 GEMM rate
divided by 4*d*F. lorascope's encoder backward is sparse (it touches only the selected latents), so it does
~2*d*F dense FLOPs per token and can exceed 100% of this dense ceiling.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def gemm_rate(n: int, d: int, f: int, dtype: torch.dtype, reps: int = 3) -> float:
    """FLOP/s of an [n, d] x [d, f] product (best of ``reps``)."""
    a, b = torch.randn(n, d, dtype=dtype), torch.randn(d, f, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n * d * f / best


def planted_data(n: int, d: int, f: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(f, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.randint(0, f, (n, k), generator=g)
    x = torch.nn.functional.embedding_bag(
        idx, atoms, per_sample_weights=torch.rand(n, k, generator=g) + 0.5, mode="sum"
    )
    return x * (d**0.5 / x.norm(dim=1).mean())


def adam(params, lr: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


# ---- one training step per library (each returns a closure step(x) and an fvu(x) evaluator) ----
def make_lorascope(d: int, f: int, k: int, lr: float):
    from lorascope.saes import create_sae
    from lorascope.saes.base import TrainContext

    sae = create_sae("topk", d, f, k=k, seed=0)
    opt = adam([p for p in sae.parameters() if p.requires_grad], lr)
    dead = torch.zeros(f, dtype=torch.bool)

    def step(x):
        out = sae.training_loss(x, TrainContext(0, 1, 1.0, dead))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.post_step()

    return step, lambda x: sae.forward(x)


def make_sparsify(d: int, f: int, k: int, lr: float):
    from sparsify import SaeConfig, SparseCoder

    sae = SparseCoder(d, SaeConfig(num_latents=f, k=k), device="cpu")
    opt = adam(sae.parameters(), lr)

    def step(x):
        out = sae(x, dead_mask=torch.zeros(f, dtype=torch.bool))
        opt.zero_grad(set_to_none=True)
        (out.fvu + out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    return step, lambda x: sae(x).sae_out


def make_saelens(d: int, f: int, k: int, lr: float):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=f, k=k))
    opt = adam(sae.parameters(), lr)

    def step(x):
        out = sae.training_forward_pass(TrainStepInput(x, {}, torch.zeros(f, dtype=torch.bool), 0, False))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step, lambda x: sae.decode(sae.encode(x))


LIBS = {"lorascope": make_lorascope, "sparsify": make_sparsify, "sae_lens": make_saelens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=384)
    ap.add_argument("--d-sae", type=int, default=6144)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per library and precision")
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--libs", default="lorascope,sparsify,sae_lens")
    ap.add_argument(
        "--bf16",
        choices=["auto", "on", "off"],
        default="auto",
        help="auto: skip bf16 training when this CPU's bf16 GEMM is slower than fp32 (no AMX/AVX512-BF16)",
    )
    a = ap.parse_args()
    d, f, k, n = a.d_in, a.d_sae, a.k, a.batch
    from lorascope.geometry.metrics import fvu

    torch.manual_seed(0)
    print(
        f"TopK SAE {d} -> {f}, k={k}, batch {n}, {a.steps} timed steps, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    rate32 = gemm_rate(n, d, f, torch.float32)
    rate16 = gemm_rate(min(n, 256), d, f, torch.bfloat16, reps=1)  # small: bf16 may be emulated (slow)
    ceiling = rate32 / (4 * d * f)
    print(
        f"GEMM [{n}x{d}]x[{d}x{f}]: fp32 {rate32 / 1e9:.1f} GFLOP/s, bf16 {rate16 / 1e9:.1f} GFLOP/s; "
        f"dense fp32 ceiling {ceiling:,.0f} tok/s (4*d*F FLOPs/token)"
    )
    data = planted_data(n * (a.steps + 2), d, 2 * f, k)
    held_out = planted_data(n, d, 2 * f, k, seed=1)
    precisions = ["fp32"]
    if a.bf16 == "on" or (a.bf16 == "auto" and rate16 >= rate32):
        precisions.append("bf16")
    else:
        print("bf16: skipped (bf16 GEMM is not faster than fp32 on this CPU; pass --bf16 on to force)")

    for prec in precisions:
        steps, evals, times = {}, {}, {}
        for name in a.libs.split(","):
            try:
                steps[name], evals[name] = LIBS[name](d, f, k, a.lr)
                times[name] = []
            except ImportError:
                print(f"{name}: not installed")
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16")
        for i in range(a.steps + 1):  # interleaved; step 0 is warm-up
            x = data[i * n : (i + 1) * n]
            for name, step in steps.items():
                t = time.perf_counter()
                with amp:
                    step(x)
                if i > 0:
                    times[name].append(time.perf_counter() - t)
        print(
            f"\n[{prec}]  {'library':<10} {'tok/s (median)':>15} {'vs sparsify':>12} {'of fp32 ceiling':>16} "
            f"{'FVU held-out':>13}"
        )
        med = {name: statistics.median(ts) for name, ts in times.items()}
        for name in times:
            tps = n / med[name]
            ratio = f"{med['sparsify'] / med[name]:.2f}x" if "sparsify" in med else "n/a"
            with torch.no_grad(), amp:
                err = fvu(held_out, evals[name](held_out).float())
            print(f"        {name:<10} {tps:>15,.0f} {ratio:>12} {tps / ceiling:>15.0%} {err:>13.4f}")
        print(f"        (FVU after {(a.steps + 1) * n:,} tokens each, lr {a.lr}, same data)")


if __name__ == "__main__":
    main()
