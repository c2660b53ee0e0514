import hashlib
import json
import shutil

import pytest
import torch

from lorascope.activations import HeldOutSplit, ReadOrder, extract, open_store
from lorascope.activations.extract import tokenize_docs
from lorascope.activations.split import PREFIX, content_hash
from lorascope.data.examples import Example
from lorascope.errors import LorascopeError
from lorascope.study.splits import eval_split_record, sae_split_record

SPLIT = HeldOutSplit(0.3, seed=5)


def _cat(reader):
    batches = list(reader)
    return batches, torch.cat([b.x for b in batches]), torch.cat([b.doc_index for b in batches])


def _rule_mask(store, split):
    return torch.tensor([split.is_held_out(h) for h in store.doc_hashes])


def _first_copies(store):
    seen, out = set(), []
    for h in store.doc_hashes:
        out.append(h not in seen)
        seen.add(h)
    return torch.tensor(out)


def test_split_is_by_document_content_and_never_mixes(store, docs, peft_tiny):
    tok = peft_tiny[1]
    tokenized = tokenize_docs(tok, docs, store.manifest["config"]["max_length"])
    assert store.doc_hashes == [content_hash(d) for d in tokenized]  # the identity: sha256 of the token ids
    held, rule = store.split_docs("held_out", SPLIT), _rule_mask(store, SPLIT)
    assert torch.equal(held, rule & _first_copies(store)) and 0 < int(held.sum()) < len(docs)
    assert torch.equal(store.split_docs("train", SPLIT), ~rule)  # repeats of a held-out text are in neither split
    assert not bool(store.eval_exclusions.any())  # a store without a split record excludes nothing
    # the records the study stores describe exactly the documents the mask selects
    evals = eval_split_record(store, SPLIT)
    trains = sae_split_record(store, SPLIT)["train_docs"]
    assert set(evals["eval_docs"]) == {h[:PREFIX] for h, k in zip(store.doc_hashes, held.tolist(), strict=True) if k}
    assert not set(evals["eval_docs"]) & set(trains) and evals["n_excluded_from_eval"] == 0
    seen = {}
    for split in ("train", "held_out"):
        r = store.reader(0, "delta", "rank_2", split=split, batch_size=7, holdout=SPLIT, with_meta=True)
        batches, x, doc = _cat(r)
        assert len(batches) == len(r) and x.shape == (r.n_rows, store.d_model)
        assert all(b.x.shape[0] == 7 for b in batches[:-1])
        assert bool((held[doc] == (split == "held_out")).all())  # every row's document is on the right side
        seen[split] = r.n_rows
    repeats = rule & ~_first_copies(store)
    assert seen["train"] + seen["held_out"] + sum(store.split_rows(repeats)) == store.n_tokens


@pytest.fixture(scope="module")
def twin_store(peft_tiny, docs, tmp_path_factory):
    from lorascope.activations import ExtractConfig

    """A store whose documents come in pairs of identical texts under different ids (and in another order)."""
    pm, tok = peft_tiny
    from lorascope.activations.split import dedupe_against

    base = [docs[i] for i in dedupe_against(docs, [])[0]][:8]  # distinct texts
    twins = [Example(f"twin-{i}", d.instruction, d.input, d.output) for i, d in enumerate(base)][::-1]
    config = ExtractConfig(layers=[0, 2], batch_size=3, docs_per_shard=4, progress=False)
    return extract(pm, tok, base + twins, tmp_path_factory.mktemp("twins") / "acts", config), len(base)


def test_identical_texts_always_land_on_the_same_side(twin_store):
    store, n = twin_store
    assert len(set(store.doc_hashes)) == n and len(store.doc_ids) == 2 * n
    for fraction in (0.2, 0.5, 0.8):
        for seed in range(6):
            split = HeldOutSplit(fraction, seed)
            train = store.split_docs("train", split).tolist()
            held = store.split_docs("held_out", split).tolist()
            for i in range(n):
                twin = 2 * n - 1 - i
                assert train[i] == train[twin], (fraction, seed, i)
                # a held-out text is evaluated once (its first copy); the repeat is in neither split
                assert held[i] == (not train[i]) and not held[twin], (fraction, seed, i)


def _with_record(store, tmp_path, record):
    """A copy of ``store`` whose manifest carries ``record`` under "split" (None: the key is removed)."""
    shutil.copytree(store.path, tmp_path / "copy")
    mf = tmp_path / "copy" / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest.pop("split", None)
    if record is not None:
        manifest["split"] = record
    mf.write_text(json.dumps(manifest))
    return open_store(tmp_path / "copy")


def test_documents_excluded_from_evaluation_are_never_held_out_and_join_training(store, tmp_path):
    from lorascope.activations.split import eval_exclusion_record

    rule = _rule_mask(store, SPLIT)
    held_ids = rule.nonzero().flatten().tolist()
    excluded = [held_ids[0], int((~rule).nonzero()[0])]  # one held out by the rule, one train
    hashes = {store.doc_hashes[i] for i in excluded}
    record = eval_exclusion_record(sorted(hashes), "test")
    copy = _with_record(store, tmp_path, json.loads(json.dumps(record)))
    held, train = copy.split_docs("held_out", SPLIT), copy.split_docs("train", SPLIT)
    hit = torch.tensor([h in hashes for h in store.doc_hashes])  # every copy of an excluded text
    want = rule & ~hit
    assert torch.equal(held, want & _first_copies(store)) and torch.equal(train, ~want) and int(want.sum()) > 0
    assert torch.equal(copy.eval_exclusions, hit)
    assert eval_split_record(copy, SPLIT)["n_excluded_from_eval"] == int(hit.sum())
    rows = copy.held_out(0, "rank_2", SPLIT)
    assert not set(rows.doc_index.tolist()) & set(excluded) and rows.doc_index.numel() > 0
    train_rows = torch.cat([b.doc_index for b in copy.reader(0, "delta", "rank_2", holdout=SPLIT, with_meta=True)])
    assert set(excluded) <= set(train_rows.tolist())


def test_old_store_without_a_split_record_uses_the_content_hash_rule_alone(store, tmp_path):
    old = _with_record(store, tmp_path, None)
    assert old.split_record == {} and not bool(old.eval_exclusions.any())
    assert torch.equal(old.split_docs("held_out", SPLIT), _rule_mask(store, SPLIT) & _first_copies(store))
    default = _rule_mask(store, HeldOutSplit()) & _first_copies(store)  # default: 0.2, seed 0
    assert torch.equal(old.split_docs("held_out"), default)
    assert torch.equal(old.held_out(0, "rank_2", SPLIT).delta, store.held_out(0, "rank_2", SPLIT).delta)


def test_kinds_are_consistent(store):
    kw = dict(split="all", order=ReadOrder(shuffle=False), batch_size=10_000)
    base = next(iter(store.reader(2, "base", **kw)))
    delta = next(iter(store.reader(2, "delta", "rank_4", **kw)))
    adapted = next(iter(store.reader(2, "adapted", "rank_4", **kw)))
    assert torch.equal(adapted, base + delta)
    rows = store.held_out(2, "rank_4", split="all")
    assert torch.equal(rows.base, base) and torch.equal(rows.delta, delta)


def test_order_is_deterministic_and_resumable(store):
    def run(**kw):
        order = ReadOrder(window_shards=2, **kw)
        return [b for b in store.reader(0, "delta", "rank_2", batch_size=5, order=order, with_meta=True)]

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
    rows = store.held_out(0, "rank_2", SPLIT)
    held = _rule_mask(store, SPLIT)
    assert rows.base.shape == rows.delta.shape and rows.base.shape[0] == rows.doc_index.shape[0] > 0
    assert bool(held[rows.doc_index].all())
    assert torch.equal(rows.adapted - rows.base, rows.delta)


def _digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(str((b.doc_index.tolist(), b.position.tolist())).encode())
    return h.hexdigest()[:16]


def test_bundled_order_options_give_the_batches_of_the_old_keyword_reader(store):
    """Golden digests of the (doc, position) batch sequence, recorded with the reader's former keyword arguments
    (seed, epoch, window_shards, skip_rows, drop_last) on this fixture store, split "all" (unchanged by the
    split rule): the ReadOrder bundle reads the very same batches."""
    got = [
        _digest(store.reader(0, "delta", "rank_2", "all", 5, order=ReadOrder(seed, epoch, True, ws), with_meta=True))
        for seed, epoch, ws in ((0, 0, 4), (3, 1, 2), (7, 0, 1))
    ]
    order = ReadOrder(seed=3, window_shards=2, skip_rows=13, drop_last=True)
    got.append(_digest(store.reader(0, "delta", "rank_2", "all", 5, order=order, with_meta=True)))
    assert store.n_tokens == 605
    assert got == ["0c00f25c9e55fdb2", "d4b3afb19759deb2", "227cedbc157b2b44", "7a74aaa23bd85de7"]


def test_reader_rejects_bad_arguments(store):
    with pytest.raises(LorascopeError, match=r"layer 1 is not in this store.*\[0, 2\]"):
        store.reader(1)
    with pytest.raises(LorascopeError, match="adapter"):
        store.reader(0, "delta", "nope")
    with pytest.raises(LorascopeError, match="kind"):
        store.reader(0, "logits")
    with pytest.raises(LorascopeError, match="window_shards"):
        ReadOrder(window_shards=0)
    with pytest.raises(LorascopeError, match="unknown split"):
        store.split_docs("test")
