"""benchmarks/gpu_check.py runs on CPU with --tiny (a smoke test of the script; the CUDA path needs a GPU)."""

from __future__ import annotations

import pytest


def _table(out: str) -> dict[str, str]:
    lines = out.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stage"))
    return {line[:44].strip(): line[44:] for line in lines[start + 2 :]}


def test_tiny_cpu_sae_and_dist_parts_print_one_table(bench, capsys):
    G = bench("gpu_check")
    assert G.main(["--device", "cpu", "--tiny", "--skip", "study"]) == 0
    rows = _table(capsys.readouterr().out)
    lorascope = rows["SAE 64->256 k8 lorascope"].split()
    assert float(lorascope[0].replace(",", "")) > 0 and lorascope[1].endswith("%")
    assert "skipped" in rows["2-rank torchrun (NCCL)"] and "gpu_check total" in rows
    assert not any(k.startswith("study:") for k in rows)


def test_cuda_without_a_gpu_is_one_clear_error(bench, capsys, monkeypatch):
    G = bench("gpu_check")
    monkeypatch.setattr(G.torch.cuda, "is_available", lambda: False)
    assert G.main(["--device", "cuda"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_cpu_study_reports_every_stage(bench, capsys):
    G = bench("gpu_check")
    assert G.main(["--device", "cpu", "--tiny", "--skip", "sae,dist"]) == 0
    rows = _table(capsys.readouterr().out)
    for stage in ("adapters", "extraction", "saes", "geometry"):
        assert float(rows[f"study: {stage}"].split()[-1]) > 0, rows
    assert float(rows["study: saes"].split()[0].replace(",", "")) > 0
    assert "FAILED" not in rows["study: whole run (process wall)"]
