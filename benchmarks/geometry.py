"""Benchmark lorascope.geometry against GEMM floors: chunked MMCS and streaming linear CKA.

    python benchmarks/geometry.py                       # full size: MMCS 16384 x 2304, CKA 1M x 2304 tokens
    python benchmarks/geometry.py --F 4096 --cka-tokens 65536   # quick run

Each measurement runs in a fresh subprocess so its peak-memory delta (ru_maxrss after the inputs exist vs
after the operation; tracemalloc cannot see torch allocations) is its own. Floors use GEMM rates measured in
the same subprocess: MMCS floor = 2·F_A·F_B·d / fp32 rate (rate from one same-size [F, d] x [d, F] matmul);
CKA floor = 3·N·d²·2 / fp64 rate (XᵀX, YᵀY, XᵀY per batch; rate from the same [d, b] x [b, d] float64
products). Prints a table; times are the best of --reps runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def child_mmcs(F: int, d: int, reps: int) -> dict:
    import torch

    from lorascope.geometry import mmcs

    g = torch.Generator().manual_seed(0)
    A = torch.randn(F, d, generator=g)
    B = torch.randn(F, d, generator=g)
    mmcs(A[:64], B[:64])  # warm-up (thread pool, first-call overheads)
    base = _rss_mib()
    result = {}
    t = _best(lambda: result.setdefault("m", mmcs(A, B)), reps)
    extra = _rss_mib() - base
    flops = 2.0 * F * F * d
    gemm_t = _best(lambda: A @ B.T, reps)  # same-size fp32 GEMM (allocates the full F x F output)
    rate = flops / gemm_t
    m = result["m"]
    return {
        "name": f"mmcs both ways {F}x{d} fp32",
        "time_s": t,
        "floor_s": flops / rate,
        "ratio": t / (flops / rate),
        "extra_mib": extra,
        "gflops": rate / 1e9,
        "note": f"a->b {m.a_to_b:.4f} b->a {m.b_to_a:.4f}",
    }


def child_cka(N: int, d: int, batch: int, reps: int) -> dict:
    import torch

    from lorascope.geometry import StreamingLinearCKA

    g = torch.Generator().manual_seed(0)
    pool = []  # a few pre-generated batches, cycled: the timing covers accumulation only, not data generation
    for _ in range(2):
        x = torch.randn(batch, d, generator=g)
        pool.append((x, 0.5 * x + torch.randn(batch, d, generator=g)))
    StreamingLinearCKA().update(pool[0][0][:64], pool[0][1][:64])  # warm-up
    base = _rss_mib()
    n_batches = max(1, N // batch)
    out = {}

    def run():
        acc = StreamingLinearCKA()
        for i in range(n_batches):
            x, y = pool[i % len(pool)]
            acc.update(x, y)
        out["v"] = acc.value()

    t = _best(run, reps)
    extra = _rss_mib() - base
    x64 = pool[0][0].double()
    y64 = pool[0][1].double()
    per_batch = _best(lambda: (x64.T @ x64, y64.T @ y64, x64.T @ y64), max(reps, 2))
    flops = 3.0 * 2 * n_batches * batch * d * d
    rate64 = 3.0 * 2 * batch * d * d / per_batch
    x32 = pool[0][0]
    rate32 = 2.0 * batch * d * d / _best(lambda: x32.T @ x32, max(reps, 2))
    return {
        "name": f"streaming linear CKA {n_batches * batch}x{d} (batch {batch})",
        "time_s": t,
        "floor_s": flops / rate64,
        "ratio": t / (flops / rate64),
        "extra_mib": extra,
        "gflops": rate64 / 1e9,
        "note": f"cka {out['v']:.4f}; fp64 floor; fp32 rate {rate32 / 1e9:.0f} GFLOP/s, "
        f"fp32 floor {flops / rate32:.1f}s",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--F", type=int, default=16384, help="atoms per dictionary")
    p.add_argument("--d", type=int, default=2304, help="model width for MMCS and CKA")
    p.add_argument("--cka-tokens", type=int, default=1_000_000)
    p.add_argument("--cka-batch", type=int, default=8192)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--skip", choices=["mmcs", "cka"], action="append", default=[])
    p.add_argument("--child", choices=["mmcs", "cka"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child == "mmcs":
        print(json.dumps(child_mmcs(a.F, a.d, a.reps)))
        return
    if a.child == "cka":
        print(json.dumps(child_cka(a.cka_tokens, a.d, a.cka_batch, a.reps)))
        return
    rows = []
    for which in ("mmcs", "cka"):
        if which in a.skip:
            continue
        cmd = [
            sys.executable,
            __file__,
            "--child",
            which,
            "--F",
            str(a.F),
            "--d",
            str(a.d),
            "--cka-tokens",
            str(a.cka_tokens),
            "--cka-batch",
            str(a.cka_batch),
            "--reps",
            str(a.reps),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    head = ("benchmark", "time s", "floor s", "x floor", "extra MiB", "GFLOP/s")
    print(f"{head[0]:48s} {head[1]:>8s} {head[2]:>8s} {head[3]:>8s} {head[4]:>10s} {head[5]:>8s}  note")
    for r in rows:
        print(
            f"{r['name']:48s} {r['time_s']:8.2f} {r['floor_s']:8.2f} {r['ratio']:8.2f} "
            f"{r['extra_mib']:10.0f} {r['gflops']:8.0f}  {r['note']}"
        )


if __name__ == "__main__":
    main()
