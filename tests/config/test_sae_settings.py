"""Typed SAE settings: one settings class per architecture (registered with it), the experiment YAML's SAE
sections a discriminated union on ``architecture``, old flat keys still accepted, nothing mutated."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from lorascope.config import load_config, parse_config, parse_sae_section
from lorascope.errors import LorascopeError
from lorascope.saes import (
    JumpReLUSettings,
    ReLUSettings,
    SAEConfig,
    SASASettings,
    TopKSettings,
    create_sae,
    known_architectures,
    sae_class,
    settings_class,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_every_architecture_registers_its_settings():
    expected = {"topk": TopKSettings, "relu": ReLUSettings, "jumprelu": JumpReLUSettings, "sasa": SASASettings}
    for name, cls in expected.items():
        assert settings_class(name) is cls
    assert set(known_architectures()) >= set(expected)


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "paper_a_smollm2.yaml"))
def test_shipped_configs_parse(path):  # paper_a_smollm2.yaml (a paper_a adapter SAE): tests/test_config_paper_a.py
    cfg = load_config(path)
    assert cfg.adapter_sae.architecture == "topk"
    assert isinstance(cfg.adapter_sae, TopKSettings) and isinstance(cfg.reference_sae, TopKSettings)


def test_quickstart_sae_sections_keep_their_values():
    cfg = load_config(CONFIGS / "quickstart.yaml")
    a = cfg.adapter_sae
    assert (a.k, a.expansion, a.tokens, a.batch_size, a.lr, a.seeds) == (16, 4, 40000, 512, 0.01, [0, 1])
    assert a.sae_width(576) == 2304
    assert a.sae_settings() == {"k": 16, "k_aux": None, "auxk_coefficient": 1 / 32}
    assert cfg.reference_sae.seeds == [0] and cfg.reference_sae.source == "train"


def test_old_flat_keys_parse_for_every_architecture():
    flat = {"k": 32, "l1_coefficient": 3.0, "l0_coefficient": 0.01, "sasa_rank": 4}
    want = {
        "topk": {"k": 32},
        "batchtopk": {"k": 32},
        "relu": {"l1_coefficient": 3.0},
        "jumprelu": {"l0_coefficient": 0.01},
        "sasa": {"rank": 4, "s": 8},
    }
    for arch, sub in want.items():
        c = parse_config({"adapter_sae": {"architecture": arch, **flat}}).adapter_sae
        settings = c.sae_settings()
        assert {k: settings[k] for k in sub} == sub, arch
        create_sae(arch, 64, c.sae_width(64) if arch != "sasa" else 64, **settings)  # the SAE accepts them


def test_defaults_are_the_settings_class_defaults():
    c = parse_config({"adapter_sae": {"architecture": "jumprelu"}}).adapter_sae
    assert c.l0_coefficient == JumpReLUSettings.model_fields["l0_coefficient"].default == 1e-3
    assert parse_config({}).adapter_sae.k == 32  # the study default for TopK's required k
    relu = parse_config({"adapter_sae": {"architecture": "relu", "unit_decoder": True}}).adapter_sae
    assert relu.sae_settings() == {"l1_coefficient": 5.0, "unit_decoder": True, "l1_penalty": "decoder_norm"}


def test_sasa_needs_k_divisible_by_rank():
    with pytest.raises(LorascopeError, match="divisible by sasa_rank"):
        parse_config({"adapter_sae": {"architecture": "sasa", "k": 30, "sasa_rank": 4}})


def test_errors_name_the_key_without_the_union_tag():
    with pytest.raises(LorascopeError, match=r"adapter_sae\.k: Input should be greater than 0"):
        parse_config({"adapter_sae": {"k": 0}})
    with pytest.raises(LorascopeError, match=r"unknown key 'reference_sae\.auxk'"):
        parse_config({"reference_sae": {"auxk": 1}})
    with pytest.raises(LorascopeError, match="does not match any of the expected tags"):
        parse_config({"adapter_sae": {"architecture": "gated"}})
    with pytest.raises(LorascopeError, match=r"train-sae: k: Input should be greater than 0"):
        parse_sae_section({"architecture": "topk", "k": -1}, "train-sae")


def test_parsing_and_building_mutate_nothing():
    data = {"adapter_sae": {"architecture": "sasa", "k": 32, "sasa_rank": 4, "l1_coefficient": 1.0}}
    before = copy.deepcopy(data)
    parse_config(data)
    assert data == before
    cfg = SAEConfig("sasa", 16, 12, arch={"rank": 3, "s": 2})
    sae = sae_class("sasa")(cfg)
    assert cfg.arch == {"rank": 3, "s": 2}  # the caller's config is untouched
    assert sae.cfg.arch["groups"] == 4 and sae.cfg.arch["nuclear_form"] == "svd"  # the SAE records all settings


def test_settings_reject_bools_and_strings_for_numbers():
    for bad in ({"k": True}, {"k": "4"}, {"k": 4, "auxk_coefficient": False}):
        with pytest.raises(LorascopeError, match="topk SAE"):
            create_sae("topk", 8, 16, **bad)
    with pytest.raises(LorascopeError, match="has no setting 'kk'"):
        create_sae("topk", 8, 16, k=2, kk=3)
    with pytest.raises(LorascopeError, match="threshold_momentum"):
        create_sae("batchtopk", 8, 16, k=2, threshold_momentum=1.5)
