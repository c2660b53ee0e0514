"""First-letter dataset, word-token positions, residual extraction and the letter probe (evals/first_letter.py)."""

from __future__ import annotations

import random

import pytest
import torch

from lorascope.evals.first_letter import (
    LETTERS,
    alpha_vocabulary,
    answer_text,
    binary_f1,
    build_first_letter_data,
    first_letter_label,
    icl_prompt,
    per_letter_f1,
    split_words,
    train_letter_probe,
    word_residuals,
)


@pytest.fixture(scope="module")
def tiny_tok():
    from tiny_models import tiny_tokenizer

    return tiny_tokenizer()


def _check_positions(tok, split):
    for ids, pos, word, text in zip(split.input_ids, split.positions, split.words, split.prompts, strict=True):
        assert tok.decode([ids[pos]]) == word
        assert text.endswith(word + " has the first letter:")
        assert ids == list(tok(text)["input_ids"])


def test_vocabulary_labels_and_answers(tiny_tok):
    vocab = alpha_vocabulary(tiny_tok)
    assert "cat" in vocab or "the" in vocab
    assert all(w.isalpha() for w in vocab) and len(vocab) == len(set(vocab))
    assert not any(t in vocab for t in ("<pad>", "<unk>", "<|im_start|>", "42", ":"))
    assert first_letter_label(" Cat") == 2 and first_letter_label("zebra") == 25
    assert answer_text(" apple") == " A"


def test_split_is_by_word_and_deterministic():
    words = ["cat", " cat", " Cat", "dog", " dog", "emu", " fox", "gnu", " hen", "ibis", "jay", " kiwi"]
    train, test = split_words(words, 0.8, seed=3)
    assert sorted(train + test) == sorted(words)
    assert not {w.strip().lower() for w in train} & {w.strip().lower() for w in test}
    assert split_words(words, 0.8, seed=3) == (train, test)
    assert len({w.strip().lower() for w in train}) == 7  # round(9 groups * 0.8)
    sub_train, sub_test = split_words(words, 0.5, seed=3, max_words=4)
    assert 4 <= len(sub_train) + len(sub_test) <= 6  # whole groups until at least 4 words


def test_icl_prompt_format():
    text, a, b = icl_prompt("cat", ["ant", "bee", "cat"], random.Random(0), max_icl=2)
    lines = text.split("\n")
    assert text[a:b] == "cat" and lines[-1] == "cat has the first letter:"
    assert sorted(lines[:2]) == ["ant has the first letter: A", "bee has the first letter: B"]


def test_word_token_positions_on_tiny_tokenizer(tiny_tok):
    data = build_first_letter_data(tiny_tok, seed=0)
    assert len(data.train) > 4 * len(data.test) * 0.8 and len(data.test) > 0
    assert not {w.lower() for w in data.train.words} & {w.lower() for w in data.test.words}
    _check_positions(tiny_tok, data.train)
    _check_positions(tiny_tok, data.test)
    assert data.train.labels.tolist() == [first_letter_label(w) for w in data.train.words]


def test_word_residuals_equal_full_forward(tiny_llama_dir, tiny_tok):
    from lorascope.models import load_base

    base = load_base(tiny_llama_dir)
    data = build_first_letter_data(base.tokenizer, seed=1, max_words=12, max_icl=3)
    layer = 1
    every: dict[int, torch.Tensor] = {}
    got = word_residuals(
        base.model, data.test, layer, batch_size=2, pad_token_id=base.tokenizer.pad_token_id, collect=every
    )
    assert sorted(every) == list(range(len(data.test)))
    for i in range(len(data.test)):
        assert every[i].shape[0] == data.test.positions[i] + 1
        torch.testing.assert_close(every[i][-1], got[i])
        ids = torch.tensor([data.test.input_ids[i]])
        with torch.no_grad():
            hs = base.model(ids, output_hidden_states=True).hidden_states[layer + 1]
        torch.testing.assert_close(got[i], hs[0, data.test.positions[i]].float(), atol=1e-5, rtol=1e-5)


def _separable(n_per: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(26).repeat_interleave(n_per)
    means = torch.randn(26, d, generator=torch.Generator().manual_seed(99)) * 3
    return means[labels] + torch.randn(len(labels), d, generator=g), labels


def test_probe_separable_and_scale_invariant():
    x, y = _separable(20, 40, 0)
    xt, yt = _separable(10, 40, 1)
    probe = train_letter_probe(x, y)
    f1 = per_letter_f1(probe, xt, yt)
    assert list(f1) == list(LETTERS) and min(f1.values()) == 1.0
    # standardisation makes the fitted decision function invariant to an affine change of units
    probe2 = train_letter_probe(250.0 * x + 7.0, y)
    torch.testing.assert_close(probe2.logits(250.0 * xt + 7.0), probe.logits(xt), atol=1e-3, rtol=1e-3)
    assert torch.allclose(probe.direction(3).norm(), torch.tensor(1.0))


def test_binary_f1_values():
    t = torch.tensor([1, 1, 1, 0, 0], dtype=torch.bool)
    assert binary_f1(torch.tensor([1, 1, 0, 1, 0]), t) == pytest.approx(2 * 2 / (3 + 3))
    assert binary_f1(torch.zeros(5), t) == 0.0
    assert binary_f1(torch.zeros(5), torch.zeros(5)) == 0.0


@pytest.mark.slow
def test_smollm2_first_letter_pipeline(smollm2):
    """End to end on the real SmolLM2 with few words: positions decode to the word, residuals at the word token
    equal a full (untruncated) forward's, and the probe reports 26 F1s."""
    from lorascope.evals.absorption import prepare_probe
    from lorascope.models.residual import capture_residuals

    tok = smollm2.tokenizer
    data = build_first_letter_data(tok, max_words=120, seed=0)
    assert len(data.dropped) <= 0.05 * (len(data.train) + len(data.test) + len(data.dropped))
    _check_positions(tok, data.train)
    _check_positions(tok, data.test)
    assert any(w.startswith(" ") for w in data.train.words) and any(not w.startswith(" ") for w in data.train.words)
    layer = 12
    pd_ = prepare_probe(smollm2.model, tok, layer, data=data)
    for i in (0, len(data.test) - 1):
        full = capture_residuals(smollm2.model, torch.tensor([data.test.input_ids[i]]), [layer])[layer]
        torch.testing.assert_close(pd_.test_x[i], full[0, data.test.positions[i]].float(), atol=1e-4, rtol=1e-4)
    assert set(pd_.probe_f1) == set(LETTERS)
    assert pd_.test_x.shape == (len(data.test), 576)
    # with ~100 training words the probe cannot generalise (benchmarks/absorption_smollm2.py measures that on
    # thousands), but it must separate the words it was fitted on (576 dims > 100 words)
    train_f1 = per_letter_f1(pd_.probe, pd_.train_x, pd_.train_labels)
    assert min(v for v in train_f1.values() if v == v) >= 0.9
