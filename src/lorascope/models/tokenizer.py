"""The tokenizer of a model spec without loading the model, so data checks (long examples, empty datasets) run
in seconds, before the model load."""

from __future__ import annotations

import os
from pathlib import Path

from lorascope.errors import LorascopeError


def load_tokenizer(spec: str | os.PathLike | None = None, trust_remote_code: bool = False):
    """The tokenizer ``load_base(spec)`` would return (same sources: embedded, .gguf, HF folder, hub id)."""
    from transformers import AutoTokenizer

    from lorascope.models.loading import EMBEDDED_NAMES, _check_gguf, _looks_like_path, embedded_gguf_path

    spec_str = "embedded" if spec is None else str(spec)
    if spec_str.lower() in EMBEDDED_NAMES or spec_str.endswith(".gguf"):
        path = embedded_gguf_path() if spec_str.lower() in EMBEDDED_NAMES else Path(spec_str).expanduser()
        _check_gguf(path)
        try:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except ImportError as exc:
            raise LorascopeError("loading GGUF needs the 'gguf' package", fix="pip install gguf") from exc
    elif Path(spec_str).expanduser().exists():
        folder = Path(spec_str).expanduser()
        if not (folder / "config.json").is_file():
            raise LorascopeError(
                f"{folder} is not a Hugging Face model folder (no config.json)",
                fix="point at a folder saved with save_pretrained, a .gguf file, or a hub id",
            )
        tok = AutoTokenizer.from_pretrained(folder)
    elif _looks_like_path(spec_str):
        raise LorascopeError(
            f"model path {spec_str} does not exist",
            fix="check the path, or use 'embedded' for the built-in SmolLM2-135M-Instruct",
        )
    else:
        try:
            tok = AutoTokenizer.from_pretrained(spec_str, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise LorascopeError(
                f"could not load the tokenizer of {spec_str!r} from the Hugging Face hub",
                fix="download the model once (huggingface-cli download) and pass the local folder "
                "path, or use 'embedded'",
            ) from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


__all__ = ["load_tokenizer"]
