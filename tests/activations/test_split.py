"""One held-out split by content hash, its record, the overlap check, and dedupe against training documents."""

import json

import pytest

from lorascope.activations.split import (
    HeldOutSplit,
    check_no_overlap,
    content_hash,
    dedupe_against,
)
from lorascope.data import make_demo_dataset
from lorascope.data.chat import TokenizedExample
from lorascope.data.examples import Example
from lorascope.errors import LorascopeError


def _examples(n=200, seed=0):
    """Demo examples with distinct contents (the demo set repeats some: exactly what dedupe is for)."""
    docs = make_demo_dataset(n, seed=seed)
    return [docs[i] for i in dedupe_against(docs, [])[0]]


def test_content_hash_ignores_ids_and_whitespace_not_content():
    a = Example("id-1", "Write a poem", "", "Roses are red")
    b = Example("other-id", "  Write a poem\n", "", "Roses are red ")
    c = Example("id-1", "Write a poem", "", "Roses are blue")
    assert content_hash(a) == content_hash(b) != content_hash(c)
    assert content_hash(a) != content_hash(Example("x", "Write a poem", "Roses are red", ""))  # fields kept apart
    t = TokenizedExample("d", [1, 2, 3], 2)
    assert (
        content_hash(t)
        == content_hash(TokenizedExample("e", [1, 2, 3], 1))
        != content_hash(TokenizedExample("d", [1, 2, 4], 2))
    )
    with pytest.raises(LorascopeError, match="cannot hash"):
        content_hash(3.5)


def test_split_is_reproducible_across_order_and_ids_and_has_the_right_size():
    docs = _examples()
    split = HeldOutSplit(0.25, seed=3)
    _, held = split.partition(docs)
    renamed = [Example(f"new{i}", d.instruction, d.input, d.output) for i, d in enumerate(docs)][::-1]
    _, held_r = split.partition(renamed)
    assert {content_hash(docs[i]) for i in held} == {content_hash(renamed[i]) for i in held_r}
    assert 0.1 < len(held) / len(docs) < 0.4
    _, other_seed = HeldOutSplit(0.25, seed=4).partition(docs)
    assert set(other_seed) != set(held)
    assert HeldOutSplit(0.0).partition(docs)[1] == []
    with pytest.raises(LorascopeError, match="fraction"):
        HeldOutSplit(1.0)


def test_record_round_trips_and_check_refuses_overlap_in_one_line():
    docs = _examples()
    split = HeldOutSplit(0.2, seed=0)
    train, held = split.partition(docs)
    store_meta = {"split": split.record(train_docs=[docs[i] for i in train], eval_docs=[docs[i] for i in held])}
    store_meta = json.loads(json.dumps(store_meta))  # stored as JSON
    assert store_meta["split"]["fraction"] == 0.2 and len(store_meta["split"]["eval_docs"]) == len(held)
    clean_sae = {"split": split.record(train_docs=[docs[i] for i in train])}
    assert check_no_overlap(clean_sae, store_meta).status == "ok"
    # an SAE trained on this run's held-out documents, given as the run's reference
    leaky_sae = {"split": split.record(train_docs=[docs[i] for i in held[:5]] + [docs[i] for i in train])}
    with pytest.raises(LorascopeError, match=r"trained on 5 of the \d+ evaluation documents") as err:
        check_no_overlap(leaky_sae, store_meta, sae_name="reference SAE")
    assert "\n" not in str(err.value) and str(err.value).startswith("reference SAE")
    allowed = check_no_overlap(leaky_sae, store_meta, allow_overlap=True)
    assert allowed.status == "overlap" and allowed.n_overlap == 5
    assert check_no_overlap({}, store_meta).status == "unknown"


def test_dedupe_drops_training_documents_and_repeats():
    docs = _examples(60)
    assert len(docs) >= 25 and len(dedupe_against(make_demo_dataset(60, seed=0), [])[1]) > 0
    lora_train = docs[:10]
    held = [docs[3], docs[12], Example("copy", docs[12].instruction, docs[12].input, docs[12].output), docs[20]]
    kept, dropped = dedupe_against(held, lora_train)
    assert kept == [1, 3] and dropped == [0, 2]
