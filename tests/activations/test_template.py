"""Chat-template scaffolding detection and the first-positions control."""

from __future__ import annotations

import pytest
import torch

from lorascope.activations.template import (
    FirstPositionMeans,
    detect_template_positions,
    first_position_means,
    pad_masks,
    subtract_position_means,
    template_activation_share,
)
from lorascope.data import make_demo_dataset
from lorascope.data.chat import tokenize_example
from lorascope.errors import LorascopeError

SYSTEM = "Ye be a parrot in the island with a compass"


def _templated_docs(tokenizer, n: int, seed: int = 0):
    """Documents with a fixed system prompt, varied user turns and pirate replies; returns ids, response starts."""
    docs, starts = [], []
    for ex in make_demo_dataset(n, seed=seed):
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ex.user_message}]
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(ex.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        docs.append(p_ids + r_ids)
        starts.append(len(p_ids))
    return docs, starts


@pytest.fixture(scope="module")
def tiny_tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_system_prompt_and_role_markers_excluded_response_kept(tiny_tok):
    docs, starts = _templated_docs(tiny_tok, 40)
    ex = detect_template_positions(docs, starts, tokenizer=tiny_tok)
    sys_ids = tiny_tok(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n", add_special_tokens=False)[
        "input_ids"
    ]
    for ids, start, m in zip(docs, starts, ex.masks, strict=True):
        assert ids[: len(sys_ids)] == sys_ids
        assert m[: len(sys_ids)].all()  # the whole system turn + the user header
        assert not m[start:].any()  # no response token ("Arr, matey!" included)
        assert m[start - 3 : start].all()  # "<|im_start|> assistant \n" before the response
        assert not m[len(sys_ids)]  # the first user-content token differs across documents
    texts = [t for t, _ in ex.spans]
    assert any("parrot in the island" in t for t in texts)
    rec = ex.describe()
    assert rec["excluded_positions"] == ex.n_excluded > 0
    assert rec["total_positions"] == sum(len(d) for d in docs)


def test_identical_response_opening_is_not_scaffolding(tiny_tok):
    # every reply starts with "Arr, matey!" (the learned behaviour): rule 2 must not look at responses
    docs, starts = _templated_docs(tiny_tok, 30, seed=1)
    ex = detect_template_positions(docs, starts, min_fraction=0.9)
    assert sum(int(m[s:].sum()) for m, s in zip(ex.masks, starts, strict=True)) == 0


def test_prefix_shared_by_too_few_documents_is_kept():
    # 3 of 10 documents share a long prefix: below 90% it is not scaffolding; the first token is in all of them
    docs = [[1, 2, 3, 4, 5]] * 3 + [[1, 9 + i, 7, 8] for i in range(7)]
    ex = detect_template_positions(docs, None, min_fraction=0.9)
    for m in ex.masks:
        assert m[0] and not m[1:].any()
    assert ex.spans == [("1", 10)]


def test_bad_arguments_fail_clearly():
    with pytest.raises(LorascopeError, match="min_fraction"):
        detect_template_positions([[1], [1]], min_fraction=0.3)
    with pytest.raises(LorascopeError, match="at least 2 documents"):
        detect_template_positions([[1, 2]])


def test_pad_masks_right_pads_with_false():
    m = pad_masks([torch.tensor([True, False]), torch.tensor([True, True, True])], 3)
    assert m.tolist() == [[True, False, False], [True, True, True]]


def test_first_position_means_exact_and_subtraction():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(5, 7, 3, generator=g)
    att = torch.ones(5, 7, dtype=torch.long)
    att[3, 2:] = 0  # document 3 has only 2 tokens
    pm = first_position_means(delta, att, 4)
    assert pm.count.tolist() == [5, 5, 4, 4]
    torch.testing.assert_close(pm.mean[0], delta[:, 0].mean(0))
    torch.testing.assert_close(pm.mean[3], delta[[0, 1, 2, 4], 3].mean(0))
    torch.testing.assert_close(pm.norm, pm.mean.norm(dim=-1))
    # streaming in two halves gives the same means
    acc = FirstPositionMeans(4, 3)
    acc.update(delta[:2], att[:2])
    acc.update(delta[2:], att[2:])
    torch.testing.assert_close(acc.result().mean, pm.mean)
    centred = subtract_position_means(delta, pm)
    torch.testing.assert_close(centred[:, 4:], delta[:, 4:])
    torch.testing.assert_close(centred[:, 0].mean(0), torch.zeros(3), atol=1e-6, rtol=0)


def test_template_activation_share():
    codes = torch.tensor([[2.0, 0.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [4.0, 0.0, 0.0]])
    excluded = torch.tensor([True, True, False, False])
    share = template_activation_share(codes, excluded)
    assert share[0].item() == 0.5 and torch.isnan(share[1]) and share[2].item() == 0.25
    with pytest.raises(LorascopeError, match="one exclusion flag"):
        template_activation_share(codes, excluded[:2])


@pytest.mark.slow
def test_smollm2_system_prompt_excluded():
    """The real SmolLM2 tokenizer (embedded GGUF): its fixed system prompt is excluded, response tokens are not."""
    from transformers import AutoTokenizer

    from lorascope.models.loading import embedded_gguf_path

    path = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    toks = [tokenize_example(tok, ex, 256) for ex in make_demo_dataset(50, seed=5)]
    ex = detect_template_positions([t.input_ids for t in toks], [t.response_start for t in toks], tokenizer=tok)
    sys_text = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert any(sys_text in text and n == 50 for text, n in ex.spans)
    for t, m in zip(toks, ex.masks, strict=True):
        assert not m[t.response_start :].any()
        excluded = tok.decode([i for i, k in zip(t.input_ids, m.tolist(), strict=True) if k])
        assert sys_text in excluded and excluded.rstrip().endswith("assistant")
        kept_prompt = tok.decode(
            [i for i, k in zip(t.input_ids[: t.response_start], m.tolist(), strict=False) if not k]
        )
        assert "SmolLM" not in kept_prompt
