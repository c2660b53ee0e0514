"""The bad-input catalogue (docs/bad-inputs.md): every wrong input fails fast with one line naming the problem and
the fix, and leaves nothing half-written behind.

CLI cases call ``lorascope.cli.main`` in-process and check: a non-zero exit, stderr exactly one line
``error: <problem>. Fix: <fix>.``, no traceback. A few run the real console script as a subprocess. Python API
cases check the LorascopeError message. Test names match the catalogue's "test" column.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess

import pytest
import torch
import yaml

from lorascope.cli import main
from lorascope.errors import IntegrityError, LorascopeError
from lorascope.io import OutputLock

D = 32  # width of the tiny Llama


def cli_error(capsys, argv: list[str], *patterns: str) -> str:
    """Run the CLI in-process; check the one-line error and that it matches every regex in ``patterns``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: ") and ". Fix: " in line, line
    assert "Traceback" not in err
    for p in patterns:
        assert re.search(p, line), (p, line)
    return line


def leftovers(root) -> list:
    return sorted(p for p in root.rglob(".tmp*"))  # ours (.tmp-*) and safetensors' (.tmpXXXXXX)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    """transformers' own 'Loading weights' bar is progress output, not part of an error: keep stderr for errors."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


@pytest.fixture(scope="module")
def store_dir(tiny_llama_dir, tiny_adapters, tmp_path_factory):
    """A small finished activation store (8 documents, layer 1, adapter rank_2, two shards)."""
    from lorascope.activations import ExtractConfig, extract
    from lorascope.data import make_demo_dataset
    from lorascope.models import load_adapters, load_base

    out = tmp_path_factory.mktemp("bad_inputs") / "store"
    base = load_base(tiny_llama_dir)
    pm = load_adapters(base, {"rank_2": tiny_adapters["rank_2"]})
    extract(pm, base.tokenizer, make_demo_dataset(8, seed=5), out,
            ExtractConfig(layers=[1], docs_per_shard=4, max_length=48, progress=False))
    return out


@pytest.fixture
def sae_dir(tmp_path):
    from lorascope.saes import create_sae, save_sae

    return save_sae(create_sae("topk", D, 2 * D, k=4, seed=1), tmp_path / "sae")


@pytest.fixture
def pickled_sae(tmp_path):
    """A dictionary_learning folder whose ae.pt is a whole pickled module (needs full unpickling)."""
    module = torch.nn.Module()
    module.encoder = torch.nn.Linear(D, 2 * D)
    module.decoder = torch.nn.Linear(2 * D, D, bias=False)
    module.register_parameter("bias", torch.nn.Parameter(torch.zeros(D)))
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(module, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    return folder


@pytest.fixture
def mini_yaml(rel, tiny_llama_dir, tmp_path):
    def make(**over):
        path = tmp_path / "mini.yaml"
        path.write_text(yaml.safe_dump(rel.mini_config(tiny_llama_dir, tmp_path / "run", **over)))
        return path

    return make


def _extract(model, adapters: dict, out, *extra, layers: str = "1") -> list[str]:
    return ["extract", "--model", str(model), *[x for k, v in adapters.items() for x in ("-a", f"{k}={v}")],
            "--layers", layers, "--n-docs", "4", "--max-length", "32", "--no-progress", "--out", str(out), *extra]


# ---- configuration -----------------------------------------------------------------------------------------------
def test_missing_config_file(capsys, tmp_path):
    cli_error(capsys, ["run", tmp_path / "nope.yaml"], r"config file .*nope\.yaml does not exist")


def test_invalid_yaml(capsys, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  spec: x\n extraction: [unclosed\n")
    cli_error(capsys, ["run", p], r"bad\.yaml is not valid YAML at line \d+", r"Fix: fix the syntax")


def test_unknown_config_key(capsys, mini_yaml):
    cli_error(capsys, ["run", mini_yaml(**{"extraction.layerz": [1]})], r"unknown key 'extraction\.layerz'")


def test_impossible_config_value(capsys, mini_yaml):
    cli_error(capsys, ["run", mini_yaml(), "--set", "adapter_sae.k=0"], r"adapter_sae\.k: Input should be greater")
    cli_error(capsys, ["run", mini_yaml(), "--set", "adapters.train.ranks=[4,0]"], r"ranks must be positive")


def test_set_not_key_value(capsys, mini_yaml):
    cli_error(capsys, ["run", mini_yaml(), "--set", "adapter_sae.k"], r"--set 'adapter_sae\.k' is not KEY=VALUE")


def test_pipeline_layer_out_of_range_fails_before_training(capsys, mini_yaml, tmp_path):
    cli_error(capsys, ["run", mini_yaml(**{"extraction.layers": [1, 7]}), "-q"],
              r"extraction\.layers: layer 7 is out of range: this model has 3 blocks", r"choose layers in 0\.\.2")
    assert not (tmp_path / "run").exists()  # failed before creating anything


# ---- hyperparameters ---------------------------------------------------------------------------------------------
def test_lora_rank_zero(capsys, tmp_path):
    cli_error(capsys, ["train-lora", "--rank", "0", "--out", tmp_path / "a"], r"LoRA rank must be a positive integer")


def test_k_larger_than_d_sae(capsys, store_dir, tmp_path):
    cli_error(capsys, ["train-sae", "--store", store_dir, "--layer", "1", "--expansion", "2", "--k", "100",
                       "--out", tmp_path / "s"], r"k = 100 is larger than d_sae = 64")
    assert not (tmp_path / "s" / "sae_weights.safetensors").exists()


def test_sasa_s_larger_than_groups(capsys, store_dir, tmp_path):
    cli_error(capsys, ["train-sae", "--store", store_dir, "--layer", "1", "--architecture", "sasa", "--expansion",
                       "2", "--sasa-rank", "4", "--k", "80", "--out", tmp_path / "s"], r"SASA s=20 exceeds groups=16")


# ---- data and stores ---------------------------------------------------------------------------------------------
def test_extract_layer_out_of_range(capsys, tiny_llama_dir, tiny_adapters, tmp_path):
    cli_error(capsys, _extract(tiny_llama_dir, tiny_adapters, tmp_path / "st", layers="1,9"),
              r"layer 9 is out of range: this model has 3 blocks", r"choose layers in 0\.\.2")
    assert not list((tmp_path / "st").glob("shards/*"))


def test_layer_not_in_store(capsys, store_dir, tmp_path):
    cli_error(capsys, ["train-sae", "--store", store_dir, "--layer", "0", "--out", tmp_path / "s"],
              r"layer 0 is not in this store", r"choose one of \[1\]")


def test_empty_dataset(capsys, tiny_llama_dir, tiny_adapters, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    cli_error(capsys, _extract(tiny_llama_dir, tiny_adapters, tmp_path / "st", "--data", tmp_path / "empty.jsonl"),
              r"empty\.jsonl has no examples")


def test_dataset_line_missing_fields(capsys, tiny_llama_dir, tiny_adapters, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    cli_error(capsys, _extract(tiny_llama_dir, tiny_adapters, tmp_path / "st", "--data", p),
              r"d\.jsonl line 2: missing field\(s\) output", r"'instruction' and 'output'")


def test_corrupt_shard_checksum(capsys, store_dir, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    shard = copy / "shards" / "shard_000000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern inside the tensor data
    shard.write_bytes(bytes(data))
    cli_error(capsys, ["train-sae", "--store", copy, "--layer", "1", "--tokens", "256", "--batch-size", "32",
                       "--out", tmp_path / "s"], r"checksum mismatch in .*shard_000000\.safetensors",
              r"re-run the extraction")
    assert not (tmp_path / "s" / "sae_weights.safetensors").exists() and leftovers(tmp_path) == []


def test_incomplete_store(capsys, store_dir, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    (copy / "manifest.json").unlink()
    cli_error(capsys, ["train-sae", "--store", copy, "--layer", "1", "--out", tmp_path / "s"],
              r"activation store .* is incomplete", r"re-run the same extract command")


def test_not_a_store(capsys, tmp_path):
    cli_error(capsys, ["train-sae", "--store", tmp_path, "--layer", "1", "--out", tmp_path / "s"],
              r"is not an activation store \(no manifest\.json\)")


def test_wrong_store_dtype(capsys, tiny_llama_dir, tiny_adapters, tmp_path):
    cli_error(capsys, _extract(tiny_llama_dir, tiny_adapters, tmp_path / "st", "--dtype", "float16"),
              r"unknown store dtype 'float16'", r"use float32 or bfloat16")


def test_wrong_dtype_activations():
    from lorascope.saes import create_sae
    from lorascope.saes.trainer import TrainerConfig, train_sae

    with pytest.raises(LorascopeError, match=r"yielded int64 rows; activations are floating point"):
        train_sae(create_sae("topk", D, 2 * D, k=4), torch.randint(0, 9, (64, D)), TrainerConfig(batch_size=32),
                  progress=False)


def test_wrong_shape_activations():
    from lorascope.saes import create_sae

    with pytest.raises(LorascopeError, match=r"shape \(5, 31\) but this SAE expects \[N, 32\]"):
        create_sae("topk", D, 2 * D, k=4).encode(torch.randn(5, D - 1))


def test_nan_activations_in_training():
    from lorascope.saes import create_sae
    from lorascope.saes.trainer import TrainerConfig, train_sae

    x = torch.randn(256, D)
    x[3, 0] = float("nan")
    with pytest.raises(LorascopeError, match=r"mean norm nan.*non-finite"):
        train_sae(create_sae("topk", D, 2 * D, k=4), x, TrainerConfig(batch_size=32, init_tokens=64), progress=False)


def test_nan_sae_loss(tmp_path):
    from lorascope.saes import create_sae
    from lorascope.saes.trainer import TrainerConfig, train_sae

    cfg = TrainerConfig(batch_size=64, lr=1e12, scale_inputs=False, b_dec_init="zeros", checkpoint_every=1)
    with pytest.raises(LorascopeError, match=r"training loss became (nan|inf) at step \d+.*lower the learning rate"):
        train_sae(create_sae("relu", D, 2 * D), torch.randn(2048, D) * 1e3, cfg, checkpoint_dir=tmp_path,
                  progress=False)
    assert leftovers(tmp_path) == []


def test_nan_activations_in_extraction(tiny_llama_dir, tiny_adapters, tmp_path):
    from lorascope.activations import ExtractConfig, extract
    from lorascope.data import make_demo_dataset
    from lorascope.models import load_adapters, load_base

    base = load_base(tiny_llama_dir)
    pm = load_adapters(base, {"rank_2": tiny_adapters["rank_2"]})
    with torch.no_grad():
        next(p for n, p in pm.named_parameters() if "layers.0.mlp.down_proj.base_layer.weight" in n)[0, 0] = torch.nan
    with pytest.raises(IntegrityError, match=r"non-finite \(NaN/inf\) activations at layer 1 in shard 0"):
        extract(pm, base.tokenizer, make_demo_dataset(4, seed=1), tmp_path / "st",
                ExtractConfig(layers=[1], max_length=32, progress=False))
    assert not list((tmp_path / "st").glob("shards/*")) and not (tmp_path / "st" / "manifest.json").exists()
    assert leftovers(tmp_path) == []


# ---- models and adapters -----------------------------------------------------------------------------------------
def test_gguf_that_is_not_gguf(capsys, tiny_adapters, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    cli_error(capsys, _extract(fake, tiny_adapters, tmp_path / "st"), r"model\.gguf is not a GGUF file")


def test_hub_id_offline(capsys, tiny_adapters, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cli_error(capsys, _extract("lorascope-made-up-org/no-such-model", tiny_adapters, tmp_path / "st"),
              r"could not load model 'lorascope-made-up-org/no-such-model' .*offline", r"pass the local folder")


def test_missing_model_path(capsys, tiny_adapters, tmp_path):
    cli_error(capsys, _extract(tmp_path / "no_model", tiny_adapters, tmp_path / "st"), r"no_model does not exist")


def test_foreign_adapter(capsys, tiny_llama_dir, tmp_path):
    """An adapter saved for another base (a Llama of width 48) loaded onto the tiny Llama (width 32)."""
    from peft import LoraConfig, get_peft_model

    from lorascope.models import load_base
    from lorascope.models.lora import save_adapter
    from tiny_models import build_tiny_model

    other = load_base(build_tiny_model("llama", tmp_path / "wide", hidden=48))
    folder = save_adapter(get_peft_model(other.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])),
                          tmp_path / "wide_adapter")
    cli_error(capsys, _extract(tiny_llama_dir, {"g": folder}, tmp_path / "st"),
              r"adapter 'g' at .*wide_adapter was trained for a different base model .*size mismatch",
              r"Fix: load it onto the base model it was trained for")
    assert not (tmp_path / "st").exists()


def test_adapter_folder_without_config(capsys, tiny_llama_dir, tmp_path):
    (tmp_path / "adapter").mkdir()
    cli_error(capsys, _extract(tiny_llama_dir, {"a": tmp_path / "adapter"}, tmp_path / "st"),
              r"adapter 'a': .*adapter has no adapter_config\.json", r"saved by PEFT")


def test_adapter_spec_without_name(capsys, tiny_llama_dir, tmp_path):
    cli_error(capsys, ["extract", "--model", tiny_llama_dir, "-a", str(tmp_path), "--layers", "1", "--out",
                       tmp_path / "st"], r"--adapter '.*' is not NAME=PATH")


# ---- SAE files ---------------------------------------------------------------------------------------------------
def test_truncated_safetensors(capsys, sae_dir):
    w = sae_dir / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    cli_error(capsys, ["info", sae_dir], r"sae_weights\.safetensors is not a readable safetensors file",
              r"corrupt or truncated")


def test_missing_sae_path(capsys, tmp_path):
    cli_error(capsys, ["info", tmp_path / "nope"], r"nope does not exist")


def test_pickle_refused_unless_allow_pickle(capsys, pickled_sae, sae_dir):
    cli_error(capsys, ["info", pickled_sae], r"ae\.pt needs full unpickling", r"--allow-pickle")
    cli_error(capsys, ["compare", sae_dir, pickled_sae], r"needs full unpickling", r"--allow-pickle")
    main(["info", str(pickled_sae), "--allow-pickle"])
    assert "SAE (relu)" in capsys.readouterr().out  # dictionary_learning AutoEncoder = ReLU SAE
    main(["compare", str(sae_dir), str(pickled_sae), "--allow-pickle"])
    assert "mmcs" in capsys.readouterr().out


def test_pickled_reference_sae_in_config(rel, pickled_sae, tiny_llama_dir, tmp_path):
    from lorascope.config import parse_config
    from lorascope.study import check_inputs, run

    over = {"reference_sae.source": "path", "reference_sae.path": str(pickled_sae)}
    cfg = parse_config(rel.mini_config(tiny_llama_dir, tmp_path / "run", **over))
    with pytest.raises(LorascopeError, match=r"needs full unpickling.*set reference_sae\.allow_pickle: true"):
        run(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    check_inputs(parse_config(rel.mini_config(tiny_llama_dir, tmp_path / "run", **over,
                                              **{"reference_sae.allow_pickle": True})))


def test_reference_sae_of_wrong_width(rel, tiny_llama_dir, tmp_path):
    from lorascope.config import parse_config
    from lorascope.saes import create_sae, save_sae
    from lorascope.study import check_inputs

    save_sae(create_sae("topk", 16, 32, k=4), tmp_path / "ref_L1")
    over = {"reference_sae.source": "path", "reference_sae.path": str(tmp_path / "ref_L{layer}")}
    with pytest.raises(LorascopeError, match=r"has d_in = 16, but the model's residual width is 32"):
        check_inputs(parse_config(rel.mini_config(tiny_llama_dir, tmp_path / "run", **over)))


# ---- output folders ----------------------------------------------------------------------------------------------
def test_output_parent_is_a_file(capsys, store_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    cli_error(capsys, ["train-sae", "--store", store_dir, "--layer", "1", "--out", tmp_path / "file" / "sae"],
              r"cannot write .*file/sae: part of that path is an existing file", r"choose another output folder")


def test_two_runs_on_one_folder(capsys, mini_yaml, store_dir, tiny_llama_dir, tiny_adapters, tmp_path):
    with OutputLock(tmp_path / "run"):
        cli_error(capsys, ["run", mini_yaml(), "-q"], r"another lorascope process is writing .*run",
                  r"wait for it to finish")
    with OutputLock(tmp_path / "s"):
        cli_error(capsys, ["train-sae", "--store", store_dir, "--layer", "1", "--out", tmp_path / "s"],
                  r"another lorascope process is writing")
    with OutputLock(tmp_path / "st" / ".locks" / "rank000"):  # the lock `lorascope extract` takes (rank 0)
        cli_error(capsys, _extract(tiny_llama_dir, tiny_adapters, tmp_path / "st"),
                  r"another lorascope process is writing .*st/\.locks/rank000")
    assert not (tmp_path / "st" / "docs.json").exists()
    assert list((tmp_path / "run").iterdir()) == [tmp_path / "run" / ".lock"]


def test_disk_full(capsys, monkeypatch, sae_dir, tmp_path):
    from lorascope.io import write_json
    from lorascope.saes import load_sae, save_sae

    real = os.replace

    def full(src, dst, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(LorascopeError, match=r"disk full while writing .*x\.json.*free space"):
        write_json(tmp_path / "x.json", {"a": 1})
    with pytest.raises(LorascopeError, match=r"disk full while writing .*sae2"):
        save_sae(load_sae(sae_dir), tmp_path / "sae2")
    cli_error(capsys, ["compare", sae_dir, sae_dir, "--out", tmp_path / "rows.csv"],
              r"disk full while writing .*rows\.csv")
    monkeypatch.setattr(os, "replace", real)
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "sae2").exists()
    assert not (tmp_path / "rows.csv").exists() and leftovers(tmp_path) == []


def test_report_without_results(capsys, tmp_path):
    cli_error(capsys, ["report", tmp_path], r"has no results/results\.parquet", r"lorascope run CONFIG")


# ---- the real entry point ----------------------------------------------------------------------------------------
def _script(rel, *args, env=None):
    return subprocess.run([str(rel.console_script()), *map(str, args)], env=env or rel.ENV, capture_output=True,
                          text=True, timeout=120)


def test_console_script_errors_are_one_line(rel, mini_yaml, tmp_path):
    if not rel.console_script().exists():
        pytest.skip("the lorascope console script is not installed beside this interpreter")
    p = _script(rel, "run", tmp_path / "missing.yaml")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert re.fullmatch(r"error: config file .*missing\.yaml does not exist\. Fix: .*\.\n", p.stderr), p.stderr
    with OutputLock(tmp_path / "run"):  # held by this process; the script is another process
        p = _script(rel, "run", mini_yaml(), "-q")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert re.fullmatch(r"error: another lorascope process is writing .*run\. Fix: .*\.\n", p.stderr)


def test_debug_shows_the_traceback(rel, tmp_path):
    p = subprocess.run(rel.lorascope_cmd("--debug", "run", tmp_path / "missing.yaml"), env=rel.ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "Traceback (most recent call last)" in p.stderr and "LorascopeError" in p.stderr
    assert "config file" in p.stderr and "does not exist" in p.stderr
