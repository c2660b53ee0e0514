"""Acceptance: with a chat template that opens every document with a fixed system prompt, extraction (template
exclusion on) stores no row on the system prompt or the role markers, records what it excluded, and so the top
features' contexts never sit on the system prompt; with exclusion off the same rows are there (the test can fail)."""

from __future__ import annotations

import torch

from lorascope.activations import extract
from lorascope.report.contexts import TokenSource, top_activating_contexts
from tiny_models import CHAT_TEMPLATE, tiny_tokenizer

SYSTEM = "you are a good assistant"


def _system_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n" + CHAT_TEMPLATE
    return tok


def _system_span(tok) -> int:
    """Number of leading tokens of every document that belong to the system turn and the user role marker."""
    ids = tok(
        tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False), add_special_tokens=False
    )["input_ids"]
    return ids.index(tok.convert_tokens_to_ids("hello"))


def test_fixed_system_prompt_never_reaches_the_store_or_the_contexts(peft_tiny, docs, small_config, tmp_path):
    pm, _ = peft_tiny
    tok = _system_tokenizer()
    span = _system_span(tok)
    assert span >= 8  # <|im_start|> system you are a good assistant <|im_end|> <|im_start|> user
    on = extract(pm, tok, docs, tmp_path / "on", small_config(exclude_template=True, skip_first=1))
    off = extract(pm, tok, docs, tmp_path / "off", small_config(exclude_template=False, skip_first=1))
    record = on.manifest["config"]["template"]
    assert any(SYSTEM in s["text"] for s in record["excluded_spans"])
    rows_on = on.held_out(0, "rank_2", split="all")
    rows_off = off.held_out(0, "rank_2", split="all")
    assert (rows_off.position < span).any()  # without exclusion the system prompt is stored
    assert (rows_on.position >= span).all()
    assert on.manifest["counts"]["excluded_template"] > 0
    # top contexts of the "features" (here: the Δ coordinates with the largest mass) never sit on the system prompt
    acts = rows_on.delta.abs()
    top = torch.argsort(acts.sum(0), descending=True)[:4].tolist()
    doc_list = [on.doc_tokens(i) for i in range(len(on.doc_ids))]
    ctx = top_activating_contexts(
        acts, TokenSource(rows_on.token_id, rows_on.doc_index, rows_on.position, doc_list, tok.decode), top, 5
    )
    shown = [c for f in ctx for c in f["contexts"]]
    prefix = tok.decode(doc_list[0][:span])  # identical in every document
    # a context on the prefix would be a piece of it (its window reaches no further than the token itself)
    assert shown and all((c["text_before"] + c["token"]) not in prefix for c in shown)
