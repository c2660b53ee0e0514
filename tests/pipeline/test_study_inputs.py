"""The study's own-data and own-fine-tune inputs (issue #18), checked without running a study: what
``adapters.load`` expands into, the early checks of ``check_inputs`` (before any model is loaded), the reference
SAE per layer, the checkpoint rows and the report's per-checkpoint table."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lorascope.config import parse_config
from lorascope.errors import LorascopeError
from lorascope.results import ResultRow, rows_to_frame
from tiny_models import miniature_study_config as mini_config


def no_model_load(monkeypatch) -> None:
    import lorascope.models as models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input check")

    monkeypatch.setattr(models, "load_base", refuse)


def checkpoint_folder(root: Path, adapter: Path, steps=(10, 2, 30)) -> Path:
    for s in steps:
        shutil.copytree(adapter, root / f"checkpoint-{s}")
    (root / "logs").mkdir()  # not a checkpoint: ignored
    return root


def test_loaded_adapters_expand_checkpoints_in_step_order_with_kind_rank_and_step(
    tmp_path, tiny_llama_dir, tiny_adapters
):
    from lorascope.study.adapters import loaded_adapters
    from lorascope.study.cache import RunState

    ck = checkpoint_folder(tmp_path / "run", tiny_adapters["rank_4"])
    cfg = parse_config(
        mini_config(
            tiny_llama_dir,
            tmp_path / "o",
            **{
                "adapters.train": None,
                "adapters.load": {
                    "lora": str(tiny_adapters["rank_2"]),
                    "run": {"checkpoints": str(ck)},
                    "ft": {"model": str(tiny_llama_dir)},
                },
            },
        )
    )
    got = loaded_adapters(RunState(cfg, tmp_path / "o", progress=False))
    assert [(a.name, a.kind, a.rank, a.step) for a in got] == [
        ("lora", "peft", 2, None),
        ("run_step_2", "peft", 4, 2),
        ("run_step_10", "peft", 4, 10),
        ("run_step_30", "peft", 4, 30),
        ("ft", "full", -1, None),
    ]
    # cache keys follow the weight files' contents: the three checkpoints here are byte-identical copies
    assert len({a.key for a in got}) == 3


@pytest.mark.parametrize(
    ("load", "message"),
    [
        ({"ft": {"model": "{tmp}/nothing"}}, "adapters.load.ft.model"),
        ({"run": {"checkpoints": "{tmp}"}}, "holds no checkpoint-<step>/ folders"),
        ({"x": "{tmp}"}, "no adapter_config.json"),
    ],
)
def test_bad_load_entries_fail_before_any_model_is_loaded(tmp_path, tiny_llama_dir, monkeypatch, load, message):
    from lorascope.study import run

    no_model_load(monkeypatch)
    load = {
        k: ({kk: vv.format(tmp=tmp_path) for kk, vv in v.items()} if isinstance(v, dict) else v.format(tmp=tmp_path))
        for k, v in load.items()
    }
    cfg = parse_config(mini_config(tiny_llama_dir, tmp_path / "o", **{"adapters.train": None, "adapters.load": load}))
    with pytest.raises(LorascopeError, match=message):
        run(cfg, progress=False)


def test_long_example_policy_error_stops_before_the_model_load(tmp_path, tiny_llama_dir, monkeypatch):
    from lorascope.study import run

    no_model_load(monkeypatch)
    cfg = parse_config(
        mini_config(tiny_llama_dir, tmp_path / "o", **{"data.long_examples": "error", "data.max_length": 20})
    )
    with pytest.raises(LorascopeError, match=r"example demo:.*max_length( is)? 20"):
        run(cfg, progress=False)
    assert not (tmp_path / "o" / "adapters").exists()  # nothing trained


def test_data_columns_reach_the_fine_tuning_data(tmp_path, tiny_llama_dir):
    """A dataset with its own field names loads through data.finetune_columns in the preflight (else: one line)."""
    import json

    from lorascope.study.run import check_inputs

    p = tmp_path / "mine.jsonl"
    p.write_text(
        "".join(json.dumps({"question": f"what is {i} and {i}", "answer": f"{2 * i}"}) + "\n" for i in range(20))
    )
    base = {"data.finetune": str(p), "data.n_finetune": 20}
    with pytest.raises(LorascopeError, match=r"mine.jsonl line 1: no known dataset format \(fields found: answer"):
        check_inputs(parse_config(mini_config(tiny_llama_dir, tmp_path / "o", **base)))
    check_inputs(
        parse_config(
            mini_config(
                tiny_llama_dir,
                tmp_path / "o",
                **base,
                **{"data.finetune_columns": {"instruction": "question", "output": "answer"}},
            )
        )
    )


def saved_reference(folder: Path, d_in: int = 32) -> Path:
    from lorascope.saes import create_sae, save_sae

    return save_sae(create_sae("topk", d_in, 64, k=4, seed=0), folder)


def test_reference_saes_by_glob_pick_the_closest_l0_and_say_so(tmp_path, tiny_llama_dir):
    from lorascope.study.publish import _reference_picks
    from lorascope.study.run import check_inputs
    from lorascope.study.saes import reference_picks

    for l0 in (8, 20, 64):
        saved_reference(tmp_path / "scope" / "layer_1" / f"average_l0_{l0}")
    glob = str(tmp_path / "scope" / "layer_{layer}" / "average_l0_*")
    cfg = parse_config(
        mini_config(
            tiny_llama_dir, tmp_path / "o", **{"reference_sae": {"source": "path", "path": glob, "target_l0": 25}}
        )
    )
    check_inputs(cfg)
    pick = reference_picks(cfg)[1]
    assert pick.path.name == "average_l0_20" and pick.rule == "glob"
    assert "picked" in _reference_picks(cfg)["1"] and "average_l0_20" in _reference_picks(cfg)["1"]
    mapping = parse_config(
        mini_config(
            tiny_llama_dir,
            tmp_path / "o",
            **{"reference_sae": {"source": "path", "path": {1: str(tmp_path / "scope" / "layer_1" / "average_l0_64")}}},
        )
    )
    assert reference_picks(mapping)[1].path.name == "average_l0_64"
    missing = parse_config(
        mini_config(
            tiny_llama_dir,
            tmp_path / "o",
            **{"extraction.layers": [0, 1], "reference_sae": {"source": "path", "path": {1: str(pick.path)}}},
        )
    )
    with pytest.raises(LorascopeError, match="no entry for layer 0"):
        check_inputs(missing)
    wide = tmp_path / "wide"
    saved_reference(wide, d_in=48)
    with pytest.raises(LorascopeError, match="d_in = 48"):
        check_inputs(
            parse_config(
                mini_config(
                    tiny_llama_dir, tmp_path / "o", **{"reference_sae": {"source": "path", "path": {1: str(wide)}}}
                )
            )
        )


# ---- checkpoint rows and the report's per-checkpoint table ----------------------------------------------------
def sequence_frame() -> pd.DataFrame:
    from lorascope.study.adapters import Adapter
    from lorascope.study.checkpoints import checkpoint_rows

    adapters = [Adapter(f"run_step_{s}", Path("x"), 4, "k", step=s) for s in (20, 5)] + [
        Adapter("other", Path("y"), 8, "k")
    ]
    rows = checkpoint_rows(adapters)
    for s, norm, mmcs in ((5, 0.1, 0.3), (20, 0.7, 0.5)):
        rows += [
            ResultRow("delta_norm", "delta_norm_mean", norm, layer=3, adapter=f"run_step_{s}", rank=4),
            ResultRow("decoder_similarity", "mmcs_adapter_to_ref", mmcs, layer=3, adapter=f"run_step_{s}"),
        ]
    rows.append(ResultRow("delta_norm", "delta_norm_mean", 9.0, layer=3, adapter="other", rank=8))
    return rows_to_frame(rows)


def test_checkpoint_rows_carry_the_step_and_the_sequence():
    df = sequence_frame()
    ck = df[df.family == "checkpoint"]
    assert sorted(zip(ck.adapter, ck.value, ck.note, ck.layer, strict=True)) == [
        ("run_step_20", 20.0, "run", -1),
        ("run_step_5", 5.0, "run", -1),
    ]


def test_checkpoint_table_pivots_the_rows_by_step():
    from lorascope.report.checkpoints import checkpoint_steps, checkpoint_table, checkpoints_section

    df = sequence_frame()
    steps = checkpoint_steps(df)
    assert steps == {"run": {"run_step_20": 20, "run_step_5": 5}}
    contexts = [
        {"layer": 3, "adapter": "run_step_20", "feature": 7, "contexts": [{"token": "ahoy"}]},
        {"layer": 3, "adapter": "run_step_20", "feature": 9, "contexts": []},
    ]
    table = checkpoint_table(df, contexts, steps["run"], 3)
    assert [r["step"] for r in table] == [5, 20]
    assert [r["delta_norm_mean"] for r in table] == [0.1, 0.7]
    assert [r["mmcs_adapter_to_ref"] for r in table] == [0.3, 0.5]
    assert math.isnan(table[0]["l0_adapter_sae"])  # not in this table: shown as a dash, never invented
    assert table[1]["top_features"] == [(7, "ahoy")] and table[0]["top_features"] == []
    html = checkpoints_section(df, contexts)
    assert html.count("<tr><td class='num'>") == 2 and "other" not in html and "&#x27;ahoy&#x27;" in html
    assert checkpoints_section(df[df.family != "checkpoint"], contexts) == ""


@pytest.mark.slow
def test_a_dora_adapter_is_studied_without_the_splice(tmp_path, tiny_llama_dir, tiny_adapters):
    """DoRA cannot run in PEFT's mixed batches: extraction falls back to separate forwards and the splice test
    (mixed batches) leaves it out, saying why; the LoRA beside it is measured in full."""
    from peft import LoraConfig, get_peft_model

    from lorascope.models import load_base
    from lorascope.study import run

    model = load_base(tiny_llama_dir).model
    pm = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, use_dora=True
        ),
    )
    pm.save_pretrained(tmp_path / "dora")
    load = {"lora": str(tiny_adapters["rank_2"]), "dora": str(tmp_path / "dora")}
    cfg = parse_config(mini_config(tiny_llama_dir, tmp_path / "o", **{"adapters.train": None, "adapters.load": load}))
    df = run(cfg, progress=False, report=False).table
    assert set(df[df.family == "splice"].adapter) == {"lora"}
    for name in ("lora", "dora"):
        rows = df[df.adapter == name]
        assert {"delta_norm", "reconstruction", "decoder_similarity"} <= set(rows.family), name
        assert rows.value.map(math.isfinite).all(), name
