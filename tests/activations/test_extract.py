import math

import numpy as np
import pytest
import torch

from lorascope.activations import TokenSelection, extract, select_positions
from lorascope.activations.extract import tokenize_docs
from lorascope.activations.store import base_key, delta_key
from lorascope.models.lora import collate
from lorascope.models.residual import ResidualCapture

LAYERS = [0, 2]


def _shard_tensors(store, i):
    s = store
    keys = (
        ["doc_index", "position", "token_id"]
        + [base_key(L) for L in s.layers]
        + [delta_key(L, a) for L in s.layers for a in s.adapters]
    )
    return s.load_shard(i, keys)


def test_stored_rows_equal_separate_passes(store, peft_tiny, docs):
    """Stored base equals a base-only pass, stored delta equals (adapter-only pass) - (base-only pass), bitwise."""
    pm, tok = peft_tiny
    toks = tokenize_docs(tok, docs, 256)
    cap = ResidualCapture(pm, LAYERS)
    t = _shard_tensors(store, 1)  # documents 4..7: batches [4, 5, 6] and [7]
    for start, stop in ((4, 7), (7, 8)):
        batch = collate(toks[start:stop], tok.pad_token_id)
        B = stop - start
        base = cap(batch["input_ids"], batch["attention_mask"], ["__base__"] * B)
        rows = (t["doc_index"] >= start) & (t["doc_index"] < stop)
        bi, pi = t["doc_index"][rows] - start, t["position"][rows].long()
        assert torch.equal(t["token_id"][rows].long(), batch["input_ids"][bi, pi])
        for L in LAYERS:
            assert torch.equal(t[base_key(L)][rows], base[L][bi, pi])
            for a in store.adapters:
                adapted = cap(batch["input_ids"], batch["attention_mask"], [a] * B)[L]
                want = adapted[bi, pi] - base[L][bi, pi]
                got = t[delta_key(L, a)][rows]
                assert torch.equal(got, want), (L, a)
                assert got.abs().max() > 0  # base and adapted rows really differ
        rows_held = store.held_out(LAYERS[0], store.adapters[0], split="all")
        assert torch.equal(rows_held.adapted, rows_held.base + rows_held.delta)


def test_token_metadata_and_selection(store, peft_tiny, docs):
    _, tok = peft_tiny
    toks = tokenize_docs(tok, docs, 256)
    rows = store.held_out(0, "rank_2", split="all")
    assert rows.position.min() >= 1  # skip_first = 1 drops position 0 (<|im_start|>)
    for i in range(len(toks)):
        assert store.doc_tokens(i) == toks[i].input_ids
        assert store.doc_ids[i] == toks[i].doc_id
    assert torch.equal(
        rows.token_id,
        torch.tensor(
            [toks[d].input_ids[p] for d, p in zip(rows.doc_index.tolist(), rows.position.tolist(), strict=True)]
        ),
    )
    m = store.manifest
    c = m["counts"]
    assert c["selected"] == m["n_tokens"] == rows.base.shape[0] == store.n_tokens
    assert c["tokens"] == sum(len(t) for t in toks)
    assert c["tokens"] == c["selected"] + c["skipped_first"] + c["other_part"] + c["excluded_norm"]
    assert c["skipped_first"] == len(toks) and c["other_part"] == 0
    assert "position >= 1" in m["config"]["selection"]["rule"]


def test_prompt_and_response_modes(peft_tiny, docs, tmp_path, small_config):
    pm, tok = peft_tiny
    toks = tokenize_docs(tok, docs[:6], 256)
    for mode in ("prompt", "response"):
        st = extract(pm, tok, docs[:6], tmp_path / mode, small_config(tokens=mode, max_norm_factor=None))
        rows = st.held_out(2, "rank_4", split="all")
        rs = torch.tensor([toks[d].response_start for d in rows.doc_index.tolist()])
        assert bool((rows.position < rs).all() if mode == "prompt" else (rows.position >= rs).all())
        want = sum(t.response_start - 1 if mode == "prompt" else len(t) - t.response_start for t in toks)
        assert rows.base.shape[0] == want


def test_norm_rule_drops_sinks_and_counts():
    att = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    norms = {3: torch.ones(2, 6), 7: torch.ones(2, 6)}
    norms[7][1, 2] = 50.0  # an attention sink inside document 1
    keep, counts = select_positions(att, torch.tensor([3, 3]), norms, TokenSelection("all", 1, 10.0))
    assert not keep[:, 0].any() and not keep[1, 2] and not keep[0, 5]
    assert counts == {"tokens": 11, "skipped_first": 2, "other_part": 0, "excluded_norm": 1, "selected": 8}
    keep, counts = select_positions(att, torch.tensor([3, 3]), norms, TokenSelection("all", 0, None))
    assert counts["selected"] == 11 and counts["excluded_norm"] == 0


def test_statistics_match_stored_rows(store):
    for L in LAYERS:
        for a in store.adapters:
            s = store.stats(L, a)
            rows = store.held_out(L, a, split="all")
            d = rows.delta.double()
            dn = d.norm(dim=1)
            bn = rows.base.double().norm(dim=1)
            assert s["n_tokens"] == d.shape[0]
            assert math.isclose(s["delta_norm"]["mean"], float(dn.mean()), rel_tol=1e-12)
            assert math.isclose(s["relative_norm"]["mean"], float((dn / bn).mean()), rel_tol=1e-12)
            assert math.isclose(s["energy_ratio"], float((dn**2).sum() / (bn**2).sum()), rel_tol=1e-12)
            med = float(dn.median())
            assert abs(math.log10(s["delta_norm"]["q50"]) - math.log10(med)) < 0.011  # 0.01-dex bins
            lam = np.linalg.eigvalsh(np.cov(d.numpy(), rowvar=False))[::-1].clip(0)
            assert math.isclose(s["participation_ratio"], lam.sum() ** 2 / (lam**2).sum(), rel_tol=1e-9)
            vec = store.stat_vectors(L, a)
            assert torch.allclose(vec["mean"], d.mean(0), rtol=0, atol=1e-12)


def test_bfloat16_store_keeps_delta_precision(store, peft_tiny, docs, tmp_path, small_config):
    pm, tok = peft_tiny
    bf = extract(pm, tok, docs, tmp_path / "bf16", small_config(dtype="bfloat16"))
    t = bf.load_shard(0, [delta_key(2, "rank_4")])
    assert t[delta_key(2, "rank_4")].dtype == torch.bfloat16
    ref = store.held_out(2, "rank_4", split="all")
    got = bf.held_out(2, "rank_4", split="all")
    assert got.delta.dtype == torch.float32 and torch.equal(got.position, ref.position)
    rel = float((got.delta - ref.delta).norm() / ref.delta.norm())
    assert 0 < rel < 0.01  # bf16 rounding of delta itself (~0.4%), not of adapted - base


@pytest.mark.parametrize("arch", ["gemma2", "gpt2"])
def test_other_architectures(tiny_model_dirs, arch, docs, tmp_path, small_config, random_adapters):
    from lorascope.models import load_base

    base = load_base(tiny_model_dirs[arch])
    pm = random_adapters(base.model, [2, 4], scale=0.5)
    st = extract(pm, base.tokenizer, docs[:5], tmp_path / arch, small_config(layers=[0, 2]))
    toks = tokenize_docs(base.tokenizer, docs[:3], 256)
    batch = collate(toks, base.tokenizer.pad_token_id)
    cap = ResidualCapture(pm, [2])
    h_base = cap(batch["input_ids"], batch["attention_mask"], ["__base__"] * 3)[2]
    h_r4 = cap(batch["input_ids"], batch["attention_mask"], ["r4"] * 3)[2]
    rows = st.held_out(2, "r4", split="all")
    first = rows.doc_index < 3
    bi, pi = rows.doc_index[first], rows.position[first]
    assert torch.equal(rows.base[first], h_base[bi, pi])
    assert torch.equal(rows.delta[first], h_r4[bi, pi] - h_base[bi, pi])
    assert rows.delta.abs().max() > 0
