"""First-letter probe, feature splitting and absorption on the real SmolLM2-135M (base residuals), CPU.

1. First-letter data from the tokenizer (every alphabetic single token, or ``--max-words`` of them; 80/20 split by
   word; SAEBench few-shot prompts, ``--words-per-prefix`` words sharing one prefix whose cache is reused),
   residuals after block ``--layer`` at the word token, the 26-way probe, per-letter test F1.
2. SAE training data from the same forward passes (all positions of the train prompts, attention-sink positions
   dropped) plus the Alpaca seed tasks (/work/shared/data, benchmark only): a TopK (d_sae 4608, k 32) and a SASA
   (1152 groups x rank 4, s 8) are trained on it with lorascope's trainer.
3. Splitting / absorption of both with SAEBench's definitions (scored even if the probe is below the bar, and
   then labelled "forced").

    python benchmarks/absorption_smollm2.py --layer 12 --no-saes      # the probe over the whole vocabulary
    python benchmarks/absorption_smollm2.py --layer 12 --max-words 2000 --words-per-prefix 1   # SAEs too

CPU note (measured here, 2 shared cores): one torch thread was 3x faster than two, and bfloat16 autocast was
~10x slower than float32 (626 vs 63 tok/s for a 32x80 batch through 13 blocks), so the defaults are fp32 and
one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_seed_tasks.jsonl"


def alpaca_texts(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        for inst in rec.get("instances", []):
            out.append("\n".join(t for t in (rec["instruction"], inst.get("input", ""), inst.get("output", "")) if t))
    return out


@torch.no_grad()
def text_residuals(model, tokenizer, texts: list[str], layer: int, autocast, max_len: int = 256) -> torch.Tensor:
    from lorascope.models.residual import ResidualCapture

    cap = ResidualCapture(model, [layer])
    rows = []
    for t in texts:
        ids = torch.tensor([tokenizer(t)["input_ids"][:max_len]])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            rows.append(cap(ids)[layer][0, 1:].float())  # drop position 0 (attention sink)
    return torch.cat(rows)


def drop_sinks(x: torch.Tensor, factor: float = 10.0) -> torch.Tensor:
    norms = x.norm(dim=1)
    return x[norms < factor * norms.median()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--max-words", type=int, default=None, help="default: every alphabetic single token")
    ap.add_argument(
        "--words-per-prefix",
        type=int,
        default=64,
        help="words sharing one few-shot prefix (1 = SAEBench's own prefix per word)",
    )
    ap.add_argument("--max-icl", type=int, default=10)
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the model forward")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=1, help="passes over the SAE training rows")
    ap.add_argument("--sae-batch", type=int, default=512)
    ap.add_argument("--no-saes", action="store_true")
    ap.add_argument("--l2", type=float, default=1e-2)
    ap.add_argument("--out", type=Path, default=None, help="write absorption.csv / .json here")
    ap.add_argument(
        "--save-probe-data",
        type=Path,
        default=None,
        help="torch.save the word-token residuals, labels and words (to re-fit probes offline)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    from lorascope.evals.absorption import ProbeOptions, evaluate_absorption, prepare_probe
    from lorascope.evals.first_letter import build_first_letter_data
    from lorascope.evals.shared_prefix import build_shared_prefix_data
    from lorascope.models import load_base

    timings: dict[str, float] = {}
    t = time.time()
    base = load_base("embedded")
    timings["load model"] = time.time() - t
    tok = base.tokenizer
    t = time.time()
    if args.words_per_prefix > 1:
        data = build_shared_prefix_data(
            tok, words_per_prefix=args.words_per_prefix, max_words=args.max_words, seed=0, max_icl=args.max_icl
        )
    else:
        data = build_first_letter_data(tok, max_words=args.max_words, seed=0, max_icl=args.max_icl)
    timings["build prompts"] = time.time() - t
    t = time.time()
    collect: dict[int, torch.Tensor] = {}
    autocast = torch.bfloat16 if args.bf16 else None
    probe = prepare_probe(
        base.model,
        tok,
        args.layer,
        data=data,
        options=ProbeOptions(autocast_dtype=autocast, l2=args.l2),
        collect_train=None if args.no_saes else collect,
    )
    n_tok = sum(p + 1 for p in data.train.positions) + sum(p + 1 for p in data.test.positions)
    timings["probe data + fit"] = time.time() - t
    if args.save_probe_data is not None:
        torch.save(
            {
                "train_x": probe.train_x,
                "train_labels": probe.train_labels,
                "test_x": probe.test_x,
                "test_labels": probe.test_labels,
                "train_words": data.train.words,
                "test_words": data.test.words,
                "layer": args.layer,
            },
            args.save_probe_data,
        )
    passing = probe.letters_passing()
    print(
        f"\nSmolLM2-135M layer {args.layer}: {len(data.train)} train / {len(data.test)} test words "
        f"({len(data.dropped)} dropped: not one token in context), {n_tok} prompt tokens, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}"
    )
    counts = torch.bincount(probe.test_labels, minlength=26).tolist()
    print("letter  " + " ".join(f"{c:>5}" for c in probe.probe_f1))
    print("n_test  " + " ".join(f"{n:>5}" for n in counts))
    print("F1      " + " ".join(f"{v:5.2f}" for v in probe.probe_f1.values()))
    f1s = [v for v in probe.probe_f1.values() if v == v]
    print(f"letters with probe F1 > 0.6: {len(passing)} / 26 (need 20); mean F1 {sum(f1s) / len(f1s):.3f}")

    reports = []
    if not args.no_saes:
        from lorascope.saes import TrainerConfig, create_sae, evaluate_sae, train_sae

        t = time.time()
        fl_rows = drop_sinks(torch.cat([v[1:] for v in collect.values()]))
        alp_rows = drop_sinks(text_residuals(base.model, tok, alpaca_texts(ALPACA), args.layer, args.bf16))
        rows = torch.cat([fl_rows, alp_rows])
        g = torch.Generator().manual_seed(0)
        rows = rows[torch.randperm(rows.shape[0], generator=g)]
        held, train_rows = rows[:8192], rows[8192:]
        timings["SAE data (alpaca forward)"] = time.time() - t
        print(
            f"SAE data: {fl_rows.shape[0]} first-letter-prompt rows + {alp_rows.shape[0]} Alpaca rows; "
            f"{train_rows.shape[0]} train x {args.epochs} epochs, {held.shape[0]} held out"
        )
        stream = torch.cat([train_rows[torch.randperm(train_rows.shape[0], generator=g)] for _ in range(args.epochs)])
        meta = {"model": base.name, "layer": args.layer, "trained_on": "base"}
        specs = {
            "topk_4608_k32": ("topk", {"k": 32}),
            "sasa_1152x4_s8": ("sasa", {"groups": 1152, "rank": 4, "s": 8, "recipe": "lorascope"}),
        }
        for label, (arch, kw) in specs.items():
            t = time.time()
            sae = create_sae(arch, 576, 4608, seed=0, metadata=meta, **kw)
            train_sae(sae, stream, TrainerConfig(batch_size=args.sae_batch, seed=0), progress=False)
            ev = evaluate_sae(sae, held)
            timings[f"train {label}"] = time.time() - t
            t = time.time()
            rep = evaluate_absorption(probe, sae, label, force=True)
            timings[f"absorption {label}"] = time.time() - t
            reports.append(rep)
            print(f"{label}: held-out FVU {ev['fvu']:.3f}, L0 {ev['l0']:.1f}, dead {ev['dead']}")
        print("\nper letter (scored letters: probe F1 > 0.6 with true positives)")
        print(f"{'SAE':<16} {'letter':>6} {'F1':>5} {'TP':>4} {'split k':>7} {'absorb':>7} {'full':>6}  main latents")
        for rep in reports:
            for r in rep.letters:
                print(
                    f"{rep.sae_label:<16} {r.letter:>6} {r.probe_f1:5.2f} {r.n_true_positives:>4} "
                    f"{r.splitting_k:>7} {r.absorption_fraction:7.3f} {r.full_absorption_rate:6.3f}  "
                    f"{r.main_latents}"
                )
        print(f"\n{'SAE':<16} {'status':<8} {'letters':>7} {'absorption':>10} {'full abs':>8} {'split k':>7}")
        for rep in reports:
            print(
                f"{rep.sae_label:<16} {rep.status:<8} {len(rep.letters):>7} {rep.absorption_fraction:10.4f} "
                f"{rep.full_absorption_rate:8.4f} {rep.splitting_k:7.2f}"
                + ("  (forced: probe below the 20-letter bar)" if rep.forced else "")
            )
    print("\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    if args.out is not None:
        from dataclasses import asdict

        from lorascope.io import atomic_path, write_json
        from lorascope.results import rows_to_frame

        rows_all = [r for rep in reports for r in rep.to_rows()]
        if rows_all:
            with atomic_path(args.out / "absorption.csv") as tmp:
                rows_to_frame(rows_all).to_csv(tmp, index=False)
        write_json(
            args.out / "absorption.json",
            {
                "probe_f1": probe.probe_f1,
                "reports": [asdict(r) for r in reports],
                "timings": timings,
                "args": {k: str(v) for k, v in vars(args).items()},
            },
        )


if __name__ == "__main__":
    main()
