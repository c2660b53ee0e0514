"""`lorascope extract` with fine-tunes that are not one PEFT folder (--full-model, --checkpoints), a dataset with
its own field names (--column) and the long-example policy (--long-examples)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lorascope.activations import HeldOutSplit, open_store
from lorascope.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_llama_dir, tiny_adapters):
    """A text dataset with a field named ``body``, a perturbed whole copy of the tiny model, a checkpoint folder."""
    from lorascope.models import load_base

    root = tmp_path_factory.mktemp("cli_finetunes")
    words = "the pirate has sorted words and gives away two numbers".split()
    with open(root / "notes.jsonl", "w", encoding="utf-8") as fh:
        for i in range(10):
            fh.write(json.dumps({"body": " ".join(words[(i + j) % len(words)] for j in range(6 + i))}) + "\n")
    ft = load_base(tiny_llama_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ft.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ft.model.save_pretrained(root / "ft")
    ft.tokenizer.save_pretrained(root / "ft")
    for step in (3, 12):
        shutil.copytree(tiny_adapters[f"rank_{2 if step == 3 else 4}"], root / "run" / f"checkpoint-{step}")
    return root


def extract(tiny_llama_dir, out, *extra):
    main(
        [
            "extract",
            "--model",
            str(tiny_llama_dir),
            "--layers",
            "1",
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--docs-per-shard",
            "5",
            "--n-docs",
            "10",
            "--no-progress",
            *extra,
        ]
    )
    return open_store(out)


def test_whole_model_and_checkpoints_share_one_store_and_match_the_mixed_batch_path(tmp_path, tiny_llama_dir, inputs):
    data = ["--data", str(inputs / "notes.jsonl"), "--column", "text=body"]
    both = extract(
        tiny_llama_dir,
        tmp_path / "both",
        *data,
        "--full-model",
        f"ft={inputs / 'ft'}",
        "--checkpoints",
        f"run={inputs / 'run'}",
    )
    assert both.adapters == ["ft", "run_step_3", "run_step_12"]
    assert both.manifest["config"]["adapters"]["kind"] == "full-model"
    assert len(both.doc_ids) == 10
    ck3 = inputs / "run" / "checkpoint-3"
    peft = extract(tiny_llama_dir, tmp_path / "peft", *data, "--adapter", f"run_step_3={ck3}")
    half = HeldOutSplit(0.5)
    separate, mixed = both.held_out(1, "run_step_3", half), peft.held_out(1, "run_step_3", half)
    assert separate.delta.shape == mixed.delta.shape and separate.delta.shape[0] > 0
    # a PEFT checkpoint run as its own model gives the Δ of the mixed-batch path (float32 round-off only)
    torch.testing.assert_close(separate.delta, mixed.delta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(separate.base, mixed.base, rtol=1e-5, atol=1e-6)
    assert float(both.held_out(1, "ft", half).delta.norm()) > 0


def test_bad_finetune_options_are_one_line_before_any_model_load(tmp_path, tiny_llama_dir, inputs, capsys, monkeypatch):
    import lorascope.models as models

    monkeypatch.setattr(models, "load_base", lambda *a, **k: pytest.fail("model loaded before the check"))
    cases = [
        (["--full-model", f"ft={tmp_path}"], "adapters.load.ft.model"),
        (["--checkpoints", f"run={tmp_path}"], "holds no checkpoint-<step>/ folders"),
        (
            ["--adapter", f"x={inputs / 'run' / 'checkpoint-3'}", "--full-model", f"x={inputs / 'ft'}"],
            "'x' is given twice",
        ),
        ([], "nothing to compare with the base model"),
        (["--adapter", f"x={inputs / 'run' / 'checkpoint-3'}", "--long-examples", "cut"], "--long-examples"),
        (["--adapter", f"x={inputs / 'run' / 'checkpoint-3'}", "--column", "text"], "is not OURS=YOURS"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(["extract", "--model", str(tiny_llama_dir), "--layers", "1", "--out", str(tmp_path / "x"), *extra])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
