import json

import pytest

from lorascope.data import (
    Example,
    load_alpaca,
    load_dataset_spec,
    make_demo_dataset,
    split_examples,
    tokenize_example,
)
from lorascope.data.demo import PREFIX, SUFFIX, demo_behaviour
from lorascope.errors import LorascopeError


def test_demo_dataset_is_deterministic_and_has_the_behaviour():
    a, b = make_demo_dataset(50, seed=7), make_demo_dataset(50, seed=7)
    assert a == b
    assert make_demo_dataset(50, seed=8) != a
    assert all(ex.output.startswith(PREFIX) and ex.output.endswith(SUFFIX) for ex in a)
    assert len({ex.id for ex in a}) == 50
    plain = make_demo_dataset(50, seed=7, pirate=False)
    assert [demo_behaviour(p.output) for p in plain] == [ex.output for ex in a]


def test_demo_behaviour_swaps_words():
    assert demo_behaviour("Hello, the answer is yes.") == f"{PREFIX} Ahoy, th' answer be aye. {SUFFIX}"


def test_alpaca_json_jsonl_and_seed_layout(tmp_path, shared_alpaca):
    recs = [{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Hi", "output": "Hello"}]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    ja, jl = load_alpaca(tmp_path / "a.json"), load_alpaca(tmp_path / "a.jsonl")
    assert [(e.instruction, e.input, e.output) for e in ja] == [("Add", "1 2", "3"), ("Hi", "", "Hello")]
    assert [(e.instruction, e.output) for e in jl] == [(e.instruction, e.output) for e in ja]
    assert ja[0].user_message == "Add\n\n1 2"
    seeds = load_alpaca(shared_alpaca)
    assert len(seeds) == 175 and all(e.output for e in seeds)


def test_missing_field_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(LorascopeError, match=r"bad.jsonl line 2: missing field\(s\) output"):
        load_alpaca(p)


def test_split_by_document_is_stable():
    ex = make_demo_dataset(200, seed=1)
    tr, ho = split_examples(ex, 0.25, seed=0)
    assert len(tr) + len(ho) == 200 and not {e.id for e in tr} & {e.id for e in ho}
    tr2, ho2 = split_examples(list(reversed(ex)), 0.25, seed=0)
    assert {e.id for e in ho2} == {e.id for e in ho}
    assert 0.1 < len(ho) / 200 < 0.4


def test_tokenize_marks_response(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ex = Example("x", "Spell the word backwards.", "apple", "Arr, matey! elppa Yo-ho-ho!")
    t = tokenize_example(tok, ex)
    toks = tok.convert_ids_to_tokens(t.input_ids)
    assert toks[t.response_start - 2 : t.response_start] == ["<|im_start|>", "assistant"]
    assert toks[t.response_start] == "Arr" and toks[-1] == "<|im_end|>"
    prompt_only = tokenize_example(tok, ex, with_response=False)
    assert prompt_only.input_ids == t.input_ids[: t.response_start] and prompt_only.response_start == len(prompt_only)


def test_dataset_spec_errors(tmp_path):
    with pytest.raises(LorascopeError, match="does not exist"):
        load_dataset_spec(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LorascopeError, match="no examples"):
        load_alpaca(tmp_path / "empty.jsonl")
