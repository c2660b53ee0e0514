"""Peak memory of full-fine-tune Δ extraction: one model resident at a time vs base and fine-tune together.

    python benchmarks/full_finetune_memory.py                 # a 16-block, width-512 Llama (~190 MB in fp32)
    python benchmarks/full_finetune_memory.py --layers 12 --hidden 768

Builds a random Llama (the word-level test tokenizer) and a "fine-tune" of it (every weight moved by seeded noise),
saves both, then runs ``lorascope.activations.full.extract_full`` once per mode, each in a fresh subprocess so the
peak resident set (``ru_maxrss``) belongs to that mode alone. Printed per mode: peak RSS, the parameter bytes of
the models alive at once (weak-reference accounting inside extract_full), and the model's own size. The RSS
includes the interpreter and torch (the "baseline" row: the same subprocess loading one model and exiting).

Measured here (2 shared CPU cores, defaults: 147 MB of parameters per model, 32 documents, 2 layers):
baseline 587 MB, one 639 MB (1 model alive), both 804 MB (2 models alive): "one" stays 52 MB above one loaded
model, "both" adds about a second copy (+165 MB).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def build(root: Path, layers: int, hidden: int) -> tuple[Path, Path]:
    from lorascope.models import load_base

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny-model scaffolding
    from tiny_models import build_tiny_model

    base = build_tiny_model("llama", root / "base", seed=0, hidden=hidden, layers=layers)
    m = load_base(base)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    m.model.save_pretrained(root / "ft")
    m.tokenizer.save_pretrained(root / "ft")
    return base, root / "ft"


def child(mode: str, base: str, ft: str, out: str, layers: int) -> None:
    from lorascope.activations import ExtractConfig
    from lorascope.activations.full import extract_full
    from lorascope.data import make_demo_dataset
    from lorascope.models.tokenizer import load_tokenizer

    tok = load_tokenizer(base)
    result = {"mode": mode}
    if mode == "baseline":
        from lorascope.models import load_base

        load_base(base)
    else:
        cfg = ExtractConfig(layers=[layers // 2, layers - 1], batch_size=8, docs_per_shard=16, progress=False)
        res = extract_full(base, {"ft": ft}, tok, make_demo_dataset(32, seed=0), out, cfg, resident=mode)
        result.update(
            peak_param_bytes=res.peak_param_bytes,
            peak_models=res.peak_models,
            model_bytes=res.model_param_bytes["base"],
            rows=res.store.n_tokens,
        )
    result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, base, ft, out, layers = args.child
        return child(mode, base, ft, out, int(layers))
    with tempfile.TemporaryDirectory() as tmp:
        base, ft = build(Path(tmp), args.layers, args.hidden)
        rows = []
        for mode in ("baseline", "one", "both"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                str(base),
                str(ft),
                f"{tmp}/store_{mode}",
                str(args.layers),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    mb = 1 / 2**20
    print(f"{'mode':<10}{'peak RSS MB':>13}{'models alive':>14}{'param MB alive':>16}{'one model MB':>14}")
    for r in rows:
        print(
            f"{r['mode']:<10}{r['max_rss_bytes'] * mb:>13.0f}{r.get('peak_models', 1):>14}"
            f"{r.get('peak_param_bytes', 0) * mb:>16.0f}{r.get('model_bytes', 0) * mb:>14.0f}"
        )


if __name__ == "__main__":
    main()
