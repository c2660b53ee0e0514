"""Reference SAEs per layer: explicit mapping, {layer} template, or a glob with the L0 closest to a target."""

import logging

import pytest

from lorascope.errors import LorascopeError
from lorascope.saes.pretrained import l0_of, resolve_reference_paths

# Gemma Scope 9B residual, width 16k: the L0 suffixes released at layer 9 (SAELens pretrained_saes.yaml,
# gemma-scope-9b-pt-res) and the canonical picks at layers 20 and 31 — they differ per layer.
RELEASED = {9: [9, 16, 28, 51, 100, 209], 20: [68], 31: [114]}


@pytest.fixture
def scope(tmp_path):
    for layer, l0s in RELEASED.items():
        for l0 in l0s:
            d = tmp_path / f"layer_{layer}" / "width_16k" / f"average_l0_{l0}"
            d.mkdir(parents=True)
            (d / "params.npz").write_bytes(b"")
    return tmp_path


def test_l0_is_read_from_the_path():
    assert l0_of("/x/layer_9/width_16k/average_l0_100/params.npz") == 100
    assert l0_of("sae_l0-32.pt") == 32 and l0_of("/x/ae.pt") is None


def test_glob_picks_the_closest_l0_and_says_so(scope, caplog):
    pattern = str(scope / "layer_{layer}" / "width_16k" / "average_l0_*" / "params.npz")
    with caplog.at_level(logging.WARNING, logger="lorascope"):
        picks = resolve_reference_paths(pattern, [9, 20, 31], target_l0=71)
    assert {L: p.l0 for L, p in picks.items()} == {9: 51, 20: 68, 31: 114}  # |51-71| = 20 < |100-71| = 29
    assert picks[9].path == scope / "layer_9/width_16k/average_l0_51/params.npz"
    assert [c for _, c in picks[9].candidates] == [100, 16, 209, 28, 51, 9]  # sorted by path text
    assert "layer 9: picked" in caplog.text and "average_l0_51" in caplog.text and "L0 51" in caplog.text
    assert resolve_reference_paths(pattern, [9], target_l0=150)[9].l0 == 100  # 50 away vs 59 for 209
    assert resolve_reference_paths(pattern, [9], target_l0=22)[9].l0 == 16  # tie 16 / 28 -> the lower L0
    with pytest.raises(LorascopeError, match="6 files match .*Fix: set reference_sae.target_l0"):
        resolve_reference_paths(pattern, [9])


def test_mapping_and_template(scope):
    mapping = {
        9: str(scope / "layer_9/width_16k/average_l0_100/params.npz"),
        "20": str(scope / "layer_20/width_16k/average_l0_68/params.npz"),
    }
    picks = resolve_reference_paths(mapping, [9, 20])
    assert picks[20].rule == "mapping" and picks[20].l0 == 68 and str(picks[9].path) == mapping[9]
    with pytest.raises(LorascopeError, match="reference_sae.path has no entry for layer 31"):
        resolve_reference_paths(mapping, [9, 20, 31])
    # the old hard-coded suffix fails at the first layer that does not have it, naming the file
    template = str(scope / "layer_{layer}/width_16k/average_l0_68/params.npz")
    assert resolve_reference_paths(template, [20])[20].rule == "template"
    with pytest.raises(LorascopeError, match=r"layer 9: .*layer_9/width_16k/average_l0_68/params.npz does not exist"):
        resolve_reference_paths(template, [9, 20])
    with pytest.raises(LorascopeError, match="layer 9: nothing matches"):
        resolve_reference_paths(str(scope / "layer_{layer}/width_65k/*/params.npz"), [9], target_l0=50)


def test_gemma_config_names_the_released_file_of_each_layer():
    from pathlib import Path

    from lorascope.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "gemma2_9b_gemmascope.yaml")
    paths = cfg.reference_sae.path
    assert isinstance(paths, dict) and sorted(paths) == cfg.extraction.layers == [9, 20, 31]
    assert {L: l0_of(p) for L, p in paths.items()} == {9: 100, 20: 68, 31: 114}
