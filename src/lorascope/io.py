"""Atomic file writes and an output-folder lock.

Nothing lorascope writes is ever half-written: every file goes to a temporary sibling, is fsync'ed and then
renamed over the target (rename is atomic on POSIX). A killed process leaves either the old file or the new one,
plus at worst a ``.tmp-*`` sibling that the next run ignores and cleans.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lorascope.errors import LorascopeError

TMP_PREFIX = ".tmp-"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _disk_error(path: Path, exc: OSError) -> LorascopeError:
    if exc.errno == errno.ENOSPC:
        return LorascopeError(f"disk full while writing {path}", fix="free space or choose another output folder")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LorascopeError(f"cannot write {path}: {exc.strerror}", fix="choose a writable output folder")
    return LorascopeError(f"cannot write {path}: {exc}", fix="check the output folder")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync and rename it over ``path``.

    For writers that want a file name (``safetensors.torch.save_file``, ``DataFrame.to_parquet``).
    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
    except OSError as exc:
        raise _disk_error(path, exc) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _disk_error(path, exc) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """``open`` for writing, atomically (see module docstring)."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as fh:
        yield fh
        fh.flush()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise LorascopeError(f"{path} does not exist", fix="check the path") from exc
    except json.JSONDecodeError as exc:
        raise LorascopeError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})",
                             fix="restore or delete the file and re-run") from exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able object, independent of key order (used for stage caching and config hashes)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def clean_tmp_files(folder: str | os.PathLike) -> int:
    """Remove ``.tmp-*`` leftovers of killed writers below ``folder``; returns how many were removed."""
    n = 0
    for p in Path(folder).rglob(TMP_PREFIX + "*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


class OutputLock:
    """An exclusive lock on an output folder, so two runs never write the same folder at once.

    Uses ``fcntl.flock`` on ``<folder>/.lock``: the kernel drops it when the process dies (even on SIGKILL),
    so a killed run never leaves a stale lock behind.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._fh: IO[str] | None = None

    def __enter__(self) -> OutputLock:
        import fcntl

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.folder / ".lock", "a+")
        except OSError as exc:
            raise _disk_error(self.folder, exc) from exc
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._fh.close()
            self._fh = None
            raise LorascopeError(
                f"another lorascope process is writing {self.folder}",
                fix="wait for it to finish, or choose another output folder",
            ) from exc
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(str(os.getpid()))
        self._fh.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
