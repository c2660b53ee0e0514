"""Stage 1: the fine-tunes under study: LoRA adapters trained at the configured ranks, and what ``adapters.load``
names (PEFT folders or hub ids, whole fine-tuned models, folders of training checkpoints), expanded by
:func:`lorascope.models.finetunes.expand_load_specs` into one :class:`Adapter` each."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorascope.errors import LorascopeError
from lorascope.io import content_key, stable_hash
from lorascope.study.cache import RunState, StageDir, data_key_extras

if TYPE_CHECKING:
    from lorascope.data.chat import LengthReport


@dataclass(frozen=True)
class AdapterTraining:
    """How a trained adapter's fine-tuning went (absent for loaded adapters)."""

    loss_start: float
    loss_end: float
    heldout_loss_base: float
    heldout_loss_adapted: float


@dataclass(frozen=True)
class Adapter:
    """One fine-tune under study: its source (a PEFT folder or hub id, or a model folder when ``kind`` is
    ``full``), LoRA rank (-1 when unknown or not a LoRA), cache key (hash of what made it), training summary
    (trained adapters only) and, for an entry of a checkpoint sequence, its training ``step``."""

    name: str
    path: Path
    rank: int
    key: str
    training: AdapterTraining | None = None
    kind: str = "peft"  # "peft" | "full" (lorascope.models.finetunes.LoadEntry.kind)
    step: int | None = None


def check_adapter_folder(name: str, path: Path) -> None:
    if not (path / "adapter_config.json").is_file():
        raise LorascopeError(
            f"adapters.load.{name}: {path} is not a PEFT adapter folder (no adapter_config.json)",
            fix="point at a folder saved by PEFT, or remove the entry",
        )


def _loaded(entry) -> Adapter:
    """An :class:`Adapter` of one ``LoadEntry``; its key follows the files (path, modification time)."""
    from lorascope.activations.full import source_fingerprint

    path = Path(entry.path)
    config = path / "adapter_config.json"
    rank = int(json.loads(config.read_text()).get("r", -1)) if config.is_file() else -1
    if entry.kind == "full":
        key = stable_hash({"full": source_fingerprint(path)})
    elif path.exists():
        key = stable_hash({"load": content_key(path)})  # size + content hash of the weight files
    else:  # a hub id: PEFT fetches (and caches) it
        key = stable_hash({"hub": entry.path})
    return Adapter(entry.name, path, rank, key, kind=entry.kind, step=entry.step)


def loaded_adapters(st: RunState) -> list[Adapter]:
    """Every entry of ``adapters.load``, in order (a checkpoint folder gives one entry per step)."""
    from lorascope.models.finetunes import expand_load_specs

    return [_loaded(e) for e in expand_load_specs(st.config.adapters.load)]


def finetune_examples(cfg) -> tuple[list, list]:
    """(training, held-out) examples of the trained adapters: ``data.finetune``, 15% held out for the loss."""
    from lorascope.data import load_dataset_spec, split_examples

    examples = load_dataset_spec(
        cfg.data.finetune, limit=cfg.data.n_finetune, seed=cfg.seed, columns=cfg.data.finetune_columns
    )
    return split_examples(examples, 0.15, seed=cfg.seed)


def _train(st: RunState, todo: list[tuple[int, StageDir]]) -> None:
    cfg = st.config
    train, held = finetune_examples(cfg)
    st.log(f"fine-tuning examples: {check_lengths(cfg, train, st.tokenizer()).summary()}")  # before the model
    workers, threads = training_workers(cfg, len(todo))
    if workers > 1:
        st.log(f"training {len(todo)} LoRA ranks in {workers} processes side by side ({threads} thread(s) each)")
        _train_in_workers(st, todo, workers, threads)
        return
    base = st.base()
    base_loss = None  # the base model's held-out loss: the same for every rank, computed with the first
    for r, sd in todo:
        base_loss = _train_rank(cfg, base, r, sd, (train, held), base_loss, bars=st.progress, logs=st.progress)


def _train_rank(
    cfg, base, r: int, sd: StageDir, data: tuple[list, list], base_loss: float | None, bars: bool, logs: bool
) -> float:
    """Train the adapter of rank ``r`` into ``sd``, measure its held-out loss (and the base model's, unless
    ``base_loss`` is already known), mark the stage done; returns the base model's held-out loss. ``bars``:
    a progress bar for the steps; ``logs``: a line at the start and the end."""
    from lorascope.models import LoraSettings, held_out_loss, load_adapters, train_lora
    from lorascope.study.cache import log

    t = cfg.adapters.train
    train, held = data
    log(f"training LoRA rank {r} ({t.steps} steps)", logs)
    s = LoraSettings(
        rank=r,
        alpha=t.alpha,
        dropout=t.dropout,
        target_modules=t.target_modules,
        steps=t.steps,
        lr=t.lr,
        batch_size=t.batch_size,
        max_length=cfg.data.max_length,
        seed=cfg.seed,
        autocast_bf16=t.autocast_bf16,
        length_policy=cfg.data.long_examples,
        gradient_checkpointing=t.gradient_checkpointing,
    )
    res = train_lora(base, train, s, output_dir=sd.path / "adapter", progress=bars)
    pm = load_adapters(base, {"a": sd.path / "adapter"})
    variants = ["a"] if base_loss is not None else ["__base__", "a"]
    losses = held_out_loss(pm, base.tokenizer, held[:16], variants, max_length=cfg.data.max_length)
    base_loss = losses.get("__base__", base_loss)
    pm.unload()
    sd.mark_done(
        {
            "losses": res.losses,
            "loss_start": res.loss_start,
            "loss_end": res.loss_end,
            "heldout_loss_base": base_loss,
            "heldout_loss_adapted": losses["a"],
            "tokens_seen": res.tokens_seen,
            "examples": res.lengths.to_dict() if res.lengths else None,
        }
    )
    log(f"LoRA rank {r}: training loss {res.loss_start:.3f} -> {res.loss_end:.3f}", logs)
    return base_loss


def training_workers(cfg, n_ranks: int) -> tuple[int, int]:
    """(processes, torch threads per process) for training ``n_ranks`` adapters: ``adapters.train.workers`` on
    CPU, at most one per core and per rank, the cores shared evenly; one process without it or elsewhere (one
    device). Two one-thread processes train 1.4x as many steps per second as one two-thread process on a 2-core
    machine (benchmarks/lora_train.py, SmolLM2-135M: 6.1 s per step each, side by side, vs 4.3 s), and the
    weights are the same bit for bit (a step's matrix products split rows, not sums, among threads)."""
    from lorascope._spawn import cpu_cores

    cores = cpu_cores()
    wanted = cfg.adapters.train.workers or 1
    if cfg.model.device != "cpu" or n_ranks < 2 or wanted < 2:
        return 1, cores
    workers = max(1, min(n_ranks, wanted, cores))
    return workers, max(1, cores // workers)


def _train_in_workers(st: RunState, todo: list[tuple[int, StageDir]], workers: int, threads: int) -> None:
    """Ranks dealt round-robin to ``workers`` spawned processes (each loads the base model itself; this process
    loads nothing meanwhile). A worker's failure stops the others and is raised here; ranks a worker finished
    are marked done, so a re-run trains only the rest."""
    from lorascope._spawn import spawned

    config = st.config.model_dump(mode="json")
    shares = [todo[i::workers] for i in range(workers)]
    with spawned() as ctx:
        pool = ctx.Pool(workers)
    try:
        pending = [pool.apply_async(_worker, (config, share, threads, st.progress)) for share in shares]
        for job in pending:
            job.get()
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _worker(config: dict, share: list[tuple[int, StageDir]], threads: int, progress: bool) -> None:
    """One training process: load the base model, train its ranks one after another (no progress bars: the
    processes would draw over each other; one log line per rank instead)."""
    import torch

    from lorascope._memory import keep_freed_memory
    from lorascope.config import ExperimentConfig
    from lorascope.models import load_base

    keep_freed_memory()  # as the CLI process does
    torch.set_num_threads(threads)
    cfg = ExperimentConfig.model_validate(config)
    m = cfg.model
    base = load_base(m.spec, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code)
    data = finetune_examples(cfg)
    base_loss = None
    for r, sd in share:
        base_loss = _train_rank(cfg, base, r, sd, data, base_loss, bars=False, logs=progress)


def check_lengths(cfg, examples, tokenizer) -> LengthReport:
    """What ``data.long_examples`` does to ``examples`` at ``data.max_length`` (tokenizer only, no model): the
    policy ``error`` raises here, naming the first example that does not fit."""
    from lorascope.models.lora import prepare_training_data

    _, lengths = prepare_training_data(tokenizer, examples, cfg.data.max_length, cfg.data.long_examples)
    return lengths


def stage_adapters(st: RunState) -> list[Adapter]:
    """Loaded adapters first, then one trained adapter per configured rank (cached by its settings)."""
    cfg = st.config
    out = loaded_adapters(st)
    t = cfg.adapters.train
    if t is None or not t.ranks:
        return out
    data_inputs = {
        "model": cfg.model.spec,
        "finetune": cfg.data.finetune,
        "n": cfg.data.n_finetune,
        "max_length": cfg.data.max_length,
        "seed": cfg.seed,
    }
    data_inputs.update(data_key_extras(cfg.data.finetune_columns, cfg.data.long_examples))
    settings = t.model_dump(exclude={"ranks", "workers"})  # how many processes train them changes no weight
    stages = {
        r: StageDir.make(st.out, "adapters", f"rank_{r}", {**data_inputs, **settings, "rank": r}) for r in t.ranks
    }
    todo = [(r, sd) for r, sd in stages.items() if not sd.done]
    if todo:
        t0 = time.perf_counter()
        _train(st, todo)
        st.finished("adapters", t0)
    for r, sd in stages.items():
        i = sd.info()
        training = AdapterTraining(
            float(i["loss_start"]),
            float(i["loss_end"]),
            float(i["heldout_loss_base"]),
            float(i["heldout_loss_adapted"]),
        )
        out.append(Adapter(f"rank_{r}", sd.path / "adapter", r, sd.key, training))
    return out
