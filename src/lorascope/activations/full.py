"""Δ of fine-tunes that are whole models (a fully fine-tuned checkpoint, a merged LoRA) against their base, or of
PEFT adapters run as separate models: two (or more) model copies run on the same batches, written to the same
store format as the PEFT mixed-batch path, so everything downstream works unchanged.

Δ definition: ``h_finetune - h_base`` at the output of block L, both from the same padded batch of the same
documents (same tokenizer, same positions), subtracted in float32.

Memory (``resident``):

- ``"both"``: the base and every fine-tune are loaded at once and run in lock-step, batch by batch.
- ``"one"`` (default): one model resident at a time. The base runs over every batch still to do and its captured
  residuals (float32, padded batches, captured layers only) are spilled to ``OUT/spill/``; it is freed; each
  fine-tune in turn is loaded, run over the same batches and spilled, then freed; the shards are then assembled
  from the spill with exactly the selection and Δ code of the PEFT path. Peak memory: one model plus one batch's
  captures (the spill is on disk, about the size of a float32 store of every position; it is deleted at the end).
  Spilled batches are kept across an interruption, so a re-run resumes model by model.

Models are given as paths (an HF model folder, a ``.gguf`` file, ``embedded``; for a fine-tune also a PEFT adapter
folder, loaded onto a fresh copy of the base) or as zero-argument callables returning a model (then the caller
must not keep another reference, or ``"one"`` cannot free it). :attr:`FullExtraction.peak_param_bytes` is the
largest total parameter bytes of models alive at once, tracked with weak-reference finalizers (a model counts
until it is garbage-collected, so a leaked reference shows up as two resident copies).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorascope.activations.extract import (
    ExtractConfig,
    ExtractJob,
    Forward,
    _check_rank,
    _model_info,
    forward_autocast,
    run_extraction,
    template_exclusion,
    tokenize_docs,
)
from lorascope.activations.reader import ActivationStore
from lorascope.data.examples import Example
from lorascope.errors import LorascopeError
from lorascope.io import atomic_path, read_json, stable_hash, write_json
from lorascope.models.lora import collate
from lorascope.models.residual import ResidualCapture, check_layers

ModelSource = str | os.PathLike | Callable[[], torch.nn.Module]
RESIDENT_MODES = ("one", "both")
_log = logging.getLogger("lorascope")


@dataclass
class FullExtraction:
    """Result of :func:`extract_full`: the store and the memory accounting of the run."""

    store: ActivationStore
    resident: str
    peak_param_bytes: int = 0
    peak_models: int = 0
    model_param_bytes: dict[str, int] = field(default_factory=dict)


class _Residency:
    """Parameter bytes of the models alive right now, and the peak (weakref finalizers release a model's bytes)."""

    def __init__(self) -> None:
        self.current = self.peak = self.models = self.peak_models = 0
        self.sizes: dict[str, int] = {}

    def track(self, name: str, model: torch.nn.Module) -> torch.nn.Module:
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.sizes[name] = nbytes
        self.current += nbytes
        self.models += 1
        self.peak, self.peak_models = max(self.peak, self.current), max(self.peak_models, self.models)
        weakref.finalize(model, self._release, nbytes)
        return model

    def _release(self, nbytes: int) -> None:
        self.current -= nbytes
        self.models -= 1


def _is_peft_folder(source: ModelSource) -> bool:
    return not callable(source) and (Path(source) / "adapter_config.json").is_file()


def _open(source: ModelSource, base: ModelSource, dtype: str, device: str) -> torch.nn.Module:
    """Load a model source (a PEFT folder goes onto a fresh copy of the base, adapter active)."""
    from lorascope.models.loading import load_base

    if callable(source):
        model = source()
    elif _is_peft_folder(source):
        from peft import PeftModel

        model = PeftModel.from_pretrained(_open(base, base, dtype, device), str(source), is_trainable=False)
    else:
        model = load_base(str(source), dtype=dtype, device=device).model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def source_fingerprint(source: ModelSource) -> str:
    """sha256 (16 hex) of a source's files: names, sizes and the first and last MiB of each (no full read)."""
    if callable(source):
        return "callable:" + getattr(source, "__qualname__", type(source).__name__)
    path = Path(source).expanduser()
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
    h = hashlib.sha256()
    if not files:  # a hub id or the embedded model: its name is all we know without downloading
        h.update(str(source).encode())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


def _shape_of(source: ModelSource) -> tuple | None:
    """(model_type, width, blocks) from a folder's config.json without loading weights; None if unknown."""
    if callable(source):
        return None
    cfg_path = Path(source) / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg = cfg.get("text_config", cfg)
    return (
        cfg.get("model_type"),
        cfg.get("hidden_size") or cfg.get("n_embd"),
        cfg.get("num_hidden_layers") or cfg.get("n_layer"),
    )


def _check_compatible(base: ModelSource, finetunes: Mapping[str, ModelSource]) -> None:
    want = _shape_of(base)
    for name, src in finetunes.items():
        got = None if _is_peft_folder(src) else _shape_of(src)
        if want and got and got != want:
            raise LorascopeError(
                f"fine-tune {name!r} at {src} is a {got[0]} with width {got[1]} and {got[2]} blocks, "
                f"but the base is a {want[0]} with width {want[1]} and {want[2]} blocks",
                fix="compare a fine-tune with the base model it was trained from",
            )


class _Spill:
    """Captured residuals of one model on one batch, one safetensors file each, keyed by the batch's token ids."""

    def __init__(self, root: Path, key: str, reuse: bool) -> None:
        self.root = root
        stamp = root / "spill.json"
        if root.is_dir() and (not reuse or not stamp.is_file() or read_json(stamp).get("key") != key):
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        write_json(stamp, {"key": key})

    def path(self, model: int, ids: torch.Tensor) -> Path:
        digest = hashlib.sha256(ids.cpu().contiguous().numpy().tobytes()).hexdigest()[:20]
        return self.root / f"m{model}" / f"{digest}.safetensors"

    def save(self, model: int, ids: torch.Tensor, caps: dict[int, torch.Tensor]) -> None:
        path = self.path(model, ids)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({f"L{L}": h.float().cpu().contiguous() for L, h in caps.items()}, str(tmp))

    def load(self, model: int, ids: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        t = load_file(str(self.path(model, ids)))
        return {L: t[f"L{L}"] for L in layers}


def _batches(docs, ranges: list[range], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The padded batches :func:`run_extraction` will form for these shard ranges (same grouping, same padding)."""
    return [
        collate(docs[start : min(start + batch_size, r.stop)], pad_id)
        for r in ranges
        for start in range(r.start, r.stop, batch_size)
    ]


def _one_resident_forward(
    sources: list[tuple[str, ModelSource]], first: torch.nn.Module, base: ModelSource, ctx: dict
) -> Callable[[list[range]], tuple[Forward, torch.device]]:
    """make_forward for ``resident="one"``: spill every model's captures, then serve batches from the spill."""
    layers, spill, track = ctx["layers"], ctx["spill"], ctx["residency"].track
    holder = [first]

    def make(ranges: list[range]) -> tuple[Forward, torch.device]:
        batches = _batches(ctx["docs"], ranges, ctx["config"].batch_size, ctx["pad_id"])
        for i, (name, src) in enumerate(sources):
            todo = [b for b in batches if not spill.path(i, b["input_ids"]).is_file()]
            model = (
                holder.pop()
                if i == 0
                else (track(name, _open(src, base, ctx["dtype"], ctx["device"])) if todo else None)
            )
            if todo:
                _log.info("full fine-tune extraction: running %s over %d batches (one model resident)", name, len(todo))
                cap = ResidualCapture(model, layers, truncate=True)
                dev = next(model.parameters()).device
                for b in todo:
                    spill.save(i, b["input_ids"], _capture(cap, b, dev, ctx["config"]))
                del cap
            del model
            _free()

        def forward(ids: torch.Tensor, att: torch.Tensor) -> dict[int, torch.Tensor]:
            parts = [spill.load(i, ids, layers) for i in range(len(sources))]
            return {L: torch.cat([p[L] for p in parts]) for L in layers}

        return forward, torch.device("cpu")

    return make


def _both_resident_forward(
    base_model: torch.nn.Module, base: ModelSource, finetunes: Mapping[str, ModelSource], ctx: dict
) -> Callable[[list[range]], tuple[Forward, torch.device]]:
    """make_forward for ``resident="both"``: every fine-tune loaded beside the base, one lock-step forward."""
    track = ctx["residency"].track
    models = [base_model] + [track(n, _open(src, base, ctx["dtype"], ctx["device"])) for n, src in finetunes.items()]
    fwd, dev = _lockstep_forward(models, ctx["layers"], ctx["config"]), next(base_model.parameters()).device
    return lambda _ranges: (fwd, dev)


def _capture(cap: ResidualCapture, batch: dict, dev: torch.device, config: ExtractConfig) -> dict[int, torch.Tensor]:
    with forward_autocast(dev, config):
        return cap(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))


def _lockstep_forward(models: list[torch.nn.Module], layers: list[int], config: ExtractConfig) -> Forward:
    caps = [ResidualCapture(m, layers, truncate=True) for m in models]
    devs = [next(m.parameters()).device for m in models]

    def forward(ids: torch.Tensor, att: torch.Tensor) -> dict[int, torch.Tensor]:
        outs = [
            _capture(c, {"input_ids": ids, "attention_mask": att}, d, config) for c, d in zip(caps, devs, strict=True)
        ]
        return {L: torch.cat([o[L].float().to(devs[0]) for o in outs]) for L in layers}

    return forward


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_full_inputs(base: ModelSource, finetunes: Mapping[str, ModelSource], resident: str) -> None:
    if resident not in RESIDENT_MODES:
        raise LorascopeError(f"unknown resident mode {resident!r}", fix="use 'one' (low memory) or 'both'")
    if not finetunes:
        raise LorascopeError("no fine-tuned models given", fix="pass {name: model folder}")
    _check_compatible(base, finetunes)


def extract_full(
    base: ModelSource,
    finetunes: Mapping[str, ModelSource],
    tokenizer,
    examples: Sequence[Example],
    out_dir: str | Path,
    config: ExtractConfig,
    resident: str = "one",
    load: Mapping[str, str] | None = None,
) -> FullExtraction:
    """Extract base rows and Δ = h_finetune − h_base for whole-model fine-tunes into the standard store.

    ``finetunes``: {name: source} (module docstring); ``load``: ``{"dtype": ..., "device": ...}`` for path
    sources. Resumable like :func:`~lorascope.activations.extract.extract` (shards; in ``"one"`` mode also the
    spilled batches). Single process only.
    """
    _check_full_inputs(base, finetunes, resident)
    docs = tokenize_docs(tokenizer, examples, config.max_length, config.length_policy)  # before any model load
    opts = {"dtype": "float32", "device": "cpu", **(load or {})}
    residency, out = _Residency(), Path(out_dir)
    names = list(finetunes)
    base_model = residency.track("base", _open(base, base, opts["dtype"], opts["device"]))
    layers = check_layers(base_model, config.layers)
    info = _model_info(base_model)
    adapters_info = {
        "names": names,
        "fingerprints": {n: source_fingerprint(s) for n, s in finetunes.items()},
        "kind": "full-model",
        "forward": "lock-step",
    }
    _check_rank(0, 1)
    ctx = {
        "layers": layers,
        "docs": docs,
        "config": config,
        "pad_id": tokenizer.pad_token_id,
        "residency": residency,
        "dtype": opts["dtype"],
        "device": opts["device"],
    }
    if resident == "both":
        make = _both_resident_forward(base_model, base, finetunes, ctx)
    else:
        sources = [("base", base), *finetunes.items()]
        key = stable_hash(
            [source_fingerprint(base), adapters_info["fingerprints"], layers, config.forward_dtype, config.batch_size]
        )
        reuse = not any(callable(s) for _, s in sources)  # a callable has no fingerprint: never resume its spill
        ctx["spill"] = _Spill(out / "spill", key, reuse)
        make = _one_resident_forward(sources, base_model, base, ctx)
    del base_model
    exclusion = template_exclusion(tokenizer, docs, config)
    job = ExtractJob(out, docs, config, layers, names, info, adapters_info, tokenizer.pad_token_id, make, exclusion)
    store = run_extraction(job)
    shutil.rmtree(out / "spill", ignore_errors=True)
    return FullExtraction(store, resident, residency.peak, residency.peak_models, dict(residency.sizes))


__all__ = ["RESIDENT_MODES", "FullExtraction", "ModelSource", "extract_full", "source_fingerprint"]
