"""Loaders for SAE formats other than SAELens; each converts to the canonical layout (shared/REFERENCE.md).

- Gemma Scope ``params.npz``: W_enc [d,F], W_dec [F,d], b_enc, b_dec, threshold; encode
  relu(pre) * (pre > threshold) with pre = x @ W_enc + b_enc (no b_dec subtracted) -> ``jumprelu``,
  apply_b_dec_to_input=False.
- EleutherAI sparsify ``<hookpoint>/cfg.json`` + ``sae.safetensors``: encoder.weight [F,d], encoder.bias [F],
  W_dec [F,d], b_dec [d]; encode top-k of relu(W (x - b_dec) + b) -> ``topk`` with k from cfg.json.
- dictionary_learning ``ae.pt`` (state dict, read with weights_only=True) + ``config.json`` whose
  trainer.dict_class names the class; nn.Linear layouts (decoder.weight [d,F]) are transposed.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorascope.errors import LorascopeError
from lorascope.io import read_json
from lorascope.saes.base import SAE, SAEConfig
from lorascope.saes.formats import CFG_NAME, build_sae, classify_file, dtype_name, not_an_sae_file, read_safetensors


def _tensor_dtype(t: torch.Tensor) -> str:
    return dtype_name(str(t.dtype))


# ---- Gemma Scope -------------------------------------------------------------------------------
def load_gemma_scope(path: Path) -> SAE:
    if path.is_file() and classify_file(path) != "npz":
        raise not_an_sae_file(path, classify_file(path))
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: torch.from_numpy(np.ascontiguousarray(z[k])) for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise LorascopeError(
            f"{path} is not a readable .npz file ({exc})",
            fix="the file is corrupt or truncated; re-download it",
        ) from exc
    need = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    if not need <= set(arrays):
        raise LorascopeError(
            f"{path} lacks Gemma Scope keys {sorted(need - set(arrays))}",
            fix="expected W_enc, W_dec, b_enc, b_dec, threshold",
        )
    d, f = arrays["W_enc"].shape
    meta = {"source_format": "gemma_scope", "source_path": str(path)}
    cfg = SAEConfig("jumprelu", d, f, False, _tensor_dtype(arrays["W_enc"]), {}, meta)
    return build_sae(cfg, {k: arrays[k] for k in need}, path)


# ---- EleutherAI sparsify -----------------------------------------------------------------------
def load_sparsify(folder: Path, hookpoint: str | None) -> SAE:
    if not (folder / "sae.safetensors").exists():
        subs = sorted(c.name for c in folder.iterdir() if (c / "sae.safetensors").exists())
        if hookpoint is None and len(subs) == 1:
            hookpoint = subs[0]
        if hookpoint is None or hookpoint not in subs:
            raise LorascopeError(
                f"{folder} holds sparsify SAEs for several hookpoints: {', '.join(subs)}",
                fix="pass hookpoint=<one of them>",
            )
        folder = folder / hookpoint
    cfg = read_json(folder / CFG_NAME)
    t = read_safetensors(folder / "sae.safetensors")
    if "W_skip" in t or cfg.get("skip_connection") or cfg.get("transcode"):
        raise LorascopeError(
            f"{folder} is a sparsify transcoder / skip-connection SAE",
            fix="only plain sparsify autoencoders can be loaded",
        )
    if cfg.get("activation", "topk") != "topk":
        raise LorascopeError(
            f"{folder} uses sparsify activation {cfg.get('activation')!r}",
            fix="only activation 'topk' is supported",
        )
    w = t["encoder.weight"]
    f, d = w.shape
    meta = {"source_format": "sparsify", "source_path": str(folder), "hook_name": folder.name}
    sae_cfg = SAEConfig("topk", int(cfg.get("d_in", d)), f, True, _tensor_dtype(w), {"k": int(cfg["k"])}, meta)
    canon = {
        "W_enc": w.T.contiguous(),
        "b_enc": t["encoder.bias"],
        "W_dec": t["W_dec"].contiguous(),
        "b_dec": t["b_dec"],
    }
    return build_sae(sae_cfg, canon, folder)


# ---- dictionary_learning -----------------------------------------------------------------------
def _unreadable(path: Path, exc: BaseException) -> LorascopeError:
    return LorascopeError(
        f"{path} is not a readable torch file ({type(exc).__name__}: {exc})",
        fix="the file is corrupt or truncated; re-download it",
    )


def _torch_load(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    kind = classify_file(path)
    if kind not in ("torch", "pickle"):  # never offer unpickling for a file that is not a pickle
        raise not_an_sae_file(path, kind)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise LorascopeError(
                f"{path} needs full unpickling (it stores Python objects, not only tensors), "
                "which can run arbitrary code",
                fix="re-save it as a state dict, or, only if you trust the file, pass allow_pickle=True "
                "(on the command line: --allow-pickle)",
            ) from exc
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - arbitrary pickles fail in arbitrary ways
            raise _unreadable(path, exc2) from exc2
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as exc:
        raise _unreadable(path, exc) from exc
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise LorascopeError(f"{path} holds a {type(obj).__name__}, not a state dict", fix="save model.state_dict()")
    return obj


def _dict_class(folder: Path, state: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    trainer: dict[str, Any] = {}
    if (folder / "config.json").exists():
        trainer = read_json(folder / "config.json").get("trainer", {}) or {}
    name = trainer.get("dict_class")
    if name is None:  # infer from the keys
        if "W_enc" in state:
            name = "JumpReluAutoEncoder"
        elif "k" in state:
            name = "BatchTopKSAE" if float(state.get("threshold", torch.tensor(-1.0))) >= 0 else "AutoEncoderTopK"
        else:
            name = "AutoEncoder" if "bias" in state else "AutoEncoderNew"
    return name, trainer


def load_dictionary_learning(path: Path, allow_pickle: bool = False) -> SAE:
    state = _torch_load(path, allow_pickle)
    try:
        return _dl_from_state(path, state)
    except KeyError as exc:
        raise LorascopeError(
            f"{path} lacks the tensor {exc} of a dictionary_learning SAE (it has "
            f"{', '.join(sorted(map(str, state))[:6]) or 'no entries'})",
            fix="pass an ae.pt saved by dictionary_learning (a state dict of its SAE)",
        ) from exc


def _dl_from_state(path: Path, state: dict[str, Any]) -> SAE:
    name, trainer = _dict_class(path.parent, state)
    meta = {
        "source_format": "dictionary_learning",
        "source_path": str(path),
        "dict_class": name,
        "model_name": trainer.get("lm_name"),
        "layer": trainer.get("layer"),
    }
    if name == "JumpReluAutoEncoder":
        return _dl_jumprelu(state, path, meta)
    supported = ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder")
    if name not in supported:
        raise LorascopeError(
            f"{path}: dictionary_learning class {name!r} is not supported",
            fix=f"supported: {', '.join(supported)}",
        )
    w = state["encoder.weight"]
    f, d = w.shape
    canon = {
        "W_enc": w.T.contiguous(),
        "b_enc": state["encoder.bias"],
        "W_dec": state["decoder.weight"].T.contiguous(),
    }
    arch: dict[str, Any] = {}
    apply_b_dec = True
    if name == "AutoEncoder":
        arch_name, canon["b_dec"] = "relu", state["bias"]
    elif name == "AutoEncoderNew":
        arch_name, canon["b_dec"], apply_b_dec = "relu", state["decoder.bias"], False
    else:
        k = int(state["k"]) if "k" in state else int(trainer["k"])
        arch_name, canon["b_dec"], arch = (
            ("topk" if name == "AutoEncoderTopK" else "batchtopk"),
            state["b_dec"],
            {"k": k},
        )
        if arch_name == "batchtopk":  # threshold < 0 means "never set": relu(pre) > -1 always, i.e. plain ReLU
            thr = max(float(state.get("threshold", torch.tensor(-1.0))), 0.0)
            canon["threshold"] = torch.full((f,), thr, dtype=w.dtype)
    cfg = SAEConfig(arch_name, d, f, apply_b_dec, _tensor_dtype(w), arch, meta)
    return build_sae(cfg, canon, path)


def _dl_jumprelu(state: dict[str, torch.Tensor], path: Path, meta: dict[str, Any]) -> SAE:
    """dictionary_learning's JumpReLU multiplies codes by ||W_dec,i|| on encode and divides on decode. Folding
    n_i = ||W_dec,i|| into the canonical weights (W_enc, b_enc, threshold times n_i; W_dec rows over n_i)
    reproduces both its codes and its reconstructions."""
    n = state["W_dec"].norm(dim=1)
    d, f = state["W_enc"].shape
    canon = {
        "W_enc": state["W_enc"] * n,
        "b_enc": state["b_enc"] * n,
        "W_dec": state["W_dec"] / n[:, None],
        "b_dec": state["b_dec"],
        "threshold": state["threshold"] * n,
    }
    cfg = SAEConfig("jumprelu", d, f, False, _tensor_dtype(state["W_enc"]), {}, meta)
    return build_sae(cfg, canon, path)
