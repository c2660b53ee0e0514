"""The explain stage in the miniature study: sanity gate (a no-op adapter loaded beside two trained ones is excluded
with a one-line message), scaffolding excluded from extraction and recorded, explain rows with their controls, the
feature-browser export and the report opening with "What the adapter changed"."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from lorascope.config import parse_config
from tiny_models import miniature_study_config as mini_config


def _zero_adapter(model_dir: Path, out: Path) -> Path:
    """A saved PEFT adapter with PEFT's default init (B = 0): a no-op."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def explain_run(tiny_llama_dir, tmp_path_factory):
    from lorascope.study import run

    out = tmp_path_factory.mktemp("explain_run")
    noop = _zero_adapter(tiny_llama_dir, out / "noop_adapter")
    cfg = parse_config(mini_config(tiny_llama_dir, out / "run", **{"adapters.load": {"noop": str(noop)}}))
    return cfg, run(cfg, progress=False)


def test_noop_adapter_is_excluded_with_a_one_line_message(explain_run):
    _, res = explain_run
    assert "noop" not in set(res.table.adapter)
    sanity = json.loads((res.results_dir / "explain" / "sanity.json").read_text())
    noop = [w for w in sanity if w["adapter"] == "noop"]
    assert len(noop) == 1 and noop[0]["exclude"] and noop[0]["kind"] == "no_op" and "\n" not in noop[0]["message"]


def test_template_scaffolding_is_excluded_and_recorded(explain_run):
    from lorascope.activations import open_store
    from lorascope.activations.template import detect_template_positions

    cfg, res = explain_run
    store = open_store(next((res.output_dir / "activations").glob("store-*/store")))
    record = store.manifest["config"]["template"]
    assert record["excluded_positions"] > 0
    assert any("<|im_start|> assistant" in s["text"] for s in record["excluded_spans"])
    info = json.loads((store.path / "docs.json").read_text())
    docs = [store.doc_tokens(i) for i in range(len(info["doc_ids"]))]
    masks = detect_template_positions(docs, info["response_start"]).masks
    rows = store.held_out(1, "rank_2", split="all")
    on_template = [bool(masks[d][p]) for d, p in zip(rows.doc_index.tolist(), rows.position.tolist(), strict=True)]
    assert len(on_template) > 0 and not any(on_template)


def test_explain_rows_with_controls_and_feature_export(explain_run):
    from lorascope import results_schema as schema

    _, res = explain_run
    df = res.table
    ex = df[df.family == schema.EXPLAIN]
    for adapter in ("rank_2", "rank_4"):
        mine = ex[ex.adapter == adapter].set_index("metric")
        top = mine.loc[schema.steer_kl_closed("top_features")]
        assert top.null_name == schema.NULL_RANDOM_FEATURES
        assert top.null_value == pytest.approx(mine.loc[schema.steer_kl_closed("random_features"), "value"])
        for name in (
            schema.steer_kl_closed("pca"),
            schema.steer_kl_closed("mean_delta"),
            schema.ABLATE_EFFECT_LOST,
            schema.TOP_MODULE_DELTA_SHARE,
            schema.marker_rate("base"),
            schema.marker_rate("patch_top_features"),
            schema.marker_rate("steer_mean_delta"),
            schema.INTRUDER_DIMENSIONS,
            schema.first_position_delta(0),
        ):
            assert math.isfinite(mine.loc[name, "value"]), name
        patched = mine.loc[schema.marker_rate("patch_top_features")]  # beside the random-feature control
        assert patched.null_value == mine.loc[schema.marker_rate("patch_random_features"), "value"]
        for run in ("patch_pca", "patch_exact_delta", "steer_mean_delta"):
            assert math.isfinite(mine.loc[schema.marker_rate(run), "value"]), run
        doc = json.loads((res.results_dir / "explain" / f"features_{adapter}.json").read_text())
        assert doc["format"] == "lorascope-feature-browser/1" and len(doc["features"]) == 3
        for f in doc["features"]:
            windows = [tuple(w["tokens"]) for w in f["activations"]]
            assert len(windows) == len(set(windows))  # de-duplicated
            assert len(f["decoder"]) == doc["d_model"]
        att = (res.results_dir / "explain" / f"attribution_{adapter}.csv").read_text()
        assert "remainder" in att
    assert set(ex[ex.metric == schema.LATENTS_STRENGTHENED].adapter) == {"rank_2", "rank_4"}


def test_exact_delta_steering_closes_kl_of_an_adapter_adapting_no_later_block(explain_run):
    """The miniature's layer 1 is followed by block 2, which the adapters also adapt: exact Δ closes most, not all."""
    from lorascope import results_schema as schema

    _, res = explain_run
    df = res.table
    v = df[(df.metric == schema.steer_kl_closed("exact_delta"))].value
    assert ((v > 0.5) & (v <= 1.0 + 1e-9)).all(), v


def test_report_opens_with_what_the_adapter_changed(explain_run):
    _, res = explain_run
    text = res.report.read_text()
    heads = re.findall(r"<h2>([^<]*)</h2>", text)
    assert heads[0] == "What the adapter changed"
    section = text[text.index("id='changed'") : text.index("id='findings'")]
    assert "excluded" in section and "noop" in section
    assert "rank_2" in section and "rank_4" in section and "data:image/png;base64" in section
    assert (res.output_dir / "figures" / "attribution_rank_2.svg").is_file()


def test_disabled_explain_publishes_the_measure_stage(explain_run, tiny_llama_dir):
    from lorascope.study import run

    cfg, first = explain_run
    data = cfg.model_dump()
    data["explain"]["enabled"] = False
    res = run(parse_config(data), progress=False, report=False)
    assert "explain" not in set(res.table.family)
    assert not (res.results_dir / "explain").exists()
    assert res.work_done == []  # nothing upstream re-ran


def test_gate_excludes_a_diverged_adapter_and_refuses_when_none_is_left(tiny_adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    from lorascope.errors import LorascopeError
    from lorascope.study.adapters import Adapter
    from lorascope.study.cache import RunState
    from lorascope.study.explain import gate_adapters

    bad = tmp_path / "diverged"
    shutil.copytree(tiny_adapters["rank_2"], bad)
    w = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in w if "lora_B" in k)
    w[key] = torch.full_like(w[key], float("nan"))
    save_file(w, str(bad / "adapter_model.safetensors"))
    st = RunState(parse_config(mini_config(tmp_path, tmp_path / "o")), tmp_path, progress=False)
    good = Adapter("good", Path(tiny_adapters["rank_4"]), 4, "k1")
    kept, warnings = gate_adapters(st, [Adapter("diverged", bad, 2, "k0"), good])
    assert [a.name for a in kept] == ["good"]
    assert any(w.kind == "non_finite" and w.exclude and w.adapter == "diverged" for w in warnings)
    with pytest.raises(LorascopeError, match="every adapter failed the sanity gate"):
        gate_adapters(st, [Adapter("diverged", bad, 2, "k0")])


def test_explain_layer_not_extracted_fails_before_any_work(tiny_llama_dir, tmp_path):
    from lorascope.errors import LorascopeError
    from lorascope.study import run

    cfg = parse_config(mini_config(tiny_llama_dir, tmp_path / "o", **{"explain": {"layer": 2}}))
    with pytest.raises(LorascopeError, match=r"explain\.layer 2 is not among extraction\.layers \[1\]"):
        run(cfg, progress=False)
    assert not (tmp_path / "o" / "adapters").exists()


def test_generation_runs_scale_patches_and_constants_and_keep_the_ceiling_unscaled():
    from lorascope.models.steering import PatchRun
    from lorascope.study.explain_causal import generation_runs

    mean = torch.tensor([1.0, -2.0])
    runs = generation_runs({"patch_top_features": lambda d: d + 1, "steer_mean_delta": mean}, [1.0, 4.0])
    assert list(runs) == [
        "base",
        "adapted",
        "patch_top_features",
        "steer_mean_delta",
        "patch_top_features_x4",
        "steer_mean_delta_x4",
        "patch_exact_delta",
    ]
    d = torch.tensor([[0.5, 0.25]])
    assert torch.equal(runs["patch_top_features_x4"].edit(d), 4 * (d + 1))
    assert torch.equal(runs["patch_exact_delta"].edit(d), d) and isinstance(runs["patch_exact_delta"], PatchRun)
    assert torch.equal(runs["steer_mean_delta_x4"][0], 4 * mean) and runs["steer_mean_delta_x4"][1] is False
    assert runs["base"] == (None, False) and runs["adapted"] == (None, True)
