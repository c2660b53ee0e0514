"""Data-parallel SAE training on 2 CPU processes (Gloo) equals single-process training on the same global batches."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lorascope.saes.trainer import train_sae

from .conftest import HERE, torchrun

pytestmark = pytest.mark.dist


def _worker():
    spec = importlib.util.spec_from_file_location("ddp_worker", HERE / "ddp_worker.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun([str(HERE / "ddp_worker.py"), str(out)])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def single():
    w = _worker()
    x = w.data()
    return w, {name: train_sae(w.build(name), x, w.config(name), progress=False) for name in w.CASES}


def _close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, float((a[k] - b[k]).abs().max()))


@pytest.mark.parametrize("name", ["topk", "topk_aux_global", "batchtopk_global", "relu"])
def test_two_ranks_match_one_process(runs, single, name):
    ref = single[1][name]
    for r in (0, 1):
        _close(runs[r][name]["weights"], ref.sae.state_for_save(), atol=1e-5)
    # every rank ends bit-identical (one all-reduce result, same optimiser arithmetic)
    for k, v in runs[0][name]["weights"].items():
        assert torch.equal(v, runs[1][name]["weights"][k]), k
    log, ref_log = runs[0][name]["log"], ref.log
    assert [e["step"] for e in log] == [e["step"] for e in ref_log]
    for e, f in zip(log, ref_log, strict=True):
        assert e.keys() == f.keys()
        for key in e:
            assert e[key] == pytest.approx(f[key], rel=1e-4, abs=1e-6, nan_ok=True), (e["step"], key)
    for key in ("fvu", "mse", "cosine", "l0", "dead_frac", "steps", "tokens"):
        assert runs[0][name]["final"][key] == pytest.approx(ref.final[key], rel=1e-4, abs=1e-6), key


def test_auxk_case_really_used_dead_latents(single):
    assert any("auxk" in e for e in single[1]["topk_aux_global"].log)


def test_per_rank_batchtopk_keeps_ranks_in_sync(runs):
    for k, v in runs[0]["batchtopk"]["weights"].items():
        assert torch.equal(v, runs[1]["batchtopk"]["weights"][k]), k


def test_resume_continues_to_identical_weights_on_every_rank(runs):
    for r in (0, 1):
        res = runs[r]["resume"]
        assert res["was_resumed"] and res["ckpt_files"] == ["checkpoint.pt"]
        for k, v in res["full"].items():
            assert torch.equal(v, res["resumed"][k]), k


def test_global_batch_helpers_match_the_concatenated_batch(runs):
    g = torch.Generator().manual_seed(1)
    full = torch.randn(10, 48, generator=g).relu()
    v, i = full.reshape(-1).topk(30)
    got_i = torch.cat([runs[r]["helpers"]["flat"] for r in (0, 1)])
    got_v = torch.cat([runs[r]["helpers"]["values"] for r in (0, 1)])
    order = got_i.argsort()
    assert torch.equal(got_i[order], i.sort().values)
    assert torch.equal(got_v[order], full.reshape(-1)[i.sort().values])
    denom = (full - full.mean(0)).pow(2).sum()
    for r in (0, 1):
        h = runs[r]["helpers"]
        assert float(h["denominator"]) == pytest.approx(float(denom) * h["weight"], rel=1e-6)
