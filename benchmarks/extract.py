"""Benchmark delta-activation extraction on SmolLM2-135M-Instruct with four adapters (ranks 4/8/16/32).

    python benchmarks/extract.py                      # 16 demo documents, layers 5,15,25, 1 thread
    python benchmarks/extract.py --docs 48 --layers 5,15,29 --scale 0.2

Adapters are random (``init_lora_weights=False``, lora_B scaled by 0.05 so deltas have a trained-adapter
magnitude; the cost does not depend on the values). Every measurement runs the same mixed batches
([base; r4; r8; r16; r32] rows of ``--batch-size`` documents):

- bare forward: ``peft_model(input_ids, attention_mask, adapter_names=...)``, full model incl. LM head, no hooks;
- bare truncated: the same forward cut after the deepest captured block, one hook, nothing kept (the compute
  floor of extraction);
- extract: ``lorascope.activations.extract`` end to end (capture of every layer, token selection, fp32 deltas,
  statistics, shard writes, progress files), float32 forward;
- extract bf16: the same with ``forward_dtype="bf16-autocast"``; its deltas are compared with the float32 run's
  on the same (document, position) rows.

Peak memory: the largest resident set sampled every 20 ms during the extract run, minus the resident set before
it (the model is already loaded), next to the model's parameter bytes. Times are the best of ``--reps`` runs
(bf16: one run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "activations"))


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    def __enter__(self):
        self.start = _rss_mib()
        self.peak = self.start
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mib())


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", default="5,15,25")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scale", type=float, default=0.05, help="factor applied to the random lora_B weights")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from lorascope.activations import ExtractConfig, extract
    from lorascope.activations.extract import tokenize_docs
    from lorascope.data import make_demo_dataset
    from lorascope.models import load_base
    from lorascope.models.evaluate import BASE
    from lorascope.models.lora import collate
    from lorascope.models.residual import ResidualCapture

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny-model scaffolding
    from tiny_models import random_adapters

    layers = [int(x) for x in args.layers.split(",")]
    base = load_base("embedded")
    pm = random_adapters(base.model, [4, 8, 16, 32], scale=args.scale)
    adapters = ["r4", "r8", "r16", "r32"]
    model_mib = sum(p.numel() * p.element_size() for p in base.model.parameters()) / 2**20
    examples = make_demo_dataset(args.docs, seed=1)
    tok = base.tokenizer
    docs = tokenize_docs(tok, examples, 256)
    n_tokens = sum(len(d) for d in docs)
    batches = []
    for i in range(0, len(docs), args.batch_size):
        chunk = docs[i : i + args.batch_size]
        b = collate(chunk, tok.pad_token_id)
        k = 1 + len(adapters)
        names = [BASE] * len(chunk) + [a for a in adapters for _ in chunk]
        batches.append((b["input_ids"].repeat(k, 1), b["attention_mask"].repeat(k, 1), names))

    @torch.no_grad()
    def bare():
        for ids, att, names in batches:
            pm(input_ids=ids, attention_mask=att, adapter_names=names, use_cache=False)

    floor_cap = ResidualCapture(pm, [max(layers)])

    def bare_truncated():
        for ids, att, names in batches:
            floor_cap(ids, att, names)

    work = Path(tempfile.mkdtemp(prefix="lorascope-bench-"))
    stores = {}

    def run_extract(fwd: str):
        out = work / fwd
        shutil.rmtree(out, ignore_errors=True)
        cfg = ExtractConfig(
            layers=layers, batch_size=args.batch_size, docs_per_shard=16, forward_dtype=fwd, progress=False
        )
        stores[fwd] = extract(pm, tok, examples, out, cfg)

    results = {}
    results["bare forward (full model + LM head)"] = _best(bare, args.reps)
    results["bare truncated forward"] = _best(bare_truncated, args.reps)
    with PeakRSS() as mem:
        results["extract float32"] = _best(lambda: run_extract("float32"), args.reps)
    results["extract bf16-autocast"] = _best(lambda: run_extract("bf16-autocast"), 1)  # once: for its error

    print(
        f"\nSmolLM2-135M, {len(docs)} docs, {n_tokens} tokens, layers {layers}, adapters {adapters}, "
        f"batch {args.batch_size} docs x {1 + len(adapters)} variants, {args.threads} thread(s)"
    )
    ref = results["bare forward (full model + LM head)"]
    floor = results["bare truncated forward"]
    print(f"{'run':40s} {'seconds':>9s} {'doc tok/s':>10s} {'vs bare':>8s} {'vs truncated':>13s}")
    for name, t in results.items():
        print(f"{name:40s} {t:9.2f} {n_tokens / t:10.1f} {t / ref:8.3f} {t / floor:13.3f}")
    size = sum(p.stat().st_size for p in (work / "float32").rglob("*") if p.is_file()) / 2**20
    print(f"\nrows stored: {stores['float32'].n_tokens} per (layer, variant); store size {size:.1f} MiB")
    print(
        f"memory: model parameters {model_mib:.0f} MiB; RSS before extract {mem.start:.0f} MiB, "
        f"peak during extract {mem.peak:.0f} MiB (+{mem.peak - mem.start:.0f} MiB)"
    )

    f32, b16 = stores["float32"], stores["bf16-autocast"]
    print(
        "\nbf16-autocast forward: relative error of deltas vs float32, ||Δ_bf16 − Δ_fp32|| / ||Δ_fp32|| "
        "(pooled over shared rows), and of base rows"
    )
    print(
        f"{'layer':>5s} {'adapter':>7s} {'rows':>6s} {'mean |Δ|/|h|':>13s} {'delta rel err':>14s} {'base rel err':>13s}"
    )
    for L in layers:
        for a in adapters:
            x, y = f32.held_out(L, a, split="all"), b16.held_out(L, a, split="all")
            kx = {(d, p): i for i, (d, p) in enumerate(zip(x.doc_index.tolist(), x.position.tolist(), strict=True))}
            pairs = [
                (kx[(d, p)], j)
                for j, (d, p) in enumerate(zip(y.doc_index.tolist(), y.position.tolist(), strict=True))
                if (d, p) in kx
            ]
            ix, iy = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
            dx, dy = x.delta[ix], y.delta[iy]
            err = float((dy - dx).norm() / dx.norm())
            berr = float((y.base[iy] - x.base[ix]).norm() / x.base[ix].norm())
            rel = f32.stats(L, a)["relative_norm"]["mean"]
            print(f"{L:5d} {a:>7s} {len(pairs):6d} {rel:13.4f} {err:14.4f} {berr:13.5f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
