import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.models import load_adapters, load_base
from lorascope.models.residual import (
    ResidualCapture,
    capture_residuals,
    decoder_blocks,
    final_norm,
)

IDS = torch.tensor([[2, 30, 40, 50, 60, 70, 3], [2, 31, 41, 51, 0, 0, 0]])
MASK = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_capture_matches_hidden_states_and_last_is_pre_norm(tiny_model_dirs, arch):
    base = load_base(tiny_model_dirs[arch])
    n = base.num_layers
    with torch.no_grad():
        hs = base.model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True).hidden_states
    got = capture_residuals(base.model, IDS, range(n), attention_mask=MASK)
    for L in range(n - 1):
        assert torch.equal(got[L], hs[L + 1]), (arch, L)
    last = got[n - 1]
    assert not torch.allclose(last, hs[-1])  # hidden_states[-1] is after the final norm
    with torch.no_grad():
        assert torch.allclose(final_norm(base.model)(last), hs[-1], atol=1e-6, rtol=1e-5)


def test_truncation_is_exact(tiny_llama_dir):
    base = load_base(tiny_llama_dir)
    full = capture_residuals(base.model, IDS, [0, 1], attention_mask=MASK, truncate=False)
    cut = capture_residuals(base.model, IDS, [0, 1], attention_mask=MASK, truncate=True)
    assert all(torch.equal(full[L], cut[L]) for L in (0, 1))


def test_mixed_batch_equals_separate_passes(tiny_llama_dir, tiny_adapters):
    base = load_base(tiny_llama_dir)
    pm = load_adapters(base, tiny_adapters)
    names = list(tiny_adapters)
    cap = ResidualCapture(pm, [0, 2])
    ids, mask = IDS.repeat(3, 1), MASK.repeat(3, 1)
    mixed = cap(ids, mask, ["__base__"] * 2 + [names[0]] * 2 + [names[1]] * 2)
    sep_base = cap(IDS, MASK, ["__base__"] * 2)
    with pm.disable_adapter():
        plain_base = cap(IDS, MASK)
    for L in (0, 2):
        assert torch.equal(mixed[L][:2], sep_base[L])
        assert (mixed[L][:2] - plain_base[L]).abs().max() == 0
        for i, name in enumerate(names):
            pm.set_adapter(name)
            alone = cap(IDS, MASK)
            rows = mixed[L][2 * (i + 1) : 2 * (i + 2)]
            assert (rows - alone[L]).abs().max() == 0, (L, name)
            assert not torch.equal(rows, mixed[L][:2])  # guards against adapter_names being silently ignored


def test_truncated_mixed_batch_leaves_no_peft_hooks(tiny_llama_dir, tiny_adapters):
    base = load_base(tiny_llama_dir)
    pm = load_adapters(base, tiny_adapters)
    modules = list(pm.modules())
    count = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules)
    cap = ResidualCapture(pm, [1])
    cap(IDS, MASK, ["__base__", "rank_2"])
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules) == count
    # a later batch of another size runs normally (stale PEFT hooks would fail on the row count)
    out = cap(IDS[:1], MASK[:1], ["rank_4"])
    assert out[1].shape[0] == 1


def test_bad_layers_and_architecture(tiny_llama_dir):
    base = load_base(tiny_llama_dir)
    with pytest.raises(LorascopeError, match=r"layer 3 is out of range.*0\.\.2"):
        capture_residuals(base.model, IDS, [1, 3])
    with pytest.raises(LorascopeError, match=r"0\.\.2"):
        capture_residuals(base.model, IDS, [-1])
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            max_position_embeddings=32,
        )
    )
    with pytest.raises(LorascopeError, match=r"'opt'.*llama.*gpt2"):
        decoder_blocks(opt)


def test_mixed_batch_needs_peft_model(tiny_llama_dir):
    base = load_base(tiny_llama_dir)
    with pytest.raises(LorascopeError, match="PeftModel"):
        capture_residuals(base.model, IDS, [0], adapter_names=["__base__", "__base__"])
