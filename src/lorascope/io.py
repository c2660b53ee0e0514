"""Atomic file writes and an output-folder lock.

Nothing lorascope writes is ever half-written: every file goes to a temporary sibling, is fsync'ed and then
renamed over the target (rename is atomic on POSIX). A killed process leaves either the old file or the new one,
plus at worst a ``.tmp-*`` sibling that the next run ignores and cleans. Folders (an SAE, a PEFT adapter, a
results folder) are written the same way with :func:`atomic_dir`.

Temporary names carry the writer's pid (``.tmp-<name>.<pid>.<random>``), so :func:`clean_tmp_files` never
removes a file that a live process on this machine (another rank of the same run) is still writing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from lorascope.errors import LorascopeError

TMP_PREFIX = ".tmp-"
_TMP_PID = re.compile(r"\.(\d+)\.[^.]*$")  # the pid field of a temporary name (see tmp_prefix)
# safetensors >= 0.7 (Rust ``tempfile`` crate) writes ``.tmpXXXXXX`` beside its target and renames it: a kill
# mid-write leaves one behind, as big as the file (a whole shard).
_FOREIGN_TMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tmp_prefix(name: str) -> str:
    """Prefix for a temporary sibling of ``name`` (mkstemp/mkdtemp add a random suffix without dots)."""
    return f"{TMP_PREFIX}{name}.{os.getpid()}."


def _writer_alive(name: str) -> bool:
    m = _TMP_PID.search(name)
    if m is None or int(m.group(1)) == os.getpid():
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def _disk_error(path: Path, exc: OSError) -> LorascopeError:
    if exc.errno == errno.ENOSPC:
        return LorascopeError(f"disk full while writing {path}", fix="free space or choose another output folder")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LorascopeError(f"cannot write {path}: {exc.strerror}", fix="choose a writable output folder")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return LorascopeError(
            f"cannot write {path}: part of that path is an existing file, not a folder",
            fix="choose another output folder, or move the file out of the way",
        )
    return LorascopeError(f"cannot write {path}: {exc}", fix="check the output folder")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync and rename it over ``path``.

    For writers that want a file name (``safetensors.torch.save_file``, ``DataFrame.to_parquet``).
    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        # signals wait until the name is known, so the cleanup below always sees the file it must remove (a
        # signal held back here is delivered inside this try)
        with _signals_deferred():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path.name), dir=path.parent)
            tmp_path = Path(tmp)
            os.close(fd)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        raise _disk_error(path, exc) from exc
    except BaseException:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back inside the block, then delivered (their handlers run) right after it; in the
    main thread only, elsewhere a no-op.

    The Python handlers are swapped for one that records the signal, rather than blocking the signals with
    ``pthread_sigmask``: a mask holds back only the calling thread, so with torch's or OpenMP's threads alive the
    kernel hands a process-directed SIGTERM to another thread, and Python then runs the handler in the main
    thread at its next check anyway — inside the block (seen in CI: a SIGTERM during ``extract`` left
    ``.tmp-rank000.safetensors.*`` behind although the mask was in place).
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if h is not None}  # None: a handler set outside Python, left alone
    held: list[int] = []
    active = [True]

    def record(signum: int, frame: Any) -> None:
        if active[0]:
            if signum not in held:
                held.append(signum)
            return
        # the block has ended and the handlers are being put back: behave as the previous handler
        signal.signal(signum, previous[signum])
        signal.raise_signal(signum)

    installed: list[int] = []
    try:
        for s in previous:
            signal.signal(s, record)
            installed.append(s)
        yield
    finally:
        active[0] = False
        for s in installed:
            signal.signal(s, previous[s])
        for s in held:  # through the restored disposition: a Python handler runs here, SIG_DFL ends the process
            signal.raise_signal(s)


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
        raise LorascopeError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})", fix="restore or delete the file and re-run"
        ) from exc


def content_key(path: str | os.PathLike) -> dict[str, Any]:
    """A cache key of a file or folder's *contents*: {relative path: [size, sha256]} of every file under it (so a
    file rewritten in place, or a folder with a new timestamp but the same bytes, is told apart correctly)."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)) if p != root else p.name: [p.stat().st_size, sha256_file(p)] for p in files}


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


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb+") as fh:
                os.fsync(fh.fileno())
    for p in sorted((d for d in folder.rglob("*") if d.is_dir()), reverse=True):
        _fsync_dir(p)
    _fsync_dir(folder)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, keep: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success fsync it and swap it in for ``path``.

    A killed process leaves either the old folder or the new one complete (or, between the two renames, no
    folder at all), never a mixture. Entries of an existing ``path`` whose names are in ``keep`` (a checkpoint
    folder, a ``.lock`` file) are moved into the new folder first, so they survive the swap (a held lock stays
    held: the file is renamed, not recreated). On any exception the temporary folder is removed.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        with _signals_deferred():  # as in atomic_path: the cleanup below always knows the folder
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(path.name), dir=path.parent))
        yield tmp
        _fsync_tree(tmp)
        old = None
        if path.exists():
            for name in keep:
                if (path / name).exists() and not (tmp / name).exists():
                    os.replace(path / name, tmp / name)
            old = path.parent / f"{tmp_prefix('old-' + path.name)}{os.urandom(4).hex()}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(path, exc) from exc
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_tmp_files(folder: str | os.PathLike) -> int:
    """Remove leftovers of killed writers below ``folder`` (``.tmp-*`` files and folders, and the ``.tmpXXXXXX``
    files of safetensors' own writer); returns how many. Call it only while holding the folder's lock.

    ``.tmp-*`` leftovers whose writer (the pid in the name) is still alive on this machine are kept.
    """
    n = 0
    for p in sorted(Path(folder).rglob(".tmp*")):
        if not p.name.startswith(TMP_PREFIX) and not (_FOREIGN_TMP.match(p.name) and p.is_file()):
            continue
        if not p.exists() or _writer_alive(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
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


OUTPUT_RECORD = ".lorascope-output.json"  # which artefact an output folder holds, and a hash of its settings


def claim_output(
    folder: str | os.PathLike,
    kind: str,
    settings: Any,
    overwrite: bool = False,
    option: str = "--out",
    not_inside: Iterable[tuple[str, str | os.PathLike]] = (),
) -> None:
    """Make sure ``folder`` may receive the artefact ``kind`` made with ``settings`` (a JSON-able mapping).

    The first call writes ``folder/.lorascope-output.json`` (kind + settings hash). Later calls with the same
    kind and settings pass (a re-run resumes or redoes the same work). A folder that holds another artefact
    (another kind, other settings) or files lorascope did not write is refused with one line, unless
    ``overwrite``: then its contents are removed first (a held ``.lock`` stays), so the result never mixes two
    runs. ``not_inside``: (description, folder) pairs that ``folder`` must not lie in (an SAE written into its
    own activation store). Call it while holding the folder's :class:`OutputLock`.
    """
    folder = Path(folder)
    _refuse_inside(folder, not_inside, option)
    digest = stable_hash(settings)
    record_path = folder / OUTPUT_RECORD
    if _refuse_other(folder, kind, digest, overwrite, option):
        for entry in folder.iterdir():
            if entry.name == ".lock":
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    write_json(record_path, {"kind": kind, "settings_hash": digest, "settings": settings})


def _refuse_other(folder: Path, kind: str, digest: str, overwrite: bool, option: str) -> bool:
    """True when ``folder`` holds something else that ``overwrite`` allows replacing; raises without it."""
    record_path = folder / OUTPUT_RECORD
    record = read_json(record_path) if record_path.is_file() else None
    if record is not None and record.get("kind") == kind and record.get("settings_hash") == digest:
        return False
    content = sorted(e.name for e in folder.iterdir() if not e.name.startswith(".")) if folder.is_dir() else []
    if not content:  # empty, or only a record/lock of a run that wrote nothing yet
        return False
    if record is not None:
        what = (
            f"another {record.get('kind', 'artefact')}"
            if record.get("kind") != kind
            else f"{_article(kind)} {kind} made with other settings"
        )
    else:
        what = f"files of another run or program ({', '.join(content[:3])}{', …' if len(content) > 3 else ''})"
    if not overwrite:
        raise LorascopeError(
            f"{option} {folder} already holds {what}",
            fix=f"choose another {option} folder, or pass --overwrite to replace its contents",
        )
    return True


def check_output(
    folder: str | os.PathLike, kind: str, settings: Any, overwrite: bool = False, option: str = "--out"
) -> None:
    """The refusals of :func:`claim_output` without touching anything (to fail before expensive work; claim the
    folder later, when writing starts)."""
    _refuse_other(Path(folder), kind, stable_hash(settings), overwrite, option)


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" or noun.startswith(("SAE", "LoRA")) else "a"


def _refuse_inside(folder: Path, not_inside: Iterable[tuple[str, str | os.PathLike]], option: str) -> None:
    for what, other in not_inside:
        if folder.resolve().is_relative_to(Path(other).resolve()):
            raise LorascopeError(
                f"{option} {folder} is inside {what} {other}",
                fix=f"choose an {option} folder outside it, e.g. beside it",
            )


@contextlib.contextmanager
def claimed_output(
    folder: str | os.PathLike,
    kind: str,
    settings: Any,
    overwrite: bool = False,
    option: str = "--out",
    not_inside: Iterable[tuple[str, str | os.PathLike]] = (),
) -> Iterator[Path]:
    """``with OutputLock(folder)`` + :func:`claim_output`: the folder is checked (``not_inside`` before anything is
    created), locked, and claimed for ``kind``/``settings``; yields the folder."""
    folder = Path(folder)
    not_inside = list(not_inside)
    _refuse_inside(folder, not_inside, option)
    with OutputLock(folder):
        claim_output(folder, kind, settings, overwrite, option, not_inside)
        yield folder
