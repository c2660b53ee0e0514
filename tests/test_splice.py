"""The splice test: baselines (Δ̂ = 0, mean Δ), relative recovery, per-document sums, extraction's token rule."""

import pytest
import torch

from lorascope.activations import ExtractConfig, extract
from lorascope.activations.extract import tokenize_docs
from lorascope.data import make_demo_dataset, tokenize_example
from lorascope.errors import LorascopeError
from lorascope.models import load_adapters, load_base
from lorascope.study.splice import SpliceOptions, SpliceResult, splice_kl

EXACT = {"exact": lambda hb, hf: hf - hb}


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tiny_adapters):
    base = load_base(tiny_llama_dir)
    pm = load_adapters(base, tiny_adapters)
    docs = [tokenize_example(base.tokenizer, ex) for ex in make_demo_dataset(6, seed=5)]
    return base, pm, docs


def test_last_layer_exact_is_one_and_zero_is_the_base(setup):
    base, pm, docs = setup
    res = splice_kl(
        pm, base.tokenizer.pad_token_id, docs, base.num_layers - 1, "rank_4", EXACT, SpliceOptions(batch_size=4)
    )
    assert isinstance(res, SpliceResult) and res.kl_adapted_vs_base > 0
    assert abs(res.recovered["exact"] - 1.0) < 1e-5 and abs(res.recovered_raw["exact"] - 1.0) < 1e-5
    # the output head is not adapted: replacing the last block's output by h_base gives the base logits exactly
    assert res.recovered_raw["zero"] == 0.0 and res.recovered["zero"] == 0.0
    assert res.n_tokens == sum(len(d) - 1 for d in docs)
    legacy = res.to_dict()
    assert legacy["kl_recovered_exact"] == res.recovered_raw["exact"] and legacy["n_tokens"] == res.n_tokens
    assert legacy["kl_recovered_rel_zero"] == 0.0
    # the old dict API still reads: res["key"] and res.items() (caller's reconstructors only)
    assert res["kl_recovered_exact"] == res.recovered_raw["exact"] and res["n_tokens"] == res.n_tokens
    assert dict(res.items()).keys() == {"kl_adapted_vs_base", "kl_recovered_exact", "n_tokens"}
    assert res[0] == res.kl_adapted_vs_base


def test_middle_layer_zero_baseline_recovers_part_and_recovery_is_relative_to_it(setup):
    base, pm, docs = setup
    mean_delta = torch.zeros(base.model.config.hidden_size)
    res = splice_kl(
        pm,
        base.tokenizer.pad_token_id,
        docs,
        1,
        "rank_4",
        {**EXACT, "half": lambda hb, hf: 0.5 * (hf - hb)},
        SpliceOptions(batch_size=4, mean_delta=mean_delta),
    )
    assert 0 < base.num_layers - 1 and res.kl_adapted_vs_base > 0
    assert res.recovered_raw["zero"] > 0.0  # later adapted blocks still act: doing nothing "recovers" this much
    assert res.recovered["zero"] == 0.0
    assert abs(res.recovered["exact"] - 1.0) < 1e-5
    assert res.recovered["mean_delta"] == pytest.approx(0.0, abs=1e-12)  # a zero mean is the zero splice
    assert res.recovered["half"] < res.recovered_raw["half"]  # relative recovery is the stricter number
    z = res.kl["zero"] / res.kl_adapted_vs_base
    assert 1 - res.recovered["half"] == pytest.approx((1 - res.recovered_raw["half"]) / z, rel=1e-9)


def test_per_document_sums_add_up(setup):
    base, pm, docs = setup
    res = splice_kl(pm, base.tokenizer.pad_token_id, docs, 1, "rank_2", EXACT, SpliceOptions(batch_size=4))
    assert len(res.doc_tokens) == len(docs) and sum(res.doc_tokens) == res.n_tokens
    for name, per_doc in res.doc_kl.items():
        assert len(per_doc) == len(docs)
        total = sum(per_doc) / res.n_tokens
        assert total == pytest.approx(res.kl_adapted_vs_base if name == "base" else res.kl[name], rel=1e-12)


def test_positions_follow_the_extraction_rule(setup, tmp_path):
    base, pm, _ = setup
    examples = make_demo_dataset(7, seed=11)
    cfg = ExtractConfig(layers=[0, 1, 2], batch_size=3, docs_per_shard=4, max_norm_factor=1.3, progress=False)
    store = extract(pm, base.tokenizer, examples, tmp_path / "acts", cfg)
    docs = tokenize_docs(base.tokenizer, examples, cfg.max_length)
    rows = store.held_out(1, "rank_4", split="all")
    stored = torch.bincount(rows.doc_index, minlength=len(docs)).tolist()
    assert sum(stored) < sum(len(d) - 1 for d in docs)  # the norm rule excluded some positions
    pad = base.tokenizer.pad_token_id
    by_rule = splice_kl(
        pm,
        pad,
        docs,
        1,
        "rank_4",
        EXACT,
        SpliceOptions(batch_size=cfg.batch_size, selection=cfg.selection, norm_layers=cfg.layers),
    )
    assert by_rule.doc_tokens == stored
    positions = [rows.position[rows.doc_index == i].tolist() for i in range(len(docs))]
    exact = splice_kl(pm, pad, docs, 1, "rank_4", EXACT, SpliceOptions(batch_size=2, keep_positions=positions))
    assert exact.doc_tokens == stored and abs(exact.recovered["exact"] - 1.0) < 1e-5


def test_bad_inputs(setup):
    base, pm, docs = setup
    pad = base.tokenizer.pad_token_id
    with pytest.raises(LorascopeError, match="reserved"):
        splice_kl(pm, pad, docs, 1, "rank_4", {"zero": lambda hb, hf: hb})
    with pytest.raises(LorascopeError, match="one list of positions per document"):
        splice_kl(pm, pad, docs, 1, "rank_4", EXACT, SpliceOptions(keep_positions=[[1]]))
    with pytest.raises(LorascopeError, match="outside"):
        splice_kl(pm, pad, docs, 1, "rank_4", EXACT, SpliceOptions(keep_positions=[[10_000]] * len(docs)))
