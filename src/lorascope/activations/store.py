"""On-disk layout of an activation store, and its write side (shards, per-rank progress, final manifest).

::

    OUT/
      docs.json                    doc table: ids, token counts, response_start (doc_index = position here)
      docs.safetensors             input_ids of every document (flat int32 + offsets), for showing contexts
      shards/shard_000042.safetensors
      progress/rank000.safetensors per-rank progress: completed shards (metadata) + exact statistics state
      manifest.json                written once every shard is done (``finalize_store``)
      stats.safetensors            mean Δ and covariance spectrum per (layer, adapter), float64

A shard holds the rows of documents ``[s·S, (s+1)·S)`` (S = ``docs_per_shard``) in document order, then position
order. Tensors: ``doc_index`` int64 [N], ``position`` int32 [N], ``token_id`` int32 [N], ``base.L{l}`` [N, d]
and ``delta.L{l}.{adapter}`` [N, d] (float32 or bfloat16). We store base and Δ = h_adapted − h_base (computed in
float32 from the float32 forward) rather than base and adapted: Δ is a small difference of large vectors, so
storing it directly keeps its precision even in bfloat16 (where adapted − base would lose most of it);
``adapted`` is reconstructed as base + Δ on read.

Resume: a shard counts as done only once the rank's progress file lists it (written atomically after the
shard). Shard files that are not listed are leftovers of a killed run and are deleted and redone; the
document→shard→rank assignment is a pure function of (document order, ``docs_per_shard``, ``world_size``), so
redoing gives the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorascope.activations.stats import DeltaStats
from lorascope.errors import IntegrityError, LorascopeError
from lorascope.io import atomic_path, read_json, sha256_file, write_json

FORMAT = "lorascope-activations"
VERSION = 1
DELTA_DEFINITION = (
    "delta = h_adapted - h_base at the output of block L (residual stream, before the final norm),"
    " both rows from one PEFT mixed-batch forward, subtracted in float32; adapted = base + delta "
    "is reconstructed on read"
)
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def shard_name(index: int) -> str:
    return f"shards/shard_{index:06d}.safetensors"


def progress_name(rank: int) -> str:
    return f"progress/rank{rank:03d}.safetensors"


def base_key(layer: int) -> str:
    return f"base.L{layer}"


def delta_key(layer: int, adapter: str) -> str:
    return f"delta.L{layer}.{adapter}"


def shard_docs(index: int, docs_per_shard: int, n_docs: int) -> range:
    """Documents of shard ``index`` (pure function of document order and shard size)."""
    return range(index * docs_per_shard, min((index + 1) * docs_per_shard, n_docs))


def n_shards(n_docs: int, docs_per_shard: int) -> int:
    return (n_docs + docs_per_shard - 1) // docs_per_shard


def rank_shards(n_docs: int, docs_per_shard: int, rank: int, world_size: int) -> list[int]:
    """Shards written by ``rank`` of ``world_size`` (round-robin over shard indices)."""
    return [s for s in range(n_shards(n_docs, docs_per_shard)) if s % world_size == rank]


def _meta(obj: dict) -> dict[str, str]:
    # one key only: safetensors writes its metadata map in arbitrary order, which would change the file bytes
    return {"lorascope": json.dumps(obj, sort_keys=True)}


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> str:
    """Atomically write one shard; returns its sha256. A failure (e.g. disk full) leaves no file behind."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=_meta(metadata))
    return sha256_file(path)


def write_docs(out: Path, doc_ids: list[str], input_ids: list[list[int]], response_start: list[int]) -> None:
    lengths = [len(x) for x in input_ids]
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0)
    flat = torch.tensor([t for ids in input_ids for t in ids], dtype=torch.int32)
    with atomic_path(out / "docs.safetensors") as tmp:
        save_file(
            {"input_ids": flat, "offsets": offsets, "response_start": torch.tensor(response_start, dtype=torch.long)},
            str(tmp),
        )
    write_json(out / "docs.json", {"doc_ids": doc_ids, "n_tokens": lengths, "response_start": response_start})


class RankProgress:
    """Completed shards of one rank plus its statistics state, saved together in one atomic file."""

    def __init__(self, config_hash: str, layers: list[int], adapters: list[str], d: int) -> None:
        self.config_hash = config_hash
        self.layers, self.adapters, self.d = layers, adapters, d
        self.shards: dict[int, dict] = {}
        self.stats = {(L, a): DeltaStats(d) for L in layers for a in adapters}

    def save(self, path: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for (L, a), st in self.stats.items():
            tensors.update(st.state(f"L{L}.{a}"))
        meta = {"config_hash": self.config_hash, "shards": [self.shards[k] for k in sorted(self.shards)]}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=_meta(meta))

    @classmethod
    def load(cls, path: Path, layers: list[int], adapters: list[str], d: int) -> RankProgress:
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get("lorascope", "{}"))
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except Exception as exc:
            raise IntegrityError(
                f"progress file {path} is unreadable ({type(exc).__name__})",
                fix="delete it (its shards will be redone) and re-run",
            ) from exc
        prog = cls(meta.get("config_hash", ""), layers, adapters, d)
        prog.shards = {int(r["index"]): r for r in meta.get("shards", [])}
        prog.stats = {(L, a): DeltaStats.from_state(tensors, f"L{L}.{a}", d) for L in layers for a in adapters}
        return prog


def finalize_store(out: str | Path, config: dict, config_hash: str, world_size: int = 1) -> dict:
    """Merge every rank's progress into ``manifest.json`` + ``stats.safetensors`` once all shards are done.

    Returns the manifest. Raises if a shard is missing (some rank has not finished).
    """
    out = Path(out)
    layers, adapters, d = config["layers"], config["adapters"]["names"], config["model"]["d_model"]
    total = n_shards(config["n_docs"], config["docs_per_shard"])
    shards: dict[int, dict] = {}
    stats = {(L, a): DeltaStats(d) for L in layers for a in adapters}
    for rank in range(world_size):
        path = out / progress_name(rank)
        if not path.is_file():
            raise LorascopeError(f"rank {rank} has not written {path}", fix="finish every rank's extraction first")
        prog = RankProgress.load(path, layers, adapters, d)
        if prog.config_hash != config_hash:
            raise LorascopeError(f"{path} belongs to another extraction config", fix="use a fresh output folder")
        shards.update(prog.shards)
        for key, st in prog.stats.items():
            stats[key].merge(st)
    missing = [s for s in range(total) if s not in shards]
    if missing:
        raise LorascopeError(
            f"{len(missing)} of {total} shards are not done (first: {missing[0]})",
            fix="re-run the extraction to resume it",
        )
    records = [shards[s] for s in range(total)]
    counts: dict[str, int] = {}
    for r in records:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
    vectors = {}
    summaries: dict[str, dict[str, dict]] = {str(L): {} for L in layers}
    for (L, a), st in stats.items():
        summaries[str(L)][a] = st.summary()
        vectors.update({f"L{L}.{a}.{k}": v for k, v in st.vectors().items()})
    if vectors:
        with atomic_path(out / "stats.safetensors") as tmp:
            save_file(vectors, str(tmp))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "config": config,
        "config_hash": config_hash,
        "delta_definition": DELTA_DEFINITION,
        "n_tokens": counts.get("selected", 0),
        "counts": counts,
        "shards": records,
        "stats": summaries,
        "world_size": world_size,
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        if (path / "progress").is_dir():
            raise LorascopeError(
                f"the activation store {path} is incomplete (no manifest.json yet)",
                fix="re-run the same extract command to resume it",
            )
        raise LorascopeError(
            f"{path} is not an activation store (no manifest.json)",
            fix="point at a folder written by `lorascope extract`",
        )
    manifest = read_json(mf)
    if manifest.get("format") != FORMAT:
        raise LorascopeError(f"{mf} is not a lorascope activation manifest", fix="point at an extract output folder")
    return manifest


def missing_shards(path: str | Path, manifest: dict | None = None) -> list[str]:
    """Shard files the manifest lists but the folder lacks (a finished store is complete when this is empty)."""
    path = Path(path)
    manifest = manifest if manifest is not None else read_manifest(path)
    return [rec["file"] for rec in manifest.get("shards", []) if not (path / rec["file"]).is_file()]


__all__ = [
    "DELTA_DEFINITION",
    "STORE_DTYPES",
    "RankProgress",
    "base_key",
    "delta_key",
    "finalize_store",
    "missing_shards",
    "n_shards",
    "progress_name",
    "rank_shards",
    "read_manifest",
    "shard_docs",
    "shard_name",
    "write_docs",
    "write_shard",
]
