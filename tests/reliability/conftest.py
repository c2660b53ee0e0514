"""Helpers for the reliability tests: run the real ``lorascope`` command as a subprocess, SIGKILL it when a file
appears, compare finished artefacts by content, and a miniature study config (same as tests/pipeline)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tiny_models import miniature_study_config as mini_config

# Subprocesses run single-threaded like the test process (conftest sets torch threads to 1), so the in-process
# reference runs and the killed/resumed subprocess runs do the same float arithmetic.
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def lorascope_cmd(*args: str) -> list[str]:
    """``python -m lorascope ARGS`` with the test's interpreter (the same entry point as the console script)."""
    return [sys.executable, "-m", "lorascope", *map(str, args)]


def console_script() -> Path:
    return Path(sys.executable).parent / "lorascope"


def run_to_end(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def run_and_kill(cmd: list[str], trigger: Callable[[], bool], timeout: float = 240, poll: float = 0.002) -> str:
    """Start ``cmd``; SIGKILL it as soon as ``trigger()`` is true. Returns 'killed' or 'finished' (when the
    command ended before the trigger fired). Fails on a non-zero exit that was not our kill."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if trigger():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return "killed"
            if time.monotonic() > deadline:
                raise AssertionError(f"{cmd} did not reach its kill point within {timeout} s")
            time.sleep(poll)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        stderr = proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}) before its kill point:\n{stderr[-3000:]}"
    return "finished"


def run_and_signal(
    cmd: list[str], trigger: Callable[[], bool], sig: int = signal.SIGINT, timeout: float = 240, poll: float = 0.002
) -> subprocess.CompletedProcess:
    """Start ``cmd``; send it ``sig`` (as Ctrl-C or ``kill`` would) once ``trigger()`` is true, wait for it to end
    and return its exit status and output. Fails if the command ended before the trigger fired."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not trigger():
            assert proc.poll() is None, f"{cmd} ended ({proc.returncode}) before its signal point"
            assert time.monotonic() < deadline, f"{cmd} did not reach its signal point within {timeout} s"
            time.sleep(poll)
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def exists(pattern_root: Path, pattern: str, at_least: int = 1) -> Callable[[], bool]:
    """Trigger: at least ``at_least`` files matching the glob ``pattern`` below ``pattern_root``."""
    return lambda: sum(1 for _ in pattern_root.glob(pattern)) >= at_least


def any_of(*triggers: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: any(t() for t in triggers)


def changed_times(path: Path, n: int) -> Callable[[], bool]:
    """Trigger: ``path`` has been (re)written ``n`` times since the trigger was made (by mtime/inode)."""
    seen: list[tuple[int, int]] = []

    def check() -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        key = (st.st_ino, st.st_mtime_ns)
        if not seen or seen[-1] != key:
            seen.append(key)
        return len(seen) >= n

    return check


def tmp_leftovers(root: Path) -> list[Path]:
    """Temporary files of killed writers: ours (``.tmp-*``) and safetensors' (``.tmpXXXXXX``)."""
    return sorted(p for p in root.rglob(".tmp*"))


def safetensors_content(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})  # noqa: SIM118


def assert_same_safetensors(a: Path, b: Path) -> None:
    ta, ma = safetensors_content(a)
    tb, mb = safetensors_content(b)
    assert ma == mb, (a, b)
    assert sorted(ta) == sorted(tb), (a, b)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), (a, k)


def assert_same_store(a: Path, b: Path) -> None:
    """Two activation stores hold the same data: manifest, documents, statistics and every shard's tensors."""
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma == mb  # includes every shard's rows, counts and sha256
    assert json.loads((a / "docs.json").read_text()) == json.loads((b / "docs.json").read_text())
    for name in ("docs.safetensors", "stats.safetensors"):
        assert_same_safetensors(a / name, b / name)
    for rec in ma["shards"]:
        assert_same_safetensors(a / rec["file"], b / rec["file"])
    assert sorted(p.name for p in (a / "shards").iterdir()) == sorted(p.name for p in (b / "shards").iterdir())


def assert_same_sae(a: Path, b: Path) -> None:
    from lorascope.saes import load_sae

    sa, sb = load_sae(a), load_sae(b)
    assert sa.cfg.to_dict() == sb.cfg.to_dict()
    da, db = sa.state_dict(), sb.state_dict()
    assert sorted(da) == sorted(db)
    for k in da:
        assert torch.equal(da[k].cpu(), db[k].cpu()), (a, k)


@pytest.fixture(scope="session")
def rel() -> SimpleNamespace:
    """The helpers above, for test modules (which cannot import each other under --import-mode=importlib)."""
    return SimpleNamespace(
        **{
            f.__name__: f
            for f in (
                lorascope_cmd,
                console_script,
                run_to_end,
                run_and_kill,
                run_and_signal,
                exists,
                any_of,
                changed_times,
                tmp_leftovers,
                safetensors_content,
                assert_same_safetensors,
                assert_same_store,
                assert_same_sae,
            )
        },
        ENV=ENV,
        mini_config=mini_config,
    )
