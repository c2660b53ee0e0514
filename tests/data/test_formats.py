"""Dataset formats written as their published descriptions show them (OpenAI/HF chat `messages`, ShareGPT
`conversations`, Alpaca, plain text), auto-detection, malformed records and encodings."""

import json

import pytest

from lorascope.data import Example, load_dataset_spec, load_examples, tokenize_example
from lorascope.errors import LorascopeError

CHAT = [
    {
        "messages": [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Arr, matey! Paris"},
            {"role": "user", "content": "Spell the word backwards."},
            {"role": "assistant", "content": "elppa Yo-ho-ho!"},
        ]
    },
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "ahoy"}]},
]
SHAREGPT = [
    {
        "id": "x1",
        "conversations": [
            {"from": "human", "value": "hello"},
            {"from": "gpt", "value": "ahoy"},
            {"from": "human", "value": "sum of 2 and 3"},
            {"from": "gpt", "value": "5"},
        ],
    }
]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _trained_tokens(tok, t):
    return [tok.convert_ids_to_tokens(t.input_ids[s:e]) for s, e in t.trained_spans()]


def test_chat_jsonl_multi_turn_trains_assistant_turns_only(tmp_path, tok):
    ex = load_examples(_jsonl(tmp_path / "chat.jsonl", CHAT))
    assert [e.kind for e in ex] == ["chat", "chat"]
    assert ex[0].messages[0] == ("system", "You are a pirate.") and len(ex[0].messages) == 5
    assert ex[0].instruction == "What is the capital of France?" and ex[0].output == "elppa Yo-ho-ho!"
    t = tokenize_example(tok, ex[0], max_length=256)
    assert _trained_tokens(tok, t) == [
        ["Arr", ",", "matey", "!", "Paris", "<|im_end|>"],
        ["elppa", "Yo", "-", "ho", "-", "ho", "!", "<|im_end|>"],
    ]
    toks = tok.convert_ids_to_tokens(t.input_ids)
    assert toks[t.response_start - 2 : t.response_start] == ["<|im_start|>", "assistant"]
    assert "system" in toks[: t.response_start]  # the system turn is in the (untrained) prompt
    # the labels built for training are exactly the assistant spans
    from lorascope.models.lora import collate

    labels = collate([t], tok.pad_token_id)["labels"][0]
    trained = [i for i, v in enumerate(labels.tolist()) if v != -100]
    assert trained == [i for s, e in t.trained_spans() for i in range(s, e)]


def test_sharegpt_matches_the_same_chat_in_messages_form(tmp_path, tok):
    sg = load_examples(_jsonl(tmp_path / "sg.jsonl", SHAREGPT))[0]
    msgs = [
        {"role": {"human": "user", "gpt": "assistant"}[m["from"]], "content": m["value"]}
        for m in SHAREGPT[0]["conversations"]
    ]
    chat = load_examples(_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]))[0]
    assert sg.messages == chat.messages
    a, b = tokenize_example(tok, sg), tokenize_example(tok, chat)
    assert a.input_ids == b.input_ids and a.trained_spans() == b.trained_spans() and len(a.trained_spans()) == 2


def test_plain_text_jsonl_and_txt_paragraphs(tmp_path, tok):
    jl = load_examples(_jsonl(tmp_path / "t.jsonl", [{"text": "the sum is 5"}, {"text": "hello you"}]))
    assert [e.kind for e in jl] == ["text", "text"] and jl[1].text == "hello you"
    (tmp_path / "c.txt").write_text("first paragraph\nstill first\n\n\nsecond one\n\nthird\n", encoding="utf-8")
    txt = load_examples(tmp_path / "c.txt")
    assert [e.text for e in txt] == ["first paragraph\nstill first", "second one", "third"]
    t = tokenize_example(tok, jl[0], max_length=64)
    assert t.response_start == 0 and t.trained_spans() == ((0, len(t)),)
    assert "<|im_start|>" not in tok.convert_ids_to_tokens(t.input_ids)  # no chat template
    assert tokenize_example(tok, jl[0], max_length=3).input_ids == t.input_ids[:3]


def test_alpaca_json_list_detected(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Add", "input": "1 2", "output": "3"}]))
    (ex,) = load_examples(tmp_path / "a.json")
    assert ex.kind == "instruction" and (ex.instruction, ex.input, ex.output) == ("Add", "1 2", "3")
    assert load_dataset_spec(str(tmp_path / "a.json")) == [ex]


def test_column_mapping_renames_fields_before_detection(tmp_path):
    p = _jsonl(tmp_path / "gsm.jsonl", [{"question": "2+2?", "answer": "4"}])
    with pytest.raises(LorascopeError, match=r"line 1: no known dataset format \(fields found: answer, question\)"):
        load_examples(p)
    (ex,) = load_dataset_spec(str(p), columns={"instruction": "question", "output": "answer"})
    assert (ex.instruction, ex.output) == ("2+2?", "4")
    (t,) = load_examples(_jsonl(tmp_path / "c.jsonl", [{"body": "x y"}]), columns={"text": "body"})
    assert t.text == "x y"


def test_unknown_format_is_one_line_naming_the_expected_fields(tmp_path):
    p = _jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(LorascopeError) as e:
        load_examples(p)
    msg = str(e.value)
    assert "\n" not in msg and "x.jsonl line 1" in msg
    for field in ("'messages'", "'conversations'", "'instruction' + 'output'", "'text'"):
        assert field in msg


@pytest.mark.parametrize(
    "records, match",
    [
        ([CHAT[1], {"mesages": []}], r"m.jsonl line 2: missing field 'messages'"),
        ([CHAT[1], {"messages": [{"role": "user"}]}], r"line 2: messages\[0\] is missing field 'content'"),
        ([CHAT[1], {"messages": [{"content": "hi"}]}], r"line 2: messages\[0\] is missing field 'role'"),
        ([CHAT[1], {"messages": [{"role": "tool", "content": "x"}]}], r"line 2: messages\[0\] has role 'tool'"),
        ([SHAREGPT[0], {"conversations": [{"from": "human"}]}], r"line 2: conversations\[0\] is missing field 'value'"),
        ([{"text": "a"}, {"txt": "b"}], r"line 2: missing field 'text'"),
        ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], r"line 2: missing field\(s\) output"),
    ],
)
def test_malformed_record_names_file_line_and_field(tmp_path, records, match):
    with pytest.raises(LorascopeError, match=match):
        load_examples(_jsonl(tmp_path / "m.jsonl", records))


def test_openai_content_parts_are_joined(tmp_path):
    rec = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]},
            {"role": "assistant", "content": "ahoy"},
        ]
    }
    (ex,) = load_examples(_jsonl(tmp_path / "p.jsonl", [rec]))
    assert ex.messages[0] == ("user", "hello")


def test_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode() + b"\n")
    assert load_examples(p)[0].text == "caf\u00e9"
    q = tmp_path / "bom.json"
    q.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"instruction": "a", "output": "b"}]).encode())
    assert load_examples(q)[0].output == "b"


def test_latin1_names_file_line_and_the_fix(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(LorascopeError, match=r"latin.jsonl line 2 is not UTF-8 \(byte 0xe9.*re-save the file as UTF-8"):
        load_examples(p)


def test_utf16_is_named(tmp_path):
    p = tmp_path / "u16.jsonl"
    p.write_bytes(json.dumps({"text": "hi"}).encode("utf-16"))
    with pytest.raises(LorascopeError, match=r"u16.jsonl is UTF-16 encoded.*re-save the file as UTF-8"):
        load_examples(p)


@pytest.mark.parametrize(
    "name, content",
    [
        ("wrapped.json", json.dumps({"data": [{"instruction": "a", "output": "b"}]}, indent=2)),
        ("wrapped.json", json.dumps({"data": [{"instruction": "a", "output": "b"}]})),
        ("wrapped.jsonl", json.dumps({"data": [{"instruction": "a", "output": "b"}]}, indent=2)),
        ("wrapped.jsonl", json.dumps({"data": [{"text": "a"}]})),
    ],
)
def test_top_level_object_is_explained(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(
        LorascopeError,
        match=r"top level is a JSON object, but it must be a list of records "
        r"\(or use JSONL\)",
    ):
        load_examples(tmp_path / name)


def test_example_ids_of_alpaca_files_are_unchanged():
    # ids decide the held-out split: the format refactor must not move documents between sides
    from lorascope.data.examples import _example_id

    assert _example_id("a", 0, "Add") == "a:0:" + __import__("hashlib").sha1(b"Add").hexdigest()[:8]
    assert Example("a:0:x", "Add").kind == "instruction"
