"""Save SAEs in SAELens's format; load SAEs from every format people have (auto-detected).

Saved folder = SAELens v6 layout, so SAELens (``SAE.load_from_disk``) and SAEBench read it unchanged:
  cfg.json                 architecture ("standard" | "topk" | "jumprelu"), d_in, d_sae, dtype, device,
                           apply_b_dec_to_input, normalize_activations "none", reshape_activations "none",
                           metadata {sae_lens_version, model_name, hook_name, ...}, k (topk), and a
                           "lorascope" block (our architecture name and cfg.arch) that SAELens ignores;
  sae_weights.safetensors  W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], threshold.
Our ReLU saves as "standard", BatchTopK as "jumprelu" (its threshold, per latent). Our own loader reads the
"lorascope" block and rebuilds the exact architecture, so save -> load round-trips bit-exactly.

``load_sae`` also reads SAELens pre-6 flat configs and (see ``_external``) Gemma Scope ``params.npz``,
EleutherAI sparsify folders and dictionary_learning ``ae.pt`` + ``config.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lorascope.errors import LorascopeError
from lorascope.io import atomic_dir, read_json
from lorascope.saes.base import DTYPES, SAE, SAEConfig, sae_class

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"  # the SAELens config layout we write (v6: nested metadata)
TO_SAELENS = {
    "relu": "standard",
    "paper_a": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "jumprelu": "jumprelu",
}
FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}


# ---- saving ------------------------------------------------------------------------------------
def saelens_config(sae: SAE) -> dict[str, Any]:
    """The cfg.json dict for ``sae`` (SAELens v6 keys plus our "lorascope" block)."""
    cfg = sae.cfg
    meta = dict(cfg.metadata)
    meta.setdefault("model_name", meta.get("model"))
    meta.setdefault("hook_name", meta.get("hook"))
    meta.setdefault("sae_lens_version", SAELENS_FORMAT_VERSION)
    meta.setdefault("sae_lens_training_version", None)
    out: dict[str, Any] = {
        "architecture": TO_SAELENS.get(cfg.architecture, cfg.architecture),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
        "lorascope": {
            "format_version": 1,
            "architecture": cfg.architecture,
            "arch": cfg.arch,
            "metadata": cfg.metadata,
        },
    }
    if cfg.architecture == "topk":
        out.update(k=int(cfg.arch["k"]), rescale_acts_by_decoder_norm=False)
    own = getattr(sae, "saelens_fields", None)  # architecture-specific SAELens keys (SASA: topk_sasa, layer_norm)
    if callable(own):
        out.update(own())
    return out


def save_sae(sae: SAE, folder: str | os.PathLike) -> Path:
    """Write ``sae`` to ``folder`` (cfg.json + sae_weights.safetensors), atomically: a killed save leaves the
    previous folder (or none), never a half-written one. Other entries of an existing ``folder`` (a training
    checkpoint, a lock file) are kept. Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    keep = [e.name for e in folder.iterdir() if e.name not in (CFG_NAME, WEIGHTS_NAME)] if folder.is_dir() else []
    with atomic_dir(folder, keep=keep) as tmp:
        tensors = {k: v.cpu() for k, v in sae.state_for_save().items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CFG_NAME).write_text(json.dumps(saelens_config(sae), indent=2, default=str) + "\n", encoding="utf-8")
    return folder


# ---- canonical construction --------------------------------------------------------------------
def build_sae(cfg: SAEConfig, tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> SAE:
    """An SAE of ``cfg.architecture`` holding exactly ``tensors`` (canonical names and layout)."""
    sae = sae_class(cfg.architecture)(cfg)
    expected = sae.state_for_save()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise LorascopeError(
            f"{source} lacks tensors {missing} for a {cfg.architecture} SAE",
            fix="check that the file is a complete SAE of that architecture",
        )
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise LorascopeError(
                f"{source}: {name} has shape {tuple(tensors[name].shape)}, expected "
                f"{tuple(ref.shape)} for d_in={cfg.d_in}, d_sae={cfg.d_sae}",
                fix="the config and the weights do not match; re-export the SAE",
            )
    sae.load_state_dict({k: tensors[k].to(ref.dtype) for k, ref in expected.items()}, strict=False)
    hook = getattr(sae, "on_load_canonical", None)
    if hook is not None:
        hook()
    return sae.eval()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LorascopeError(
            f"{path} is not a readable safetensors file ({exc})",
            fix="the file is corrupt or truncated; re-download or re-export it",
        ) from exc


def dtype_name(value: Any) -> str:
    name = str(value or "float32").removeprefix("torch.")
    if name not in DTYPES:
        raise LorascopeError(f"unsupported dtype {value!r} in an SAE config", fix=f"use one of {', '.join(DTYPES)}")
    return name


# ---- SAELens (ours, v6, pre-6) -----------------------------------------------------------------
_SAELENS_FLAT_META_KEYS = (
    "model_name",
    "hook_point",
    "hook_name",
    "hook_layer",
    "hook_head_index",
    "context_size",
    "dataset_path",
    "prepend_bos",
    "sae_lens_training_version",
)


def _saelens_arch_and_meta(raw: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """SAELens architecture name, architecture options and metadata, for both config layouts."""
    flat = "metadata" not in raw or "hook_point" in raw or "activation_fn_str" in raw
    arch_name = raw.get("architecture", "standard")
    arch: dict[str, Any] = {}
    if flat:  # pre-6.0: flat keys, top-k given as an activation function
        if raw.get("activation_fn_str", raw.get("activation_fn")) == "topk":
            arch_name = "topk"
            arch["k"] = int((raw.get("activation_fn_kwargs") or {}).get("k", raw.get("k", 0)))
        meta = {k: v for k, v in raw.items() if k in _SAELENS_FLAT_META_KEYS}
        if "hook_point" in meta:
            meta.setdefault("hook_name", meta.pop("hook_point"))
    else:
        meta = dict(raw.get("metadata") or {})
        if arch_name == "topk":
            arch["k"] = int(raw["k"])
    return arch_name, arch, meta


def _check_saelens_supported(folder: Path, raw: dict[str, Any], arch_name: str) -> None:
    """Refuse SAELens options lorascope cannot represent (normalisation, norm rescaling, unknown archs)."""
    norm = raw.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise LorascopeError(
            f"{folder} uses normalize_activations={norm!r}; lorascope loads only 'none'",
            fix="fold the normalisation into the weights in SAELens and save again",
        )
    if raw.get("rescale_acts_by_decoder_norm"):
        raise LorascopeError(
            f"{folder}: rescale_acts_by_decoder_norm=true is not supported",
            fix="fold the decoder norms in SAELens (fold_W_dec_norm) and save again",
        )
    if arch_name not in FROM_SAELENS:
        raise LorascopeError(
            f"{folder}: SAELens architecture {arch_name!r} is not supported",
            fix=f"supported: {', '.join(sorted(FROM_SAELENS))}",
        )


def _load_saelens(folder: Path) -> SAE:
    raw = read_json(folder / CFG_NAME)
    tensors = read_safetensors(folder / WEIGHTS_NAME)
    ours = raw.get("lorascope")
    if isinstance(ours, dict):
        cfg = SAEConfig(
            ours["architecture"],
            int(raw["d_in"]),
            int(raw["d_sae"]),
            bool(raw["apply_b_dec_to_input"]),
            dtype_name(raw.get("dtype")),
            dict(ours.get("arch", {})),
            dict(ours.get("metadata", {})),
        )
        return build_sae(cfg, tensors, folder)
    arch_name, arch, meta = _saelens_arch_and_meta(raw)
    _check_saelens_supported(folder, raw, arch_name)
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise LorascopeError(f"{folder} has a finetuning scaling_factor", fix="fold it into W_dec before loading")
    if "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if arch_name == "batchtopk" and "topk_threshold" in tensors:
        tensors["threshold"] = torch.full((int(raw["d_sae"]),), float(tensors.pop("topk_threshold")))
        arch["k"] = int(raw["k"])
    cfg = SAEConfig(
        FROM_SAELENS[arch_name],
        int(raw["d_in"]),
        int(raw["d_sae"]),
        bool(raw.get("apply_b_dec_to_input", True)),
        dtype_name(raw.get("dtype")),
        arch,
        meta,
    )
    return build_sae(cfg, tensors, folder)


def nonfinite_tensors(sae: SAE) -> dict[str, int]:
    """{tensor name: count of NaN/inf entries} for every tensor of ``sae`` that has any (empty when all finite)."""
    out = {}
    for name, t in sae.state_for_save().items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                out[name] = bad
    return out


# ---- dispatch ----------------------------------------------------------------------------------
_CONTENT_NAMES = {
    "safetensors": "a safetensors file",
    "npz": "a NumPy .npz archive",
    "npy": "a NumPy .npy array",
    "torch": "a torch.save zip archive",
    "pickle": "a Python pickle",
    "zip": "a zip archive",
    "json": "a JSON text file",
    "empty": "an empty file",
}
_SAE_FILE_FIX = (
    "pass an SAE folder (cfg.json + sae_weights.safetensors), a Gemma Scope params.npz or a dictionary_learning ae.pt"
)


def classify_file(path: str | os.PathLike) -> str:
    """What a file holds, from its first bytes (never from its name): 'safetensors' (8-byte little-endian header
    length, then a JSON header), 'npz' (zip of .npy members), 'torch' (zip written by torch.save: a
    ``*/data.pkl`` member), 'zip' (another zip), 'pickle' (protocol 2-5 opcode, incl. legacy torch.save), 'npy',
    'json', 'empty', or 'unknown'."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(16)
    if not head:
        return "empty"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        import zipfile

        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "unknown"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "torch" if any(n.endswith("data.pkl") for n in names) else "zip"
    if head[:6] == b"\x93NUMPY":
        return "npy"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    return "unknown"


def not_an_sae_file(path: Path, kind: str) -> LorascopeError:
    """The error for a file whose content is not what an SAE loader reads (named by file, with its content)."""
    what = (
        f"it holds {_CONTENT_NAMES[kind]}"
        if kind in _CONTENT_NAMES
        else f"unrecognised content, first bytes {Path(path).read_bytes()[:8]!r}"
    )
    return LorascopeError(f"{path} is not an SAE file ({what})", fix=_SAE_FILE_FIX)


def _detect_file(p: Path) -> tuple[str, Path]:
    kind = classify_file(p)
    if kind == "npz":
        return "gemma_scope", p
    if kind in ("torch", "pickle"):
        return "dictionary_learning", p
    if kind != "safetensors":
        raise not_an_sae_file(p, kind)
    folder = p.parent
    if p.name == WEIGHTS_NAME and (folder / CFG_NAME).exists():
        return "saelens", folder
    if p.name == "sae.safetensors" and (folder / CFG_NAME).exists():
        return "sparsify", folder
    raise LorascopeError(
        f"{p} is a safetensors file without an SAE config beside it",
        fix="pass the folder holding cfg.json + sae_weights.safetensors (SAELens) or "
        "cfg.json + sae.safetensors (sparsify)",
    )


def detect_format(path: str | os.PathLike) -> str:
    """'saelens' | 'gemma_scope' | 'sparsify' | 'dictionary_learning' for a file or folder. A file is
    classified by its content (:func:`classify_file`), not its name."""
    p = Path(path)
    if p.is_file():
        return _detect_file(p)[0]
    if not p.exists():
        raise LorascopeError(f"{p} does not exist", fix="check the path")
    if (p / WEIGHTS_NAME).exists() and (p / CFG_NAME).exists():
        return "saelens"
    if (p / "params.npz").exists():
        return "gemma_scope"
    if (p / "sae.safetensors").exists() and (p / CFG_NAME).exists():
        return "sparsify"
    if (p / "ae.pt").exists():
        return "dictionary_learning"
    if any((c / "sae.safetensors").exists() for c in p.iterdir() if c.is_dir()):
        return "sparsify"
    raise LorascopeError(
        f"{p} holds no SAE lorascope can read",
        fix="expected cfg.json + sae_weights.safetensors (SAELens), params.npz (Gemma Scope), "
        "<hookpoint>/sae.safetensors (sparsify) or ae.pt + config.json (dictionary_learning)",
    )


def load_sae(
    path: str | os.PathLike,
    *,
    hookpoint: str | None = None,
    allow_pickle: bool = False,
    device: str | torch.device | None = None,
) -> SAE:
    """Load an SAE from any supported format (auto-detected) into the canonical interface, in eval mode.

    ``hookpoint`` picks one SAE from a sparsify folder holding several. ``allow_pickle=True`` permits full
    unpickling of dictionary_learning ``.pt`` files that ``torch.load(weights_only=True)`` refuses: only for
    files you trust (unpickling runs code).
    """
    from lorascope.saes import _external

    fmt = detect_format(path)
    p = Path(path)
    if p.is_file() and fmt in ("saelens", "sparsify"):
        p = p.parent
    if fmt == "saelens":
        sae = _load_saelens(p.parent if p.is_file() else p)
    elif fmt == "gemma_scope":
        sae = _external.load_gemma_scope(p if p.is_file() else p / "params.npz")
    elif fmt == "sparsify":
        sae = _external.load_sparsify(p.parent if p.is_file() else p, hookpoint)
    else:
        sae = _external.load_dictionary_learning(p if p.is_file() else p / "ae.pt", allow_pickle)
    return sae.to(device) if device is not None else sae
