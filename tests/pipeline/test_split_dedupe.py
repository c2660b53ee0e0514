"""The study's held-out Δ documents never include the LoRA's own training texts (issue #14, "one held-out split"):
a constructed case on a tiny model, through the study's adapters and extraction stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorascope.activations.split import content_hash, dedupe_against
from lorascope.config import parse_config
from lorascope.data import make_demo_dataset
from tiny_models import miniature_study_config as mini_config


def _write_jsonl(path: Path, examples) -> Path:
    path.write_text(
        "".join(
            json.dumps({"instruction": e.instruction, "input": e.input, "output": e.output}) + "\n" for e in examples
        )
    )
    return path


def _stages(cfg):
    from lorascope.study.adapters import stage_adapters
    from lorascope.study.cache import RunState
    from lorascope.study.extract import stage_extract

    st = RunState(cfg, Path(cfg.output_dir), progress=False)
    lines: list[str] = []
    st.log = lines.append  # the run output, captured
    adapters = stage_adapters(st)
    return adapters, stage_extract(st, adapters).open(), lines, st


def test_a_lora_training_text_is_never_held_out(tiny_llama_dir, tmp_path):
    from lorascope.study.adapters import finetune_examples
    from lorascope.study.extract import activation_examples
    from lorascope.study.splits import study_holdout

    demo = make_demo_dataset(120, seed=3)
    distinct = [demo[i] for i in dedupe_against(demo, [])[0]]
    finetune = _write_jsonl(tmp_path / "finetune.jsonl", distinct[:30])
    over = {
        "data.finetune": str(finetune),
        "data.n_finetune": 30,
        "data.n_docs": 40,
        "data.held_out_fraction": 0.5,
        "adapters.train.ranks": [2],
        "adapters.train.steps": 2,
    }
    lora_train, lora_held = finetune_examples(parse_config(mini_config(tiny_llama_dir, tmp_path / "run", **over)))
    assert len(lora_train) >= 20 and lora_held  # what the LoRA trains on / holds out for its loss
    # activation documents: LoRA training texts (under other ids, i.e. matched by content), the LoRA's own held-out
    # examples (not training texts: they may be held out) and fresh texts
    acts = lora_train[:16] + lora_held + distinct[30:46]
    over["data.activations"] = str(_write_jsonl(tmp_path / "activations.jsonl", acts))
    cfg = parse_config(mini_config(tiny_llama_dir, tmp_path / "run", **over))
    adapters, store, lines, st = _stages(cfg)

    holdout = study_holdout(cfg)
    lora = {content_hash(e) for e in lora_train}
    by_id = {e.id: e for e in activation_examples(st)}
    is_lora = torch.tensor([content_hash(by_id[d]) in lora for d in store.doc_ids])
    assert int(is_lora.sum()) == 16
    rule = torch.tensor([holdout.is_held_out(h) for h in store.doc_hashes])
    dropped = int((rule & is_lora).sum())
    assert dropped > 0  # by the split rule alone, some LoRA training texts would be held out
    held = store.split_docs("held_out", holdout)
    assert not bool((held & is_lora).any())  # never held out ...
    assert torch.equal(held, rule & ~is_lora)  # ... and nothing else changes
    assert bool(store.split_docs("train", holdout)[is_lora].all())  # they stay available to SAE training
    rows = store.held_out(1, "rank_2", holdout)
    assert rows.doc_index.numel() > 0 and not bool(is_lora[rows.doc_index].any())
    record = store.manifest["split"]
    assert len(record["exclude_from_eval"]) == 16 and "rank_2" in record["exclude_reason"]
    assert record["held_out_dropped"] == {"fraction": 0.5, "seed": 0, "n_docs": dropped}
    assert record["training_data_unknown"] == []
    n_rule = int(rule.sum())
    want = f"held-out split: {dropped} of {n_rule} held-out documents are LoRA training texts"
    assert sum(line.startswith(want) for line in lines) == 1, lines

    # the same adapter loaded from its folder: its training data is unknown, said once, nothing excluded
    loaded = parse_config(
        mini_config(
            tiny_llama_dir,
            tmp_path / "loaded",
            **{**over, "adapters.train": None, "adapters.load": {"ext": str(adapters[0].path)}},
        )
    )
    _, store2, lines2, _ = _stages(loaded)
    assert store2.manifest["split"]["exclude_from_eval"] == []
    assert store2.manifest["split"]["training_data_unknown"] == ["ext"]
    assert torch.equal(store2.split_docs("held_out", holdout), rule)
    assert [line for line in lines2 if line.startswith("held-out split:")] == [
        "held-out split: training data of loaded fine-tunes unknown (ext): not deduplicated"
    ]


@pytest.mark.slow  # two miniature studies (~1 min on 2 cores)
def test_an_allowed_reference_overlap_reaches_the_table_and_the_report(tiny_llama_dir, tmp_path):
    """End to end: a path reference SAE trained on every document of the run (held-out ones included), with
    ``reference_sae.allow_overlap``, is measured, its overlap is a row of the table and a caution in report.html."""
    from lorascope import results_schema as schema
    from lorascope.saes import save_sae
    from lorascope.study import run
    from lorascope.study.saes import SAEJob, train_sae_job, trainer_config

    over = {"geometry.splice": False, "explain.enabled": False}
    cfg = parse_config(mini_config(tiny_llama_dir, tmp_path / "run", **over))
    run(cfg, progress=False, report=False)
    store = next((tmp_path / "run" / "activations").glob("store-*")) / "store"
    from lorascope.activations import open_store

    job = SAEJob(1, "base", None, 3, 0.0, cfg.seed, 7_003, {"init_seed": 7_003})  # fraction 0: every document
    section = cfg.reference_sae
    leaky = train_sae_job(open_store(store), job, section, trainer_config(section, 3, 1), None, tmp_path / "ck", False)
    save_sae(leaky.sae, tmp_path / "leaky")
    path_ref = {"reference_sae.source": "path", "reference_sae.path": str(tmp_path / "leaky")}
    allowed = parse_config(
        mini_config(tiny_llama_dir, tmp_path / "run", **over, **path_ref, **{"reference_sae.allow_overlap": True})
    )
    res = run(allowed, progress=False)
    rows = res.table[res.table.metric == schema.REFERENCE_EVAL_OVERLAP]
    assert len(rows) == 1 and int(rows.value.iloc[0]) > 0
    html = res.report.read_text()
    assert "Reference SAE saw evaluation documents" in html and f"layer 1: {int(rows.value.iloc[0])} documents" in html
