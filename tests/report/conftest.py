"""A fake run folder with figures and report, built once per session (figure rendering is the slow part)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def reported_run(tmp_path_factory) -> tuple[Path, list[Path], Path]:
    """(run_dir, figure paths from make_all_figures, report.html path)."""
    from lorascope.report import make_all_figures, write_fake_run, write_report

    run = write_fake_run(tmp_path_factory.mktemp("fake") / "run", seed=0)
    paths = make_all_figures(run)
    report = write_report(run, make_figures=False)
    return run, paths, report
