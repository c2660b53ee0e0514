"""Bad dataset files through the real CLI (`lorascope train-lora --data FILE`): one line naming the file, the line
and the fix, exit status 2, before any model is loaded. Rows B1-B6 of docs/bad-inputs.md ("Your own data")."""

from __future__ import annotations

import json

import pytest

from lorascope.cli import main


def data_error(capsys, tiny_llama_dir, tmp_path, monkeypatch, path) -> str:
    import lorascope.models as models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data check")

    monkeypatch.setattr(models, "load_base", no_load)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["train-lora", "-m", str(tiny_llama_dir), "-r", "2", "-d", str(path), "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: ") and ". Fix: " in lines[0], lines
    assert "Traceback" not in lines[0] and "Error" not in lines[0].split(". Fix:")[0].replace("error: ", "")
    return lines[0]


def test_latin1_dataset(capsys, tiny_llama_dir, tmp_path, monkeypatch):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    line = data_error(capsys, tiny_llama_dir, tmp_path, monkeypatch, p)
    assert "latin.jsonl line 2 is not UTF-8" in line and "re-save the file as UTF-8" in line


def test_utf16_dataset(capsys, tiny_llama_dir, tmp_path, monkeypatch):
    p = tmp_path / "u16.json"
    p.write_bytes(json.dumps([{"instruction": "a", "output": "b"}]).encode("utf-16"))
    assert "u16.json is UTF-16 encoded" in data_error(capsys, tiny_llama_dir, tmp_path, monkeypatch, p)


def test_json_top_level_object(capsys, tiny_llama_dir, tmp_path, monkeypatch):
    p = tmp_path / "wrapped.json"
    p.write_text(json.dumps({"data": [{"instruction": "a", "output": "b"}]}, indent=2))
    line = data_error(capsys, tiny_llama_dir, tmp_path, monkeypatch, p)
    assert "the top level is a JSON object, but it must be a list of records (or use JSONL)" in line


def test_unknown_dataset_format(capsys, tiny_llama_dir, tmp_path, monkeypatch):
    p = tmp_path / "pc.jsonl"
    p.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    line = data_error(capsys, tiny_llama_dir, tmp_path, monkeypatch, p)
    assert "pc.jsonl line 1: no known dataset format (fields found: completion, prompt)" in line
    assert "'messages'" in line and "'conversations'" in line and "'text'" in line


def test_chat_turn_missing_field(capsys, tiny_llama_dir, tmp_path, monkeypatch):
    p = tmp_path / "chat.jsonl"
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ahoy"}]}
    p.write_text(json.dumps(ok) + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    line = data_error(capsys, tiny_llama_dir, tmp_path, monkeypatch, p)
    assert "chat.jsonl line 2: messages[0] is missing field 'content'" in line


def test_utf8_bom_dataset_is_accepted(tmp_path):
    from lorascope.data import load_dataset_spec

    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"instruction": "a", "output": "b"}).encode() + b"\n")
    assert load_dataset_spec(str(p))[0].output == "b"
