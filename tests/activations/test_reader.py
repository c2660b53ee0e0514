import pytest
import torch

from lorascope.activations import held_out_mask
from lorascope.data import split_examples
from lorascope.errors import LorascopeError


def _cat(reader):
    batches = list(reader)
    return batches, torch.cat([b.x for b in batches]), torch.cat([b.doc_index for b in batches])


def test_split_is_by_document_and_never_mixes(store, docs):
    held = held_out_mask(store.doc_ids, 0.3, seed=5)
    assert 0 < int(held.sum()) < len(docs)
    _, held_docs = split_examples(docs, 0.3, seed=5)  # same rule as the example splitter
    assert {store.doc_ids[i] for i in held.nonzero().flatten().tolist()} == {e.id for e in held_docs}
    seen = {}
    for split in ("train", "held_out"):
        r = store.reader(
            0, "delta", "rank_2", split=split, batch_size=7, held_out_fraction=0.3, split_seed=5, with_meta=True
        )
        batches, x, doc = _cat(r)
        assert len(batches) == len(r) and x.shape == (r.n_rows, store.d_model)
        assert all(b.x.shape[0] == 7 for b in batches[:-1])
        assert bool((held[doc] == (split == "held_out")).all())  # every row's document is on the right side
        seen[split] = r.n_rows
    assert seen["train"] + seen["held_out"] == store.n_tokens


def test_kinds_are_consistent(store):
    kw = dict(split="all", shuffle=False, batch_size=10_000)
    base = next(iter(store.reader(2, "base", **kw)))
    delta = next(iter(store.reader(2, "delta", "rank_4", **kw)))
    adapted = next(iter(store.reader(2, "adapted", "rank_4", **kw)))
    assert torch.equal(adapted, base + delta)
    rows = store.held_out(2, "rank_4", split="all")
    assert torch.equal(rows.base, base) and torch.equal(rows.delta, delta)


def test_order_is_deterministic_and_resumable(store):
    def run(**kw):
        return [b for b in store.reader(0, "delta", "rank_2", batch_size=5, window_shards=2, with_meta=True, **kw)]

    a, b, c = run(seed=1, epoch=0), run(seed=1, epoch=0), run(seed=1, epoch=1)
    assert all(torch.equal(x.x, y.x) for x, y in zip(a, b, strict=True))
    assert not torch.equal(torch.cat([x.doc_index for x in a]), torch.cat([x.doc_index for x in c]))
    # same multiset of rows every epoch: sort the (doc, position) keys
    key = lambda bs: sorted(  # noqa: E731
        zip(
            torch.cat([x.doc_index for x in bs]).tolist(),
            torch.cat([x.position for x in bs]).tolist(),
            strict=True,
        )
    )
    assert key(a) == key(c)
    for k in (0, 3, 7, len(a) - 1):  # resuming after k batches yields exactly the remaining batches
        rest = run(seed=1, epoch=0, skip_rows=5 * k)
        assert len(rest) == len(a) - k
        assert all(
            torch.equal(x.x, y.x) and torch.equal(x.doc_index, y.doc_index) for x, y in zip(rest, a[k:], strict=True)
        )


def test_held_out_rows_are_held_out_documents(store):
    rows = store.held_out(0, "rank_2", held_out_fraction=0.3, split_seed=5)
    held = held_out_mask(store.doc_ids, 0.3, seed=5)
    assert rows.base.shape == rows.delta.shape and rows.base.shape[0] == rows.doc_index.shape[0] > 0
    assert bool(held[rows.doc_index].all())
    assert torch.equal(rows.adapted - rows.base, rows.delta)


def test_reader_rejects_bad_arguments(store):
    with pytest.raises(LorascopeError, match=r"layer 1 is not in this store.*\[0, 2\]"):
        store.reader(1)
    with pytest.raises(LorascopeError, match="adapter"):
        store.reader(0, "delta", "nope")
    with pytest.raises(LorascopeError, match="kind"):
        store.reader(0, "logits")
