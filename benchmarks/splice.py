"""Benchmark the splice test: the unoptimised path (one full mixed forward, then one full forward per splice) vs
the fast path (prefix once, only the blocks after the layer, every splice stacked in one forward, logits only at
the selected positions), on a tiny random Llama and on the embedded SmolLM2-135M, with random LoRA adapters.

    python benchmarks/splice.py                       # tiny Llama + SmolLM2, 4 docs, layers early/middle/late
    python benchmarks/splice.py --tiny-only --reps 3
    python benchmarks/splice.py --memory               # peak RSS of each path, SmolLM2, 8 docs of 192 tokens

A second table times the study's shape — every layer of one adapter — as one splice per layer (splice_kl in a
loop) against splice_cells (one prefix to the deepest layer, the adapted/base log-probabilities once).


Reconstructors are the study's pair (a linear stand-in for the adapter SAE on Δ and a tanh stand-in for the
reference SAE's difference) plus the zero and mean-Δ baselines: 4 splices per (layer, adapter) as in the study.
Each row also reports the largest absolute difference between the two results (all fields), which must be ~1e-6.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from lorascope.data import make_demo_dataset, tokenize_example
from lorascope.models import load_base
from lorascope.study.splice import SpliceCell, SpliceOptions, splice_cells, splice_kl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' scaffolding and splice oracle
from splice_reference import reference_splice_kl  # noqa: E402
from tiny_models import build_tiny_model, random_adapters  # noqa: E402


def _recons(d: int) -> dict:
    w = torch.randn(d, d, generator=torch.Generator().manual_seed(0)) / d**0.5
    return {
        "adapter_sae": lambda hb, hf: (hf - hb) @ w,
        "ref_diff": lambda hb, hf: torch.tanh(hf @ w) - torch.tanh(hb @ w),
    }


def _max_diff(a, b) -> float:
    vals = [abs(a.kl_adapted_vs_base - b.kl_adapted_vs_base)]
    for field in ("kl", "recovered", "recovered_raw"):
        vals += [abs(getattr(a, field)[k] - getattr(b, field)[k]) for k in getattr(a, field)]
    vals += [abs(x - y) for k in a.doc_kl for x, y in zip(a.doc_kl[k], b.doc_kl[k], strict=True)]
    return max(v for v in vals if not math.isnan(v))


def _time(fn, reps: int):
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench(name: str, source: str, n_docs: int, reps: int, scale: float) -> tuple[list[tuple], tuple]:
    """Per-layer rows (reference vs fast splice) and one row for every layer at once (loop vs splice_cells)."""
    base = load_base(source)
    pm = random_adapters(base.model, [4], scale=scale, seed=1)
    docs = [tokenize_example(base.tokenizer, ex) for ex in make_demo_dataset(n_docs, seed=2)]
    d, n = base.model.config.hidden_size, base.num_layers
    mean = torch.zeros(d)
    rows = []
    for layer in sorted({1, n // 2, n - 2}):

        def run(f, layer=layer):
            return f(pm, base.tokenizer.pad_token_id, docs, layer, "r4", _recons(d), SpliceOptions(mean_delta=mean))

        t_ref, ref = _time(lambda run=run: run(reference_splice_kl), reps)
        t_new, new = _time(lambda run=run: run(splice_kl), reps)
        rows.append((name, layer, n, ref.n_tokens, t_ref, t_new, _max_diff(new, ref)))
    layers = sorted({1, n // 2, n - 2})
    cells = [SpliceCell(layer, "r4", _recons(d), mean) for layer in layers]
    opt = SpliceOptions(mean_delta=mean)

    def one_by_one():
        return [splice_kl(pm, base.tokenizer.pad_token_id, docs, c.layer, "r4", c.reconstructors, opt) for c in cells]

    t_loop, loop = _time(one_by_one, reps)
    t_cells, together = _time(lambda: splice_cells(pm, base.tokenizer.pad_token_id, docs, cells, opt), reps)
    diff = max(_max_diff(together[c.key], r) for c, r in zip(cells, loop, strict=True))
    return rows, (name, "+".join(map(str, layers)), loop[0].n_tokens, t_loop, t_cells, diff)


MEMORY_CHILD = """
import resource, sys, torch
sys.path.insert(0, {tests!r})
from lorascope.data import make_demo_dataset, tokenize_example
from lorascope.data.chat import TokenizedExample
from lorascope.models import load_base
from tiny_models import random_adapters
from splice_reference import reference_splice_kl
from lorascope.study.splice import SpliceOptions, splice_kl
base = load_base("embedded")
pm = random_adapters(base.model, [4], scale=0.05, seed=1)
parts = [tokenize_example(base.tokenizer, ex) for ex in make_demo_dataset(40, seed=2)]
docs = []
for i in range(8):  # long documents: demo documents chained to 192 tokens, the response starting at the last one
    ids = [t for p in parts[5 * i: 5 * i + 5] for t in p.input_ids][:192]
    docs.append(TokenizedExample(f"d{{i}}", ids, 1))
d = base.model.config.hidden_size
w = torch.randn(d, d) / d**0.5
recons = {{"adapter_sae": lambda hb, hf: (hf - hb) @ w,
          "ref_diff": lambda hb, hf: torch.tanh(hf @ w) - torch.tanh(hb @ w)}}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fn = reference_splice_kl if {which!r} == "before" else splice_kl
fn(pm, base.tokenizer.pad_token_id, docs, 15, "r4", recons, SpliceOptions(mean_delta=torch.zeros(d)))
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def memory() -> None:
    """Peak RSS (MiB) of each path in a fresh process: after loading the model, and after one splice call."""
    import subprocess

    tests = str(Path(__file__).resolve().parents[1] / "tests")
    print(f"{'path':<8}{'RSS after load MiB':>20}{'peak RSS MiB':>14}{'splice adds MiB':>17}")
    for which in ("before", "after"):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD.format(tests=tests, which=which)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        load, peak = int(out[-2]) / 1024, int(out[-1]) / 1024
        print(f"{which:<8}{load:>20.0f}{peak:>14.0f}{peak - load:>17.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--tiny-only", action="store_true")
    ap.add_argument("--memory", action="store_true", help="only the peak-RSS comparison (fresh processes)")
    args = ap.parse_args()
    if args.memory:
        memory()
        return
    torch.manual_seed(0)
    import tempfile

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_model("llama", f"{tmp}/tiny", hidden=64, layers=8)
        results.append(bench("tiny llama", str(tiny), args.docs, max(args.reps, 3), scale=0.5))
    if not args.tiny_only:
        results.append(bench("SmolLM2-135M", "embedded", args.docs, args.reps, scale=0.05))
    head = (
        f"{'model':<14}{'layer':>7}{'tokens':>8}{'before s':>10}{'after s':>10}{'after/before':>14}{'max |diff|':>12}"
    )
    print(head + "\n" + "-" * len(head))
    for name, layer, n, tok, t0, t1, diff in (row for rows, _ in results for row in rows):
        print(f"{name:<14}{f'{layer}/{n}':>7}{tok:>8}{t0:>10.2f}{t1:>10.2f}{t1 / t0:>14.2f}{diff:>12.1e}")
    head = f"{'model':<14}{'layers':>10}{'tokens':>8}{'per layer s':>13}{'cells s':>9}{'cells/per layer':>17}"
    head += f"{'max |diff|':>12}"
    print("\n" + head + "\n" + "-" * len(head))
    for _, (name, layers, tok, t0, t1, diff) in results:
        print(f"{name:<14}{layers:>10}{tok:>8}{t0:>13.2f}{t1:>9.2f}{t1 / t0:>17.2f}{diff:>12.1e}")


if __name__ == "__main__":
    main()
