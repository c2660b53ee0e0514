"""Extraction on 2 torchrun ranks (Gloo, CPU) gives the single-process store's rows; per-rank resume; SAE jobs
spread over ranks (`train-saes-distributed`)."""

from __future__ import annotations

import pytest
import torch

from lorascope.activations import ExtractConfig, HeldOutSplit, extract, open_store
from lorascope.activations.extract import finalize_extraction
from lorascope.activations.store import base_key, delta_key
from lorascope.data import load_dataset_spec
from lorascope.distributed import my_jobs
from lorascope.models import load_adapters, load_base

from .conftest import torchrun

pytestmark = pytest.mark.dist

N_DOCS, LAYERS = 18, [0, 2]


def _cfg() -> ExtractConfig:
    return ExtractConfig(layers=LAYERS, batch_size=3, docs_per_shard=4, progress=False)


def _examples():
    return load_dataset_spec("demo", limit=N_DOCS, seed=0)  # what `--data demo --n-docs 18` loads


@pytest.fixture(scope="module")
def peft(tiny_llama_dir, tiny_adapters):
    base = load_base(tiny_llama_dir)
    return load_adapters(base, tiny_adapters), base.tokenizer


@pytest.fixture(scope="module")
def single(peft, tmp_path_factory):
    pm, tok = peft
    return extract(pm, tok, _examples(), tmp_path_factory.mktemp("single") / "acts", _cfg())


def _rows(store) -> dict[str, torch.Tensor]:
    """Every row of the store, sorted by (document, position)."""
    keys = [
        "doc_index",
        "position",
        "token_id",
        *(base_key(L) for L in store.layers),
        *(delta_key(L, a) for L in store.layers for a in store.adapters),
    ]
    parts = [store.load_shard(i, keys) for i in range(len(store.shards))]
    cat = {k: torch.cat([p[k] for p in parts]) for k in keys}
    order = (cat["doc_index"] * 100_000 + cat["position"].long()).argsort()
    return {k: v[order] for k, v in cat.items()}


def _same_content(a, b) -> None:
    ra, rb = _rows(a), _rows(b)
    assert ra.keys() == rb.keys()
    for k in ra:
        assert torch.equal(ra[k], rb[k]), k
    assert a.manifest["config_hash"] == b.manifest["config_hash"]
    assert a.manifest["counts"] == b.manifest["counts"] and a.n_tokens == b.n_tokens > 0
    for L in a.layers:
        for ad in a.adapters:
            va, vb = a.stat_vectors(L, ad), b.stat_vectors(L, ad)
            for k in va:  # merged from per-rank accumulators: equal up to float64 summation order
                assert torch.allclose(va[k], vb[k], rtol=1e-9, atol=1e-12), (L, ad, k)


@pytest.fixture(scope="module")
def dist_store(tiny_llama_dir, tiny_adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "acts"
    args = [
        "-m",
        "lorascope",
        "extract",
        "--model",
        str(tiny_llama_dir),
        "--data",
        "demo",
        "--n-docs",
        str(N_DOCS),
        "--layers",
        "0,2",
        "--batch-size",
        "3",
        "--docs-per-shard",
        "4",
        "--no-progress",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    for name, path in tiny_adapters.items():
        args += ["--adapter", f"{name}={path}"]
    log = torchrun(args)
    return open_store(out, verify="open"), log


def test_torchrun_extraction_equals_single_process(dist_store, single):
    store, log = dist_store
    assert store.manifest["world_size"] == 2
    assert log.count("rows from") == 1  # the summary table is printed by rank 0 only
    assert len(store.shards) == 5  # 18 documents / 4 per shard; ranks wrote shards 0,2,4 and 1,3
    _same_content(store, single)


def test_separately_started_ranks_resume_and_finalize(peft, single, tmp_path, monkeypatch):
    """Ranks without a process group: rank 0 dies after one shard, resumes, and finalize_extraction merges."""
    import importlib

    ex = importlib.import_module("lorascope.activations.extract")  # the module (the package exports the function)
    pm, tok = peft
    out = tmp_path / "acts"
    assert extract(pm, tok, _examples(), out, _cfg(), rank=1, world_size=2) is None
    real, calls = ex.write_shard, []

    def dying(path, tensors, meta):
        calls.append(meta["shard"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, tensors, meta)

    monkeypatch.setattr(ex, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        extract(pm, tok, _examples(), out, _cfg(), rank=0, world_size=2)
    monkeypatch.setattr(ex, "write_shard", real)
    calls.clear()
    monkeypatch.setattr(ex, "write_shard", lambda p, t, m: calls.append(m["shard"]) or real(p, t, m))
    assert extract(pm, tok, _examples(), out, _cfg(), rank=0, world_size=2) is None
    assert calls == [2, 4]  # shard 0 was done before the interruption
    _same_content(finalize_extraction(out, world_size=2), single)


def test_sae_jobs_are_spread_round_robin_and_match_single_process(dist_store, tmp_path):
    from lorascope.io import read_json
    from lorascope.saes import create_sae, load_sae
    from lorascope.saes.trainer import TrainerConfig, train_sae

    store, _ = dist_store
    out = tmp_path / "saes"
    torchrun(
        [
            "-m",
            "lorascope",
            "train-saes-distributed",
            "--store",
            str(store.path),
            "--layers",
            "all",
            "--seeds",
            "0",
            "--expansion",
            "2",
            "--k",
            "4",
            "--tokens",
            "256",
            "--batch-size",
            "64",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    jobs = [(L, a) for L in store.layers for a in store.adapters]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(f"L{L}__{a}__seed0" for L, a in jobs)
    for r in (0, 1):
        for L, a in my_jobs(jobs, r, 2):
            assert read_json(out / f"L{L}__{a}__seed0" / "done.json")["rank"] == r
    L, a = jobs[-1]  # trained by rank 1: the same SAE as a single-process run
    from lorascope.study.splits import derived_init_seed

    sae = create_sae("topk", store.d_model, 2 * store.d_model, seed=derived_init_seed(0, L, "delta", a), k=4)
    res = train_sae(
        sae,
        store.training_stream(L, "delta", a, 64, 0, HeldOutSplit(0.2, 0)),
        TrainerConfig(total_tokens=256, batch_size=64, seed=0, device="cpu", checkpoint_every=1, resume=True),
        checkpoint_dir=tmp_path / "ck",
        progress=False,
    )
    got = load_sae(out / f"L{L}__{a}__seed0")
    for k, v in res.sae.state_for_save().items():
        assert torch.allclose(v, got.state_for_save()[k], atol=1e-6, rtol=0), k


def test_my_jobs_partitions_deterministically():
    jobs = list(range(7))
    parts = [my_jobs(jobs, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(parts, [])) == jobs
