"""Top-activating contexts: true top-k on constructed arrays, exact window text, bookkeeping checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.report import context_html, top_activating_contexts
from lorascope.report.contexts import TokenSource


def decode(ids):
    return "".join(f"<t{i}>" for i in ids)


@pytest.fixture
def corpus():
    docs = [list(range(100, 130)), list(range(200, 215)), list(range(300, 340))]
    doc_index = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    positions = np.concatenate([np.arange(len(d)) for d in docs])
    token_ids = np.concatenate([np.asarray(d) for d in docs])
    return docs, token_ids, doc_index, positions


def test_picks_true_top_k_with_exact_windows(corpus):
    docs, tok, doc, pos = corpus
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((len(tok), 5))
    out = top_activating_contexts(
        acts,
        TokenSource(tok, doc, pos, docs, decode),
        features=[0, 3],
        n_per_feature=4,
        window=3,
        layer=7,
        adapter="rank_4",
    )
    assert [e["feature"] for e in out] == [0, 3]
    for e in out:
        col = acts[:, e["feature"]]
        expect = sorted(range(len(col)), key=lambda i: -col[i])[:4]
        assert [c["activation"] for c in e["contexts"]] == [col[i] for i in expect]
        assert e["density"] == float((col > 0).mean()) and e["max_act"] == col.max()
        assert e["layer"] == 7 and e["adapter"] == "rank_4"
        for c, i in zip(e["contexts"], expect, strict=True):
            d, p = int(doc[i]), int(pos[i])
            assert c["doc_id"] == d
            assert c["token"] == f"<t{docs[d][p]}>"
            assert c["text_before"] == decode(docs[d][max(0, p - 3) : p])
            assert c["text_after"] == decode(docs[d][p + 1 : p + 4])
    json.dumps(out)  # contexts.json-ready


def test_window_is_clipped_at_document_edges_and_ties_keep_order(corpus):
    docs, tok, doc, pos = corpus
    acts = np.zeros(len(tok))
    first, last = 0, len(docs[0]) - 1  # doc 0 start and end
    acts[[first, last]] = 2.0  # a tie: lower index first
    acts[5] = 1.0
    (e,) = top_activating_contexts(
        torch.tensor(acts), TokenSource(tok, doc, pos, docs, decode), features=42, n_per_feature=10, window=12
    )
    assert e["feature"] == 42 and len(e["contexts"]) == 3  # only strictly positive activations
    a, b, c = e["contexts"]
    assert a["text_before"] == "" and a["token"] == "<t100>" and a["text_after"] == decode(range(101, 113))
    assert b["token"] == "<t129>" and b["text_after"] == "" and b["text_before"] == decode(range(117, 129))
    assert c["token"] == "<t105>" and c["text_before"] == decode(range(100, 105))
    assert e["density"] == 3 / len(tok)


def test_feature_that_never_fires(corpus):
    docs, tok, doc, pos = corpus
    (e,) = top_activating_contexts(-np.ones((len(tok), 2)), TokenSource(tok, doc, pos, docs, decode), [1], 5)
    assert e["contexts"] == [] and e["max_act"] == 0.0 and e["density"] == 0.0


def test_bookkeeping_errors(corpus):
    docs, tok, doc, pos = corpus
    acts = np.ones(len(tok))
    bad = tok.copy()
    bad[3] += 1
    with pytest.raises(LorascopeError, match="token_ids says"):
        top_activating_contexts(acts, TokenSource(bad, doc, pos, docs, decode), 0, len(tok))
    with pytest.raises(LorascopeError, match="lengths differ"):
        top_activating_contexts(acts[:-1], TokenSource(tok, doc, pos, docs, decode), 0, 2)
    with pytest.raises(LorascopeError, match="outside acts"):
        top_activating_contexts(np.ones((len(tok), 2)), TokenSource(tok, doc, pos, docs, decode), [2], 2)
    with pytest.raises(LorascopeError, match="one feature"):
        top_activating_contexts(acts, TokenSource(tok, doc, pos, docs, decode), [0, 1], 2)
    with pytest.raises(LorascopeError, match="lengths differ"):
        TokenSource(tok, doc[:-1], pos, docs, decode)


def test_context_html_escapes_and_marks_the_token():
    ctx = {
        "doc_id": 1,
        "text_before": "a <script>alert(1)</script> & b\n",
        "token": "<b>",
        "text_after": " \"q\" 'x'",
        "activation": 2.5,
    }
    h = context_html(ctx)
    assert "<script>" not in h and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; b↵" in h
    assert '<mark title="activation 2.5">&lt;b&gt;</mark>' in h
    assert "&quot;q&quot; &#x27;x&#x27;" in h
