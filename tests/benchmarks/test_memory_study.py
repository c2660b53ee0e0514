"""benchmarks/memory_study.py: the process-tree memory it reports, and its input checks (the study itself is a
benchmark run, not a test)."""

from __future__ import annotations

import subprocess
import sys

import pytest

_HOLDER = """
import os, sys
block = bytearray(256 * 2**20)  # 256 MiB, every page written below so it is resident
for i in range(0, len(block), 4096):
    block[i] = 1
print(os.getpid(), flush=True)
sys.stdin.read()  # hold it until the test closes our stdin
"""


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return int(next(line for line in fh if line.startswith("VmRSS")).split()[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_tree_sum_counts_the_children_and_not_other_processes(bench):
    M = bench("memory_study")
    # a parent shell whose child holds 256 MiB: the parent's tree includes it, the child's own tree is the child
    parent = subprocess.Popen(
        # a command follows python's, so the shell forks it rather than exec-ing into it
        ["/bin/sh", "-c", f'{sys.executable} -c "$0"; exit $?', _HOLDER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        child = int(parent.stdout.readline())  # printed once its pages are resident
        tree = M._tree_rss_kb(parent.pid)
        assert tree == pytest.approx(_rss_kb(parent.pid) + _rss_kb(child), abs=2048)  # pages may move meanwhile
        assert tree >= 256 * 1024
        assert M._tree_rss_kb(child) < tree  # the child's tree holds the child only
        assert M._tree_rss_kb(2**22 + 1) == 0  # no such process: nothing
    finally:
        parent.stdin.close()  # the child reads end-of-file and exits, then the shell
        parent.wait()


def test_refuses_a_missing_data_file_and_a_used_output_folder(bench, tmp_path, capsys):
    M = bench("memory_study")
    assert M.main(["--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "no file" in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("keep me")
    assert M.main(["--data", str(data), "--out", str(used)]) == 2
    assert "is not empty" in capsys.readouterr().err and (used / "x").read_text() == "keep me"
    assert not (tmp_path / "o").exists()
