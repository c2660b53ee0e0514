"""Ctrl-C and ``kill``: a real SIGINT / SIGTERM to a running ``lorascope`` subprocess ends it with exit status 130 /
143 and the line "interrupted: re-run the same command to resume", never with status 0 (a script
``extract && train-sae`` must stop). The signal lands wherever the process is (inside the progress bar loop,
the forward pass, the training loop); re-running the same command then finishes with exactly the artefacts of
an uninterrupted run.
"""

from __future__ import annotations

import signal

import pytest

from lorascope.cli import RESUME_LINE, main

EXTRACT = [
    "--layers",
    "0,2",
    "--n-docs",
    "48",
    "--batch-size",
    "1",
    "--docs-per-shard",
    "4",
    "--max-length",
    "48",
    "--seed",
    "2",
]  # with the progress bar: the signal arrives inside tqdm's loop
TRAIN_SAE = [
    "--layer",
    "2",
    "--kind",
    "delta",
    "--adapter",
    "rank_4",
    "--expansion",
    "2",
    "--k",
    "4",
    "--tokens",
    "32000",
    "--batch-size",
    "32",
    "--held-out-fraction",
    "0.25",
    "--seed",
    "1",
]


def _extract_args(model, adapters, out, *extra):
    return [
        "extract",
        "--model",
        str(model),
        *[x for k, v in adapters.items() for x in ("-a", f"{k}={v}")],
        "--out",
        str(out),
        *EXTRACT,
        *extra,
    ]


def _assert_interrupted(proc, code: int) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.rstrip("\n").split("\n")[-1].strip() == RESUME_LINE, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr


@pytest.fixture(scope="module")
def ref_store(tiny_llama_dir, tiny_adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("int_ref_store") / "store"
    main(_extract_args(tiny_llama_dir, tiny_adapters, out, "--no-progress"))
    return out


@pytest.fixture(scope="module")
def ref_sae(ref_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("int_ref_sae") / "sae"
    main(["train-sae", "--store", str(ref_store), "--out", str(out), *TRAIN_SAE])
    return out


@pytest.mark.slow  # ~1-2 min each on a busy 2-core machine (model load in a subprocess, twice)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_extract_exits_with_resume_line_and_resumes(
    rel, ref_store, tiny_llama_dir, tiny_adapters, tmp_path, sig
):
    out = tmp_path / "store"
    cmd = rel.lorascope_cmd(*_extract_args(tiny_llama_dir, tiny_adapters, out))
    proc = rel.run_and_signal(cmd, rel.exists(out, "shards/shard_*.safetensors", 3), sig)
    _assert_interrupted(proc, 128 + sig)
    assert not (out / "manifest.json").exists()  # stopped part-way, not at the end
    assert rel.tmp_leftovers(out) == []
    rel.run_to_end(cmd)
    rel.assert_same_store(out, ref_store)


@pytest.mark.slow  # ~1-2 min each on a busy 2-core machine (model load in a subprocess, twice)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_train_sae_exits_with_resume_line_and_resumes(rel, ref_store, ref_sae, tmp_path, sig):
    out = tmp_path / "sae"
    cmd = rel.lorascope_cmd("train-sae", "--store", str(ref_store), "--out", str(out), *TRAIN_SAE)
    proc = rel.run_and_signal(cmd, rel.changed_times(out / "ckpt" / "checkpoint.pt", 2), sig)
    _assert_interrupted(proc, 128 + sig)
    assert not (out / "sae_weights.safetensors").exists()
    assert rel.tmp_leftovers(out) == []
    rel.run_to_end(cmd)
    rel.assert_same_sae(out, ref_sae)


# ---- the mechanism, in-process (fast) ----------------------------------------------------------------------------
def _self_signal_in(monkeypatch, sig, inside_tqdm: bool):
    """Make `lorascope info` signal its own process part-way through a loop (optionally inside a tqdm bar)."""
    import os

    from tqdm.auto import tqdm

    import lorascope.cli.info as info

    def describe(path, allow_pickle=False):
        items = tqdm(range(10**6), disable=False) if inside_tqdm else range(10**6)
        for i in items:
            if i == 3:
                os.kill(os.getpid(), sig)
            try:  # a broad `except Exception` in a loop must not swallow the interrupt
                sum(range(100))
            except Exception:  # noqa: BLE001
                pass
        raise AssertionError("the signal did not interrupt the loop")

    monkeypatch.setattr(info, "describe", describe)


@pytest.mark.parametrize("inside_tqdm", [False, True], ids=["loop", "tqdm"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_exit_code_and_resume_line_in_process(monkeypatch, capsys, tmp_path, sig, inside_tqdm):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _self_signal_in(monkeypatch, sig, inside_tqdm)
    with pytest.raises(SystemExit) as info:
        main(["info", str(tmp_path)])
    assert info.value.code == 128 + sig
    assert capsys.readouterr().err.rstrip("\n").split("\n")[-1] == RESUME_LINE
    assert {s: signal.getsignal(s) for s in before} == before  # the CLI restores the caller's handlers
