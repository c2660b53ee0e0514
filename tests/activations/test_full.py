"""Full fine-tunes (whole models) against their base: Δ from two model copies on the same batches, same store
format, one model resident at a time in the default mode."""

import pytest
import torch

from lorascope.activations import ExtractConfig, HeldOutSplit, extract, open_store
from lorascope.activations.full import extract_full
from lorascope.activations.store import base_key, delta_key
from lorascope.data import make_demo_dataset
from lorascope.models import load_adapters, load_base

LAYERS = [0, 1]  # hidden_states[L + 1] of the HF forward is the output of block L for every block but the last


@pytest.fixture(scope="module")
def finetuned_dir(tiny_llama_dir, tmp_path_factory):
    """A 'fully fine-tuned' tiny Llama: every weight of the base moved by seeded noise."""
    base = load_base(tiny_llama_dir)
    torch.manual_seed(11)
    with torch.no_grad():
        for p in base.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("ft") / "full_ft"
    base.model.save_pretrained(out)
    base.tokenizer.save_pretrained(out)
    return out


def _rows(store, name):
    out = {
        k: [] for k in ("doc_index", "position", *(base_key(L) for L in LAYERS), *(delta_key(L, name) for L in LAYERS))
    }
    for i in range(len(store.manifest["shards"])):
        t = store.load_shard(i, list(out))
        for k in out:
            out[k].append(t[k])
    return {k: torch.cat(v) for k, v in out.items()}


def _cfg(**kw):
    return ExtractConfig(
        **{"layers": LAYERS, "batch_size": 1, "docs_per_shard": 3, "progress": False, "max_norm_factor": None, **kw}
    )


def test_delta_equals_hand_computed_difference_of_two_models(tiny_llama_dir, finetuned_dir, tmp_path):
    base = load_base(tiny_llama_dir)
    ft = load_base(finetuned_dir).model
    examples = make_demo_dataset(7, seed=5)
    res = extract_full(
        str(tiny_llama_dir), {"ft": str(finetuned_dir)}, base.tokenizer, examples, tmp_path / "s", _cfg()
    )
    rows = _rows(res.store, "ft")
    docs = res.store.doc_ids
    assert len(docs) == 7 and res.store.adapters == ["ft"]
    from lorascope.activations.extract import tokenize_docs

    toks = tokenize_docs(base.tokenizer, examples, 256)
    with torch.no_grad():
        for d, t in enumerate(toks):
            ids = torch.tensor([t.input_ids])
            att = torch.ones_like(ids)
            hb = base.model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
            hf = ft(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
            sel = rows["doc_index"] == d
            pos = rows["position"][sel].long()
            assert pos.tolist() == list(range(1, len(t)))  # skip_first=1, no norm rule
            for L in LAYERS:
                want_base = hb[L + 1][0, pos]
                want_delta = hf[L + 1][0, pos].float() - hb[L + 1][0, pos].float()
                assert torch.equal(rows[base_key(L)][sel], want_base)
                assert torch.equal(rows[delta_key(L, "ft")][sel], want_delta)
    assert res.store.manifest["config"]["adapters"]["kind"] == "full-model"
    assert not (tmp_path / "s" / "spill").exists()
    # downstream readers see an ordinary store: adapted = base + Δ, statistics per (layer, fine-tune)
    half = HeldOutSplit(0.5)
    paired = res.store.held_out(1, "ft", half)
    assert paired.delta.shape[0] > 0 and torch.allclose(paired.adapted, paired.base + paired.delta)
    train = torch.cat(list(res.store.reader(1, "delta", "ft", batch_size=16, holdout=half)))
    assert train.shape[0] + paired.delta.shape[0] == rows["doc_index"].shape[0]
    assert res.store.stats(1, "ft")["n_tokens"] == rows["doc_index"].shape[0]


def test_one_resident_matches_lockstep_and_holds_one_model(tiny_llama_dir, finetuned_dir, tmp_path):
    tok = load_base(tiny_llama_dir).tokenizer
    examples = make_demo_dataset(10, seed=6)
    fts = {"ft": str(finetuned_dir), "ft2": str(finetuned_dir)}
    one = extract_full(str(tiny_llama_dir), fts, tok, examples, tmp_path / "one", _cfg(batch_size=4))
    both = extract_full(str(tiny_llama_dir), fts, tok, examples, tmp_path / "both", _cfg(batch_size=4), resident="both")
    for name in fts:
        a, b = _rows(one.store, name), _rows(both.store, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    size = one.model_param_bytes["base"]
    assert one.model_param_bytes == {"base": size, "ft": size, "ft2": size}
    # parameter-bytes accounting (weakref finalizers): one copy alive at a time vs all three at once
    assert (one.peak_models, one.peak_param_bytes) == (1, size)
    assert (both.peak_models, both.peak_param_bytes) == (3, 3 * size)
    assert one.peak_param_bytes < 2 * size


def test_merged_lora_as_full_model_matches_the_peft_path(tiny_llama_dir, tiny_adapters, tmp_path):
    """A merged LoRA analysed as a whole model gives the Δ of the same adapter through PEFT mixed batches."""
    from peft import PeftModel

    base = load_base(tiny_llama_dir)
    merged = PeftModel.from_pretrained(load_base(tiny_llama_dir).model, str(tiny_adapters["rank_4"]))
    merged = merged.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    base.tokenizer.save_pretrained(tmp_path / "merged")
    examples = make_demo_dataset(6, seed=8)
    full = extract_full(
        str(tiny_llama_dir),
        {"a": str(tmp_path / "merged")},
        base.tokenizer,
        examples,
        tmp_path / "full",
        _cfg(batch_size=3),
    ).store
    pm = load_adapters(base, {"a": tiny_adapters["rank_4"]})
    peft = extract(pm, base.tokenizer, examples, tmp_path / "peft", _cfg(batch_size=3))
    a, b = _rows(full, "a"), _rows(peft, "a")
    assert torch.equal(a["position"], b["position"]) and torch.equal(a[base_key(1)], b[base_key(1)])
    d_full, d_peft = a[delta_key(1, "a")], b[delta_key(1, "a")]
    assert d_peft.norm() > 0 and torch.allclose(d_full, d_peft, atol=1e-5, rtol=1e-3)


def test_peft_folder_as_separate_model_and_incompatible_model(tiny_llama_dir, tiny_model_dirs, tiny_adapters, tmp_path):
    from lorascope.errors import LorascopeError

    base = load_base(tiny_llama_dir)
    examples = make_demo_dataset(5, seed=9)
    sep = extract_full(
        str(tiny_llama_dir),
        {"a": str(tiny_adapters["rank_2"])},
        base.tokenizer,
        examples,
        tmp_path / "sep",
        _cfg(batch_size=5),
    ).store
    mixed = extract(
        load_adapters(base, {"a": tiny_adapters["rank_2"]}),
        base.tokenizer,
        examples,
        tmp_path / "mix",
        _cfg(batch_size=5),
    )
    a, b = _rows(sep, "a"), _rows(mixed, "a")
    assert torch.allclose(a[delta_key(0, "a")], b[delta_key(0, "a")], atol=1e-6)
    with pytest.raises(LorascopeError, match="fine-tune 'g' at .* is a gemma2 .* but the base is a llama"):
        extract_full(
            str(tiny_llama_dir),
            {"g": str(tiny_model_dirs["gemma2"])},
            base.tokenizer,
            examples,
            tmp_path / "bad",
            _cfg(),
        )
    assert not (tmp_path / "bad").exists()  # refused before any model load or write


def test_store_is_resumed_not_recomputed(tiny_llama_dir, finetuned_dir, tmp_path):
    tok = load_base(tiny_llama_dir).tokenizer
    examples = make_demo_dataset(4, seed=1)
    first = extract_full(str(tiny_llama_dir), {"ft": str(finetuned_dir)}, tok, examples, tmp_path / "s", _cfg())
    again = extract_full(str(tiny_llama_dir), {"ft": str(finetuned_dir)}, tok, examples, tmp_path / "s", _cfg())
    assert again.store.manifest["config_hash"] == first.store.manifest["config_hash"]
    assert open_store(tmp_path / "s").n_tokens == first.store.n_tokens
