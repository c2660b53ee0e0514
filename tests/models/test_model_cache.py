"""The GGUF -> safetensors model cache: a cached load is bit-identical to a fresh GGUF load (weights, logits,
tokenizer), needs no GGUF parsing, memoises the file hash, and rebuilds a corrupt entry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lorascope.models import cache as C
from lorascope.models import load_base

TEXTS = ["the cat in there", "Hello, world!\n  tabs\tand ümlauts", ""]


def _fresh_gguf_load(path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    return model, tok


def _assert_same_model(loaded, model, tok) -> None:
    got, want = loaded.model.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    ids = torch.tensor([[1, 70, 71, 72, 260, 5, 2]])
    assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    for text in TEXTS:
        assert loaded.tokenizer(text).input_ids == tok(text).input_ids
    chat = [{"role": "user", "content": "hi there"}]
    assert loaded.tokenizer.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
    assert (loaded.tokenizer.eos_token_id, loaded.tokenizer.bos_token_id) == (tok.eos_token_id, tok.bos_token_id)


def _notices(capsys) -> list[str]:
    """lorascope's own stderr lines (transformers' progress bars filtered out)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("lorascope:")]


def _entries(cache) -> list:
    return [p for p in (cache / "models").iterdir() if p.is_dir()]


@pytest.fixture(scope="module")
def fresh_fp32(tiny_gguf):
    return _fresh_gguf_load(tiny_gguf, torch.float32)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(C.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _no_gguf_reading(monkeypatch) -> None:
    import gguf

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed although the cache holds it")

    monkeypatch.setattr(gguf, "GGUFReader", refuse)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_load_is_bit_identical_to_a_fresh_gguf_load(tiny_gguf, cache, monkeypatch, capsys, dtype):
    model, tok = _fresh_gguf_load(tiny_gguf, getattr(torch, dtype))
    first = load_base(tiny_gguf, dtype=dtype)
    (line,) = _notices(capsys)
    assert "dequantising tiny-llama.gguf once" in line
    (entry,) = _entries(cache)
    assert (entry / C.WEIGHTS).is_file() and (entry / C.MANIFEST).is_file()
    _assert_same_model(first, model, tok)
    _no_gguf_reading(monkeypatch)
    second = load_base(tiny_gguf, dtype=dtype)
    assert _notices(capsys) == []
    assert second.source == "gguf" and second.name == "tiny-llama" and second.num_layers == 2
    _assert_same_model(second, model, tok)


def test_file_digest_is_memoised_by_path_size_and_mtime(tiny_gguf, tmp_path, monkeypatch):
    import hashlib

    calls = []
    real = C.sha256_file
    monkeypatch.setattr(C, "sha256_file", lambda p: calls.append(p) or real(p))
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    want = hashlib.sha256(copy.read_bytes()).hexdigest()
    assert C.file_digest(copy, tmp_path / "c") == want and len(calls) == 1
    assert C.file_digest(copy, tmp_path / "c") == want and len(calls) == 1  # memoised
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert C.file_digest(copy, tmp_path / "c") == want and len(calls) == 2  # touched: hashed again
    copy.write_bytes(copy.read_bytes() + b"x")
    assert C.file_digest(copy, tmp_path / "c") != want and len(calls) == 3


def _corrupt_truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _corrupt_flip(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("victim", "damage"),
    [
        (C.WEIGHTS, _corrupt_truncate),
        (C.WEIGHTS, _corrupt_flip),
        ("tokenizer.json", _corrupt_flip),
        ("config.json", Path.unlink),
        (C.MANIFEST, _corrupt_truncate),
    ],
)
def test_corrupt_cache_entry_is_detected_and_rebuilt(tiny_gguf, fresh_fp32, cache, capsys, victim, damage):
    model, tok = fresh_fp32
    load_base(tiny_gguf)
    (entry,) = _entries(cache)
    damage(entry / victim)
    capsys.readouterr()
    again = load_base(tiny_gguf)
    err = _notices(capsys)
    assert len(err) == 1 and "is corrupt" in err[0] and "rebuilding" in err[0], err
    assert C.entry_problem(entry) is None
    _assert_same_model(again, model, tok)


def test_cache_off_and_unwritable_cache_fall_back_to_the_gguf(tiny_gguf, fresh_fp32, tmp_path, monkeypatch, capsys):
    model, tok = fresh_fp32
    monkeypatch.setenv(C.CACHE_ENV, "off")
    assert C.cache_root() is None
    _assert_same_model(load_base(tiny_gguf), model, tok)
    assert _notices(capsys) == []
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(C.CACHE_ENV, str(blocker))
    _assert_same_model(load_base(tiny_gguf), model, tok)
    err = _notices(capsys)
    assert len(err) == 1 and "is not usable" in err[0] and "LORASCOPE_CACHE" in err[0]


def test_tokenizer_alone_reads_the_cache_entry_and_falls_back_to_the_gguf(tiny_gguf, fresh_fp32, cache, monkeypatch):
    from lorascope.models.tokenizer import load_tokenizer

    _, tok = fresh_fp32
    assert C.cached_tokenizer_folder(tiny_gguf) is None  # no entry yet, and none is built for a tokenizer
    assert not (cache / "models").exists()
    load_base(tiny_gguf)
    (entry,) = _entries(cache)
    _corrupt_flip(entry / C.WEIGHTS)  # the tokenizer does not need the weights: their check is skipped
    assert C.cached_tokenizer_folder(tiny_gguf) == entry
    with monkeypatch.context() as m:
        _no_gguf_reading(m)
        from_cache = load_tokenizer(tiny_gguf)
    _corrupt_flip(entry / "tokenizer.json")
    assert C.cached_tokenizer_folder(tiny_gguf) is None  # a damaged tokenizer file: the GGUF is read again
    from_gguf = load_tokenizer(tiny_gguf)
    chat = [{"role": "user", "content": "hi there"}]
    for got in (from_cache, from_gguf):
        assert [got(t).input_ids for t in TEXTS] == [tok(t).input_ids for t in TEXTS]
        assert got.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
        assert (got.eos_token_id, got.bos_token_id) == (tok.eos_token_id, tok.bos_token_id)
    assert from_cache.pad_token_id == from_gguf.pad_token_id is not None


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(C.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert C.cache_root() == tmp_path / "xdg" / "lorascope"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert C.cache_root() == tmp_path / "home" / ".cache" / "lorascope"
    monkeypatch.setenv(C.CACHE_ENV, str(tmp_path / "mine"))
    assert C.cache_root() == tmp_path / "mine"


def test_suite_does_not_write_the_users_cache(model_cache_dir):
    assert os.environ[C.CACHE_ENV] == str(model_cache_dir)
    assert C.cache_root() == model_cache_dir


@pytest.mark.slow
def test_embedded_model_from_cache_equals_a_fresh_gguf_load(smollm2):
    from lorascope.models import embedded_gguf_path

    model, tok = _fresh_gguf_load(embedded_gguf_path(), torch.float32)
    cached = load_base("embedded")
    assert cached.source == "embedded-gguf"
    for loaded in (smollm2, cached):
        got, want = loaded.model.state_dict(), model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        ids = tok("What is the capital of France?", return_tensors="pt").input_ids
        assert loaded.tokenizer("What is the capital of France?").input_ids == ids[0].tolist()
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)
        assert loaded.tokenizer.chat_template == tok.chat_template
