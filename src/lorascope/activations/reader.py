"""Reading an activation store: verified shard access, a seeded shuffling batch stream, held-out rows in memory.

Train / held-out split is by *document*, with the one rule of :class:`lorascope.activations.split.HeldOutSplit`
applied to each document's content hash (sha256 of its token ids, :func:`~lorascope.activations.split.content_hash`
of a ``TokenizedExample``): identical texts always land on the same side, and the split records the study stores
(lorascope.study.splits) hash documents the same way, so the mask and the records cannot disagree. No token of a
held-out document ever reaches a training batch. Documents listed in the manifest's ``split.exclude_from_eval``
(e.g. the LoRA's own training texts, recorded by the study's extraction stage) are never held out: they go to the
train split. A store without that record (older stores, CLI extractions) excludes nothing.

Batch order (:class:`ReadOrder`) for (seed, epoch): shards are permuted, grouped into windows of
``window_shards`` shards, and the rows of each window are permuted; batches are consecutive slices of that
stream. The order is a pure function of (seed, epoch, manifest), and row counts per shard are in the manifest, so
``skip_rows`` skips whole windows without reading them (for resuming a trainer mid-epoch).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from lorascope.activations.split import PREFIX, HeldOutSplit, content_hash
from lorascope.activations.store import base_key, delta_key, read_manifest
from lorascope.errors import IntegrityError, LorascopeError
from lorascope.io import read_json, sha256_file, stable_hash

KINDS = ("base", "delta", "adapted")
SPLITS = ("train", "held_out", "all")
META = ("doc_index", "position", "token_id")


@dataclass(frozen=True)
class ReadOrder:
    """How a reader orders its rows: ``seed`` and ``epoch`` fix the permutation; ``shuffle=False`` reads in store
    order; ``window_shards`` shards are mixed at a time; the first ``skip_rows`` stream rows are skipped (whole
    windows unread); ``drop_last`` drops a final short batch."""

    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    window_shards: int = 4
    skip_rows: int = 0
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.window_shards < 1 or self.skip_rows < 0:
            raise LorascopeError("window_shards must be >= 1 and skip_rows >= 0", fix="check the ReadOrder")


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

    @cached_property
    def doc_hashes(self) -> list[str]:
        """sha256 content hash of every document's token ids, in document order (the split's document identity)."""
        with safe_open(str(self.path / "docs.safetensors"), framework="pt") as fh:
            off, ids = fh.get_tensor("offsets").tolist(), fh.get_tensor("input_ids")
        return [_token_hash(ids[off[i] : off[i + 1]].tolist()) for i in range(len(off) - 1)]

    @property
    def split_record(self) -> dict:
        """The manifest's "split" record ({} for stores written before it existed)."""
        return dict(self.manifest.get("split") or {})

    @property
    def eval_exclusions(self) -> torch.Tensor:
        """bool [n_docs]: documents that may never be held out (``split.exclude_from_eval``, content-hash prefixes)."""
        excluded = set(self.split_record.get("exclude_from_eval", []))
        return torch.tensor([h[:PREFIX] in excluded for h in self.doc_hashes], dtype=torch.bool)

    def split_docs(self, split: str, holdout: HeldOutSplit | None = None) -> torch.Tensor:
        """bool [n_docs]: documents belonging to ``split`` (train, held_out or all) under ``holdout`` (default
        :class:`HeldOutSplit` ()), less the documents excluded from evaluation (they join the train split).

        Identical texts share a side (the rule hashes content). On the held-out side only the first copy of a text
        is evaluated: later copies are in neither split (in train they would leak the held-out text into SAE
        training; in held_out they would enter the document bootstrap as independent documents twice)."""
        if split not in SPLITS:
            raise LorascopeError(f"unknown split {split!r}", fix="use train, held_out or all")
        holdout = holdout or HeldOutSplit()
        hashes = self.doc_hashes
        side = torch.tensor([holdout.is_held_out(h) for h in hashes], dtype=torch.bool) & ~self.eval_exclusions
        if split == "all":
            return torch.ones_like(side)
        if split == "train":
            return ~side
        first = torch.zeros_like(side)
        first[sorted({h: i for i, h in reversed(list(enumerate(hashes)))}.values())] = True
        return side & first

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
        holdout: HeldOutSplit | None = None,
        order: ReadOrder | None = None,
        with_meta: bool = False,
    ) -> ActivationReader:
        """Stream of [n, d] float32 batches of (layer, kind, adapter) for one split of ``holdout`` (default
        :class:`HeldOutSplit` ()), in ``order`` (default :class:`ReadOrder` ()); see the module docstring."""
        self._keys(layer, kind, adapter)
        docs = self.split_docs(split, holdout)
        return ActivationReader(self, layer, kind, adapter, docs, batch_size, order or ReadOrder(), with_meta)

    def training_stream(
        self,
        layer: int,
        kind: str = "delta",
        adapter: str | None = None,
        batch_size: int = 4096,
        seed: int = 0,
        holdout: HeldOutSplit | None = None,
    ):
        """A re-openable, endless, deterministic stream of training rows: a factory whose iterators read the
        train split epoch after epoch, a new shuffle each epoch (what ``train_sae`` takes for resumable runs)."""

        def factory() -> Iterator[torch.Tensor]:
            epoch = 0
            while True:
                reader = self.reader(layer, kind, adapter, "train", batch_size, holdout, ReadOrder(seed, epoch))
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
        holdout: HeldOutSplit | None = None,
        split: str = "held_out",
    ) -> PairedRows:
        """All rows of ``split`` (default: the held-out documents of ``holdout``) at ``layer`` in store order:
        base, Δ (and adapted = base + Δ), with metadata."""
        keys = self._keys(layer, "adapted", adapter)
        docs = self.split_docs(split, holdout)
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
        order: ReadOrder,
        with_meta: bool,
    ) -> None:
        if batch_size < 1:
            raise LorascopeError(f"batch_size must be >= 1, got {batch_size}", fix="check arguments")
        self.store, self.layer, self.kind, self.adapter, self.docs = store, layer, kind, adapter, docs
        self.batch_size, self.order, self.with_meta = batch_size, order, with_meta
        self.rows_per_shard = store.split_rows(docs)
        self.n_rows = sum(self.rows_per_shard)

    @property
    def skip_rows(self) -> int:
        return self.order.skip_rows

    def __len__(self) -> int:
        n = max(self.n_rows - self.skip_rows, 0)
        return n // self.batch_size if self.order.drop_last else -(-n // self.batch_size)

    def _windows(self) -> list[list[int]]:
        o = self.order
        shards = list(range(len(self.rows_per_shard)))
        if o.shuffle:
            shards = torch.randperm(len(shards), generator=_generator(o.seed, o.epoch, "shards")).tolist()
        shards = [s for s in shards if self.rows_per_shard[s] > 0]
        return [shards[i : i + o.window_shards] for i in range(0, len(shards), o.window_shards)]

    def _load_window(self, w: int, shards: list[int]) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for s in shards:
            t = self.store._rows(s, self.layer, self.kind, self.adapter, self.with_meta)
            sel = self.docs[t["doc_index"]]
            for k, v in t.items():
                parts.setdefault(k, []).append(v[sel])
        cat = {k: torch.cat(v) for k, v in parts.items()}
        o = self.order
        if o.shuffle:
            perm = torch.randperm(cat["x"].shape[0], generator=_generator(o.seed, o.epoch, "window", w))
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
        if carry is not None and carry["x"].shape[0] and not self.order.drop_last:
            yield self._out(carry)

    def iter_from(self, row: int) -> Iterator[torch.Tensor | Batch]:
        """Batches from stream row ``row`` on (the trainer's resume protocol); skipped windows are never read."""
        clone = copy.copy(self)
        clone.order = replace(self.order, skip_rows=self.order.skip_rows + int(row))
        return iter(clone)

    def _out(self, t: dict[str, torch.Tensor]) -> torch.Tensor | Batch:
        if not self.with_meta:
            return t["x"]
        return Batch(t["x"], t["doc_index"], t["position"], t["token_id"])


def _token_hash(input_ids: list[int]) -> str:
    """The content hash of a document given by its token ids (as ``content_hash`` of a ``TokenizedExample``)."""
    return content_hash(_Tokens(input_ids))


class _Tokens(NamedTuple):
    input_ids: list[int]


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
    "ReadOrder",
    "open_store",
]
