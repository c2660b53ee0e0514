"""Helper processes (lorascope._spawn.spawned) do not re-run the script that started them."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys, time
from pathlib import Path
Path(sys.argv[1]).open("a").write("ran\\n")  # top level, no __main__ guard
if sys.argv[2] == "spawned":
    from lorascope._spawn import spawned
    with spawned() as ctx:
        p = ctx.Process(target=time.sleep, args=(0,))
        p.start()
else:
    import multiprocessing
    p = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    p.start()
p.join()
print(p.exitcode)
"""


def test_spawned_children_do_not_rerun_an_unguarded_script(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    runs = {}
    for mode in ("spawned", "plain"):
        log = tmp_path / f"{mode}.log"
        out = subprocess.run([sys.executable, str(script), str(log), mode], capture_output=True, text=True)
        runs[mode] = (log.read_text().count("ran"), out.stdout.strip())
    assert runs["spawned"] == (1, "0")  # the script ran once; the child ran its target and exited cleanly
    assert runs["plain"][0] == 2  # multiprocessing's own spawn re-runs the script in the child
