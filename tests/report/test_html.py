"""HTML report: one self-contained file, escaped data, sections present; rendered in headless Chromium."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import pytest

from lorascope import __version__
from lorascope.report import FIGURES, load_run, render_report, write_fake_run
from lorascope.report.html import write_report
from lorascope.results import ResultRow, rows_to_frame

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="headless Chromium not installed (apt-get install -y chromium)"
)


def test_report_is_one_self_contained_file(reported_run):
    run, paths, report = reported_run
    assert report == run / "report.html"
    text = report.read_text(encoding="utf-8")
    # no external resource of any kind
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert "<link" not in text.lower() and "@import" not in text and "url(" not in text
    srcs = re.findall(r"""<img[^>]*\ssrc='([^']*)'""", text)
    assert len(srcs) == len([p for p in paths if p.suffix == ".png"]) == len(FIGURES)
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1]).startswith(b"\x89PNG")
    hrefs = re.findall(r"""href=['"]([^'"]*)['"]""", text)
    assert hrefs and all(h.startswith("#") for h in hrefs)
    for section in ("findings", "figures", "results", "contexts", "absorption"):
        assert f"id='{section}'" in text
    assert f"lorascope {__version__}" in text
    assert text.count("<script>") == 1  # ours only
    assert "Not run for this experiment" in text  # no absorption rows in the default fake run
    assert text.count("<tr>") >= len(load_run(run).df)


def test_report_escapes_every_data_string(tmp_path):
    run_dir = write_fake_run(tmp_path / "r", seed=2)
    run = load_run(run_dir)
    run.contexts[0]["contexts"][0].update(text_before="x <script>alert(1)</script> & y", token="</mark><i>")
    run.meta["name"] = "<img src=x onerror=alert(2)>"
    run.meta["config"] = {"note": "</pre><script>evil()</script>"}
    extra = rows_to_frame([ResultRow("density", "<svg onload=alert(3)>", 1.0, layer=3, adapter="a&b<c>")])
    import pandas as pd

    run.df = pd.concat([run.df, extra], ignore_index=True)
    text = render_report(run, {})
    assert text.count("<script>") == 1 and "<img src=x" not in text and "<svg onload" not in text
    assert "x &lt;script&gt;alert(1)&lt;/script&gt; &amp; y" in text
    assert '<mark title="activation' in text and "&lt;/mark&gt;&lt;i&gt;</mark>" in text
    assert "&lt;/pre&gt;&lt;script&gt;evil()" in text and "a&amp;b&lt;c&gt;" in text


def test_absorption_section_when_rows_exist(tmp_path):
    run_dir = write_fake_run(tmp_path / "r", seed=0, with_absorption=True)
    text = render_report(load_run(run_dir), {})
    sec = text[text.index("id='absorption'") :]
    assert "Not run" not in sec
    for m in ("absorption_fraction", "full_absorption_rate", "splitting_k", "probe_letters_passing"):
        assert m in sec
    assert "base_sae/rank_4" in sec


def test_write_report_without_figures_on_disk(tmp_path):
    run_dir = write_fake_run(tmp_path / "r", seed=0)
    out = write_report(run_dir, make_figures=False)
    text = out.read_text(encoding="utf-8")
    assert "<img" not in text and "Not drawn (no data in this run)" in text


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile{len(list(tmp_path.iterdir()))}"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def _rows(dom: str) -> list[str]:
    body = dom[dom.index('id="results-table"') :]
    body = body[body.index("<tbody>") : body.index("</tbody>")]
    return re.findall(r"<tr[^>]*>.*?</tr>", body, re.S)


@needs_chromium
def test_report_renders_in_headless_chromium(reported_run, tmp_path):
    run, _, report = reported_run
    df = load_run(run).df
    dom = _chromium(["--dump-dom", report.as_uri() + "#sort=value:desc"], tmp_path).stdout
    assert 'class="data js-sortable"' in dom  # the script ran and wired the table
    assert dom.count("data:image/png;base64,") == len(FIGURES)
    rows = _rows(dom)
    assert len(rows) == len(df)
    vcol = list(df.columns).index("value")
    values = [float(re.search(r'data-v="([^"]*)"', re.findall(r"<td[^>]*>", r)[vcol]).group(1)) for r in rows]
    assert values == sorted(values, reverse=True) and values[0] == df["value"].max()
    assert 'aria-sort="descending"' in dom

    dom = _chromium(["--dump-dom", report.as_uri() + "#filter=mmcs_adapter_to_ref"], tmp_path).stdout
    shown = [r for r in _rows(dom) if not r.startswith("<tr hidden")]
    assert len(shown) == int((df["metric"] == "mmcs_adapter_to_ref").sum()) > 0
    assert all("mmcs_adapter_to_ref" in r for r in shown)

    shot = tmp_path / "report.png"
    _chromium([f"--screenshot={shot}", "--window-size=1280,4000", report.as_uri()], tmp_path)
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 50_000


def test_absorption_rows_from_the_cli_join_the_report(tmp_path):
    """`lorascope absorption --out RUN/absorption` writes absorption.csv; the report of RUN then shows them."""
    from lorascope.report.run import load_run, read_results

    source = write_fake_run(tmp_path / "src", seed=0, with_absorption=True)
    rows = read_results(source)
    run_dir = write_fake_run(tmp_path / "r", seed=0)
    assert "absorption" not in set(load_run(run_dir).df.family)
    (run_dir / "absorption").mkdir()
    rows[rows.family == "absorption"].to_csv(run_dir / "absorption" / "absorption.csv", index=False)
    df = load_run(run_dir).df
    assert set(df[df.family == "absorption"].metric) >= {"absorption_fraction", "full_absorption_rate"}
