import torch

from lorascope.data import make_demo_dataset, tokenize_example
from lorascope.models import load_adapters, load_base
from lorascope.study.splice import splice_kl


def _setup(tiny_llama_dir, tiny_adapters):
    base = load_base(tiny_llama_dir)
    pm = load_adapters(base, tiny_adapters)
    docs = [tokenize_example(base.tokenizer, ex) for ex in make_demo_dataset(6, seed=5)]
    return base, pm, docs


def test_exact_delta_recovers_everything_and_zero_delta_at_last_layer_recovers_nothing(tiny_llama_dir,
                                                                                          tiny_adapters):
    base, pm, docs = _setup(tiny_llama_dir, tiny_adapters)
    last = base.num_layers - 1
    res = splice_kl(pm, base.tokenizer.pad_token_id, docs, last, "rank_4", {
        "exact": lambda hb, hf: hf - hb,
        "zero": lambda hb, hf: torch.zeros_like(hb),
    }, batch_size=4)
    assert res["kl_adapted_vs_base"] > 0
    assert abs(res["kl_recovered_exact"] - 1.0) < 1e-5
    # the output head is not adapted: replacing the last block's output by h_base gives the base logits exactly
    assert res["kl_recovered_zero"] == 0.0
    assert res["n_tokens"] == sum(len(d) - 1 for d in docs)


def test_half_delta_recovers_part(tiny_llama_dir, tiny_adapters):
    base, pm, docs = _setup(tiny_llama_dir, tiny_adapters)
    res = splice_kl(pm, base.tokenizer.pad_token_id, docs, 1, "rank_2", {"half": lambda hb, hf: 0.5 * (hf - hb)})
    assert 0.0 < res["kl_recovered_half"] < 1.0
