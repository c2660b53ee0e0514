"""Peak resident memory of a role-play-sized study, end to end (issue: "a study of that size under 4 GB").

    python benchmarks/memory_study.py --data ../shared/data/alpaca_seed_tasks.jsonl --out runs/memory_study
    python benchmarks/memory_study.py --config configs/quickstart.yaml --out runs/memory_quickstart   # any study

The study: SmolLM2-135M-Instruct (embedded), LoRA adapters at ranks 4/8/16 fine-tuned on up to 160 instruction
documents, Δ extracted on the same 160 documents at max length 192 at two layers, then every later stage of
``lorascope run`` (SAEs, density, geometry with the splice test, "What the adapter changed", report) with the
quickstart's settings. The data is any instruction file lorascope reads; the Alpaca seed tasks (Wang et al. 2022,
"Self-Instruct", 175 tasks, https://github.com/yizhongw/self-instruct) are the intended input.

The study runs as a child process (``python -m lorascope run``). Two peaks: ``ru_maxrss`` of the children, the
largest single process, as ``/usr/bin/time -v`` reports it; and the largest sum of the resident sets of the whole
process tree (the study and its LoRA training / figure workers, which run side by side, each holding what it
needs), sampled from ``/proc`` every 0.2 s — what the machine must have. Prints one table: wall seconds, both
peaks, and the run's per-stage seconds from ``timings.json``. Linux only (``/proc``). Run it on a quiet machine if
the seconds matter; the memory does not depend on load.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

STUDY = {
    "name": "memory-roleplay-sized",
    "seed": 0,
    "model": {"spec": "embedded", "dtype": "float32"},
    "data": {"n_finetune": 160, "n_docs": 160, "held_out_fraction": 0.3, "max_length": 192},
    "adapters": {"train": {"ranks": [4, 8, 16], "steps": 12, "lr": 0.004, "batch_size": 4}},
    "extraction": {"layers": [14, 22], "tokens": "all", "skip_first": 1, "batch_size": 16},
    "adapter_sae": {"expansion": 4, "k": 16, "tokens": 40000, "batch_size": 512, "lr": 0.01, "seeds": [0, 1]},
    "reference_sae": {"expansion": 4, "k": 16, "tokens": 40000, "batch_size": 512, "lr": 0.01},
    "geometry": {"bootstrap": 200, "splice": True, "splice_docs": 8},
    "density": {"enabled": True, "tokens": 20000},
    "explain": {"layer": 22},
}


def _tree_rss_kb(root: int) -> int:
    """Sum of VmRSS (kB) of ``root`` and all its descendants, read from /proc (processes may vanish meanwhile)."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        parent[int(d.name)] = int(fields.get("PPid", "0").strip())
        rss[int(d.name)] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += [c for c, p in parent.items() if p == pid]
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--data", help="instruction data (Alpaca JSON/JSONL, chat JSONL, ...) for the role-play-sized study"
    )
    what.add_argument("--config", help="measure this study config instead (its output_dir is replaced by OUT/study)")
    ap.add_argument("--out", default="runs/memory_study", help="output folder of the study (created fresh)")
    ap.add_argument(
        "--workers", type=int, default=None, help="adapters.train.workers (default: unset, one training process)"
    )
    args = ap.parse_args(argv)

    source = Path(args.data or args.config)
    if not source.is_file():
        print(f"error: no file {source}; pass --data PATH (instruction data) or --config PATH", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; pass a new --out so the run starts fresh", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if args.config:
        study = yaml.safe_load(source.read_text())
    else:
        study = copy.deepcopy(STUDY)
        study["data"]["finetune"] = str(source.resolve())
        study["data"]["activations"] = str(source.resolve())
    study["output_dir"] = str(out.resolve() / "study")
    if args.workers is not None:
        study.setdefault("adapters", {}).setdefault("train", {})["workers"] = args.workers
    config = out / "study.yaml"
    config.write_text(yaml.safe_dump(study, sort_keys=False))

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lorascope", "run", str(config)], env=dict(os.environ))
    samples: list[tuple[float, int]] = []  # (seconds since start, tree RSS kB)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            samples.append((time.perf_counter() - t0, _tree_rss_kb(proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        proc.wait()
    except KeyboardInterrupt:  # the study got the Ctrl-C too (same process group) and stops at a resumable point
        proc.wait()
        print(f"interrupted: {out} holds a partial run; measure again with a new --out", file=sys.stderr)
        return 130
    finally:
        done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kB on Linux
    if proc.returncode != 0:
        print(f"error: the study exited with {proc.returncode}", file=sys.stderr)
        return proc.returncode

    timings = json.loads((out / "study" / "timings.json").read_text())
    print(f"\n| quantity | value |\n|---|---|\n| wall | {wall:.0f} s |")
    print(f"| peak RSS (largest process) | {peak_kb:,} kB ({peak_kb / 2**20:.2f} GiB) |")
    tree = max((kb for _, kb in samples), default=0)
    print(f"| peak RSS (sum over the process tree, 0.2-s samples) | {tree:,} kB ({tree / 2**20:.2f} GiB) |")
    with open(out / "rss.csv", "w") as fh:
        fh.write("seconds,tree_rss_kb\n" + "".join(f"{t:.1f},{kb}\n" for t, kb in samples))
    # stages in the order the study runs them (model loads happen inside the first stage that needs the model
    # and are counted apart, so the bounds are approximate); the run's start-up precedes the first
    order = ["model_load", "adapters", "extraction", "saes", "geometry", "explain", "density", "report"]
    got = timings.get("stages", {})
    stages = [(k, got[k]) for k in order if k in got] + [(k, v) for k, v in got.items() if k not in order]
    end = wall - float(timings.get("total") or sum(sec for _, sec in stages))
    print("\n| stage | seconds | peak tree RSS (approx.: stage bounds from timings.json) |\n|---|---|---|")
    for stage, sec in stages:
        start, end = end, end + float(sec)
        peak = max((kb for t, kb in samples if start <= t < end), default=0)
        print(f"| {stage} | {sec:.0f} | {peak / 2**20:.2f} GiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
