"""Fault injection: SIGKILL a real ``lorascope`` process at several points, re-run the same command, and check the
finished artefacts equal those of an uninterrupted run exactly (store tensors and checksums, SAE weights with
torch.equal, result tables cell for cell, figures byte for byte), with no ``.tmp-*`` leftovers.

Kill points are chosen by watching the output folder (a file appears, a checkpoint is rewritten n times), so
they do not depend on the machine's speed. Each test kills the same command several times in a row (every
resume is itself killed once more) and then lets it finish: this exercises resuming from each kill point, and
resuming a resume. The uninterrupted reference runs in-process with the same code and the same thread count.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from lorascope.cli import main

EXTRACT = [
    "--layers",
    "0,2",
    "--n-docs",
    "64",
    "--batch-size",
    "1",
    "--docs-per-shard",
    "4",
    "--max-length",
    "48",
    "--seed",
    "1",
    "--no-progress",
]
TRAIN_SAE = [
    "--layer",
    "2",
    "--kind",
    "delta",
    "--adapter",
    "rank_4",
    "--architecture",
    "topk",
    "--expansion",
    "2",
    "--k",
    "4",
    "--tokens",
    "48000",
    "--batch-size",
    "32",
    "--held-out-fraction",
    "0.25",
    "--seed",
    "3",
]


def fresh(root, pattern):
    """Trigger: a file matching ``pattern`` that did not exist when the trigger was made."""
    before = set(root.glob(pattern))
    return lambda: any(p not in before for p in root.glob(pattern))


def _extract_args(model, adapters, out):
    return [
        "extract",
        "--model",
        str(model),
        *[x for k, v in adapters.items() for x in ("-a", f"{k}={v}")],
        "--out",
        str(out),
        *EXTRACT,
    ]


@pytest.fixture(scope="module")
def ref_store(tiny_llama_dir, tiny_adapters, tmp_path_factory):
    """The uninterrupted extraction (in-process, through the same CLI function)."""
    out = tmp_path_factory.mktemp("ref_store") / "store"
    main(_extract_args(tiny_llama_dir, tiny_adapters, out))
    return out


def test_extract_killed_three_times_resumes_to_the_same_store(rel, ref_store, tiny_llama_dir, tiny_adapters, tmp_path):
    out = tmp_path / "store"
    cmd = rel.lorascope_cmd(*_extract_args(tiny_llama_dir, tiny_adapters, out))
    points = [
        rel.exists(out, "docs.json"),  # 1: documents tokenized, docs.json written, no shard yet
        rel.exists(out, "shards/shard_*.safetensors", 6),  # 2: between shards, 6 of 16 done
        None,  # 3: in the middle of writing a shard (a new temporary file), at the latest once 12 shards exist
    ]
    outcomes = []
    for i, trigger in enumerate(points):
        if trigger is None:  # made only now, so temporary files left by the previous kill do not count
            trigger = rel.any_of(fresh(out, "shards/.tmp-*"), rel.exists(out, "shards/shard_*.safetensors", 12))
        outcomes.append(rel.run_and_kill(cmd, trigger))
        assert not (out / "manifest.json").exists(), f"kill point {i + 1} came after the end ({outcomes})"
    assert outcomes == ["killed"] * 3
    rel.run_to_end(cmd)
    rel.assert_same_store(out, ref_store)
    assert rel.tmp_leftovers(out) == []
    from lorascope.activations import open_store

    assert open_store(out, verify="open").n_tokens == open_store(ref_store).n_tokens > 0  # all checksums hold


@pytest.fixture(scope="module")
def ref_sae(ref_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref_sae") / "sae"
    main(["train-sae", "--store", str(ref_store), "--out", str(out), *TRAIN_SAE])
    return out


def test_train_sae_killed_three_times_resumes_to_identical_weights(rel, ref_store, ref_sae, tmp_path):
    out = tmp_path / "sae"
    ckpt = out / "ckpt" / "checkpoint.pt"
    cmd = rel.lorascope_cmd("train-sae", "--store", str(ref_store), "--out", str(out), *TRAIN_SAE)
    triggers = [
        lambda: ckpt.exists(),  # 1: right after the first checkpoint (step 150 of 1500)
        None,  # 2: after the checkpoint was rewritten 3 more times
        None,  # 3: in the middle of writing a checkpoint, or at the latest after 3 more rewrites
    ]
    outcomes = []
    for i, trig in enumerate(triggers):
        if i == 1:
            trig = rel.changed_times(ckpt, 4)
        elif i == 2:
            trig = rel.any_of(fresh(out / "ckpt", ".tmp-checkpoint.pt.*"), rel.changed_times(ckpt, 4))
        outcomes.append(rel.run_and_kill(cmd, trig))
        assert not (out / "sae_weights.safetensors").exists(), f"kill point {i + 1} came after the end ({outcomes})"
    assert outcomes == ["killed"] * 3
    rel.run_to_end(cmd)
    rel.assert_same_sae(out, ref_sae)
    assert json.loads((out / "cfg.json").read_text()) == json.loads((ref_sae / "cfg.json").read_text())
    assert rel.tmp_leftovers(out) == []


@pytest.mark.slow
def test_pipeline_killed_in_every_stage_resumes_to_identical_results(rel, tiny_llama_dir, tmp_path):
    from lorascope.config import parse_config
    from lorascope.study import run

    ref = run(parse_config(rel.mini_config(tiny_llama_dir, tmp_path / "ref")), progress=False)
    out = tmp_path / "killed"
    yml = tmp_path / "mini.yaml"
    yml.write_text(yaml.safe_dump(rel.mini_config(tiny_llama_dir, out)))
    cmd = rel.lorascope_cmd("run", str(yml), "--quiet")
    points = {
        "adapters: rank_2 done, rank_4 training": rel.exists(out, "adapters/rank_2-*/done.json"),
        "extraction: 2 of 5 shards written": rel.exists(out, "activations/store-*/store/shards/shard_*.safetensors", 2),
        "SAEs: 2 of 5 trained": rel.exists(out, "saes/*/done.json", 2),
        "geometry: first part file written": rel.exists(out, "geometry/tables-*/parts/*.json"),
        "report: 3 figures written": rel.exists(out, "figures/*.png", 3),
    }
    outcomes = {name: rel.run_and_kill(cmd, trig) for name, trig in points.items()}
    assert list(outcomes.values()) == ["killed"] * len(points), outcomes
    assert not (out / "report.html").exists()
    rel.run_to_end(cmd)

    pd.testing.assert_frame_equal(pd.read_parquet(out / "results" / "results.parquet"), ref.table, check_exact=True)
    assert (out / "results" / "results.csv").read_bytes() == (ref.results_dir / "results.csv").read_bytes()
    for name in ("contexts.json",):
        assert (out / "results" / name).read_text() == (ref.results_dir / name).read_text()
    arrays = sorted(p.name for p in (ref.results_dir / "arrays").iterdir())
    assert arrays and arrays == sorted(p.name for p in (out / "results" / "arrays").iterdir())
    for a in arrays:
        assert (out / "results" / "arrays" / a).read_bytes() == (ref.results_dir / "arrays" / a).read_bytes()
    ref_out = ref.output_dir
    for stage in ("adapters", "activations", "saes", "geometry"):  # same stage folders (same input hashes)
        assert sorted(p.name for p in (out / stage).iterdir()) == sorted(p.name for p in (ref_out / stage).iterdir())
    for folder in (ref_out / "adapters").iterdir():
        rel.assert_same_safetensors(
            out / "adapters" / folder.name / "adapter" / "adapter_model.safetensors",
            folder / "adapter" / "adapter_model.safetensors",
        )
    store = next((ref_out / "activations").iterdir()).name
    rel.assert_same_store(out / "activations" / store / "store", ref_out / "activations" / store / "store")
    for folder in (ref_out / "saes").iterdir():
        rel.assert_same_sae(out / "saes" / folder.name / "sae", folder / "sae")
    figs = sorted(p.name for p in (ref_out / "figures").glob("*.png"))
    assert figs == sorted(p.name for p in (out / "figures").glob("*.png"))
    for f in figs:
        assert (out / "figures" / f).read_bytes() == (ref_out / "figures" / f).read_bytes(), f
    assert (out / "report.html").is_file()
    assert rel.tmp_leftovers(out) == []
