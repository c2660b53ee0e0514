import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.models import load_base
from tiny_models import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_round_trip_through_load_base(tiny_model_dirs, arch):
    from transformers import AutoModelForCausalLM

    loaded = load_base(tiny_model_dirs[arch])
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch]).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    assert torch.equal(loaded.model(ids).logits, ref(ids).logits)
    assert loaded.source == "local" and loaded.num_layers == 3 and loaded.d_model == 32
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training
    assert loaded.tokenizer.chat_template


def test_bfloat16_dtype(tiny_llama_dir):
    assert next(load_base(tiny_llama_dir, dtype="bfloat16").model.parameters()).dtype == torch.bfloat16
    with pytest.raises(LorascopeError, match="unknown dtype"):
        load_base(tiny_llama_dir, dtype="int3")


def test_bad_model_specs(tmp_path):
    with pytest.raises(LorascopeError, match="does not exist"):
        load_base(str(tmp_path / "missing" / "model"))
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(LorascopeError, match="is not a GGUF file"):
        load_base(str(tmp_path / "fake.gguf"))
    (tmp_path / "nocfg").mkdir()
    with pytest.raises(LorascopeError, match="no config.json"):
        load_base(str(tmp_path / "nocfg"))


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LorascopeError, match="pass the local folder path"):
        load_base("lorascope-test-org/no-such-model-xyz")


@pytest.mark.slow
def test_smollm2_from_wheel_answers_a_factual_question(smollm2):
    from lorascope.models import generate

    assert smollm2.source == "embedded-gguf" and smollm2.num_layers == 30 and smollm2.d_model == 576
    answer = generate(smollm2.model, smollm2.tokenizer, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in answer
