"""Fixtures for the activation tests: the tiny Llama with two trained adapters, a small demo corpus, and one
finished store (module-scoped so the extraction runs once)."""

from __future__ import annotations

import pytest
import torch

from lorascope.activations import ExtractConfig, extract
from lorascope.data import make_demo_dataset
from lorascope.models import load_adapters, load_base

LAYERS = [0, 2]


def _small_config(**kw) -> ExtractConfig:
    args = dict(layers=LAYERS, batch_size=3, docs_per_shard=4, progress=False)
    args.update(kw)
    return ExtractConfig(**args)


@pytest.fixture
def small_config():
    """Factory: ExtractConfig for the tiny tests (layers [0, 2], 3 docs per forward, 4 docs per shard)."""
    return _small_config


@pytest.fixture(scope="module")
def peft_tiny(tiny_llama_dir, tiny_adapters):
    base = load_base(tiny_llama_dir)
    return load_adapters(base, tiny_adapters), base.tokenizer


@pytest.fixture(scope="module")
def docs():
    return make_demo_dataset(18, seed=7)


@pytest.fixture(scope="module")
def store(peft_tiny, docs, tmp_path_factory):
    pm, tok = peft_tiny
    return extract(pm, tok, docs, tmp_path_factory.mktemp("store") / "acts", _small_config())


def random_adapters(model, ranks, scale: float = 0.05, seed: int = 0):
    """PeftModel with non-zero random LoRA adapters ``r{rank}`` (B scaled down to a trained-adapter magnitude)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = None
    for r in ranks:
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False,
                         task_type="CAUSAL_LM")
        if pm is None:
            pm = get_peft_model(model, cfg, adapter_name=f"r{r}")
        else:
            pm.add_adapter(f"r{r}", cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    pm.eval()
    return pm


@pytest.fixture(name="random_adapters")
def random_adapters_fixture():
    """The :func:`random_adapters` factory."""
    return random_adapters
