"""Feature-browser export: window selection with de-duplication, record validation, JSON schema."""

from __future__ import annotations

import json

import pytest
import torch

from lorascope.activations.feature_export import FORMAT, export_features_json, feature_record, top_windows
from lorascope.errors import LorascopeError

SYS = ["<|im_start|>", "system", "You", "are", "SmolLM"]


def test_top_windows_dedupes_identical_contexts_and_orders_by_activation():
    docs = [SYS + ["Arr", "matey"], SYS + ["Arr", "matey"], SYS + ["sum", "is"]]
    acts = [[0, 0, 0, 0, 5.0, 1.0, 0], [0, 0, 0, 0, 5.0, 1.0, 0], [0, 0, 0, 0, 0.0, 0, 3.0]]
    wins = top_windows(docs, acts, n=5, before=2, after=1, doc_ids=["a", "b", "c"])
    # the system-prompt peak (5.0) appears once although two documents have it; so does the 1.0 window
    assert [(w["docId"], w["maxValue"]) for w in wins] == [("a", 5.0), ("c", 3.0), ("a", 1.0)]
    assert wins[0]["tokens"] == ["You", "are", "SmolLM", "Arr"] and wins[0]["maxValueTokenIndex"] == 2
    assert wins[1]["tokens"] == ["SmolLM", "sum", "is"] and wins[1]["values"] == [0.0, 0.0, 3.0]
    assert all(w["values"][w["maxValueTokenIndex"]] == w["maxValue"] for w in wins)
    assert len({tuple(w["tokens"]) for w in wins}) == len(wins)
    with pytest.raises(LorascopeError, match="activations"):
        top_windows([["a"]], [[1.0, 2.0]])


def test_export_schema(tmp_path):
    dec = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    wins = top_windows([["x", "y", "z"]], [[0.0, 2.0, 1.0]], n=2, before=1, after=1)
    feats = [
        feature_record(7, dec[0], wins, {"stability": 1.0, "top_module": "1.self_attn.o_proj"}),
        feature_record(3, dec[1], []),
    ]
    doc = export_features_json(tmp_path / "f.json", "SmolLM2-135M-Instruct", 15, "rank_8", feats)
    loaded = json.loads((tmp_path / "f.json").read_text())
    assert loaded == doc
    assert set(loaded) == {"format", "modelId", "source", "layer", "adapter", "hook", "d_model", "features"}
    assert loaded["format"] == FORMAT and loaded["source"] == "15-lorascope-rank_8" and loaded["d_model"] == 6
    f0 = loaded["features"][0]
    assert set(f0) == {"index", "decoder", "maxActValue", "activations", "stability", "top_module"}
    assert f0["decoder"] == pytest.approx(dec[0].tolist()) and f0["maxActValue"] == 2.0
    act = f0["activations"][0]
    assert set(act) == {"docId", "tokens", "values", "maxValue", "maxValueTokenIndex"}
    assert loaded["features"][1]["maxActValue"] == 0.0
    with pytest.raises(LorascopeError, match="repeat"):
        export_features_json(tmp_path / "g.json", "m", 1, "a", [feats[0], feats[0]])
    assert not (tmp_path / "g.json").exists()
    with pytest.raises(LorascopeError, match="not finite"):
        feature_record(1, torch.tensor([float("nan")]), [])
