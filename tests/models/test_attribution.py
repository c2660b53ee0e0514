"""Module attribution of adapter-SAE features on tiny random models."""

from __future__ import annotations

import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.models import load_base
from lorascope.models.attribution import attribute_features
from lorascope.models.lora_switch import lora_layers, lora_only
from lorascope.models.residual import capture_residuals


def peft_with(model, target_modules, layers=None, name="adapt", r=4, scale=0.3, seed=0):
    """A non-zero LoRA adapter ``name`` on ``target_modules`` (optionally only blocks ``layers``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=target_modules, layers_to_transform=layers, init_lora_weights=False
    )
    pm = get_peft_model(model, cfg, adapter_name=name)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(scale)
    return pm.eval()


def _batch(vocab: int, b: int = 3, t: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    att = torch.ones(b, t, dtype=torch.long)
    att[2, 6:] = 0
    return ids, att


def _delta(pm, ids, att, layer, name="adapt"):
    caps = capture_residuals(
        pm,
        torch.cat([ids, ids]),
        [layer],
        torch.cat([att, att]),
        adapter_names=["__base__"] * len(ids) + [name] * len(ids),
    )[layer]
    return caps[len(ids) :] - caps[: len(ids)]


@pytest.mark.parametrize("module", ["o_proj", "q_proj", "down_proj"])
def test_single_module_adapter_gets_all_attribution_at_its_layer(tiny_llama_dir, module):
    base = load_base(tiny_llama_dir)
    pm = peft_with(base.model, [module], layers=[1])
    ids, att = _batch(base.model.config.vocab_size)
    E = torch.randn(6, base.d_model, generator=torch.Generator().manual_seed(2))
    res = attribute_features(pm, "adapt", ids, att, 1, E)
    assert res.modules == [f"1.{'self_attn' if module != 'down_proj' else 'mlp'}.{module}"]
    assert (res.shares[:, 0] >= 0.95).all()
    torch.testing.assert_close(res.shares[:, 0], torch.ones(6, dtype=torch.float64), atol=1e-6, rtol=0)
    assert res.top_modules(1)[0]["delta_share"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_shares_plus_remainder_sum_exactly_to_the_projection(tiny_model_dirs, arch):
    base = load_base(tiny_model_dirs[arch])
    pm = peft_with(base.model, "all-linear")
    ids, att = _batch(base.model.config.vocab_size)
    E = torch.randn(5, base.d_model, generator=torch.Generator().manual_seed(3))
    res = attribute_features(pm, "adapt", ids, att, 2, E)
    delta = _delta(pm, ids, att, 2).double()[att.bool()]
    expected = (delta @ E.double().T).sum(0)
    torch.testing.assert_close(res.total, expected, rtol=1e-5, atol=1e-6)  # Δ agrees with the mixed-batch capture
    torch.testing.assert_close(res.contribution.sum(1) + res.remainder, res.total, rtol=0, atol=1e-12)
    assert len(res.modules) > 6 and all(int(m.split(".")[0]) <= 2 for m in res.modules)
    rows = res.table(feature_ids=[10, 11, 12, 13, 14])
    for f in (10, 14):
        s = sum(r["share"] for r in rows if r["feature"] == f)
        assert s == pytest.approx(1.0, abs=1e-9)
    if arch == "llama":
        # down_proj's direct write is exactly its LoRA output (α/r)·B·A·x, where x is down_proj's input when
        # blocks 0-1 are adapted and, in block 2, only down_proj is
        lora = pm.base_model.model.model.layers[2].mlp.down_proj
        upstream = [m for n, m in lora_layers(pm, "adapt").items() if ".layers.2." not in n]
        seen = {}
        h = lora.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach()))  # returns None
        with lora_only(pm, "adapt", enabled=[*upstream, lora]):
            pm(input_ids=ids, attention_mask=att)
        h.remove()
        out = lora.lora_B["adapt"](lora.lora_A["adapt"](seen["x"])) * lora.scaling["adapt"]
        j = res.modules.index("2.mlp.down_proj")
        torch.testing.assert_close(
            res.contribution[:, j], (out.double()[att.bool()] @ E.double().T).sum(0), rtol=1e-5, atol=1e-6
        )
    top = res.top_modules(len(res.modules))
    assert sum(t["delta_share"] for t in top) <= 1.0 + abs(float(res.delta_energy - res.delta_dot.sum())) + 1e-9


def test_earlier_module_is_attributed_with_indirect_remainder(tiny_llama_dir):
    base = load_base(tiny_llama_dir)
    pm = peft_with(base.model, ["o_proj"], layers=[0], scale=0.05)
    ids, att = _batch(base.model.config.vocab_size)
    E = torch.randn(4, base.d_model, generator=torch.Generator().manual_seed(4))
    mask = att.bool().clone()
    mask[:, 0] = False  # token_mask narrows the tokens that count
    w = torch.rand(int(mask.sum()), 4, generator=torch.Generator().manual_seed(5))
    res = attribute_features(pm, "adapt", ids, att, 2, E, token_mask=mask, token_weights=w)
    assert res.n_tokens == int(mask.sum())
    delta = _delta(pm, ids, att, 2).double()[mask]
    torch.testing.assert_close(res.total, ((delta @ E.double().T) * w.double()).sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.contribution[:, 0] + res.remainder, res.total, rtol=0, atol=1e-12)
    # the write persists through the residual stream; later blocks add an indirect part (non-zero remainder)
    assert res.remainder.abs().max() > 0


def test_model_state_is_restored_and_bad_inputs_fail(tiny_llama_dir):
    base = load_base(tiny_llama_dir)
    pm = peft_with(base.model, ["o_proj", "up_proj"])
    ids, att = _batch(base.model.config.vocab_size)
    before = pm(input_ids=ids, attention_mask=att).logits
    attribute_features(pm, "adapt", ids, att, 1, torch.randn(2, base.d_model))
    torch.testing.assert_close(pm(input_ids=ids, attention_mask=att).logits, before, rtol=0, atol=0)
    with pytest.raises(LorascopeError, match="encoder_rows"):
        attribute_features(pm, "adapt", ids, att, 1, torch.randn(2, base.d_model + 1))
    with pytest.raises(LorascopeError, match="no LoRA layers"):
        attribute_features(pm, "nope", ids, att, 1, torch.randn(2, base.d_model))
    pm0 = peft_with(load_base(tiny_llama_dir).model, ["o_proj"], layers=[2])
    with pytest.raises(LorascopeError, match="adapts no module"):
        attribute_features(pm0, "adapt", ids, att, 1, torch.randn(2, base.d_model))


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_reusing_unchanged_linears_gives_bitwise_the_plain_reruns(tiny_model_dirs, arch, monkeypatch):
    import contextlib

    from lorascope.models import attribution

    base = load_base(tiny_model_dirs[arch])
    pm = peft_with(base.model, "all-linear")
    ids, att = _batch(base.model.config.vocab_size)
    E = torch.randn(5, base.d_model, generator=torch.Generator().manual_seed(3))
    computed = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: computed.append(1) or linear(*a, **k))
    fast = attribute_features(pm, "adapt", ids, att, 2, E)
    n_fast = len(computed)
    monkeypatch.setattr(attribution, "reuse_unchanged_linears", lambda _block: contextlib.nullcontext())
    plain = attribute_features(pm, "adapt", ids, att, 2, E)
    assert fast.modules == plain.modules
    if arch != "gpt2":  # GPT-2's Conv1D layers call addmm, not linear
        assert n_fast < 0.8 * (len(computed) - n_fast)  # the fast path skipped the unchanged weights
    for a, b in zip(
        (fast.contribution, fast.total, fast.delta_dot, fast.write_norm),
        (plain.contribution, plain.total, plain.delta_dot, plain.write_norm),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    blocks = attribution.decoder_blocks(pm)
    assert all("forward" not in m.__dict__ for b in blocks for m in attribution._linear_layers(b))  # restored


def test_reuse_unchanged_linears_recomputes_changed_inputs(tiny_llama_dir):
    from lorascope.models.attribution import decoder_blocks, reuse_unchanged_linears

    base = load_base(tiny_llama_dir)
    lin = decoder_blocks(base.model)[0].mlp.down_proj
    calls = []
    lin.register_forward_pre_hook(lambda _m, a: calls.append(a[0]))  # noqa: B023 — hooks see every real call
    x = torch.randn(2, 3, lin.in_features)
    with reuse_unchanged_linears(decoder_blocks(base.model)[0]):
        first = lin(x)
        again = lin(x.clone())
        other = lin(x + 1)
    assert len(calls) == 3
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(other, torch.nn.functional.linear(x + 1, lin.weight, lin.bias), rtol=0, atol=0)
