"""Full-vocabulary first-letter data with shared few-shot prefixes (evals/shared_prefix.py)."""

from __future__ import annotations

import torch

from lorascope.evals.first_letter import alpha_vocabulary, first_letter_label, word_residuals
from lorascope.evals.shared_prefix import build_shared_prefix_data, shared_prefix_residuals


def test_whole_vocabulary_by_default_grouped_under_shared_prefixes(tiny_llama_dir):
    from lorascope.models import load_base

    tok = load_base(tiny_llama_dir).tokenizer
    data = build_shared_prefix_data(tok, words_per_prefix=5, max_icl=3, seed=2)
    vocab = alpha_vocabulary(tok)
    seen = data.train.words + data.test.words + data.dropped
    assert sorted(seen) == sorted(vocab)  # every alphabetic token, no word subset
    assert not {w.strip().lower() for w in data.train.words} & {w.strip().lower() for w in data.test.words}
    for split, words in ((data.train, data.train.words), (data.test, data.test.words)):
        assert split.labels.tolist() == [first_letter_label(w) for w in words]
        prefixes = [tuple(ids[:p]) for ids, p in zip(split.input_ids, split.positions, strict=True)]
        assert len(set(prefixes)) >= -(-len(split) // 5) and max(prefixes.count(q) for q in prefixes) <= 5
        for ids, p, w in zip(split.input_ids, split.positions, words, strict=True):
            assert len(ids) == p + 1 and tok.decode([ids[p]]).strip() == w.strip()
        # a prefix's examples never include a word of its own group
        for prefix in set(prefixes):
            members = [w for w, q in zip(words, prefixes, strict=True) if q == prefix]
            text = tok.decode(list(prefix))
            lines = [ln.split(" has the first letter:")[0] for ln in text.split("\n") if ln]
            assert not {m.strip() for m in members} & {x.strip() for x in lines}


def test_cached_prefix_residuals_equal_separate_forwards(tiny_llama_dir):
    from lorascope.models import load_base

    base = load_base(tiny_llama_dir)
    data = build_shared_prefix_data(base.tokenizer, words_per_prefix=4, max_icl=3, seed=1, max_words=24)
    layer = 1
    fast = shared_prefix_residuals(base.model, data.test, layer, batch_size=3)
    slow = word_residuals(base.model, data.test, layer, batch_size=2, pad_token_id=base.tokenizer.pad_token_id)
    assert fast.shape == slow.shape and len(data.test) > 4
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_small_splits_keep_their_examples_and_an_empty_prefix_runs(tiny_llama_dir):
    """A split smaller than words_per_prefix is cut into groups that still have max_icl examples to draw from;
    with max_icl = 0 every prompt is the word alone (empty prefix) and still matches the separate forward."""
    from lorascope.models import load_base

    base = load_base(tiny_llama_dir)
    data = build_shared_prefix_data(base.tokenizer, words_per_prefix=64, max_icl=3, seed=0, max_words=20)
    for split in (data.train, data.test):
        assert len(split) > 0 and min(split.positions) > 0  # every prompt has a few-shot prefix
    bare = build_shared_prefix_data(base.tokenizer, words_per_prefix=8, max_icl=0, seed=0, max_words=16)
    assert set(bare.test.positions) == {0}
    fast = shared_prefix_residuals(base.model, bare.test, 1)
    slow = word_residuals(base.model, bare.test, 1, pad_token_id=base.tokenizer.pad_token_id)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
