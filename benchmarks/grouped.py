"""Rows of several adapters: one forward per adapter (models/grouped.py) vs one PEFT mixed batch.

    python benchmarks/grouped.py [--docs 16] [--ranks 4 8 16 32] [--reps 4] [--tiny]

The extraction forward of the quickstart: SmolLM2-135M with random LoRA adapters on all linear layers (the
timing does not depend on the weights), base + adapters on the same batch of demo documents, residuals captured
at layers 6 / 14 / 22 (truncated after 22). The two ways alternate ``--reps`` times (machine load hits both
alike); the table gives the median seconds per forward, the ratio, and max |difference| of the captured rows
(0 = bitwise equal). ``--tiny`` runs a random tiny Llama instead (a smoke test, seconds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from lorascope.data import make_demo_dataset
from lorascope.models import load_base
from lorascope.models.grouped import BASE
from lorascope.models.lora import collate
from lorascope.models.residual import ResidualCapture


def _model(args: argparse.Namespace, tmp: Path):
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import build_tiny_model

        return load_base(build_tiny_model("llama", tmp / "tiny", seed=0)), [0, 1, 2]
    return load_base("embedded"), [6, 14, 22]


def _adapters(model, ranks: list[int]):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = None
    for r in ranks:
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
        if pm is None:
            pm = get_peft_model(model, cfg, adapter_name=f"rank_{r}")
        else:
            pm.add_adapter(f"rank_{r}", cfg)
    pm.eval()
    return pm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=16, help="documents per batch (the quickstart's extraction batch)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        base, layers = _model(args, Path(tmp))
        pm = _adapters(base.model, args.ranks)
        docs = make_demo_dataset(args.docs, seed=1)
        from lorascope.activations.extract import tokenize_docs

        batch = collate(tokenize_docs(base.tokenizer, docs, 96), base.tokenizer.pad_token_id)
        names = [BASE] * args.docs + [f"rank_{r}" for r in args.ranks for _ in range(args.docs)]
        ids = batch["input_ids"].repeat(1 + len(args.ranks), 1)
        att = batch["attention_mask"].repeat(1 + len(args.ranks), 1)
        caps = {g: ResidualCapture(pm, layers, grouped=g) for g in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        out = {}
        for g in (False, True):  # warm-up
            out[g] = caps[g](ids, att, names)
        for _ in range(args.reps):
            for g in (False, True):
                t = time.perf_counter()
                caps[g](ids, att, names)
                times[g].append(time.perf_counter() - t)
        diff = max(float((out[True][L] - out[False][L]).abs().max()) for L in layers)
    mixed, grouped = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"\n{'tiny Llama' if args.tiny else 'SmolLM2-135M'}: base + {len(args.ranks)} adapters, {args.docs} docs "
        f"({int(batch['attention_mask'].sum())} tokens, padded to {ids.shape[1]}), layers {layers}, "
        f"{torch.get_num_threads()} threads, median of {args.reps}"
    )
    print(f"{'PEFT mixed batch s':>19} {'grouped s':>10} {'grouped/mixed':>14} {'max |diff|':>11}")
    print(f"{mixed:>19.3f} {grouped:>10.3f} {grouped / mixed:>14.2f} {diff:>11.1e}")


if __name__ == "__main__":
    main()
