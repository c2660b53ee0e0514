import errno
import importlib
from pathlib import Path

import pytest
import torch

from lorascope.activations import ReadOrder, extract, finalize_store, open_store
from lorascope.errors import IntegrityError, LorascopeError
from lorascope.io import read_json
from lorascope.models import load_adapters, load_base

# the package re-exports the function `extract`, which shadows the submodule attribute of the same name
extract_mod = importlib.import_module("lorascope.activations.extract")
store_mod = importlib.import_module("lorascope.activations.store")


def _files(path: Path) -> dict[str, bytes]:
    return {
        p.relative_to(path).as_posix(): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and ".locks" not in p.parts
    }


class _Killed(Exception):
    pass


def _fail_after(monkeypatch, k: int, exc: Exception) -> None:
    real = store_mod.write_shard
    calls = {"n": 0}

    def flaky(path, tensors, metadata):
        calls["n"] += 1
        if calls["n"] > k:
            raise exc
        return real(path, tensors, metadata)

    monkeypatch.setattr(extract_mod, "write_shard", flaky)


def test_resume_after_interruption_is_identical(store, peft_tiny, docs, tmp_path, monkeypatch, small_config):
    pm, tok = peft_tiny
    out = tmp_path / "resumed"
    _fail_after(monkeypatch, 2, _Killed())
    with pytest.raises(_Killed):
        extract(pm, tok, docs, out, small_config())
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "shard_000000.safetensors",
        "shard_000001.safetensors",
    ]
    assert not (out / "manifest.json").exists()
    with pytest.raises(LorascopeError, match="incomplete"):
        open_store(out)
    # leftovers of a killed writer: a temp file and a shard written but never recorded in the progress file
    (out / "shards" / ".tmp-shard_000002.safetensors.x").write_bytes(b"partial")
    (out / "shards" / "shard_000003.safetensors").write_bytes(b"orphan")
    monkeypatch.undo()
    resumed = extract(pm, tok, docs, out, small_config())
    assert _files(out) == _files(store.path)  # every shard, doc table, stats and the manifest, byte for byte
    assert resumed.manifest == store.manifest


def test_disk_full_leaves_no_partial_shard(peft_tiny, docs, tmp_path, monkeypatch, small_config):
    pm, tok = peft_tiny

    real = store_mod.save_file
    attempts = []

    def full_disk(tensors, filename, metadata=None):
        if "shard_000001" not in str(filename):
            return real(tensors, filename, metadata=metadata)
        attempts.append(filename)
        Path(filename).write_bytes(b"\0" * 100)  # some bytes made it to disk before the error
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "save_file", full_disk)
    out = tmp_path / "full"
    with pytest.raises(LorascopeError, match="disk full.*shard_000001"):
        extract(pm, tok, docs[:8], out, small_config())
    assert len(attempts) == 1
    assert sorted(p.name for p in out.rglob("*shard_*")) == ["shard_000000.safetensors"]  # no partial shard 1
    assert not (out / "manifest.json").exists()
    monkeypatch.undo()
    st = extract(pm, tok, docs[:8], out, small_config())  # resumes with shard 1
    assert len(st.shards) == 2


def test_corrupted_shard_is_named(store, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    shard = copy / "shards" / "shard_000002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    st = open_store(copy)  # lazy: shards 0 and 1 still read fine
    assert st.load_shard(0, ["doc_index"])["doc_index"].numel() > 0
    with pytest.raises(IntegrityError, match="shard_000002.safetensors"):
        list(st.reader(0, "base", split="all", order=ReadOrder(shuffle=False)))
    with pytest.raises(IntegrityError, match="shard_000002.safetensors"):
        open_store(copy, verify="open")


def test_nan_activations_name_layer_and_batch(tiny_llama_dir, tiny_adapters, docs, tmp_path, small_config):
    base = load_base(tiny_llama_dir)
    with torch.no_grad():
        base.model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    pm = load_adapters(base, tiny_adapters)
    with pytest.raises(IntegrityError, match=r"layer 2 in shard 0 batch 0"):
        extract(pm, base.tokenizer, docs[:4], tmp_path / "nan", small_config())
    assert not (tmp_path / "nan" / "shards").exists() or not list((tmp_path / "nan" / "shards").iterdir())


def test_bad_inputs(peft_tiny, docs, tmp_path, small_config):
    pm, tok = peft_tiny
    with pytest.raises(LorascopeError, match=r"out of range.*0\.\.2"):
        extract(pm, tok, docs[:2], tmp_path / "a", small_config(layers=[1, 5]))
    with pytest.raises(LorascopeError, match="unknown adapter"):
        extract(pm, tok, docs[:2], tmp_path / "b", small_config(), adapters=["rank_9"])
    with pytest.raises(LorascopeError, match="token selection"):
        small_config(tokens="middle")
    extract(pm, tok, docs[:2], tmp_path / "c", small_config())
    with pytest.raises(LorascopeError, match="another config"):
        extract(pm, tok, docs[:2], tmp_path / "c", small_config(layers=[1]))


def test_two_ranks_merge_to_the_single_rank_store(store, peft_tiny, docs, tmp_path, small_config):
    pm, tok = peft_tiny
    out = tmp_path / "dist"
    for rank in (1, 0):
        assert extract(pm, tok, docs, out, small_config(), rank=rank, world_size=2) is None
    prog = read_json(store.path / "manifest.json")
    manifest = finalize_store(out, prog["config"], prog["config_hash"], world_size=2)
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in store.manifest["shards"]]
    assert manifest["counts"] == store.manifest["counts"]
    for L in ("0", "2"):
        for a in store.adapters:
            one, two = store.manifest["stats"][L][a], manifest["stats"][L][a]
            assert one["n_tokens"] == two["n_tokens"]
            assert one["participation_ratio"] == pytest.approx(two["participation_ratio"], rel=1e-9)
            assert one["delta_norm"]["mean"] == pytest.approx(two["delta_norm"]["mean"], rel=1e-12)


def test_cli_extract(tiny_llama_dir, tiny_adapters, tmp_path, capsys):
    from lorascope.cli import main

    out = tmp_path / "cli"
    args = [
        "extract",
        "--model",
        str(tiny_llama_dir),
        "--data",
        "demo",
        "--n-docs",
        "6",
        "--layers",
        "0,2",
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--docs-per-shard",
        "3",
        "--no-progress",
    ]
    for name, path in tiny_adapters.items():
        args += ["--adapter", f"{name}={path}"]
    main(args)
    st = open_store(out)
    assert st.layers == [0, 2] and st.adapters == list(tiny_adapters) and len(st.shards) == 2
    assert "participation" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "extract",
                "--model",
                str(tiny_llama_dir),
                "--adapter",
                "bad",
                "--layers",
                "0",
                "--out",
                str(tmp_path / "x"),
            ]
        )
    assert exc.value.code == 2
