"""Which PEFT adapters one mixed-batch forward can serve, and where an adapter comes from (folder or hub id).

PEFT's mixed-batch inference (``adapter_names=[...]`` per row) in the installed version (checked on 0.21.2,
``peft/tuners/lora/layer.py::_check_forward_args`` and ``peft/utils/other.py::AuxiliaryTrainingWrapper.
_mixed_batch_forward``) serves:

- plain LoRA and rsLoRA (only the scaling alpha/sqrt(r) differs: the same per-row path);
- ``modules_to_save`` on Linear / Embedding / Conv modules (the wrapper picks each row's copy);

and refuses:

- DoRA (``ValueError: Cannot pass adapter_names when DoRA is enabled``);
- ``modules_to_save`` on any other module, e.g. a norm (``TypeError: Mixed batching is only supported for ...``),
  and this breaks every mixed batch of the model, whichever adapter a row uses;
- non-LoRA PEFT methods (IA3, LoHa, …): the mixed path is LoRA's.

:func:`mixed_batch_support` says which adapters need separate forwards and why; extraction then runs base and each
adapter one after another on the same batch (``lorascope.activations.extract.separate_forward``) instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from lorascope.errors import LorascopeError

_MIXED_OK_MODULES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _peft_version() -> str:
    import peft

    return str(getattr(peft, "__version__", "?"))


def _unsupported_saved_modules(peft_model) -> list[str]:
    from peft.utils.other import ModulesToSaveWrapper

    return [
        f"{name} ({type(m.original_module).__name__})"
        for name, m in peft_model.named_modules()
        if isinstance(m, ModulesToSaveWrapper) and not isinstance(m.original_module, _MIXED_OK_MODULES)
    ]


def mixed_batch_support(peft_model, adapters: Sequence[str]) -> dict[str, str | None]:
    """{adapter: None if one PEFT mixed-batch forward serves it, else the reason (one short phrase)}."""
    version = _peft_version()
    saved = _unsupported_saved_modules(peft_model)
    out: dict[str, str | None] = {}
    for name in adapters:
        cfg = peft_model.peft_config[name]
        ptype = str(getattr(cfg, "peft_type", "LORA")).split(".")[-1].upper()
        if ptype != "LORA":
            out[name] = f"{ptype} adapter: PEFT {version} mixes batches for LoRA only"
        elif getattr(cfg, "use_dora", False):
            out[name] = f"DoRA: PEFT {version}'s mixed-batch forward refuses DoRA adapters"
        elif saved:
            out[name] = (
                f"modules_to_save on {saved[0]}: PEFT {version} mixes batches only through Linear, "
                "Embedding and Conv modules"
            )
        else:
            out[name] = None
    return out


def resolve_adapter_source(name: str, spec: str | os.PathLike) -> str:
    """A local PEFT folder (checked), or a hub id handed to PEFT when the hub is reachable.

    Offline (``HF_HUB_OFFLINE=1``), a hub id that is not a folder here fails with one line saying how to point at
    a downloaded folder instead.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "adapter_config.json").is_file():
            raise LorascopeError(
                f"adapter {name!r}: {path} has no adapter_config.json",
                fix="point at a folder saved by PEFT (adapter_config.json + adapter_model.safetensors)",
            )
        return str(path)
    spec_str = str(spec)
    looks_like_hub_id = spec_str.count("/") == 1 and not spec_str.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise LorascopeError(f"adapter {name!r}: folder {spec_str} does not exist", fix="check the adapter path")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise LorascopeError(
            f"adapter {name!r}: there is no folder {spec_str}, and as a hub id it cannot be fetched: "
            "the hub is offline (HF_HUB_OFFLINE=1)",
            fix=f"check the path, or download it where you "
            f"are online (huggingface-cli download {spec_str} --local-dir DIR) and set the adapter "
            "to DIR",
        )
    return spec_str


__all__ = ["mixed_batch_support", "resolve_adapter_source"]
