"""What ``adapters.load`` can name besides one PEFT folder: a whole fine-tuned model (``{model: PATH}``) and a
folder of training checkpoints (``{checkpoints: PATH}``, the ``checkpoint-<step>/`` sub-folders that the HF
Trainer and TRL write), resolved into an ordered list of named entries the study can run.

- a PEFT folder (``adapter_config.json``) or a hub id: mixed-batch PEFT extraction (``extract``);
- a whole model (HF folder with ``config.json``, e.g. a full fine-tune or a merged LoRA):
  ``lorascope.activations.full.extract_full`` (two models on the same batches);
- a checkpoint folder: one entry per ``checkpoint-<step>`` in step order, each a PEFT folder or a whole model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lorascope.errors import LorascopeError
from lorascope.models.variants import resolve_adapter_source

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class LoadEntry:
    """One thing to compare with the base: ``kind`` is ``peft`` (adapter folder or hub id) or ``full`` (a model)."""

    name: str
    kind: str
    path: str
    step: int | None = None


def folder_kind(path: Path) -> str | None:
    """``peft`` for a PEFT adapter folder, ``full`` for an HF model folder, None otherwise."""
    if (path / "adapter_config.json").is_file():
        return "peft"
    if (path / "config.json").is_file():
        return "full"
    return None


def checkpoint_sequence(folder: str | Path, prefix: str = "step") -> list[tuple[str, int, Path]]:
    """``[(name, step, path)]`` of the ``checkpoint-<step>/`` sub-folders of ``folder``, in step order.

    Names are ``{prefix}_{step}`` (``step_500``). Each checkpoint must be a PEFT adapter folder or a model folder;
    anything else is refused naming the checkpoint.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise LorascopeError(f"checkpoint folder {root} does not exist", fix="point at the training output folder")
    found = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))),
        key=lambda t: t[0],
    )
    if not found:
        raise LorascopeError(
            f"{root} holds no checkpoint-<step>/ folders",
            fix="point at the folder the trainer wrote its checkpoints to (output_dir)",
        )
    for _step, path in found:
        if folder_kind(path) is None:
            raise LorascopeError(
                f"{path} is neither a PEFT adapter (adapter_config.json) nor a model (config.json)",
                fix="remove it or point at a folder of complete checkpoints",
            )
    return [(f"{prefix}_{step}", step, path) for step, path in found]


def _field(spec: object, key: str) -> str | None:
    value = spec.get(key) if isinstance(spec, Mapping) else getattr(spec, key, None)
    return None if value is None else str(value)


def expand_load_specs(load: Mapping[str, object]) -> list[LoadEntry]:
    """Entries of ``adapters.load``: ``{name: PATH_OR_HUB_ID}``, ``{name: {model: PATH}}``,
    ``{name: {checkpoints: PATH}}`` (entries ``name_step_N``), in the given order, checked without loading weights.
    """
    out: list[LoadEntry] = []
    for name, spec in load.items():
        model, ckpts = _field(spec, "model"), _field(spec, "checkpoints")
        if isinstance(spec, str | Path):
            out.append(LoadEntry(name, "peft", resolve_adapter_source(name, spec)))
        elif model is not None:
            path = Path(model).expanduser()
            if folder_kind(path) is None and not str(model).endswith(".gguf"):
                raise LorascopeError(
                    f"adapters.load.{name}.model: {path} is not a model folder (no config.json)",
                    fix="point at a folder saved with save_pretrained (a full fine-tune or merged LoRA)",
                )
            out.append(LoadEntry(name, "full", str(path)))
        elif ckpts is not None:
            for ck_name, step, path in checkpoint_sequence(ckpts, prefix=f"{name}_step"):
                out.append(LoadEntry(ck_name, folder_kind(path) or "peft", str(path), step))
        else:
            raise LorascopeError(
                f"adapters.load.{name}: give a folder, {{model: PATH}} or {{checkpoints: PATH}}",
                fix="see configs/examples/",
            )
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise LorascopeError(f"adapter names repeat: {names}", fix="give every entry of adapters.load its own name")
    return out


def sequence_rows(store, layer: int, entries: list[tuple[str, int, Path]]) -> list[dict]:
    """One row per checkpoint (in step order) from an activation store's Δ statistics at ``layer``: the table a
    checkpoint-sequence report starts from (Δ norm, relative norm, effective dimensionality per step)."""
    rows = []
    for name, step, _path in sorted(entries, key=lambda e: e[1]):
        st = store.stats(layer, name)
        rows.append(
            {
                "checkpoint": name,
                "step": step,
                "layer": layer,
                "n_tokens": st.get("n_tokens", 0),
                "delta_norm_mean": (st.get("delta_norm") or {}).get("mean"),
                "relative_norm_mean": (st.get("relative_norm") or {}).get("mean"),
                "participation_ratio": st.get("participation_ratio"),
            }
        )
    return rows


__all__ = ["LoadEntry", "checkpoint_sequence", "expand_load_specs", "folder_kind", "sequence_rows"]
