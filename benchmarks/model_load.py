"""Benchmark loading the embedded SmolLM2-135M-Instruct: fresh GGUF dequantisation vs the safetensors model cache.

    python benchmarks/model_load.py              # a throw-away cache folder; 2 cached loads
    python benchmarks/model_load.py --reps 3 --dtype bfloat16

Every load runs in a fresh Python process (as a second CLI command would), in this order:

- ``cache off``: ``LORASCOPE_CACHE=off``, transformers dequantises the GGUF (the cost every command paid before);
- ``first load``: an empty cache folder: dequantise, write the safetensors entry, read it back;
- ``cached load``: the entry exists: hash check of the GGUF (memoised) and of the entry's files, then
  ``from_pretrained(folder)``.

Each child reports the wall and CPU seconds spent in ``load_base`` and, apart, the seconds to import torch,
transformers and its Llama modules (paid by any command, cache or not; on a crowded machine they dominate).
The GGUF file's sha256 is timed once on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch, transformers  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa
from lorascope.models import load_base
t1, c1 = time.perf_counter(), time.process_time()
m = load_base("embedded", dtype=sys.argv[1])
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "load_cpu_s": c2 - c1}))
"""


def _child(cache: str, dtype: str) -> dict[str, float]:
    env = {**os.environ, "LORASCOPE_CACHE": cache, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", CHILD, dtype], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _hash_seconds() -> tuple[float, int]:
    from lorascope.io import sha256_file
    from lorascope.models import embedded_gguf_path

    path = embedded_gguf_path()
    t0 = time.perf_counter()
    sha256_file(path)
    return time.perf_counter() - t0, path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2, help="cached loads to time (default 2)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--skip-uncached", action="store_true", help="do not time the cache-off load")
    args = ap.parse_args()

    rows = []
    hash_s, size = _hash_seconds()
    with tempfile.TemporaryDirectory(prefix="lorascope-cache-bench-") as cache:
        if not args.skip_uncached:
            rows.append(("cache off (GGUF every time)", _child("off", args.dtype)))
        rows.append(("first load (builds cache)", _child(cache, args.dtype)))
        rows += [(f"cached load #{i + 1}", _child(cache, args.dtype)) for i in range(args.reps)]
        entry_mb = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file()) / 1e6
    print(
        f"embedded GGUF: {size / 1e6:.1f} MB, sha256 {hash_s:.2f} s; cache entry {entry_mb:.0f} MB; "
        f"dtype {args.dtype}; torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}"
    )
    print(f"{'load':<30} {'load_base s':>12} {'load_base cpu s':>16} {'imports s':>10}")
    for name, r in rows:
        print(f"{name:<30} {r['load_s']:>12.2f} {r['load_cpu_s']:>16.2f} {r['import_s']:>10.2f}")
    base = next((r["load_s"] for n, r in rows if n.startswith("cache off")), rows[0][1]["load_s"])
    print(
        f"speed-up of the cached load over {'cache off' if not args.skip_uncached else 'first load'}: "
        f"{base / rows[-1][1]['load_s']:.1f}x"
    )


if __name__ == "__main__":
    main()
