"""Adapter sanity gate: zero, diverged and mismatched adapters; did-not-learn; negligible Δ."""

from __future__ import annotations

import json

import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.models import load_base
from lorascope.models.sanity import (
    check_delta,
    check_learning,
    check_recipes,
    check_weights,
    excluded,
    recipe_from_folder,
    update_norms,
)


def _peft(model, init=False, targets=("q_proj", "v_proj"), r=2, name="adapt"):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=init)
    return get_peft_model(model, cfg, adapter_name=name)


def _lora_weights(pm):
    return {n: p.detach() for n, p in pm.named_parameters() if "lora_" in n}


def test_zero_adapter_is_a_no_op_and_excluded(tiny_llama_dir):
    pm = _peft(load_base(tiny_llama_dir).model, init=True)  # PEFT default: B = 0
    ws = check_weights("r2", _lora_weights(pm))
    assert [(w.kind, w.exclude) for w in ws] == [("no_op", True)]
    assert "no-op" in ws[0].message and "\n" not in ws[0].message
    assert excluded(ws) == {"r2": ws[0].message}


def test_diverged_adapter_is_excluded(tiny_llama_dir):
    pm = _peft(load_base(tiny_llama_dir).model)
    w = _lora_weights(pm)
    key = next(k for k in w if "lora_B" in k)
    w[key] = w[key].clone()
    w[key][0, 0] = float("nan")
    ws = check_weights("r2", w)
    assert [(x.kind, x.exclude) for x in ws] == [("non_finite", True)] and key in ws[0].message


def test_trained_like_adapter_passes_and_update_norms_are_exact(tiny_llama_dir):
    pm = _peft(load_base(tiny_llama_dir).model)
    w = _lora_weights(pm)
    assert check_weights("r2", w) == []
    norms = update_norms(w, scaling=2.0)
    mod = next(iter(norms))
    A = w[f"{mod}.lora_A.adapt.weight"].double()
    B = w[f"{mod}.lora_B.adapt.weight"].double()
    assert norms[mod] == pytest.approx(float((2.0 * B @ A).norm()), rel=1e-10)
    with pytest.raises(LorascopeError, match="lacks lora_B"):
        update_norms({k: v for k, v in w.items() if "lora_B" not in k})


def test_did_not_learn_and_negligible_delta():
    assert check_learning("r4", 1.0, 0.6) == []
    ws = check_learning("r4", 1.0, 1.02)
    assert ws[0].kind == "did_not_learn" and not ws[0].exclude
    assert check_learning("r4", 1.0, 0.99, min_gain=0.05)[0].kind == "did_not_learn"
    assert check_delta("r4", 1e-3, 10.0) == []
    assert check_delta("r4", 1e-9, 10.0)[0].exclude
    assert check_delta("r4", float("nan"), 10.0)[0].kind == "non_finite"


def test_mismatched_recipes_warn(tiny_llama_dir, tmp_path):
    recipes = {}
    for name, targets, r, data in (
        ("r2", ("q_proj", "v_proj"), 2, "pirate"),
        ("r4", ("q_proj", "v_proj"), 4, "pirate"),
        ("r8", ("q_proj", "o_proj"), 8, "math"),
    ):
        pm = _peft(load_base(tiny_llama_dir).model, targets=targets, r=r, name="default")
        pm.save_pretrained(tmp_path / name)
        (tmp_path / name / "training_metadata.json").write_text(json.dumps({"data": data, "steps": 30}))
        recipes[name] = recipe_from_folder(tmp_path / name)
    assert check_recipes({k: recipes[k] for k in ("r2", "r4")}) == []  # ranks differ, recipe agrees (α/r = 2)
    ws = check_recipes(recipes)
    kinds = sorted(w.message.split(" differ in ")[1].split(":")[0] for w in ws)
    assert kinds == ["data", "target_modules"]
    assert all(w.kind == "recipe" and not w.exclude for w in ws)
    with pytest.raises(LorascopeError, match="adapter_config.json"):
        recipe_from_folder(tmp_path)
