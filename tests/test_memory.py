"""The process's malloc settings (lorascope._memory.keep_freed_memory): freed large blocks are reused within the
process, and release_freed_memory still hands free pages back. Run in subprocesses: mallopt is process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_REUSE_PROBE = """
import os, resource, torch
from lorascope._memory import keep_freed_memory, release_freed_memory
applied = keep_freed_memory()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
for i in range(40):
    if i == 30:  # the last 10 of 40: after the heap has grown to what the loop needs
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
    del t
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
held = rss()
release_freed_memory()
print(applied, faults, (held - rss()) // 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_freed_blocks_and_release_still_returns_them():
    """Forty 64-MiB tensors made and freed in turn, page faults counted over the last ten: with glibc's defaults
    each is a fresh mmap whose 16,384 pages fault in again (163,840 or more); with keep_freed_memory() freed
    blocks are reused once the heap has grown (in the first 30: measured 2 to 8 growths), so at most one more
    growth's worth; release_freed_memory() then hands the freed pages back. LORASCOPE_MALLOC=default leaves
    glibc's settings alone."""

    def probe(mode: str) -> tuple[str, int, int]:
        env = {**os.environ, "LORASCOPE_MALLOC": mode}
        out = subprocess.run([sys.executable, "-c", _REUSE_PROBE], env=env, capture_output=True, text=True, check=True)
        applied, faults, returned_mib = out.stdout.split()
        return applied, int(faults), int(returned_mib)

    tuned, default = probe("tuned"), probe("default")
    assert tuned[0] == "True" and default[0] == "False"
    assert default[1] >= 10 * 16 * 1024  # every allocation faulted all its pages in
    assert tuned[1] <= 16 * 1024 + 1024, (tuned, default)
    assert tuned[2] >= 60, tuned  # the reused blocks were resident; release_freed_memory returned them
