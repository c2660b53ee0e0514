"""One command for a CUDA machine: the study on the GPU, SAE training at Gemma-2-2B scale, and multi-GPU checks.

    python benchmarks/gpu_check.py                       # CUDA: < 8 min on one H100/H200
    python benchmarks/gpu_check.py --device cpu --tiny   # smoke test of this script (tiny model, ~30 s)

Three parts, then ONE table (stage, tok/s, fraction of the bf16 GEMM floor, wall s):

(a) study: ``lorascope run configs/quickstart.yaml --set model.device=cuda --set model.dtype=bfloat16`` (bf16 base
    model; extraction subtracts in fp32, so Δ is fp32) into a temporary folder, through the public CLI. Per-stage
    seconds come from the run's own timing record (benchmarks/study_stages.py). tok/s: adapters = training tokens
    seen; extraction = tokens through the model (documents' tokens x (1 + adapters)); SAEs = training tokens.
    ``--tiny``: the miniature study of a tiny random Llama (tests/tiny_models.py) instead.
(b) SAE training: TopK 2304 -> 16384, k 64 (Gemma-2-2B residual width) on random activations, bf16 autocast with
    fp32 weights, lorascope vs EleutherAI sparsify when it is installed (a note otherwise).
(c) with >= 2 GPUs: an NCCL all-reduce across 2 ranks under torchrun, and the suite's 2-rank torchrun tests
    (``pytest -m dist tests/distributed``; they run on gloo/CPU by design); with fewer GPUs, a note.

The floor: a [n x d] x [d x F] bf16 matmul measured on the same device. For SAE rows a token costs 4*d*F FLOPs at
the dense floor (encoder forward + encoder weight gradient; the same model as benchmarks/sae_train.py), so the
fraction is tok/s / (GEMM FLOP/s / 4dF); lorascope's sparse encoder backward can exceed 1. Other rows: "-".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny-model scaffolding (tiny_models.py)


@dataclass
class Row:
    stage: str
    wall_s: float | None = None
    tok_s: float | None = None
    floor: float | None = None
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_flops(device: torch.device, n: int, d: int, f: int, reps: int = 5) -> float:
    """FLOP/s of a bf16 [n, d] x [d, f] product on ``device`` (best of ``reps`` after one warm-up)."""
    a = torch.randn(n, d, device=device, dtype=torch.bfloat16)
    b = torch.randn(d, f, device=device, dtype=torch.bfloat16)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n * d * f / best


# ---- (a) the study ------------------------------------------------------------------------------------------------
def _study_config(tiny: bool, device: str, work: Path) -> tuple[Path, list[str]]:
    """(config path, --set overrides) for the study part."""
    if not tiny:
        return ROOT / "configs" / "quickstart.yaml", [f"model.device={device}", "model.dtype=bfloat16"]
    import yaml

    from tiny_models import build_tiny_model, miniature_study_config

    model_dir = build_tiny_model("llama", work / "tiny_llama", seed=0)
    cfg = miniature_study_config(model_dir, work / "study")
    path = work / "tiny_study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, [f"model.device={device}"]


def _stage_tokens(out: Path) -> dict[str, float]:
    """Tokens each stage processed, read from the run folder (see module docstring)."""
    cfg = json.loads((out / "config.json").read_text())
    tokens: dict[str, float] = {}
    seen = [json.loads(p.read_text()).get("info", {}).get("tokens_seen", 0) for p in out.glob("adapters/*/done.json")]
    if seen:
        tokens["adapters"] = float(sum(seen))
    docs = sorted(out.glob("activations/*/store/docs.json"))
    if docs:
        n_adapters = len(list(out.glob("adapters/*/done.json"))) + len(cfg["adapters"].get("load") or {})
        tokens["extraction"] = float(sum(json.loads(docs[0].read_text())["n_tokens"]) * (1 + n_adapters))
    sae_tokens = 0
    for p in out.glob("saes/*/done.json"):
        kind = "reference_sae" if "reference" in p.parent.name else "adapter_sae"
        sae_tokens += int(cfg[kind]["tokens"])
    if sae_tokens:
        tokens["saes"] = float(sae_tokens)
    return tokens


def _sae_flops_per_token(out: Path) -> float:
    """4*d*F of the run's adapter SAEs (the dense floor's FLOPs per training token)."""
    saved = sorted(p for p in out.glob("saes/*/sae/cfg.json") if "reference" not in p.parent.parent.name)
    if not saved:
        return float("nan")
    c = json.loads(saved[0].read_text())
    return 4.0 * int(c["d_in"]) * int(c["d_sae"])


def study_rows(tiny: bool, device: str, work: Path, timeout: float, floor_flops: float) -> list[Row]:
    from study_stages import read_stage_seconds

    config, overrides = _study_config(tiny, device, work)
    out = work / "study"
    cmd = [sys.executable, "-m", "lorascope", "run", str(config), "--out", str(out), "--quiet"]
    for s in overrides:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        failed = proc.returncode != 0
        why = (proc.stderr.strip().splitlines() or ["(no output)"])[-1] if failed else ""
    except subprocess.TimeoutExpired:
        failed, why = True, f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    rows = []
    try:
        rec = read_stage_seconds(out)
    except SystemExit:
        rec = {"stages": {}}
    tokens = _stage_tokens(out) if (out / "config.json").is_file() else {}
    sae_fpt = _sae_flops_per_token(out) if "saes" in rec["stages"] else float("nan")
    for stage, sec in rec["stages"].items():
        tps = tokens[stage] / sec if stage in tokens and sec > 0 else None
        frac = tps * sae_fpt / floor_flops if stage == "saes" and tps else None
        rows.append(Row(f"study: {stage}", sec, tps, frac))
    rows.append(
        Row(
            "study: whole run (process wall)",
            wall,
            note=f"FAILED: {why}" if failed else ("tiny model" if tiny else "quickstart, bf16 base"),
        )
    )
    return rows


# ---- (b) SAE training ---------------------------------------------------------------------------------------------
def _lorascope_step(d: int, f: int, k: int, device: torch.device):
    from lorascope.saes import create_sae
    from lorascope.saes.base import TrainContext

    sae = create_sae("topk", d, f, k=k, seed=0).to(device)
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=4e-4)
    dead = torch.zeros(f, dtype=torch.bool, device=device)

    def step(x):
        out = sae.training_loss(x, TrainContext(0, 1, 1.0, dead))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.post_step()

    return step


def _sparsify_step(d: int, f: int, k: int, device: torch.device):
    from sparsify import SaeConfig, SparseCoder

    sae = SparseCoder(d, SaeConfig(num_latents=f, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=4e-4)
    dead = torch.zeros(f, dtype=torch.bool, device=device)

    def step(x):
        out = sae(x, dead_mask=dead)
        opt.zero_grad(set_to_none=True)
        (out.fvu + out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    return step


def sae_rows(device: torch.device, tiny: bool, floor_flops: float) -> list[Row]:
    d, f, k, n, steps = (64, 256, 8, 256, 3) if tiny else (2304, 16384, 64, 4096, 20)
    g = torch.Generator(device=device).manual_seed(0)
    data = [torch.randn(n, d, device=device, generator=g) for _ in range(steps + 2)]
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    rows = []
    for name, make in (("lorascope", _lorascope_step), ("sparsify", _sparsify_step)):
        label = f"SAE {d}->{f} k{k} {name}"
        try:
            step = make(d, f, k, device)
        except ImportError:
            rows.append(Row(label, note="sparsify not installed (pip install eai-sparsify): skipped"))
            continue
        times = []
        for i, x in enumerate(data):
            _sync(device)
            t = time.perf_counter()
            with amp:
                step(x)
            _sync(device)
            if i >= 2:  # two warm-up steps
                times.append(time.perf_counter() - t)
        tps = n / statistics.median(times)
        rows.append(
            Row(
                label,
                sum(times),
                tps,
                tps * 4 * d * f / floor_flops,
                f"bf16 autocast, batch {n}, median of {len(times)} steps",
            )
        )
    return rows


# ---- (c) multi-GPU ------------------------------------------------------------------------------------------------
NCCL_WORKER = """
import os, torch, torch.distributed as dist
dist.init_process_group("nccl")
r = dist.get_rank()
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
x = torch.full((1 << 20,), float(r + 1), device="cuda")
dist.all_reduce(x)
assert torch.all(x == 3.0), x[:4]
dist.destroy_process_group()
"""


def dist_rows(device: torch.device, work: Path, timeout: float) -> list[Row]:
    n_gpu = torch.cuda.device_count() if device.type == "cuda" else 0
    if n_gpu < 2:
        return [Row("2-rank torchrun (NCCL)", note=f"{n_gpu} GPU(s): needs >= 2, skipped")]
    worker = work / "nccl_worker.py"
    worker.write_text(NCCL_WORKER)
    rows = []
    for label, cmd in (
        (
            "NCCL all-reduce, 2 ranks",
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker)],
        ),
        (
            "pytest -m dist tests/distributed",
            [sys.executable, "-m", "pytest", "-q", "-m", "dist", str(ROOT / "tests" / "distributed")],
        ),
    ):
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
            note = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}): {tail[0][:80]}"
        except subprocess.TimeoutExpired:
            note = f"FAILED: timed out after {timeout:.0f} s"
        rows.append(Row(label, time.perf_counter() - t0, note=note))
    return rows


def format_table(rows: list[Row]) -> str:
    def cell(v, fmt):
        return format(v, fmt) if v is not None else "-"

    head = f"{'stage':<44} {'tok/s':>12} {'of bf16 floor':>14} {'wall s':>9}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.stage:<44} {cell(r.tok_s, ',.0f'):>12} {cell(r.floor, '.1%'):>14} {cell(r.wall_s, '.1f'):>9}  {r.note}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny model and SAE: a smoke test of this script")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: study,sae,dist")
    ap.add_argument("--study-timeout", type=float, default=330.0, help="seconds before the study is stopped")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible; fix: run on a CUDA machine, or pass --device cpu --tiny")
        return 2
    skip = set(filter(None, args.skip.split(",")))
    d, f, n = (64, 256, 256) if args.tiny else (2304, 16384, 8192)
    floor = gemm_flops(device, n, d, f)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = [Row(f"bf16 GEMM [{n}x{d}]x[{d}x{f}]", note=f"{floor / 1e12:.2f} TFLOP/s on {name}")]
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorascope-gpu-check-") as tmp:
        work = Path(tmp)
        if "study" not in skip:
            rows += study_rows(args.tiny, args.device, work, args.study_timeout, floor)
        if "sae" not in skip:
            rows += sae_rows(device, args.tiny, floor)
        if "dist" not in skip:
            rows += dist_rows(device, work, timeout=150.0)
    rows.append(Row("gpu_check total", time.perf_counter() - t_all))
    print(format_table(rows))
    return 1 if any(r.note.startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
