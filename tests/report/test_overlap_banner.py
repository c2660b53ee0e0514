"""A reference SAE let through by ``reference_sae.allow_overlap`` is flagged in the report, beside the findings."""

from __future__ import annotations

import pandas as pd

from lorascope.activations.split import HeldOutSplit, check_no_overlap
from lorascope.data import make_demo_dataset
from lorascope.report import load_run, render_report, write_fake_run
from lorascope.report.findings import compute_findings, findings_markdown
from lorascope.results import rows_to_frame
from lorascope.study.measure import overlap_row

TITLE = "Reference SAE saw evaluation documents"


def _check(n_leaked: int):
    docs = make_demo_dataset(80, seed=0)
    split = HeldOutSplit(0.3, seed=1)
    train, held = split.partition(docs)
    sae = {"split": split.record(train_docs=[docs[i] for i in train + held[:n_leaked]])}
    store = {"split": split.record(eval_docs=[docs[i] for i in held])}
    return check_no_overlap(sae, store, "reference SAE", allow_overlap=True)


def _run_with(tmp_path, rows):
    run = load_run(write_fake_run(tmp_path / "r", seed=0))
    run.df = pd.concat([run.df, rows_to_frame(rows)], ignore_index=True)
    return run


def test_allowed_overlap_shows_a_caution_before_the_findings_it_concerns(tmp_path):
    check = _check(4)
    assert check.status == "overlap" and check.n_overlap >= 3  # demo repeats texts: copies count once
    run = _run_with(tmp_path, [overlap_row(check, 6), overlap_row(_check(0), 14)])
    html = render_report(run, {})
    assert TITLE in html and f"layer 6: {check.n_overlap} documents" in html and "badge caution" in html
    assert html.index(TITLE) < html.index("<strong>", html.index(TITLE) + len(TITLE))  # first of the findings
    findings = compute_findings(run.df)
    assert [f.key for f in findings[:2]] == ["reference_overlap", "reconstruction"]
    assert "layer 14" not in findings[0].text  # a layer whose reference saw none of them is not named
    assert TITLE in findings_markdown(run.df)


def test_no_caution_without_overlap(tmp_path):
    clean = _run_with(tmp_path, [overlap_row(_check(0), 6)])
    assert TITLE not in render_report(clean, {})
    plain = load_run(write_fake_run(tmp_path / "plain", seed=0))
    assert TITLE not in render_report(plain, {})
