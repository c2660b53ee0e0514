"""Fixtures for the activation tests: the tiny Llama with two trained adapters, a small demo corpus, and one
finished store (module-scoped so the extraction runs once)."""

from __future__ import annotations

import pytest

from lorascope.activations import ExtractConfig, extract
from lorascope.data import make_demo_dataset
from lorascope.models import load_adapters, load_base
from tiny_models import random_adapters as make_random_adapters

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


@pytest.fixture(name="random_adapters")
def random_adapters_fixture():
    """The :func:`tiny_models.random_adapters` factory."""
    return make_random_adapters
