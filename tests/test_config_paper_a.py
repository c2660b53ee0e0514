"""configs/paper_a_smollm2.yaml parses and states the paper's protocol (arXiv 2605.28896)."""

from __future__ import annotations

from pathlib import Path

from lorascope.config import load_config
from lorascope.saes import PaperASettings, create_sae
from lorascope.saes.paper_a import PaperASAE

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper_a_smollm2.yaml"


def test_paper_a_config_parses_and_states_the_protocol():
    cfg = load_config(CONFIG)
    assert cfg.model.spec == "embedded"
    assert cfg.adapters.train.ranks == [4, 8, 16, 32]
    layers = cfg.extraction.layers
    assert len(layers) >= 3 and min(layers) <= 6 and max(layers) >= 24  # spread over SmolLM2's 30 blocks
    assert 0 < cfg.data.held_out_fraction < 1  # held-out Δ for every evaluation
    assert cfg.adapter_sae.architecture == "paper_a"
    assert len(cfg.adapter_sae.seeds) >= 2
    assert cfg.reference_sae.source == "train"  # the reference SAE is trained on base activations
    assert isinstance(cfg.adapter_sae, PaperASettings)
    assert cfg.adapter_sae.sae_settings() == {"l1_coefficient": 0.2, "unit_decoder": True, "l1_penalty": "plain"}
    # what the study builds from it (create_sae with the section's settings) is the paper's SAE
    sae = create_sae(
        cfg.adapter_sae.architecture, 576, cfg.adapter_sae.sae_width(576), **cfg.adapter_sae.sae_settings()
    )
    assert isinstance(sae, PaperASAE) and sae.d_sae == 2304 and sae.input_norm == "mean_norm"
    assert cfg.reference_sae.architecture == "relu" and cfg.reference_sae.l1_penalty == "decoder_norm"
    # the report's density finding reads free-L0 paper_a SAEs trained for it, at a fixed λ and at matched FVU
    d = cfg.density
    assert d.enabled and d.architecture == "paper_a" and d.l1_coefficient == 0.2 and d.matched_fvu_target == 0.2


def test_density_section_rejects_a_pinned_l0_architecture(tmp_path):
    import pytest
    import yaml

    from lorascope.errors import LorascopeError

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"density": {"enabled": True, "architecture": "topk"}}))
    with pytest.raises(LorascopeError, match=r"density\.architecture"):
        load_config(p)
    p.write_text(yaml.safe_dump({"density": {"matched_fvu_target": 1.5}}))
    with pytest.raises(LorascopeError, match=r"density\.matched_fvu_target"):
        load_config(p)
    quick = load_config(CONFIG.with_name("quickstart.yaml")).density
    assert quick.enabled and quick.architecture == "paper_a" and quick.matched_fvu_target is None


def test_miniature_study_with_the_paper_a_adapter_sae(tiny_llama_dir, tmp_path):
    """The study trains paper_a adapter SAEs end to end: saved SAEs load as PaperASAE, apply to raw Δ, and their
    held-out L0 is free (not pinned at a k), so the density rows carry information."""
    import math

    from lorascope.config import parse_config
    from lorascope.saes import load_sae
    from lorascope.study import run
    from tiny_models import miniature_study_config

    cfg = parse_config(
        miniature_study_config(
            tiny_llama_dir,
            tmp_path / "mini",
            **{
                "adapter_sae": {
                    "architecture": "paper_a",
                    "expansion": 2,
                    "l1_coefficient": 0.1,
                    "tokens": 1024,
                    "batch_size": 128,
                    "seeds": [0, 1],
                }
            },
        )
    )
    result = run(cfg, progress=False, report=False)
    saes = sorted((tmp_path / "mini").glob("saes/*/sae"))
    adapter = [load_sae(p) for p in saes if load_sae(p).cfg.metadata.get("trained_on") == "delta"]
    assert len(adapter) == 4 and all(isinstance(s, PaperASAE) for s in adapter)
    table = result.table
    l0 = table[table.metric == "l0_adapter_sae"].value.tolist()
    assert len(l0) == 2 and all(math.isfinite(v) and 0 < v < adapter[0].d_sae for v in l0)
