"""Rows of several adapters run adapter by adapter (lorascope.models.grouped) give PEFT's mixed-batch numbers."""

import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.models import grouped as grouped_mod
from lorascope.models import load_base
from lorascope.models.grouped import BASE, contiguous_runs, only_adapter
from lorascope.models.residual import ResidualCapture, selected_logits
from lorascope.models.suffix import SuffixForward
from tiny_models import random_adapters

IDS = torch.tensor([[2, 30, 40, 50, 60, 70, 3], [2, 31, 41, 51, 0, 0, 0]])
MASK = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])


def test_contiguous_runs():
    assert contiguous_runs(["a", "a", "b", "c", "c"]) == [("a", 0, 2), ("b", 2, 3), ("c", 3, 5)]
    assert contiguous_runs(["a"]) == [("a", 0, 1)]
    assert contiguous_runs([]) == []
    assert contiguous_runs(["a", "b", "a"]) is None  # a in two runs: only a mixed batch serves it


@pytest.fixture(scope="module", params=["llama", "gemma2", "gpt2"])
def pm(request, tiny_model_dirs):
    return random_adapters(load_base(tiny_model_dirs[request.param]).model, [2, 4], scale=0.5, seed=1)


def test_capture_grouped_equals_mixed_batch(pm):
    names = [BASE] * 2 + ["r2"] * 2 + ["r4"] * 2
    ids, mask = IDS.repeat(3, 1), MASK.repeat(3, 1)
    grouped = ResidualCapture(pm, [0, 2], grouped=True)(ids, mask, names)
    mixed = ResidualCapture(pm, [0, 2], grouped=False)(ids, mask, names)
    for L in (0, 2):
        assert torch.equal(grouped[L], mixed[L])
        assert not torch.equal(grouped[L][:2], grouped[L][2:4])  # the adapters were applied
    # rows of an adapter in two runs fall back to the mixed batch, same rows
    mixed_order = [BASE, "r2", BASE, "r2"]
    got = ResidualCapture(pm, [2], grouped=True)(IDS.repeat(2, 1), MASK.repeat(2, 1), mixed_order)
    want = ResidualCapture(pm, [2], grouped=False)(IDS.repeat(2, 1), MASK.repeat(2, 1), mixed_order)
    assert torch.equal(got[2], want[2])
    with pytest.raises(LorascopeError, match=r"unknown adapter name\(s\) \['r3'\]"):
        ResidualCapture(pm, [2], grouped=True)(IDS, MASK, [BASE, "r3"])


def test_selected_logits_and_suffix_grouped_equal_mixed(pm, monkeypatch):
    names = [BASE] * 2 + ["r4"] * 2
    ids, mask = IDS.repeat(2, 1), MASK.repeat(2, 1)
    sel = mask.bool()
    suffix = SuffixForward(pm, 0, "r4")
    h0 = ResidualCapture(pm, [0])(ids, mask, names)[0]
    on = (
        selected_logits(pm, sel, input_ids=ids, attention_mask=mask, adapter_names=names),
        suffix._forward(h0, IDS, MASK, MASK.bool(), [BASE, "r4"]),
    )
    monkeypatch.setattr(grouped_mod, "prefer_groups", lambda _m: False)
    off = (
        selected_logits(pm, sel, input_ids=ids, attention_mask=mask, adapter_names=names),
        suffix._forward(h0, IDS, MASK, MASK.bool(), [BASE, "r4"]),
    )
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a, b)
    n = int(MASK.sum())
    assert not torch.equal(on[0][:n], on[0][n:])


def test_only_adapter_restores_state_and_leaves_grads(pm):
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in pm.modules() if isinstance(m, BaseTunerLayer)]
    before = [(list(m.active_adapters), m.disable_adapters) for m in layers]
    grads = {n: p.requires_grad for n, p in pm.named_parameters()}
    with only_adapter(pm, "r2"):
        assert all(m.active_adapters == ["r2"] for m in layers)
    with pytest.raises(RuntimeError), only_adapter(pm, BASE):
        assert all(m.active_adapters == [] for m in layers)
        raise RuntimeError("restored on the way out")
    assert [(list(m.active_adapters), m.disable_adapters) for m in layers] == before
    assert {n: p.requires_grad for n, p in pm.named_parameters()} == grads
