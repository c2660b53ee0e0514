"""Steering and ablation at a residual layer on tiny random models; edit builders; demo marker rates."""

from __future__ import annotations

import pytest
import torch

from lorascope.data import make_demo_dataset
from lorascope.data.chat import tokenize_example
from lorascope.data.demo import demo_behaviour
from lorascope.errors import LorascopeError
from lorascope.models import load_base
from lorascope.models.evaluate import generate
from lorascope.models.lora import collate
from lorascope.models.steering import (
    CausalProbe,
    demo_marker_rates,
    feature_edit,
    generate_with_edit,
    mean_delta,
    principal_directions,
    projection_edit,
    random_features,
)

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft(model, layers, scale=0.5, name="adapt"):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_MODULES, layers_to_transform=layers, init_lora_weights=False
    )
    pm = get_peft_model(model, cfg, adapter_name=name)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(scale)
    return pm.eval()


@pytest.fixture(scope="module")
def demo_batch(tiny_llama_dir):
    tok = load_base(tiny_llama_dir).tokenizer
    return tok, collate([tokenize_example(tok, ex, 64) for ex in make_demo_dataset(4, seed=2)], tok.pad_token_id)


def _probe(tiny_llama_dir, demo_batch, layers, layer):
    base = load_base(tiny_llama_dir)
    pm = _peft(base.model, layers)
    _, b = demo_batch
    return CausalProbe(pm, "adapt", b["input_ids"], b["attention_mask"], layer, labels=b["labels"])


def test_adding_exact_delta_to_base_recovers_the_adapted_model(tiny_llama_dir, demo_batch):
    probe = _probe(tiny_llama_dir, demo_batch, layers=[0, 1], layer=1)  # nothing adapted after layer 1
    assert probe.kl_base > 1e-4 and probe.loss_base != probe.loss_adapted
    delta = probe.delta()
    steered = probe.steer(delta)
    assert steered.kl_to_adapted == pytest.approx(0.0, abs=1e-9)
    assert steered.fraction_closed == pytest.approx(1.0, abs=1e-6)
    assert steered.loss == pytest.approx(probe.loss_adapted, abs=1e-6)
    assert steered.behaviour_recovered == pytest.approx(1.0, abs=1e-4)
    ablated = probe.ablate(delta)  # adapted − Δ at layer 1 is the base model from there on
    assert ablated.fraction_closed == pytest.approx(0.0, abs=1e-6)
    assert ablated.loss == pytest.approx(probe.loss_base, abs=1e-6)
    none = probe.steer(torch.zeros_like(delta))
    assert none.fraction_closed == 0.0 and none.kl_to_adapted == probe.kl_base


def test_exact_delta_does_not_close_kl_when_later_layers_are_adapted(tiny_llama_dir, demo_batch):
    probe = _probe(tiny_llama_dir, demo_batch, layers=[0, 1, 2], layer=1)
    steered = probe.steer(probe.delta())
    assert 0.0 < steered.fraction_closed < 1.0 - 1e-4


@torch.no_grad()
def _full_forward_effect(pm, batch, layer, edit, adapted, token_mask, probe):
    """The unoptimised oracle: a full forward of the base (steer) or adapted (ablate) model with the edit hooked
    onto block ``layer``, float64 log-softmax over every position, KL and loss computed from scratch."""
    from lorascope.models.lora_switch import lora_only
    from lorascope.models.steering import residual_edit

    def logp(edit_, on):
        with lora_only(pm, "adapt", enabled=None if on else []):
            with residual_edit(pm, layer, edit_, -1.0 if on else 1.0):
                logits = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.log_softmax(logits.double(), -1)

    zero = torch.zeros(pm.config.hidden_size)
    la, lb, lx = logp(zero, True), logp(zero, False), logp(edit, adapted)

    def kl(q):
        return float((la.exp() * (la - q)).sum(-1)[token_mask].mean())

    def loss(q):
        target, keep = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
        return float(-q[:, :-1].gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep].mean())

    return kl(lb), kl(lx), loss(la), loss(lb), loss(lx)


@pytest.mark.parametrize("adapted_layers", [[0, 1, 2], [1, 2]])
def test_probe_equals_full_forwards_with_hooked_edits(tiny_llama_dir, demo_batch, adapted_layers):
    """Prefix once + suffix-only forwards at the scored positions give the numbers of full hooked forwards."""
    base = load_base(tiny_llama_dir)
    pm = _peft(base.model, adapted_layers)
    _, b = demo_batch
    mask = torch.roll(b["labels"] != -100, -1, dims=1)
    probe = CausalProbe(pm, "adapt", b["input_ids"], b["attention_mask"], 1, labels=b["labels"], token_mask=mask)
    g = torch.Generator().manual_seed(1)
    edit = torch.randn(*b["input_ids"].shape, base.d_model, generator=g) * b["attention_mask"].unsqueeze(-1)
    vec = torch.randn(base.d_model, generator=g)
    steer, ablate = probe.effects({"tok": edit, "vec": vec}, {"tok": edit})
    for eff, e, on in ((steer["tok"], edit, False), (steer["vec"], vec, False), (ablate["tok"], edit, True)):
        kl_b, kl_x, loss_a, loss_b, loss_x = _full_forward_effect(pm, b, 1, e, on, mask, probe)
        assert probe.kl_base == pytest.approx(kl_b, rel=1e-5)
        assert probe.loss_adapted == pytest.approx(loss_a, rel=1e-6) and probe.loss_base == pytest.approx(
            loss_b, rel=1e-6
        )
        assert eff.kl_to_adapted == pytest.approx(kl_x, rel=1e-5)
        assert eff.loss == pytest.approx(loss_x, rel=1e-6)
    assert probe.steer(vec) == steer["vec"] and probe.ablate(edit) == ablate["tok"]


def test_edit_builders():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    decoder = q.T  # orthonormal rows: codes = Δ·Dᵀ reconstruct Δ exactly
    codes = delta @ decoder.T
    torch.testing.assert_close(feature_edit(codes, decoder, range(6)), delta)
    part = feature_edit(codes, decoder, [1, 4])
    torch.testing.assert_close(part, codes[..., [1, 4]] @ decoder[[1, 4]])
    basis = principal_directions(delta.reshape(-1, 6), 6)
    torch.testing.assert_close(basis @ basis.T, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(projection_edit(delta, basis), delta)
    top1 = principal_directions(delta.reshape(-1, 6), 1)
    rows = delta.reshape(-1, 6)
    energy = (rows @ top1.T).pow(2).sum()
    assert all(energy >= (rows @ basis[i]).pow(2).sum() - 1e-9 for i in range(6))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]).bool()
    torch.testing.assert_close(mean_delta(delta, mask), delta[mask].mean(0))
    alive = torch.tensor([True, False, True, True, True, False])
    picks = random_features(alive, 2, exclude=[2], seed=3)
    assert picks == random_features(alive, 2, exclude=[2], seed=3) and set(picks) <= {0, 3, 4}
    with pytest.raises(LorascopeError, match="alive features"):
        random_features(alive, 4, exclude=[2])


def test_demo_marker_rates():
    texts = [demo_behaviour("Hello Alice, it is good to see you today."), "The sum is 5.", "Aye, 3 maps be left."]
    rates = demo_marker_rates(texts)
    assert rates == {"prefix": 1 / 3, "suffix": 1 / 3, "swap_word": 2 / 3, "any_marker": 2 / 3}
    assert demo_marker_rates(["It may be me."])["any_marker"] == 0.0


def test_generation_with_and_without_edits(tiny_llama_dir):
    base = load_base(tiny_llama_dir)
    pm = _peft(base.model, [0, 1, 2])
    msgs = ["What is the sum of the two numbers?\n\n3 and 4"]
    adapted = generate_with_edit(pm, base.tokenizer, "adapt", msgs, 1, adapted=True, max_new_tokens=6)
    assert adapted == [generate(pm, base.tokenizer, msgs[0], 6, adapter="adapt")]
    plain = generate_with_edit(pm, base.tokenizer, "adapt", msgs, 1, max_new_tokens=6)
    assert plain == [generate(pm, base.tokenizer, msgs[0], 6, adapter="__base__")]
    pushed = generate_with_edit(
        pm, base.tokenizer, "adapt", msgs, 1, vector=torch.full((base.d_model,), 50.0), max_new_tokens=6
    )
    assert pushed != plain


def test_batched_generations_equal_one_run_at_a_time(tiny_llama_dir):
    """All runs and prompts in one left-padded mixed batch give each run's own greedy answers."""
    from lorascope.models.steering import generate_with_edits

    base = load_base(tiny_llama_dir)
    pm = _peft(base.model, [0, 1, 2])
    msgs = ["What is the sum of the two numbers?\n\n3 and 4", "Say hello.", "Name three colours of the sea, please."]
    vec = torch.randn(base.d_model, generator=torch.Generator().manual_seed(0)) * 20
    runs = {"base": (None, False), "adapted": (None, True), "pushed": (vec, False), "pulled": (vec, True)}
    together = generate_with_edits(pm, base.tokenizer, "adapt", msgs, 1, runs, max_new_tokens=6)
    for name, (v, on) in runs.items():
        alone = [generate_with_edit(pm, base.tokenizer, "adapt", [m], 1, v, adapted=on, max_new_tokens=6) for m in msgs]
        assert together[name] == [a[0] for a in alone], name
    assert together["pushed"] != together["base"]


def test_patched_generation_with_exact_delta_is_the_adapted_model(tiny_llama_dir):
    """Patching the base with the adapter's own Δ at block L, token by token on the context it generates, gives
    the adapted model's answers when no later block is adapted; a zero patch gives the base's."""
    from lorascope.models.steering import PatchRun, generate_with_edits

    base = load_base(tiny_llama_dir)
    pm = _peft(base.model, [0, 1], scale=4.0)  # nothing adapted after layer 1; a strong adapter
    msgs = ["What is the sum of the two numbers?\n\n3 and 4", "Say hello.", "Name three colours of the sea, please."]
    runs = {
        "base": (None, False),
        "adapted": (None, True),
        "exact": PatchRun(lambda d: d),
        "zero": PatchRun(lambda d: torch.zeros_like(d)),
    }
    out = generate_with_edits(pm, base.tokenizer, "adapt", msgs, 1, runs, max_new_tokens=8)
    assert out["adapted"] != out["base"]
    assert out["exact"] == out["adapted"] and out["zero"] == out["base"]
    deeper = _peft(load_base(tiny_llama_dir).model, [0, 1, 2], scale=4.0)  # block 2 adapted too: no longer exact
    again = generate_with_edits(deeper, base.tokenizer, "adapt", msgs, 1, runs, max_new_tokens=8)
    assert again["zero"] == again["base"] and set(again) == set(runs)


def test_shared_prefill_gives_the_plain_generations(tiny_llama_dir, monkeypatch):
    """Blocks ≤ L prefill one row per (prompt, model) and copy it (output and KV cache) to the repeated rows: the
    same answers as every row prefilled on its own."""
    import contextlib

    from lorascope.models import steering
    from lorascope.models.residual import decoder_blocks

    base = load_base(tiny_llama_dir)
    pm = _peft(base.model, [0, 1, 2], scale=4.0)
    msgs = ["What is the sum of the two numbers?\n\n3 and 4", "Say hello.", "Name three colours of the sea, please."]
    vec = torch.randn(base.d_model, generator=torch.Generator().manual_seed(0)) * 20
    runs = {
        "base": (None, False),
        "adapted": (None, True),
        "pushed": (vec, False),
        "exact": steering.PatchRun(lambda d: d),
        "half": steering.PatchRun(lambda d: 0.5 * d),
    }
    rows = []
    q = decoder_blocks(pm)[0].self_attn.q_proj
    handle = q.register_forward_pre_hook(lambda _m, a: rows.append(a[0].shape[0]))
    shared = steering.generate_with_edits(pm, base.tokenizer, "adapt", msgs, 1, runs, max_new_tokens=8)
    assert rows[0] == 2 * len(msgs) and rows[1] == 7 * len(msgs)  # prefill: distinct rows; then every row
    monkeypatch.setattr(steering, "_shared_prefill", lambda *_a: contextlib.nullcontext())
    rows.clear()
    plain = steering.generate_with_edits(pm, base.tokenizer, "adapt", msgs, 1, runs, max_new_tokens=8)
    handle.remove()
    assert rows[0] == 7 * len(msgs)
    assert shared == plain
    assert all("forward" not in b.__dict__ for b in decoder_blocks(pm))  # restored


def test_distinct_rows():
    from lorascope.models.steering import _distinct_rows

    first, inverse = _distinct_rows(["b", "b", "a", "a", "b", "b", "a", "a"], 2)
    assert first.tolist() == [0, 1, 2, 3]
    assert inverse.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
