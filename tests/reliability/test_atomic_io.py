"""Atomic folder writes and leftover cleaning (lorascope.io), the building blocks the fault-injection tests rely on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.io import OutputLock, atomic_dir, clean_tmp_files, tmp_prefix


def test_atomic_dir_swaps_whole_folders_and_keeps_named_entries(tmp_path):
    target = tmp_path / "sae"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    (target / "ckpt").mkdir()
    (target / "ckpt" / "c.pt").write_text("state")
    with OutputLock(target) as lock:
        with atomic_dir(target, keep=["ckpt", ".lock"]) as tmp:
            (tmp / "a.txt").write_text("new")
        assert (target / "a.txt").read_text() == "new" and (target / "ckpt" / "c.pt").read_text() == "state"
        assert os.path.samefile(target / ".lock", f"/proc/self/fd/{lock._fh.fileno()}")  # same file, still held
        with pytest.raises(LorascopeError, match="another lorascope process"):
            OutputLock(target).__enter__()
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporary folder left


def test_clean_tmp_files_spares_live_writers(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        ).stdout.strip()
        live = tmp_path / f".tmp-shard_000001.safetensors.{child.pid}.abc123"
        stale = tmp_path / f".tmp-shard_000002.safetensors.{dead}.xyz789"
        own = tmp_path / f"{tmp_prefix('x.json')}q1w2e3"
        legacy = tmp_path / ".tmp-results"  # no pid: an older lorascope's name
        rust = tmp_path / "shards" / ".tmpAb12Cd"  # safetensors' own temporary file
        (tmp_path / "shards").mkdir()
        for p in (live, stale, own, rust):
            p.write_bytes(b"x")
        legacy.mkdir()
        (legacy / "f").write_text("x")
        keep = tmp_path / "shards" / "shard_000000.safetensors"
        keep.write_bytes(b"y")
        assert clean_tmp_files(tmp_path) == 4
        assert live.exists() and keep.exists()
        assert not any(p.exists() for p in (stale, own, legacy, rust))
    finally:
        child.kill()
        child.wait()
    assert clean_tmp_files(tmp_path) == 1 and not live.exists()


def test_saved_sae_folder_keeps_checkpoint_and_lock(tmp_path):
    from lorascope.saes import create_sae, load_sae, save_sae

    out = tmp_path / "sae"
    (out / "ckpt").mkdir(parents=True)
    (out / "ckpt" / "checkpoint.pt").write_bytes(b"ckpt")
    with OutputLock(out):
        save_sae(create_sae("topk", 8, 16, k=2, seed=1), out)
        sae = create_sae("topk", 8, 16, k=2, seed=2)
        save_sae(sae, out)
        assert (out / ".lock").exists() and (out / "ckpt" / "checkpoint.pt").read_bytes() == b"ckpt"
    assert torch.equal(load_sae(out).W_dec, sae.W_dec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_signals_are_held_back_while_a_temporary_file_is_created_and_delivered_after():
    """atomic_path / atomic_dir create their temporary with SIGINT/SIGTERM deferred: a signal in that window would
    otherwise raise before the cleanup that removes the temporary is in place (seen once: a SIGTERM during
    `extract` left `.tmp-rank000.safetensors.*` behind)."""
    import os
    import signal

    from lorascope.io import _signals_deferred

    seen: list[str] = []

    def handler(signum, frame):
        seen.append("handled")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with _signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # bytecodes at which a pending Python handler would otherwise run
                pass
            seen.append("inside")
        for _ in range(1000):  # delivered once the block ends (Python runs the handler at its next check)
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == ["inside", "handled"]


def test_a_signal_arriving_while_atomic_path_creates_its_temporary_leaves_nothing(tmp_path, monkeypatch):
    """The signal held back during the creation is delivered inside the block whose cleanup removes the file."""
    import os
    import signal
    import tempfile

    import lorascope.io as io

    class Stop(BaseException):
        pass

    def handler(signum, frame):
        raise Stop

    real = tempfile.mkstemp

    def mkstemp_then_signal(*args, **kwargs):
        out = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives right after the file exists, before its name is returned
        return out

    previous = signal.signal(signal.SIGTERM, handler)
    monkeypatch.setattr(io.tempfile, "mkstemp", mkstemp_then_signal)
    try:
        try:
            with io.atomic_path(tmp_path / "x.bin") as tmp:
                tmp.write_bytes(b"never")
        except Stop:
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", ["atomic_path", "atomic_dir"])
def test_a_signal_received_by_another_thread_is_still_held_back(tmp_path, monkeypatch, writer):
    """With other threads alive (torch's, OpenMP's), a process-directed SIGTERM can land in any thread that does not
    block it, and Python then runs the handler in the main thread at its next check. A signal mask in the main
    thread does not hold that back (CI saw `.tmp-rank000.safetensors.*` left after a SIGTERM to `extract`); the
    deferral must, and the cleanup must then remove the temporary."""
    import os
    import signal
    import tempfile
    import threading
    import time

    import lorascope.io as io

    class Stop(BaseException):
        pass

    calls: list[str] = []

    def handler(signum, frame):
        calls.append("handled")
        raise Stop

    # a thread started before the writer (a new thread inherits its creator's signal mask) that sends the
    # signal on request: it does not block SIGTERM, so the kernel may deliver it there
    go, sent = threading.Event(), threading.Event()

    def sender():
        go.wait()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # stay alive (unblocked) while the signal is delivered
        sent.set()

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()

    def from_another_thread():
        go.set()
        sent.wait(5)
        for _ in range(1000):  # bytecodes at which a pending Python handler would run
            pass

    name = "mkstemp" if writer == "atomic_path" else "mkdtemp"
    real = getattr(tempfile, name)

    def create_then_signal(*args, **kwargs):
        out = real(*args, **kwargs)
        from_another_thread()  # arrives after the temporary exists, before its name is returned
        calls.append("created")
        return out

    previous = signal.signal(signal.SIGTERM, handler)
    monkeypatch.setattr(io.tempfile, name, create_then_signal)
    try:
        with pytest.raises(Stop):
            with getattr(io, writer)(tmp_path / "x"):
                calls.append("body")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert calls == ["created", "handled"]  # held back until the name was known, delivered before the body
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is previous
