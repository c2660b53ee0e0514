"""Stage 1: the adapters under study, trained at the configured ranks or taken from PEFT folders."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from lorascope.errors import LorascopeError
from lorascope.io import content_key, stable_hash
from lorascope.study.cache import RunState, StageDir


@dataclass(frozen=True)
class AdapterTraining:
    """How a trained adapter's fine-tuning went (absent for loaded adapters)."""

    loss_start: float
    loss_end: float
    heldout_loss_base: float
    heldout_loss_adapted: float


@dataclass(frozen=True)
class Adapter:
    """One adapter: its PEFT folder, LoRA rank, cache key (hash of what made it) and training summary."""

    name: str
    path: Path
    rank: int
    key: str
    training: AdapterTraining | None = None


def check_adapter_folder(name: str, path: Path) -> None:
    if not (path / "adapter_config.json").is_file():
        raise LorascopeError(f"adapters.load.{name}: {path} is not a PEFT adapter folder (no adapter_config.json)",
                             fix="point at a folder saved by PEFT, or remove the entry")


def loaded_adapters(st: RunState) -> list[Adapter]:
    out = []
    for name, folder in st.config.adapters.load.items():
        path = Path(folder).expanduser()
        check_adapter_folder(name, path)
        rank = int(json.loads((path / "adapter_config.json").read_text()).get("r", -1))
        out.append(Adapter(name, path, rank, stable_hash({"load": content_key(path)})))
    return out


def _train(st: RunState, todo: list[tuple[int, StageDir]]) -> None:
    from lorascope.data import load_dataset_spec, split_examples
    from lorascope.models import LoraSettings, held_out_loss, load_adapters, train_lora

    cfg, t = st.config, st.config.adapters.train
    base = st.base()
    examples = load_dataset_spec(cfg.data.finetune, limit=cfg.data.n_finetune, seed=cfg.seed)
    train, held = split_examples(examples, 0.15, seed=cfg.seed)
    for r, sd in todo:
        st.log(f"training LoRA rank {r} ({t.steps} steps)")
        s = LoraSettings(rank=r, alpha=t.alpha, dropout=t.dropout, target_modules=t.target_modules,
                         steps=t.steps, lr=t.lr, batch_size=t.batch_size, max_length=cfg.data.max_length,
                         seed=cfg.seed, autocast_bf16=t.autocast_bf16)
        res = train_lora(base, train, s, output_dir=sd.path / "adapter", progress=st.progress)
        pm = load_adapters(base, {"a": sd.path / "adapter"})
        losses = held_out_loss(pm, base.tokenizer, held[:16], ["__base__", "a"], max_length=cfg.data.max_length)
        pm.unload()
        sd.mark_done({"losses": res.losses, "loss_start": res.loss_start, "loss_end": res.loss_end,
                      "heldout_loss_base": losses["__base__"], "heldout_loss_adapted": losses["a"],
                      "tokens_seen": res.tokens_seen})


def stage_adapters(st: RunState) -> list[Adapter]:
    """Loaded adapters first, then one trained adapter per configured rank (cached by its settings)."""
    cfg = st.config
    out = loaded_adapters(st)
    t = cfg.adapters.train
    if t is None or not t.ranks:
        return out
    data_inputs = {"model": cfg.model.spec, "finetune": cfg.data.finetune, "n": cfg.data.n_finetune,
                   "max_length": cfg.data.max_length, "seed": cfg.seed}
    stages = {r: StageDir.make(st.out, "adapters", f"rank_{r}",
                               {**data_inputs, **t.model_dump(exclude={"ranks"}), "rank": r}) for r in t.ranks}
    todo = [(r, sd) for r, sd in stages.items() if not sd.done]
    if todo:
        t0 = time.perf_counter()
        _train(st, todo)
        st.finished("adapters", t0)
    for r, sd in stages.items():
        i = sd.info()
        training = AdapterTraining(float(i["loss_start"]), float(i["loss_end"]), float(i["heldout_loss_base"]),
                                   float(i["heldout_loss_adapted"]))
        out.append(Adapter(f"rank_{r}", sd.path / "adapter", r, sd.key, training))
    return out
