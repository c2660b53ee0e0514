"""configs/examples/ run end to end through `lorascope run` (acceptance of issue #18): a checkpoint sequence of a
tiny model (3 LoRA checkpoints) gives ONE report with a row per checkpoint, and a full fine-tune of a tiny model
is measured like an adapter (no splice: that needs a PEFT model)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from lorascope.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "configs" / "examples"
pytestmark = pytest.mark.slow  # each study trains SAEs and writes a report (~30 s of CPU)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A working directory holding runs/examples-data, as the example configs expect."""
    spec = importlib.util.spec_from_file_location("build_examples", EXAMPLES / "build_examples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = tmp_path_factory.mktemp("examples")
    data = root / "runs" / "examples-data"
    mod.build_chat_data(data)
    mod.build_full_finetune(data)
    mod.build_checkpoints(data)
    return root


def run_example(root: Path, name: str, monkeypatch) -> Path:
    monkeypatch.chdir(root)
    try:
        main(["run", str(EXAMPLES / f"{name}.yaml"), "--quiet"])
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
    return root / "runs"


def test_checkpoint_sequence_gives_one_report_with_a_row_per_checkpoint(built, monkeypatch):
    out = run_example(built, "checkpoint_sequence", monkeypatch) / "example_checkpoints"
    df = pd.read_parquet(out / "results" / "results.parquet")
    steps = df[df.metric == "checkpoint_step"].set_index("adapter")
    assert steps.value.to_dict() == {"run_step_4": 4.0, "run_step_8": 8.0, "run_step_16": 16.0}
    assert set(steps.note) == {"run"} and set(steps.family) == {"checkpoint"}
    for adapter in steps.index:  # every checkpoint is measured like an adapter, at the one layer
        rows = df[(df.adapter == adapter) & (df.layer == 1)]
        for metric in ("delta_norm_mean", "mmcs_adapter_to_ref", "l0_adapter_sae", "kl_recovered_rel_adapter_sae"):
            assert math.isfinite(rows[rows.metric == metric].value.iloc[0]), (adapter, metric)
    meta = json.loads((out / "results" / "meta.json").read_text())
    assert meta["fine_tunes"]["run_step_8"] == {"kind": "peft", "step": 8}

    page = (out / "report.html").read_text()
    section = page[page.index("<section id='checkpoints'>") :]
    section = section[: section.index("</section>")]
    body_rows = re.findall(r"<tr><td class='num'>(\d+)</td><td>(run_step_\d+)</td>", section)
    assert body_rows == [("4", "run_step_4"), ("8", "run_step_8"), ("16", "run_step_16")]  # step order
    norms = df[(df.metric == "delta_norm_mean") & (df.layer == 1)].set_index("adapter").value
    assert f"{norms['run_step_16']:.4g}" in section  # the section shows the table's own values
    # the checkpoints differ, so their Δ differs: training moved the adapter between checkpoints
    assert len({round(v, 6) for v in norms[list(steps.index)]}) == 3


def test_full_finetune_study_runs_and_skips_only_the_splice(built, monkeypatch):
    out = run_example(built, "full_finetune", monkeypatch) / "example_full_ft"
    df = pd.read_parquet(out / "results" / "results.parquet")
    ft = df[df.adapter == "full_ft"]
    assert not ft.empty and set(ft.layer) >= {1}
    assert "splice" not in set(ft.family)  # needs a PeftModel; a whole model has none
    for fam in ("delta_norm", "reconstruction", "density", "decoder_similarity"):
        assert fam in set(ft.family), fam
    assert ft.value.map(math.isfinite).all(), ft[~ft.value.map(math.isfinite)]
    assert (ft[ft.metric == "delta_norm_mean"].value > 0).all()
    meta = json.loads((out / "results" / "meta.json").read_text())
    assert meta["fine_tunes"] == {"full_ft": {"kind": "full", "step": None}}
    store = next((out / "activations").glob("store-*/store"))
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["config"]["adapters"]["kind"] == "full-model"  # two models run on the same batches
    assert "id='checkpoints'" not in (out / "report.html").read_text()  # no sequence, no section


def test_chat_jsonl_study_on_a_tiny_model(built, monkeypatch):
    """chat_jsonl.yaml with the tiny model in place of SmolLM2 (same data: chat-JSONL fine-tuning, plain-text
    activations); the embedded-model run itself takes minutes and is the same code."""
    monkeypatch.chdir(built)
    small = {
        "model.spec": "runs/examples-data/tiny-base",
        "extraction.layers": "[1]",
        "data.max_length": "96",
        "adapter_sae": "{expansion: 2, k: 4, tokens: 1024, batch_size: 128}",
        "reference_sae": "{expansion: 2, k: 4, tokens: 1024, batch_size: 128}",
        "geometry": "{subspace_k: 4, bootstrap: 20, cka_max_tokens: 200, eval_tokens: 400, splice_docs: 4}",
    }
    args = [a for k, v in small.items() for a in ("--set", f"{k}={v}")]
    try:
        main(["run", str(EXAMPLES / "chat_jsonl.yaml"), "--quiet", *args])
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
    out = built / "runs" / "example_chat"
    df = pd.read_parquet(out / "results" / "results.parquet")
    assert {"rank_4", "rank_16"} <= set(df.adapter)
    lora = df[df.family == "lora"]
    assert set(lora.metric) >= {"train_loss_start", "train_loss_end", "heldout_loss_adapted"}
    for done in (out / "adapters").glob("rank_*/done.json"):
        examples = json.loads(done.read_text())["info"]["examples"]
        assert examples["policy"] == "truncate" and examples["kept"] + examples["truncated"] > 30, examples
    store = next((out / "activations").glob("store-*/store"))
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["config"]["n_docs"] == 96  # every paragraph of corpus.txt is a document
    assert "splice" in set(df.family)  # PEFT adapters: the splice test runs
