"""The long-example policy: truncate the response, skip an example whose prompt alone does not fit, count both,
never abort the run for one example; checked with the tokenizer alone before the model is loaded."""

import json

import pytest

from lorascope.data import Example, LengthReport, PromptTooLong, make_demo_dataset, tokenize_examples
from lorascope.errors import LorascopeError

LONG_ANSWER = " ".join(["apple"] * 200)
LONG_PROMPT = " ".join(["river"] * 200)


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _data():
    data = make_demo_dataset(48, seed=2)
    return [
        *data[:10],
        Example("long-answer", "Spell the word backwards.", "", LONG_ANSWER),
        *data[10:30],
        Example("long-prompt", LONG_PROMPT, "", "short"),
        *data[30:],
    ]


def test_truncate_policy_counts_and_keeps_the_prompt(tok):
    docs, rep = tokenize_examples(tok, _data(), max_length=64)
    assert (rep.kept, rep.truncated, rep.skipped) == (48, 1, 1)
    assert rep.truncated_ids == ["long-answer"] and rep.skipped_ids == ["long-prompt"]
    assert rep.summary() == "48 kept, 1 truncated, 1 skipped (max_length 64, policy truncate)"
    long = next(d for d in docs if d.doc_id == "long-answer")
    assert len(long) == 64 and long.truncated and 0 < long.response_start < 64
    assert [d.doc_id for d in docs] == [e.id for e in _data() if e.id != "long-prompt"]  # order kept


def test_skip_and_error_policies(tok):
    docs, rep = tokenize_examples(tok, _data(), max_length=64, policy="skip")
    assert (rep.kept, rep.truncated, rep.skipped) == (48, 0, 2) and len(docs) == 48
    with pytest.raises(LorascopeError, match="example long-answer is longer than max_length 64"):
        tokenize_examples(tok, _data()[:12], max_length=64, policy="error")
    with pytest.raises(PromptTooLong, match=r"example long-prompt: prompt is \d+ tokens, max_length is 64"):
        tokenize_examples(tok, _data()[25:35], max_length=64, policy="error")
    with pytest.raises(LorascopeError, match="unknown long-example policy 'cut'"):
        tokenize_examples(tok, _data(), 64, policy="cut")


def test_one_over_long_example_in_50_trains_and_reports_it(tiny_llama_dir, tmp_path):
    from lorascope.models import load_base, train_lora

    data = [*make_demo_dataset(49, seed=4), Example("long", "Spell the word backwards.", "", LONG_ANSWER)]
    base = load_base(tiny_llama_dir)
    res = train_lora(base, data, 2, output_dir=tmp_path / "ad", steps=3, batch_size=8, max_length=64, progress=False)
    assert isinstance(res.lengths, LengthReport) and "1 truncated" in res.lengths.summary()
    assert (res.lengths.kept, res.lengths.truncated, res.lengths.skipped) == (49, 1, 0)
    meta = json.loads((tmp_path / "ad" / "lorascope_training.json").read_text())
    assert meta["examples"]["truncated"] == 1 and meta["examples"]["truncated_ids"] == ["long"]
    assert meta["settings"]["rank"] == 2 and meta["steps"] == 3 == len(res.losses)


def test_train_lora_cli_checks_lengths_before_loading_the_model(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import lorascope.models as models
    from lorascope.cli import main

    recs = [{"instruction": LONG_PROMPT, "output": "x"}] * 3
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data check")

    monkeypatch.setattr(models, "load_base", no_load)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "train-lora",
                "-m",
                str(tiny_llama_dir),
                "-r",
                "2",
                "-d",
                str(tmp_path / "d.jsonl"),
                "--max-length",
                "32",
                "--held-out",
                "0.01",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "0 kept, 0 truncated, 3 skipped" in err and "no example has response tokens" in err


def test_extraction_skips_a_document_whose_prompt_does_not_fit(tiny_llama_dir, tiny_adapters, tmp_path, caplog):
    import logging

    from lorascope.activations import ExtractConfig, extract
    from lorascope.models import load_adapters, load_base

    base = load_base(tiny_llama_dir)
    pm = load_adapters(base, {"a": tiny_adapters["rank_2"]})
    docs = [*make_demo_dataset(5, seed=3), Example("long-prompt", LONG_PROMPT, "", "x")]
    cfg = ExtractConfig(layers=[1], batch_size=3, docs_per_shard=3, max_length=64, progress=False)
    with caplog.at_level(logging.WARNING, logger="lorascope"):
        store = extract(pm, base.tokenizer, docs, tmp_path / "s", cfg)
    assert store.doc_ids == [e.id for e in docs[:5]]
    assert "activation documents: 5 kept, 0 truncated, 1 skipped" in caplog.text
    strict = ExtractConfig(layers=[1], max_length=64, progress=False, length_policy="error")
    with pytest.raises(PromptTooLong, match="example long-prompt: prompt is"):
        extract(pm, base.tokenizer, docs, tmp_path / "s2", strict)
    assert not (tmp_path / "s2").exists()  # refused before anything was written
