"""The metric-name contract: built names match the catalogue, and the report's names are declared there."""

from __future__ import annotations

from lorascope import results_schema as schema


def test_built_names_are_the_table_names():
    assert schema.FVU_REF_DIFF == "fvu_ref_diff" and schema.fvu(schema.NOISE) == "fvu_noise"
    assert schema.overlap("adapter", "ref", 0.5) == "overlap_adapter_to_ref@0.5"
    assert schema.overlap_tau(schema.overlap("adapter", "ref", 0.9)) == 0.9
    assert schema.cka_delta_vs("rank_4") == "cka_delta_vs_rank_4"
    assert schema.rel_delta_norm("p90") == "rel_delta_norm_p90"


def test_lookup_finds_fixed_and_built_names_with_their_family_null_and_ci():
    m = schema.lookup(schema.FVU_ADAPTER_SAE)
    assert (m.family, m.null, m.ci) == ("reconstruction", "mean_predictor", "document")
    assert schema.lookup(schema.FVU_GAP_ADAPTER_SAE_VS_BEST_CONTROL).null == "best_control"
    assert schema.lookup(schema.MMCS_ADAPTER_TO_REF).null == schema.NULL_STRONGEST_ALIGNMENT
    assert schema.lookup(schema.mean_cos2(schema.PCA_DELTA_VS_LORA_COLSPACE)).null == "random_subspace"
    assert schema.lookup(schema.mean_cos2(schema.PCA_DELTA_VS_REF_TOPK)).null == ""  # selected on Δ: no k/d
    assert schema.lookup(schema.selected_cos2(schema.PCA_DELTA_VS_REF_TOPK)).null == schema.NULL_SELECTED_RANDOM
    assert schema.lookup(schema.kl_recovered_rel("zero")).ci == "document"
    assert schema.lookup(schema.cka_extra(schema.cka_delta_vs("rank_4"), "p")).family == "cka"
    assert schema.lookup("mmcs_adapter_to_cov_matched") is None  # the mislabelled row is gone
    assert schema.lookup(schema.overlap("ref", "adapter", 0.7)).family == "decoder_similarity"
    assert schema.lookup("fvu_ref_sae_difference") is None  # geometry's label, never a table name
    assert schema.lookup("overlap0.5_adapter_to_ref") is None


def test_every_fixed_name_is_unique():
    names = [m.name for m in schema._FIXED]
    assert len(names) == len(set(names))


def test_content_key_follows_bytes_not_timestamps(tmp_path):
    import os

    from lorascope.io import content_key

    (tmp_path / "a").mkdir()
    f = tmp_path / "a" / "adapter_model.safetensors"
    f.write_bytes(b"weights-1")
    k1 = content_key(tmp_path / "a")
    os.utime(f, (1, 1))
    assert content_key(tmp_path / "a") == k1  # same bytes, new mtime: same key
    f.write_bytes(b"weights-2")
    os.utime(f, (1, 1))
    assert content_key(tmp_path / "a") != k1  # rewritten in place with an old mtime: new key
