"""The fast splice (prefix once, only the blocks after the layer, all reconstructors in one forward, logits at the
selected positions) equals the unoptimised one (one full forward per reconstructor, tests/splice_reference.py)
on every field of SpliceResult, for a Llama, a Gemma-2 and a GPT-2, at a middle and at the last layer."""

import math

import pytest
import torch

from lorascope.activations.tokens import TokenSelection
from lorascope.data import make_demo_dataset, tokenize_example
from lorascope.errors import LorascopeError
from lorascope.models import load_base
from lorascope.study.splice import SpliceCell, SpliceOptions, splice_cells, splice_kl
from splice_reference import reference_splice_kl
from tiny_models import random_adapters

TOL = 1e-5


def _recons(d: int) -> dict:
    torch.manual_seed(7)
    w = torch.randn(d, d) / d**0.5
    return {
        "exact": lambda hb, hf: hf - hb,
        "half": lambda hb, hf: 0.5 * (hf - hb),
        "linear": lambda hb, hf, w=w: (hf - hb) @ w,
        "ref_diff": lambda hb, hf, w=w: torch.tanh(hf @ w) - torch.tanh(hb @ w),
    }


def _close(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= TOL * max(1.0, abs(b))


def _assert_same(fast, ref) -> None:
    assert fast.n_tokens == ref.n_tokens and fast.doc_tokens == ref.doc_tokens
    assert _close(fast.kl_adapted_vs_base, ref.kl_adapted_vs_base)
    for field in ("kl", "recovered", "recovered_raw"):
        a, b = getattr(fast, field), getattr(ref, field)
        assert list(a) == list(b), field
        assert all(_close(a[k], b[k]) for k in a), (field, a, b)
    assert list(fast.doc_kl) == list(ref.doc_kl)
    for name in fast.doc_kl:
        assert all(_close(x, y) for x, y in zip(fast.doc_kl[name], ref.doc_kl[name], strict=True)), name


@pytest.fixture(scope="module", params=["llama", "gemma2", "gpt2"])
def world(request, tiny_model_dirs):
    base = load_base(tiny_model_dirs[request.param])
    pm = random_adapters(base.model, [2, 4], scale=0.5, seed=1)
    docs = [tokenize_example(base.tokenizer, ex) for ex in make_demo_dataset(7, seed=2)]
    return base, pm, docs


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_fast_splice_equals_the_reference(world, layer):
    base, pm, docs = world
    d = base.model.config.hidden_size
    mean = torch.randn(d, generator=torch.Generator().manual_seed(3)) * 0.1
    opt = SpliceOptions(batch_size=3, mean_delta=mean)
    ref = reference_splice_kl(pm, base.tokenizer.pad_token_id, docs, layer, "r4", _recons(d), opt)
    fast = splice_kl(pm, base.tokenizer.pad_token_id, docs, layer, "r4", _recons(d), opt)
    assert ref.kl_adapted_vs_base > 0 and ref.kl["zero"] > 0 or layer == base.num_layers - 1
    _assert_same(fast, ref)
    # the memory bound splits the suffix into one forward per splice without changing a number
    one_at_a_time = SpliceOptions(batch_size=3, mean_delta=mean, max_logit_bytes=1)
    one_by_one = splice_kl(pm, base.tokenizer.pad_token_id, docs, layer, "r4", _recons(d), one_at_a_time)
    _assert_same(one_by_one, ref)


def test_fast_splice_equals_the_reference_with_the_norm_rule(world):
    base, pm, docs = world
    sel = TokenSelection("all", 1, 1.2)
    opt = SpliceOptions(batch_size=4, selection=sel, norm_layers=[0, 1, 2])
    d = base.model.config.hidden_size
    ref = reference_splice_kl(pm, base.tokenizer.pad_token_id, docs, 1, "r2", _recons(d), opt)
    fast = splice_kl(pm, base.tokenizer.pad_token_id, docs, 1, "r2", _recons(d), opt)
    assert ref.n_tokens < sum(len(doc) - 1 for doc in docs)  # the norm rule dropped positions
    _assert_same(fast, ref)


def test_cells_on_one_forward_equal_each_cell_alone(world):
    """splice_cells (one prefix for every layer and adapter, the base/adapted log-probabilities shared by an
    adapter's layers at the union of their positions) equals the reference run cell by cell — with each cell's
    own positions (subsets that differ between cells) and mean Δ."""
    base, pm, docs = world
    d, pad = base.model.config.hidden_size, base.tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(11)
    cells = []
    for layer in (0, 2):
        for adapter in ("r2", "r4"):
            keep = [
                sorted(torch.randperm(len(doc) - 1, generator=gen)[: max(1, (len(doc) - 1) // 2)].add(1).tolist())
                for doc in docs
            ]
            mean = torch.randn(d, generator=gen) * 0.1
            cells.append(SpliceCell(layer, adapter, _recons(d), mean, keep))
    fast = splice_cells(pm, pad, docs, cells, SpliceOptions(batch_size=4))
    assert list(fast) == [c.key for c in cells]
    for c in cells:
        opt = SpliceOptions(batch_size=4, mean_delta=c.mean_delta, keep_positions=c.keep_positions)
        ref = reference_splice_kl(pm, pad, docs, c.layer, c.adapter, _recons(d), opt)
        assert ref.n_tokens == sum(len(k) for k in c.keep_positions)
        _assert_same(fast[c.key], ref)


def test_cells_must_be_distinct(world):
    base, pm, docs = world
    cell = SpliceCell(1, "r2", {})
    with pytest.raises(LorascopeError, match="each \\(layer, adapter\\) once"):
        splice_cells(pm, base.tokenizer.pad_token_id, docs, [cell, cell])
