"""Scaling out with torchrun: SAE training and extraction throughput on 1 and 2 CPU processes, and one GPU.

    python benchmarks/scale.py                 # everything below, prints one table and the ratios
    python benchmarks/scale.py --quick         # smaller sizes

Rows (tokens/s, timed inside the workers after a barrier, excluding interpreter start-up and model loading):

- SAE train: TopK d_in 512 → d_sae 4096, k 32, batch 1024, synthetic rows; 1 process × 1 thread, 1 process ×
  2 threads and torchrun 2 processes × 1 thread (data-parallel, Gloo). The two-process run holds the same global
  batches, so its tokens/s is directly comparable.
- extract: a random Llama (hidden 256, 4 blocks) with two random LoRA adapters, 64 demo documents, layers 1,3;
  1 process × 2 threads, 1 process × 1 thread, and torchrun 2 processes × 1 thread (shards split over ranks).
- GPU (when ``torch.cuda.is_available()``): single-GPU TopK d_in 2304 → d_sae 16384, k 64, batch 4096, bf16
  autocast; "no GPU" otherwise.

On a 2-core machine 2 processes can at best double 1 process × 1 thread, and compete with 1 process × 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# ---- workers (run inside torchrun or a plain process) -------------------------------------------------------------
def _sae_worker(args: argparse.Namespace) -> dict:
    from lorascope.distributed import barrier, get_rank, init_distributed
    from lorascope.saes import create_sae
    from lorascope.saes.trainer import TrainerConfig, train_sae

    init_distributed("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.d_in, generator=g)
    sae = create_sae("topk", args.d_in, args.d_sae, k=32, seed=0)
    cfg = TrainerConfig(batch_size=1024, lr=1e-3, warmup_steps=5, init_tokens=1024, log_every=10**6)
    barrier()
    t0 = time.perf_counter()
    res = train_sae(sae, x, cfg, progress=False)
    barrier()
    return {"rank": get_rank(), "seconds": time.perf_counter() - t0, "tokens": args.tokens, "fvu": res.final["fvu"]}


def _extract_worker(args: argparse.Namespace) -> dict:
    from lorascope.activations import ExtractConfig, extract
    from lorascope.data import load_dataset_spec
    from lorascope.distributed import barrier, init_distributed
    from lorascope.models import load_adapters, load_base

    info = init_distributed("cpu")
    base = load_base(args.model)
    pm = load_adapters(base, {"first": args.model + "/adapter_first", "second": args.model + "/adapter_second"})
    examples = load_dataset_spec("demo", limit=args.docs, seed=0)
    cfg = ExtractConfig(layers=[1, 3], batch_size=4, docs_per_shard=4, max_length=128, progress=False)
    barrier()
    t0 = time.perf_counter()
    store = extract(pm, base.tokenizer, examples, args.out, cfg, rank=info.rank, world_size=info.world_size)
    barrier()
    return {"rank": info.rank, "seconds": time.perf_counter() - t0, "tokens": store.manifest["counts"]["tokens"]}


def _gpu_row() -> str:
    if not torch.cuda.is_available():
        return "GPU SAE train (TopK 2304→16384, k 64, bf16): no GPU"
    from lorascope.saes import create_sae
    from lorascope.saes.trainer import TrainerConfig, train_sae

    d_in, d_sae, batch, steps = 2304, 16384, 4096, 200
    x = torch.randn(batch * steps, d_in, device="cuda")
    sae = create_sae("topk", d_in, d_sae, k=64, seed=0)
    cfg = TrainerConfig(batch_size=batch, device="cuda", autocast_dtype="bfloat16", warmup_steps=10, log_every=10**6)
    train_sae(sae, x[: batch * 20], TrainerConfig(**{**cfg.__dict__, "total_tokens": batch * 20}), progress=False)
    torch.cuda.synchronize()
    res = train_sae(create_sae("topk", d_in, d_sae, k=64, seed=0), x, cfg, progress=False)
    torch.cuda.synchronize()
    return (
        f"GPU SAE train (TopK 2304→16384, k 64, bf16, batch 4096) on {torch.cuda.get_device_name()}: "
        f"{res.final['tokens_per_s']:,.0f} tokens/s"
    )


# ---- driver ---------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(worker_args: list[str], nproc: int, threads: int) -> dict:
    """Run this file as a worker (torchrun when nproc > 1); returns the slowest rank's result."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "CUDA_VISIBLE_DEVICES": "",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT / "src"),
        }
        prefix = (
            [sys.executable]
            if nproc == 1
            else [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(nproc),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(_free_port()),
            ]
        )
        cmd = [*prefix, __file__, "--worker-json", tmp, "--threads", str(threads), *worker_args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"worker failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        results = [json.loads(p.read_text()) for p in Path(tmp).glob("rank*.json")]
    return max(results, key=lambda r: r["seconds"])


def _prepare_model(folder: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from lorascope.models.lora import save_adapter

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny-model scaffolding
    from tiny_models import build_tiny_model

    build_tiny_model("llama", folder, seed=0, hidden=256, layers=4)
    from lorascope.models import load_base

    base = load_base(folder)
    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    pm = get_peft_model(base.model, cfg, adapter_name="first")
    pm.add_adapter("second", cfg)
    for name in ("first", "second"):
        save_adapter(pm, folder / f"adapter_{name}", adapter_name=name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", choices=["sae", "extract"])
    ap.add_argument("--worker-json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=40 * 1024)
    ap.add_argument("--d-in", type=int, default=512)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--model")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        res = (_sae_worker if args.worker == "sae" else _extract_worker)(args)
        Path(args.worker_json, f"rank{res['rank']}.json").write_text(json.dumps(res))
        return
    if args.quick:
        args.tokens, args.d_sae, args.docs = 16 * 1024, 2048, 32
    rows = []
    sae_args = ["--worker", "sae", "--tokens", str(args.tokens), "--d-in", str(args.d_in), "--d-sae", str(args.d_sae)]
    for nproc, threads in ((1, 1), (1, 2), (2, 1)):
        r = _launch(sae_args, nproc, threads)
        rows.append(("SAE train", nproc, threads, r["tokens"] / r["seconds"]))
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        _prepare_model(model)
        for i, (nproc, threads) in enumerate(((1, 1), (1, 2), (2, 1))):
            r = _launch(
                [
                    "--worker",
                    "extract",
                    "--model",
                    str(model),
                    "--docs",
                    str(args.docs),
                    "--out",
                    str(Path(tmp) / f"store{i}"),
                ],
                nproc,
                threads,
            )
            rows.append(("extract", nproc, threads, r["tokens"] / r["seconds"]))
    print(f"{'task':<10} {'processes':>9} {'threads/proc':>12} {'tokens/s':>12}")
    for task, nproc, threads, tps in rows:
        print(f"{task:<10} {nproc:>9} {threads:>12} {tps:>12,.0f}")
    for task in ("SAE train", "extract"):
        t = {(n, th): v for k, n, th, v in rows if k == task}
        print(
            f"{task}: 2 procs / 1 proc×1 thread = {t[(2, 1)] / t[(1, 1)]:.2f}×; "
            f"2 procs / 1 proc×2 threads = {t[(2, 1)] / t[(1, 2)]:.2f}×"
        )
    print(_gpu_row())


if __name__ == "__main__":
    main()
