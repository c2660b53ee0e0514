"""configs/examples/: every config parses, and the builder writes exactly the inputs each one points at."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lorascope.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))


def _builder():
    spec = importlib.util.spec_from_file_location("build_examples", EXAMPLES / "build_examples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_three_examples_exist_and_parse():
    assert {p.stem for p in CONFIGS} == {"chat_jsonl", "full_finetune", "checkpoint_sequence"}
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.name.startswith("example-")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cwd")
    _builder().build_all(root / "runs" / "examples-data")
    return root


def test_builder_writes_every_input_the_configs_name(built, monkeypatch):
    from lorascope.data import load_dataset_spec
    from lorascope.models.finetunes import expand_load_specs, folder_kind

    monkeypatch.chdir(built)  # the configs use paths relative to the repository root
    chat = load_config(EXAMPLES / "chat_jsonl.yaml")
    ft = load_dataset_spec(chat.data.finetune, columns=chat.data.finetune_columns)
    acts = load_dataset_spec(chat.data.activations)
    assert len(ft) == 48 and {e.kind for e in ft} == {"chat"} and len(ft[0].messages) == 5
    assert {e.kind for e in acts} == {"text"} and len(acts) == 96
    assert chat.data.finetune != chat.data.activations

    full = load_config(EXAMPLES / "full_finetune.yaml")
    assert folder_kind(Path(full.model.spec)) == "full"
    (entry,) = expand_load_specs(full.adapters.load)
    assert (entry.name, entry.kind) == ("full_ft", "full")

    seq = load_config(EXAMPLES / "checkpoint_sequence.yaml")
    entries = expand_load_specs(seq.adapters.load)
    assert [(e.name, e.step, e.kind) for e in entries] == [
        ("run_step_4", 4, "peft"),
        ("run_step_8", 8, "peft"),
        ("run_step_16", 16, "peft"),
    ]


def test_full_finetune_changed_every_weight_and_checkpoints_differ(built):
    import torch
    from safetensors.torch import load_file

    data = built / "runs" / "examples-data"
    base = load_file(str(data / "tiny-base" / "model.safetensors"))
    ft = load_file(str(data / "tiny-full-ft" / "model.safetensors"))
    assert base.keys() == ft.keys() and all(not torch.equal(base[k], ft[k]) for k in base)
    ck = [load_file(str(data / "tiny-lora-run" / f"checkpoint-{s}" / "adapter_model.safetensors")) for s in (4, 8, 16)]
    key = next(k for k in ck[0] if "lora_B" in k)
    assert not torch.equal(ck[0][key], ck[1][key]) and not torch.equal(ck[1][key], ck[2][key])
