"""A dequantised-model cache: a GGUF file is turned into a safetensors folder once, later loads read that folder.

Dequantising the embedded SmolLM2 GGUF costs ~45 s on a small CPU and every command paid it again. The first load
of a GGUF now writes ``model.safetensors`` (fp32, the exact tensors transformers' GGUF loader produces), the
config and the tokenizer into ``<cache>/models/<key>/``; every later load (of any dtype) reads that folder, so
nothing needs the GGUF file after the first load. A tokenizer loaded without the model (data checks before the
model load) also reads the folder when it exists (:func:`cached_tokenizer_folder`).

* ``<cache>`` is ``$LORASCOPE_CACHE`` if set, else ``$XDG_CACHE_HOME/lorascope``, else ``~/.cache/lorascope``.
  ``LORASCOPE_CACHE=off`` (or ``0``/``none``) disables the cache. An fp32 SmolLM2-135M entry takes ~540 MB.
* ``<key>`` is the sha256 of the GGUF file's bytes plus the transformers version and this cache's format version
  (a new transformers may map or dequantise tensors differently). The file's hash is computed once and memoised
  in ``<cache>/gguf_index.json`` by (absolute path, size, mtime_ns): a changed file is hashed again.
* Every file of an entry is listed with its sha256 in ``lorascope_cache.json``, written last; a load checks every
  hash, and an entry that fails (truncated, bit flip, missing file) is rebuilt after a one-line notice.
* Entries are written with :func:`lorascope.io.atomic_dir` under an exclusive ``flock``, so concurrent processes
  (ranks of one run) build an entry once and never read a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from lorascope.errors import LorascopeError
from lorascope.io import atomic_dir, read_json, sha256_file, stable_hash, write_json

CACHE_ENV = "LORASCOPE_CACHE"
FORMAT_VERSION = 1
MANIFEST = "lorascope_cache.json"
WEIGHTS = "model.safetensors"
_DISABLED = {"off", "0", "none", "false", "no"}


def cache_root() -> Path | None:
    """The cache folder (see module docstring), or None when ``LORASCOPE_CACHE`` disables it."""
    env = os.environ.get(CACHE_ENV)
    if env is not None and env.strip().lower() in _DISABLED:
        return None
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lorascope"


def notice(message: str) -> None:
    print(f"lorascope: {message}", file=sys.stderr, flush=True)


def file_digest(path: str | os.PathLike, root: Path) -> str:
    """sha256 of ``path``'s bytes, memoised in ``root/gguf_index.json`` by (absolute path, size, mtime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    index_path = root / "gguf_index.json"
    try:
        index = read_json(index_path) if index_path.is_file() else {}
    except LorascopeError:
        index = {}
    index = index if isinstance(index, dict) else {}
    seen = index.get(str(path))
    if isinstance(seen, dict) and seen.get("size") == st.st_size and seen.get("mtime_ns") == st.st_mtime_ns:
        return str(seen["sha256"])
    digest = sha256_file(path)
    index[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(LorascopeError, OSError):
        write_json(index_path, index)
    return digest


def entry_key(gguf_sha256: str) -> str:
    import transformers

    return f"{gguf_sha256[:32]}-{stable_hash({'transformers': transformers.__version__, 'v': FORMAT_VERSION}, 8)}"


def entry_problem(entry: Path, skip: frozenset[str] = frozenset()) -> str | None:
    """Why ``entry`` cannot be used (missing, bad manifest, a file missing or failing its sha256), or None.
    ``skip``: file names not checked (the weights, when only the tokenizer is read)."""
    if not (entry / MANIFEST).is_file():
        return "missing" if not entry.exists() else "no manifest (an interrupted write)"
    try:
        files = read_json(entry / MANIFEST)["files"]
    except (LorascopeError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({exc})"
    for name, digest in sorted(files.items()):
        if name in skip:
            continue
        p = entry / name
        if not p.is_file():
            return f"{name} is missing"
        if sha256_file(p) != digest:
            return f"{name} fails its sha256 check"
    return None


def _unshared_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the second name of tied tensors (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def _write_entry(entry: Path, gguf: Path, gguf_sha256: str) -> None:
    """Dequantise ``gguf`` to fp32 with transformers and write it, config and tokenizer into ``entry``."""
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with atomic_dir(entry) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_file(_unshared_state_dict(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        write_json(
            tmp / MANIFEST,
            {
                "files": files,
                "gguf": {"name": gguf.name, "sha256": gguf_sha256, "size": gguf.stat().st_size},
                "transformers": transformers.__version__,
                "format_version": FORMAT_VERSION,
            },
        )


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def cached_tokenizer_folder(gguf: str | os.PathLike) -> Path | None:
    """The cache entry of ``gguf`` when it already exists and every file but the weights passes its sha256 check,
    else None; nothing is built (a tokenizer alone is not worth dequantising the weights). Converting a GGUF's
    vocabulary to a tokenizer takes ~12 s for the embedded model; the entry's ``tokenizer.json`` loads in well
    under a second."""
    root = cache_root()
    if root is None:
        return None
    try:
        entry = root / "models" / entry_key(file_digest(gguf, root))
        return entry if entry_problem(entry, skip=frozenset({WEIGHTS})) is None else None
    except (OSError, LorascopeError):
        return None


def cached_gguf_folder(gguf: str | os.PathLike) -> Path | None:
    """The verified cache folder for ``gguf`` (built now if needed), or None when the cache is off or unwritable.

    The folder loads with ``from_pretrained(folder)`` like any Hugging Face model folder.
    """
    root = cache_root()
    if root is None:
        return None
    gguf = Path(gguf)
    try:
        entry = root / "models" / entry_key(file_digest(gguf, root))
        if entry_problem(entry) is None:
            return entry
        with _exclusive(root / "models" / f"{entry.name}.lock"):
            problem = entry_problem(entry)  # another process may have built it while we waited
            if problem is None:
                return entry
            if problem != "missing":
                notice(f"model cache {entry} is corrupt ({problem}); rebuilding it from {gguf.name}")
            else:
                notice(f"dequantising {gguf.name} once into the model cache {entry}")
            _write_entry(entry, gguf, file_digest(gguf, root))
    except (OSError, LorascopeError) as exc:
        why = exc.one_line() if isinstance(exc, LorascopeError) else str(exc)
        notice(
            f"model cache at {root} is not usable ({why}); loading {gguf.name} without it "
            f"(set {CACHE_ENV} to a writable folder)"
        )
        return None
    return entry
