"""Extract base and delta residual-stream activations for several adapters in one mixed-batch forward per batch.

Every batch of ``batch_size`` documents runs once as ``[base rows; adapter-1 rows; …]`` through the PeftModel
(``adapter_names`` per row), truncated after the deepest captured layer. Rows are selected by
:mod:`lorascope.activations.tokens`, Δ = adapted − base is taken in float32, statistics are accumulated, and
each group of ``docs_per_shard`` documents becomes one atomically written shard (see
:mod:`lorascope.activations.store` for the layout and the resume rule).

Distributed: ``rank``/``world_size`` select the shards this process writes (round-robin); every rank writes its
own progress file, and ``finalize_store`` merges them once all ranks are done. Under ``torchrun`` (a running
``torch.distributed`` process group of ``world_size`` ranks) ``extract`` does it all: rank 0 prepares the folder,
every rank writes its shards, and after a barrier rank 0 merges the manifest; every rank returns the store.
Ranks started separately (no process group) return None; run :func:`finalize_extraction` once all are done.
Shard contents do not depend on ``world_size``: a 4-rank store holds the same bytes as a 1-rank one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorascope.activations.reader import ActivationStore, open_store
from lorascope.activations.store import (
    STORE_DTYPES,
    RankProgress,
    base_key,
    delta_key,
    finalize_store,
    progress_name,
    rank_shards,
    shard_docs,
    shard_name,
    write_docs,
    write_shard,
)
from lorascope.activations.template import pad_masks
from lorascope.activations.tokens import TokenSelection, select_positions
from lorascope.data.chat import LENGTH_POLICIES, TokenizedExample, tokenize_examples
from lorascope.data.examples import Example
from lorascope.errors import IntegrityError, LorascopeError
from lorascope.io import TMP_PREFIX, OutputLock, clean_tmp_files, read_json, stable_hash, write_json
from lorascope.models.evaluate import BASE
from lorascope.models.lora import collate
from lorascope.models.residual import ResidualCapture, check_layers, unwrap_model

FORWARD_DTYPES = ("float32", "bf16-autocast")
RUN_CONFIG = "progress/config.json"


@dataclass
class ExtractConfig:
    """Settings of one extraction; everything here except ``progress`` enters the config hash."""

    layers: list[int]
    tokens: str = "all"
    skip_first: int = 1
    max_norm_factor: float | None = 10.0
    batch_size: int = 8  # documents per forward; the forward runs (1 + n_adapters) x batch_size rows
    docs_per_shard: int = 32
    max_length: int = 256
    dtype: str = "float32"  # on disk: float32 | bfloat16
    forward_dtype: str = "float32"  # float32 | bf16-autocast (adds error to deltas: measure before using)
    length_policy: str = "truncate"  # long documents (lorascope.data.chat); its effect enters the hash via docs_hash
    exclude_template: bool = False  # drop chat-template scaffolding (activations.template), recorded in the manifest
    progress: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        if self.dtype not in STORE_DTYPES:
            raise LorascopeError(f"unknown store dtype {self.dtype!r}", fix="use float32 or bfloat16")
        if self.forward_dtype not in FORWARD_DTYPES:
            raise LorascopeError(f"unknown forward dtype {self.forward_dtype!r}", fix="use float32 or bf16-autocast")
        if self.batch_size < 1 or self.docs_per_shard < 1 or self.max_length < 2:
            raise LorascopeError(
                "batch_size and docs_per_shard must be >= 1 and max_length >= 2",
                fix="e.g. batch_size=8, docs_per_shard=32",
            )
        if self.length_policy not in LENGTH_POLICIES:
            raise LorascopeError(
                f"unknown long-example policy {self.length_policy!r}", fix=f"use one of {', '.join(LENGTH_POLICIES)}"
            )
        _ = self.selection  # validates the token rule

    @property
    def selection(self) -> TokenSelection:
        return TokenSelection(self.tokens, self.skip_first, self.max_norm_factor)


def _tensor_digest(h: hashlib._Hash, t: torch.Tensor) -> None:
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def adapter_fingerprints(peft_model, adapters: Sequence[str]) -> dict[str, str]:
    """sha256 (16 hex) of each adapter's LoRA weights and its rank/alpha, so a changed adapter changes the hash."""
    out = {}
    state = peft_model.state_dict()
    for name in adapters:
        h = hashlib.sha256()
        cfg = peft_model.peft_config[name]
        targets = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules or [])
        desc = {"r": cfg.r, "alpha": cfg.lora_alpha, "targets": targets}
        desc.update({k: True for k in ("use_rslora", "use_dora") if getattr(cfg, k, False)})  # old hashes unchanged
        h.update(json_str(desc))
        for k in sorted(k for k in state if f".{name}." in k):
            h.update(k.encode())
            _tensor_digest(h, state[k])
        out[name] = h.hexdigest()[:16]
    return out


def json_str(obj) -> bytes:
    import json

    return json.dumps(obj, sort_keys=True, default=str).encode()


def _model_info(model) -> dict:
    inner = unwrap_model(model)
    cfg = inner.config
    return {
        "name": str(getattr(cfg, "name_or_path", "") or type(inner).__name__),
        "model_type": cfg.model_type,
        "n_layers": len(_blocks(model)),
        "d_model": int(getattr(cfg, "hidden_size", None) or cfg.n_embd),
        "dtype": str(next(inner.parameters()).dtype).replace("torch.", ""),
        "config_hash": stable_hash(cfg.to_dict()),
    }


def _blocks(model):
    from lorascope.models.residual import decoder_blocks

    return decoder_blocks(model)


def tokenize_docs(
    tokenizer, examples: Sequence[Example], max_length: int, policy: str = "truncate"
) -> list[TokenizedExample]:
    """Documents for extraction under the long-example ``policy`` (default: truncate the response, skip an
    example whose prompt alone exceeds ``max_length``); the counts are logged (use :func:`tokenize_examples`
    for the :class:`~lorascope.data.chat.LengthReport` itself)."""
    docs, lengths = tokenize_examples(tokenizer, examples, max_length, policy)
    if lengths.truncated or lengths.skipped:
        logging.getLogger("lorascope").warning("activation documents: %s", lengths.summary())
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        raise LorascopeError("document ids are not unique", fix="give every example a distinct id")
    return docs


def template_exclusion(tokenizer, docs: list[TokenizedExample], config: ExtractConfig) -> Any:
    """Chat-template scaffolding of the documents when ``config.exclude_template`` (None when off, or for fewer
    than 2 documents: nothing repeats)."""
    from lorascope.activations.template import detect_template_positions

    if not config.exclude_template or len(docs) < 2:
        return None
    return detect_template_positions([d.input_ids for d in docs], [d.response_start for d in docs], tokenizer=tokenizer)


def _check_finite(caps: dict[int, torch.Tensor], real: torch.Tensor, shard: int, batch: int, docs: range) -> None:
    for L in sorted(caps):
        if not torch.isfinite(caps[L][real]).all():
            raise IntegrityError(
                f"non-finite (NaN/inf) activations at layer {L} in shard {shard} batch {batch} "
                f"(documents {docs.start}..{docs.stop - 1})",
                fix="check the model and adapter weights, or use float32 instead of bfloat16",
            )


def forward_autocast(dev: torch.device, cfg: ExtractConfig) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``dev`` when ``cfg.forward_dtype`` is "bf16-autocast", else a no-op context."""
    if cfg.forward_dtype == "bf16-autocast":
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _row_meta(keep: torch.Tensor, input_ids: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
    """Per kept row: its document (``start`` + batch row), position and token id."""
    bi, ti = keep.nonzero(as_tuple=True)
    return {"doc_index": bi + start, "position": ti.to(torch.int32), "token_id": input_ids[bi, ti].to(torch.int32)}


def _run_shard(
    job: ExtractJob, forward: Forward, dev: torch.device, doc_range: range, s: int, prog: RankProgress, bar
) -> tuple[dict[str, torch.Tensor], dict]:
    docs, cfg, layers, adapters, pad_id = job.docs, job.config, job.layers, job.adapters, job.pad_id
    template = job.template.masks if job.template is not None else None
    A = len(adapters)
    store_dtype = STORE_DTYPES[cfg.dtype]
    parts: dict[str, list[torch.Tensor]] = {}
    counts: dict[str, int] = {}
    rows_per_doc: list[int] = []
    autocast = forward_autocast(dev, cfg)
    for b, start in enumerate(range(doc_range.start, doc_range.stop, cfg.batch_size)):
        idx = range(start, min(start + cfg.batch_size, doc_range.stop))
        chunk = [docs[i] for i in idx]
        B = len(chunk)
        batch = collate(chunk, pad_id)
        att = batch["attention_mask"]
        with autocast:
            caps = forward(batch["input_ids"].to(dev), att.to(dev))
        caps = {L: h.float() for L, h in caps.items()}
        _check_finite(caps, att.repeat(1 + A, 1).bool().to(dev), s, b, idx)
        norms = {L: caps[L][:B].norm(dim=-1).cpu() for L in layers}
        resp = torch.tensor([d.response_start for d in chunk])
        scaffold = pad_masks([template[i] for i in idx], att.shape[1]) if template is not None else None
        keep, c = select_positions(att, resp, norms, cfg.selection, scaffold)
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
        rows_per_doc += keep.sum(1).tolist()
        for k, v in _row_meta(keep, batch["input_ids"], start).items():
            parts.setdefault(k, []).append(v)
        keep_dev = keep.to(dev)
        for L in layers:
            base_dev = caps[L][:B][keep_dev]
            base = base_dev.cpu()
            parts.setdefault(base_key(L), []).append(base.to(store_dtype))
            for i, a in enumerate(adapters):
                delta = (caps[L][B * (i + 1) : B * (i + 2)][keep_dev] - base_dev).cpu()
                prog.stats[(L, a)].update(base, delta)
                parts.setdefault(delta_key(L, a), []).append(delta.to(store_dtype))
        del caps
        if bar is not None:
            bar.update(int(att.sum()))
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    record = {
        "index": s,
        "file": shard_name(s),
        "docs": [doc_range.start, doc_range.stop],
        "rows_per_doc": rows_per_doc,
        "n_rows": sum(rows_per_doc),
        "counts": counts,
    }
    return tensors, record


def extract(
    peft_model,
    tokenizer,
    examples: Sequence[Example],
    out_dir: str | Path,
    config: ExtractConfig,
    adapters: Sequence[str] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> ActivationStore | None:
    """Extract base rows and Δ rows [N, d] at ``config.layers`` for each adapter into ``out_dir``.

    ``peft_model``: a PeftModel holding the adapters (``lorascope.models.load_adapters``); ``adapters`` defaults
    to all of them. Adapters that PEFT's mixed-batch forward cannot serve (DoRA; ``modules_to_save`` on a module
    other than Linear/Embedding/Conv) are run as separate forwards instead, with a log line saying so (see
    :func:`lorascope.models.variants.mixed_batch_support`). Resumable: re-running the same call after an
    interruption continues where it stopped (per rank). Returns the opened store; ``None`` on ranks of a multi-rank
    run without a ``torch.distributed`` process group (then call :func:`finalize_extraction` once every rank has
    finished).
    """
    from lorascope.models.variants import mixed_batch_support

    if getattr(peft_model, "peft_config", None) is None:
        raise LorascopeError(
            "extract needs a PeftModel with the adapters loaded",
            fix="use lorascope.models.load_adapters(base, {name: folder})",
        )
    adapters = list(adapters) if adapters is not None else list(peft_model.peft_config)
    unknown = [a for a in adapters if a not in peft_model.peft_config]
    if unknown or not adapters:
        raise LorascopeError(f"unknown adapter(s) {unknown}", fix=f"choose from {list(peft_model.peft_config)}")
    grouped = _check_rank(rank, world_size)
    peft_model.eval()
    layers = check_layers(peft_model, config.layers)
    docs = tokenize_docs(tokenizer, examples, config.max_length, config.length_policy)
    unsupported = {a: why for a, why in mixed_batch_support(peft_model, adapters).items() if why}
    adapters_info: dict = {"names": adapters, "fingerprints": adapter_fingerprints(peft_model, adapters)}
    if unsupported:
        logging.getLogger("lorascope").warning(
            "running base and each adapter as separate forwards (PEFT mixed batches refuse them; same Δ): %s",
            "; ".join(f"{a}: {why}" for a, why in unsupported.items()),
        )
        adapters_info["forward"] = "separate"
    cap = ResidualCapture(peft_model, layers, truncate=True)
    fwd = separate_forward(peft_model, cap, adapters) if unsupported else mixed_batch_forward(cap, adapters)
    dev = next(peft_model.parameters()).device
    job = ExtractJob(
        Path(out_dir),
        docs,
        config,
        layers,
        adapters,
        _model_info(peft_model),
        adapters_info,
        tokenizer.pad_token_id,
        lambda _ranges: (fwd, dev),
        template_exclusion(tokenizer, docs, config),
    )
    return run_extraction(job, rank, world_size, grouped)


Forward = Callable[[torch.Tensor, torch.Tensor], dict[int, torch.Tensor]]
"""(input_ids [B, T], attention_mask [B, T]) -> {layer: residuals [(1 + A)·B, T, d]}: base rows, then each
adapter's rows in ``adapters`` order (the layout of one PEFT mixed batch)."""


def mixed_batch_forward(cap: ResidualCapture, adapters: Sequence[str]) -> Forward:
    """Base and every adapter in one capture call with ``adapter_names`` per row: on CPU one forward per adapter's
    rows, elsewhere one PEFT mixed batch (same numbers: :mod:`lorascope.models.grouped`)."""

    def forward(ids: torch.Tensor, att: torch.Tensor) -> dict[int, torch.Tensor]:
        B, A = ids.shape[0], len(adapters)
        names = [BASE] * B + [a for a in adapters for _ in range(B)]
        return cap(ids.repeat(1 + A, 1), att.repeat(1 + A, 1), names)

    return forward


def separate_forward(peft_model, cap: ResidualCapture, adapters: Sequence[str]) -> Forward:
    """Base (adapters disabled) and each adapter (set active) as separate forwards, stacked like a mixed batch."""

    def forward(ids: torch.Tensor, att: torch.Tensor) -> dict[int, torch.Tensor]:
        previous = peft_model.active_adapter
        with peft_model.disable_adapter():
            outs = [cap(ids, att)]
        try:
            for a in adapters:
                peft_model.set_adapter(a, inference_mode=True)
                outs.append(cap(ids, att))
        finally:
            peft_model.set_adapter(previous, inference_mode=True)
        return {L: torch.cat([o[L] for o in outs]) for L in cap.layers}

    return forward


@dataclass
class ExtractJob:
    """What :func:`run_extraction` needs, independent of how the residuals are computed.

    ``make_forward(doc_ranges)`` is called once the shards still to do are known (their document ranges) and
    returns the :data:`Forward` and the device its batches go to.
    """

    out: Path
    docs: list[TokenizedExample]
    config: ExtractConfig
    layers: list[int]
    adapters: list[str]
    model_info: dict
    adapters_info: dict  # {"names", "fingerprints", ...}: enters the config hash
    pad_id: int
    make_forward: Callable[[list[range]], tuple[Forward, torch.device]]
    template: Any = None  # activations.template.TemplateExclusion of the documents, or None (nothing excluded)


def _check_rank(rank: int, world_size: int) -> bool:
    """Validate the rank; True when the ranks form a ``torch.distributed`` process group (torchrun)."""
    from lorascope import distributed

    if not 0 <= rank < world_size:
        raise LorascopeError(f"rank {rank} is not in 0..{world_size - 1}", fix="check the launcher's rank")
    grouped = world_size > 1 and distributed.is_initialized()  # torchrun: barrier + merge here
    if grouped and (distributed.get_world_size(), distributed.get_rank()) != (world_size, rank):
        raise LorascopeError(
            f"extract was called as rank {rank} of {world_size} inside a process group of "
            f"{distributed.get_world_size()} (this is rank {distributed.get_rank()})",
            fix="pass rank=distributed.get_rank(), world_size=distributed.get_world_size()",
        )
    return grouped


def _full_config(job: ExtractJob) -> dict:
    settings = {k: v for k, v in asdict(job.config).items() if k not in ("layers", "progress", "length_policy")}
    docs_hash = stable_hash([[d.doc_id, d.input_ids, d.response_start] for d in job.docs])
    full = {
        "model": job.model_info,
        "adapters": job.adapters_info,
        "layers": job.layers,
        "selection": job.config.selection.describe(),
        **settings,
        "n_docs": len(job.docs),
        "docs_hash": docs_hash,
    }
    if job.template is not None:
        full["template"] = job.template.describe()
    return full


def _load_progress(out: Path, rank: int, job: ExtractJob, config_hash: str) -> RankProgress:
    prog_path = out / progress_name(rank)
    d = job.model_info["d_model"]
    if not prog_path.is_file():
        return RankProgress(config_hash, job.layers, job.adapters, d)
    prog = RankProgress.load(prog_path, job.layers, job.adapters, d)
    if prog.config_hash != config_hash:
        raise LorascopeError(
            f"{out} holds an unfinished extraction with another config",
            fix="re-run it with the same options, or choose another output folder",
        )
    return prog


def run_extraction(
    job: ExtractJob, rank: int = 0, world_size: int = 1, grouped: bool = False
) -> ActivationStore | None:
    """Write (or resume) the store of ``job``: shards, per-rank progress, manifest (see :func:`extract`)."""
    from lorascope import distributed

    if not job.docs:
        raise LorascopeError("no documents to extract", fix="give at least one example")
    config, docs, out = job.config, job.docs, job.out
    full = _full_config(job)
    config_hash = stable_hash(full)
    with OutputLock(out / ".locks" / f"rank{rank:03d}"):
        if (out / "manifest.json").is_file():
            store = open_store(out)
            if store.manifest["config_hash"] != config_hash:
                raise LorascopeError(
                    f"{out} already holds an activation store with another config",
                    fix="choose another output folder or delete the old one",
                )
            return store
        mine = rank_shards(len(docs), config.docs_per_shard, rank, world_size)
        _prepare(out, docs, {"config": full, "config_hash": config_hash}, rank, world_size, grouped, mine)
        prog = _load_progress(out, rank, job, config_hash)
        for s in mine:  # shard files not recorded in progress are leftovers of a killed run: redo them
            if s not in prog.shards:
                (out / shard_name(s)).unlink(missing_ok=True)
        todo = [s for s in mine if s not in prog.shards]
        forward, dev = job.make_forward([shard_docs(s, config.docs_per_shard, len(docs)) for s in todo])
        bar = _bar(config, docs, mine, todo) if rank == 0 else None
        try:
            for s in todo:
                doc_range = shard_docs(s, config.docs_per_shard, len(docs))
                tensors, record = _run_shard(job, forward, dev, doc_range, s, prog, bar)
                meta = {"config_hash": config_hash, "shard": s, "dtype": config.dtype}
                record["sha256"] = write_shard(out / record["file"], tensors, meta)
                prog.shards[s] = record
                prog.save(out / progress_name(rank))
        finally:
            if bar is not None:
                bar.close()
        if world_size > 1:
            if not grouped:
                return None
            distributed.barrier()  # every rank's progress file is complete
            if rank == 0:
                finalize_store(out, full, config_hash, world_size=world_size)
            distributed.barrier()  # the manifest exists
            return open_store(out)
        finalize_store(out, full, config_hash, world_size=1)
    return open_store(out)


def _prepare(
    out: Path, docs: list[TokenizedExample], config: dict, rank: int, world_size: int, grouped: bool, mine: list[int]
) -> None:
    """Clean leftovers and write the document table (rank 0 alone when the ranks form a process group)."""
    from lorascope import distributed

    if world_size == 1:
        clean_tmp_files(out)
    else:  # only this rank's own leftovers: other ranks may be writing right now
        for s in mine:
            for p in (out / shard_name(s)).parent.glob(TMP_PREFIX + Path(shard_name(s)).name + ".*"):
                p.unlink(missing_ok=True)
        for p in (out / "progress").glob(TMP_PREFIX + Path(progress_name(rank)).name + ".*"):
            p.unlink(missing_ok=True)
    writer = rank == 0 or not grouped
    if grouped and not writer:
        distributed.barrier()  # rank 0 has written docs.json
    if (out / "docs.json").is_file():
        if read_json(out / "docs.json")["doc_ids"] != [d.doc_id for d in docs]:
            raise LorascopeError(
                f"{out} holds an unfinished extraction of other documents",
                fix="choose another output folder or delete the old one",
            )
    elif writer:
        write_docs(out, [d.doc_id for d in docs], [d.input_ids for d in docs], [d.response_start for d in docs])
    if writer and world_size > 1:
        write_json(out / RUN_CONFIG, config)  # lets finalize_extraction merge without re-running the model
    if grouped and writer:
        distributed.barrier()


def finalize_extraction(out_dir: str | Path, world_size: int) -> ActivationStore:
    """Merge the progress of ``world_size`` separately started ranks into the manifest; returns the store."""
    out = Path(out_dir)
    if not (out / RUN_CONFIG).is_file():
        raise LorascopeError(
            f"{out} holds no unfinished extraction ({RUN_CONFIG} is missing)",
            fix="run the extraction on every rank first",
        )
    run = read_json(out / RUN_CONFIG)
    finalize_store(out, run["config"], run["config_hash"], world_size=world_size)
    return open_store(out)


def _bar(config: ExtractConfig, docs: list[TokenizedExample], mine: list[int], todo: list[int]):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    def tokens(shards: list[int]) -> int:
        return sum(len(docs[i]) for s in shards for i in shard_docs(s, config.docs_per_shard, len(docs)))

    return tqdm(
        total=tokens(mine),
        initial=tokens(mine) - tokens(todo),
        unit="tok",
        unit_scale=True,
        desc="extract",
        dynamic_ncols=True,
    )


__all__ = [
    "FORWARD_DTYPES",
    "ExtractConfig",
    "ExtractJob",
    "Forward",
    "adapter_fingerprints",
    "extract",
    "finalize_extraction",
    "mixed_batch_forward",
    "run_extraction",
    "separate_forward",
    "tokenize_docs",
]
