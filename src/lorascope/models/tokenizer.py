"""The tokenizer of a model spec without loading the model, so data checks (long examples, empty datasets) run
in seconds, before the model load."""

from __future__ import annotations

import os

from lorascope.errors import LorascopeError


def load_tokenizer(spec: str | os.PathLike | None = None, trust_remote_code: bool = False):
    """The tokenizer ``load_base(spec)`` would return (same sources: embedded, .gguf, HF folder, hub id)."""
    from transformers import AutoTokenizer

    from lorascope.models.loading import resolve_spec, with_pad_token

    source, where = resolve_spec(spec)
    if source in ("embedded-gguf", "gguf"):
        from lorascope.models.cache import cached_tokenizer_folder

        folder = cached_tokenizer_folder(where)  # the model cache's copy, when a model load already wrote it
        try:
            if folder is not None:
                tok = AutoTokenizer.from_pretrained(folder)
            else:
                tok = AutoTokenizer.from_pretrained(where.parent, gguf_file=where.name)
        except ImportError as exc:
            raise LorascopeError("loading GGUF needs the 'gguf' package", fix="pip install gguf") from exc
    elif source == "local":
        tok = AutoTokenizer.from_pretrained(where)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise LorascopeError(
                f"could not load the tokenizer of {where!r} from the Hugging Face hub",
                fix="download the model once (huggingface-cli download) and pass the local folder "
                "path, or use 'embedded'",
            ) from exc
    return with_pad_token(tok)


__all__ = ["load_tokenizer"]
