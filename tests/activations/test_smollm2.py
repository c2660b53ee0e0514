"""The same extraction on the real SmolLM2-135M-Instruct (30-layer Llama, d = 576), with two random adapters."""

import pytest
import torch

from lorascope.activations import ExtractConfig, extract
from lorascope.activations.extract import tokenize_docs
from lorascope.data import make_demo_dataset
from lorascope.models.lora import collate
from lorascope.models.residual import ResidualCapture


@pytest.mark.slow
def test_smollm2_extraction(smollm2, tmp_path, random_adapters):
    docs = make_demo_dataset(6, seed=11)
    pm = random_adapters(smollm2.model, [4, 8])
    try:
        cfg = ExtractConfig(layers=[3, 15], batch_size=3, docs_per_shard=3, max_length=96, skip_first=0, progress=False)
        store = extract(pm, smollm2.tokenizer, docs, tmp_path / "smol", cfg)
        # mixed batch == separate passes, bitwise, on the real model
        toks = tokenize_docs(smollm2.tokenizer, docs, 96)
        batch = collate(toks[:3], smollm2.tokenizer.pad_token_id)
        cap = ResidualCapture(pm, [15])
        base = cap(batch["input_ids"], batch["attention_mask"], ["__base__"] * 3)[15]
        r8 = cap(batch["input_ids"], batch["attention_mask"], ["r8"] * 3)[15]
        rows = store.held_out(15, "r8", split="all")
        first = rows.doc_index < 3
        bi, pi = rows.doc_index[first], rows.position[first]
        assert torch.equal(rows.base[first], base[bi, pi])
        assert torch.equal(rows.delta[first], r8[bi, pi] - base[bi, pi])
        # the attention sink at position 0 (<|im_start|>) is caught by the norm rule even with skip_first = 0
        assert not bool((rows.position == 0).any())
        assert store.manifest["counts"]["excluded_norm"] >= len(docs)
        for L in (3, 15):
            for a in ("r4", "r8"):
                s = store.stats(L, a)
                assert s["n_tokens"] == store.n_tokens and 0 < s["relative_norm"]["mean"] < 1
                assert 1 <= s["participation_ratio"] <= 576
    finally:
        pm.unload()  # leave the session-wide SmolLM2 as it was
