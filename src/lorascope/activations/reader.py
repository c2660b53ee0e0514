"""Reading an activation store: verified shard access, a seeded shuffling batch stream, held-out rows in memory.

Train / held-out split is by *document*: a document is held out when sha256(f"{split_seed}:{doc_id}") falls
below ``held_out_fraction`` (the rule of ``lorascope.data.split_examples``, so it agrees with how examples are
split elsewhere), so no token of a held-out document ever reaches a training batch.

Batch order for (seed, epoch): shards are permuted, grouped into windows of ``window_shards`` shards, and the
rows of each window are permuted; batches are consecutive slices of that stream. The order is a pure function of
(seed, epoch, manifest), and row counts per shard are in the manifest, so ``skip_rows`` skips whole windows
without reading them (for resuming a trainer mid-epoch).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from lorascope.activations.store import base_key, delta_key, read_manifest
from lorascope.errors import IntegrityError, LorascopeError
from lorascope.io import read_json, sha256_file, stable_hash

KINDS = ("base", "delta", "adapted")
SPLITS = ("train", "held_out", "all")
META = ("doc_index", "position", "token_id")


def held_out_mask(doc_ids: Sequence[str], fraction: float, seed: int = 0) -> torch.Tensor:
    """bool [n_docs]: True for held-out documents (same hash rule as ``lorascope.data.split_examples``)."""
    if not 0 <= fraction < 1:
        raise LorascopeError(f"held_out_fraction must be in [0, 1), got {fraction}", fix="e.g. 0.1")
    return torch.tensor(
        [int(hashlib.sha256(f"{seed}:{d}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction for d in doc_ids],
        dtype=torch.bool,
    )


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(int(stable_hash(list(parts)), 16) & ((1 << 63) - 1))


class Batch(NamedTuple):
    x: torch.Tensor  # [n, d] float32
    doc_index: torch.Tensor  # [n] int64
    position: torch.Tensor  # [n] int64
    token_id: torch.Tensor  # [n] int64


@dataclass
class PairedRows:
    """All rows of one split at one layer, base and Δ paired row by row (same order as the metadata)."""

    base: torch.Tensor  # [N, d] float32
    delta: torch.Tensor  # [N, d] float32
    doc_index: torch.Tensor
    position: torch.Tensor
    token_id: torch.Tensor

    @property
    def adapted(self) -> torch.Tensor:
        return self.base + self.delta


class ActivationStore:
    """An opened store: ``manifest``, ``layers``, ``adapters``, ``d_model``, ``n_tokens``; see module docstring."""

    def __init__(self, path: str | Path, verify: str = "lazy") -> None:
        if verify not in ("lazy", "open", "none"):
            raise LorascopeError(f"unknown verify mode {verify!r}", fix="use lazy, open or none")
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        cfg = self.manifest["config"]
        self.layers: list[int] = list(cfg["layers"])
        self.adapters: list[str] = list(cfg["adapters"]["names"])
        self.d_model: int = int(cfg["model"]["d_model"])
        self.n_tokens: int = int(self.manifest["n_tokens"])
        self.shards: list[dict] = self.manifest["shards"]
        self._verify = verify
        self._verified: set[int] = set()
        self._docs: dict | None = None
        if verify == "open":
            for i in range(len(self.shards)):
                self._check(i)

    # ---- shard access -------------------------------------------------------------------------------------
    def _check(self, i: int) -> Path:
        rec = self.shards[i]
        path = self.path / rec["file"]
        if not path.is_file():
            raise IntegrityError(f"shard file {path} is missing", fix="re-run the extraction into a fresh folder")
        if self._verify != "none" and i not in self._verified:
            if sha256_file(path) != rec["sha256"]:
                raise IntegrityError(
                    f"checksum mismatch in {path} (file is corrupted or was modified)",
                    fix="delete the store and re-run the extraction",
                )
            self._verified.add(i)
        return path

    def _keys(self, layer: int, kind: str, adapter: str | None) -> list[str]:
        if layer not in self.layers:
            raise LorascopeError(f"layer {layer} is not in this store", fix=f"choose one of {self.layers}")
        if kind not in KINDS:
            raise LorascopeError(f"unknown kind {kind!r}", fix="use base, delta or adapted")
        if kind == "base":
            return [base_key(layer)]
        if adapter is None and len(self.adapters) == 1:
            adapter = self.adapters[0]
        if adapter not in self.adapters:
            raise LorascopeError(f"adapter {adapter!r} is not in this store", fix=f"choose one of {self.adapters}")
        return [delta_key(layer, adapter)] if kind == "delta" else [base_key(layer), delta_key(layer, adapter)]

    def load_shard(self, i: int, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tensors ``keys`` of shard ``i`` (checksum verified on first access unless verify='none')."""
        path = self._check(i)
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in keys}

    def _rows(self, i: int, layer: int, kind: str, adapter: str | None, meta: bool) -> dict[str, torch.Tensor]:
        keys = self._keys(layer, kind, adapter)
        t = self.load_shard(i, keys + (list(META) if meta else ["doc_index"]))
        x = t[keys[0]].float()
        if kind == "adapted":
            x = x + t[keys[1]].float()
        out = {"x": x, "doc_index": t["doc_index"].long()}
        if meta:
            out.update(position=t["position"].long(), token_id=t["token_id"].long())
        return out

    # ---- documents ----------------------------------------------------------------------------------------
    @property
    def doc_ids(self) -> list[str]:
        if self._docs is None:
            self._docs = read_json(self.path / "docs.json")
        return self._docs["doc_ids"]

    def doc_tokens(self, doc_index: int) -> list[int]:
        """Token ids of document ``doc_index`` (all positions, for showing contexts)."""
        with safe_open(str(self.path / "docs.safetensors"), framework="pt") as fh:
            off = fh.get_tensor("offsets")
            return fh.get_slice("input_ids")[int(off[doc_index]) : int(off[doc_index + 1])].tolist()

    def split_docs(self, split: str, held_out_fraction: float, split_seed: int) -> torch.Tensor:
        """bool [n_docs]: documents belonging to ``split``."""
        if split not in SPLITS:
            raise LorascopeError(f"unknown split {split!r}", fix="use train, held_out or all")
        held = held_out_mask(self.doc_ids, held_out_fraction, split_seed)
        return torch.ones_like(held) if split == "all" else (held if split == "held_out" else ~held)

    def split_rows(self, docs_mask: torch.Tensor) -> list[int]:
        """Rows per shard that belong to the documents in ``docs_mask`` (from the manifest, no shard reads)."""
        out = []
        for rec in self.shards:
            lo, hi = rec["docs"]
            out.append(sum(n for n, keep in zip(rec["rows_per_doc"], docs_mask[lo:hi].tolist(), strict=True) if keep))
        return out

    # ---- public reading API -------------------------------------------------------------------------------
    def reader(
        self,
        layer: int,
        kind: str = "delta",
        adapter: str | None = None,
        split: str = "train",
        batch_size: int = 4096,
        seed: int = 0,
        epoch: int = 0,
        held_out_fraction: float = 0.1,
        split_seed: int = 0,
        shuffle: bool = True,
        window_shards: int = 4,
        skip_rows: int = 0,
        drop_last: bool = False,
        with_meta: bool = False,
    ) -> ActivationReader:
        """Stream of [n, d] float32 batches of (layer, kind, adapter) for one split (see module docstring)."""
        self._keys(layer, kind, adapter)
        return ActivationReader(
            self,
            layer,
            kind,
            adapter,
            self.split_docs(split, held_out_fraction, split_seed),
            batch_size,
            seed,
            epoch,
            shuffle,
            window_shards,
            skip_rows,
            drop_last,
            with_meta,
        )

    def training_stream(
        self,
        layer: int,
        kind: str = "delta",
        adapter: str | None = None,
        batch_size: int = 4096,
        seed: int = 0,
        held_out_fraction: float = 0.1,
        split_seed: int = 0,
    ):
        """A re-openable, endless, deterministic stream of training rows: a factory whose iterators read the
        train split epoch after epoch, a new shuffle each epoch (what ``train_sae`` takes for resumable runs)."""

        def factory() -> Iterator[torch.Tensor]:
            epoch = 0
            while True:
                reader = self.reader(
                    layer,
                    kind=kind,
                    adapter=adapter,
                    split="train",
                    batch_size=batch_size,
                    seed=seed,
                    epoch=epoch,
                    held_out_fraction=held_out_fraction,
                    split_seed=split_seed,
                )
                if len(reader) == 0:
                    raise LorascopeError(
                        f"no training tokens at layer {layer}",
                        fix="extract more documents or lower the held-out fraction",
                    )
                yield from reader
                epoch += 1

        return factory

    def held_out(
        self,
        layer: int,
        adapter: str | None = None,
        held_out_fraction: float = 0.1,
        split_seed: int = 0,
        split: str = "held_out",
    ) -> PairedRows:
        """All rows of ``split`` at ``layer`` in store order: base, Δ (and adapted = base + Δ), with metadata."""
        keys = self._keys(layer, "adapted", adapter)
        docs = self.split_docs(split, held_out_fraction, split_seed)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("base", "delta", *META)}
        for i, n in enumerate(self.split_rows(docs)):
            if n == 0:
                continue
            t = self.load_shard(i, [*keys, *META])
            sel = docs[t["doc_index"]]
            parts["base"].append(t[keys[0]][sel].float())
            parts["delta"].append(t[keys[1]][sel].float())
            for k in META:
                parts[k].append(t[k][sel].long())
        if not parts["base"]:
            empty = torch.zeros(0, self.d_model)
            return PairedRows(empty, empty.clone(), *(torch.zeros(0, dtype=torch.long) for _ in META))
        return PairedRows(*(torch.cat(parts[k]) for k in ("base", "delta", *META)))

    def stats(self, layer: int, adapter: str | None = None) -> dict:
        """Summary statistics of Δ at (layer, adapter) computed during extraction (see activations.stats)."""
        keys = self._keys(layer, "delta", adapter)
        adapter = keys[0].split(".", 2)[2]
        return self.manifest["stats"][str(layer)][adapter]

    def stat_vectors(self, layer: int, adapter: str | None = None) -> dict[str, torch.Tensor]:
        """Mean Δ [d] and Δ covariance eigenvalues [d] (descending), float64."""
        adapter = self._keys(layer, "delta", adapter)[0].split(".", 2)[2]
        path = self.path / "stats.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            return {
                k.rsplit(".", 1)[1]: fh.get_tensor(k)
                for k in fh.keys()  # noqa: SIM118
                if k.startswith(f"L{layer}.{adapter}.")
            }


class ActivationReader:
    """Iterable of batches; deterministic for (seed, epoch). ``len()`` = number of batches."""

    def __init__(
        self,
        store: ActivationStore,
        layer: int,
        kind: str,
        adapter: str | None,
        docs: torch.Tensor,
        batch_size: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        window_shards: int,
        skip_rows: int,
        drop_last: bool,
        with_meta: bool,
    ) -> None:
        if batch_size < 1 or window_shards < 1 or skip_rows < 0:
            raise LorascopeError("batch_size and window_shards must be >= 1, skip_rows >= 0", fix="check arguments")
        self.store, self.layer, self.kind, self.adapter, self.docs = store, layer, kind, adapter, docs
        self.batch_size, self.seed, self.epoch, self.shuffle = batch_size, seed, epoch, shuffle
        self.window_shards, self.skip_rows = window_shards, skip_rows
        self.drop_last, self.with_meta = drop_last, with_meta
        self.rows_per_shard = store.split_rows(docs)
        self.n_rows = sum(self.rows_per_shard)

    def __len__(self) -> int:
        n = max(self.n_rows - self.skip_rows, 0)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _windows(self) -> list[list[int]]:
        order = list(range(len(self.rows_per_shard)))
        if self.shuffle:
            order = torch.randperm(len(order), generator=_generator(self.seed, self.epoch, "shards")).tolist()
        order = [s for s in order if self.rows_per_shard[s] > 0]
        return [order[i : i + self.window_shards] for i in range(0, len(order), self.window_shards)]

    def _load_window(self, w: int, shards: list[int]) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for s in shards:
            t = self.store._rows(s, self.layer, self.kind, self.adapter, self.with_meta)
            sel = self.docs[t["doc_index"]]
            for k, v in t.items():
                parts.setdefault(k, []).append(v[sel])
        cat = {k: torch.cat(v) for k, v in parts.items()}
        if self.shuffle:
            perm = torch.randperm(cat["x"].shape[0], generator=_generator(self.seed, self.epoch, "window", w))
            cat = {k: v[perm] for k, v in cat.items()}
        return cat

    def __iter__(self) -> Iterator[torch.Tensor | Batch]:
        skip = self.skip_rows
        carry: dict[str, torch.Tensor] | None = None
        for w, shards in enumerate(self._windows()):
            n_w = sum(self.rows_per_shard[s] for s in shards)
            if skip >= n_w:
                skip -= n_w
                continue
            cur = {k: v[skip:] for k, v in self._load_window(w, shards).items()}
            skip = 0
            if carry is not None:
                cur = {k: torch.cat([carry[k], cur[k]]) for k in cur}
            n = cur["x"].shape[0]
            full = n - n % self.batch_size
            for i in range(0, full, self.batch_size):
                yield self._out({k: v[i : i + self.batch_size] for k, v in cur.items()})
            carry = {k: v[full:] for k, v in cur.items()}
        if carry is not None and carry["x"].shape[0] and not self.drop_last:
            yield self._out(carry)

    def iter_from(self, row: int) -> Iterator[torch.Tensor | Batch]:
        """Batches from stream row ``row`` on (the trainer's resume protocol); skipped windows are never read."""
        clone = copy.copy(self)
        clone.skip_rows = self.skip_rows + int(row)
        return iter(clone)

    def _out(self, t: dict[str, torch.Tensor]) -> torch.Tensor | Batch:
        if not self.with_meta:
            return t["x"]
        return Batch(t["x"], t["doc_index"], t["position"], t["token_id"])


def open_store(path: str | Path, verify: str = "lazy") -> ActivationStore:
    """Open a finished store; ``verify``: 'lazy' (sha256 per shard on first read), 'open' (all now) or 'none'."""
    return ActivationStore(path, verify)


__all__ = [
    "KINDS",
    "SPLITS",
    "ActivationReader",
    "ActivationStore",
    "Batch",
    "PairedRows",
    "held_out_mask",
    "open_store",
]
