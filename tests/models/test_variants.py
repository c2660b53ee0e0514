"""PEFT variants through extraction (rsLoRA, modules_to_save, DoRA), adapters by hub id, checkpoint sequences."""

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lorascope.activations import ExtractConfig, extract
from lorascope.activations.extract import mixed_batch_forward, separate_forward
from lorascope.data import make_demo_dataset
from lorascope.errors import LorascopeError
from lorascope.models import load_adapters, load_base
from lorascope.models.finetunes import checkpoint_sequence, expand_load_specs, sequence_rows
from lorascope.models.residual import ResidualCapture
from lorascope.models.variants import mixed_batch_support, resolve_adapter_source


def _save_adapter(base_dir, out, scale=1.0, seed=0, **cfg):
    """A random non-zero adapter of the tiny Llama saved in PEFT's format (lora_B scaled by ``scale``)."""
    model = load_base(base_dir).model
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **cfg
    )
    pm = get_peft_model(model, config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.3 * scale)
            if "modules_to_save" in n:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(out)
    return out


def _mixed_vs_separate(pm, layers=(0, 2)):
    cap = ResidualCapture(pm, list(layers))
    ids = torch.randint(5, 120, (3, 9))
    att = torch.ones_like(ids)
    return separate_forward(pm, cap, ["a"])(ids, att), cap, ids, att


@pytest.mark.parametrize(
    "kind, cfg", [("rslora", {"use_rslora": True}), ("modules_to_save", {"modules_to_save": ["embed_tokens"]})]
)
def test_rslora_and_modules_to_save_serve_mixed_batches(tiny_llama_dir, tmp_path, kind, cfg):
    path = _save_adapter(tiny_llama_dir, tmp_path / kind, **cfg)
    pm = load_adapters(load_base(tiny_llama_dir), {"a": path})
    assert mixed_batch_support(pm, ["a"]) == {"a": None}
    sep, cap, ids, att = _mixed_vs_separate(pm)
    mixed = mixed_batch_forward(cap, ["a"])(ids, att)
    for L in sep:
        assert torch.allclose(mixed[L], sep[L], atol=1e-5), L
        assert (sep[L][3:] - sep[L][:3]).norm() > 1e-3  # the adapter changes the residual stream
    if kind == "rslora":
        layer = pm.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["a"] == pytest.approx(8 / 4**0.5)


@pytest.mark.parametrize(
    "kind, cfg, why",
    [
        ("dora", {"use_dora": True}, r"DoRA: PEFT .* refuses DoRA"),
        ("norm_saved", {"modules_to_save": ["norm"]}, r"modules_to_save on .*norm \(LlamaRMSNorm\)"),
    ],
)
def test_unsupported_variants_fall_back_to_separate_forwards(tiny_llama_dir, tmp_path, caplog, kind, cfg, why):
    path = _save_adapter(tiny_llama_dir, tmp_path / kind, **cfg)
    base = load_base(tiny_llama_dir)
    pm = load_adapters(base, {"a": path})
    support = mixed_batch_support(pm, ["a"])
    assert support["a"] and __import__("re").search(why, support["a"])
    _, cap, ids, att = _mixed_vs_separate(pm)
    cap.grouped = False  # a real PEFT mixed batch (on CPU contiguous rows would run adapter by adapter)
    with pytest.raises((ValueError, TypeError)):  # what PEFT itself does with a mixed batch (the claim we rely on)
        mixed_batch_forward(cap, ["a"])(ids, att)
    examples = make_demo_dataset(4, seed=2)
    cfg_x = ExtractConfig(layers=[1], batch_size=2, docs_per_shard=4, progress=False)
    with caplog.at_level(logging.WARNING, logger="lorascope"):
        store = extract(pm, base.tokenizer, examples, tmp_path / "store", cfg_x)
    assert "separate forwards" in caplog.text and "a: " in caplog.text
    assert store.manifest["config"]["adapters"]["forward"] == "separate"
    # rows equal a hand-run of the adapted model minus the base (same padded batches)
    from lorascope.activations.extract import tokenize_docs
    from lorascope.models.lora import collate

    toks = tokenize_docs(base.tokenizer, examples, 256)
    batch = collate(toks[:2], base.tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        pm.set_adapter("a")
        h_ad = pm(**inputs, output_hidden_states=True).hidden_states[2]
        with pm.disable_adapter():
            h_b = pm(**inputs, output_hidden_states=True).hidden_states[2]
    t = store.load_shard(0, ["doc_index", "position", "delta.L1.a"])
    first = t["doc_index"] < 2
    want = (h_ad - h_b)[t["doc_index"][first], t["position"][first].long()]
    assert torch.allclose(t["delta.L1.a"][first], want, atol=1e-6) and want.norm() > 0


def test_hub_id_offline_is_one_line_with_the_folder_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        LorascopeError,
        match=r"adapter .x.: there is no folder org/some-lora, and as a hub id it "
        r"cannot be fetched: the hub is offline.*huggingface-cli download "
        r"org/some-lora --local-dir DIR",
    ):
        resolve_adapter_source("x", "org/some-lora")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_adapter_source("x", "org/some-lora") == "org/some-lora"  # online: handed to PEFT as is
    with pytest.raises(LorascopeError, match="folder ./missing/adapter does not exist"):
        resolve_adapter_source("x", "./missing/adapter")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorascopeError, match="has no adapter_config.json"):
        resolve_adapter_source("x", tmp_path / "empty")


@pytest.fixture(scope="module")
def run_dir(tiny_llama_dir, tmp_path_factory):
    """A trainer output folder with 3 checkpoints (steps 5, 10, 100; written out of order) of one adapter whose
    update grows with the step."""
    root = tmp_path_factory.mktemp("run")
    for step, scale in ((100, 3.0), (5, 1.0), (10, 2.0)):
        _save_adapter(tiny_llama_dir, root / f"checkpoint-{step}", scale=scale)
    (root / "runs").mkdir()  # tensorboard logs and other files are ignored
    return root


def test_checkpoint_sequence_is_ordered_by_step(run_dir, tmp_path):
    seq = checkpoint_sequence(run_dir)
    assert [(n, s) for n, s, _ in seq] == [("step_5", 5), ("step_10", 10), ("step_100", 100)]
    assert all(p.name == f"checkpoint-{s}" for _, s, p in seq)
    with pytest.raises(LorascopeError, match="holds no checkpoint-<step>/ folders"):
        checkpoint_sequence(tmp_path)
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(LorascopeError, match="checkpoint-3 is neither a PEFT adapter"):
        checkpoint_sequence(tmp_path)


def test_expand_load_specs(run_dir, tiny_llama_dir, tiny_adapters):
    from lorascope.config import parse_config

    cfg = parse_config(
        {
            "adapters": {
                "train": None,
                "load": {
                    "lora": str(tiny_adapters["rank_2"]),
                    "full": {"model": str(tiny_llama_dir)},
                    "run": {"checkpoints": str(run_dir)},
                },
            }
        }
    )
    entries = expand_load_specs(cfg.adapters.load)
    assert [(e.name, e.kind, e.step) for e in entries] == [
        ("lora", "peft", None),
        ("full", "full", None),
        ("run_step_5", "peft", 5),
        ("run_step_10", "peft", 10),
        ("run_step_100", "peft", 100),
    ]
    with pytest.raises(LorascopeError, match=r"adapters.load.m.model: .* is not a model folder"):
        expand_load_specs({"m": {"model": str(run_dir)}})


def test_checkpoint_sequence_gives_one_row_per_checkpoint(run_dir, tiny_llama_dir, tmp_path):
    base = load_base(tiny_llama_dir)
    seq = checkpoint_sequence(run_dir)
    pm = load_adapters(base, {name: path for name, _, path in seq})
    store = extract(
        pm,
        base.tokenizer,
        make_demo_dataset(6, seed=3),
        tmp_path / "s",
        ExtractConfig(layers=[1], batch_size=3, docs_per_shard=3, progress=False),
    )
    rows = sequence_rows(store, 1, seq)
    assert [r["step"] for r in rows] == [5, 10, 100] and len({r["n_tokens"] for r in rows}) == 1
    norms = [r["delta_norm_mean"] for r in rows]
    assert norms[0] < norms[1] < norms[2]  # the update grows with the step, so does the Δ norm


def test_hub_id_online_is_handed_to_peft(tiny_llama_dir, monkeypatch):
    from peft import PeftModel

    seen = []

    def fake_from_pretrained(model, path, **kw):
        seen.append(path)
        raise OSError("404 Client Error")  # what the hub answers for an unknown id

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(PeftModel, "from_pretrained", fake_from_pretrained)
    with pytest.raises(
        LorascopeError,
        match=r"adapter 'x': could not fetch org/some-lora from the Hugging Face hub "
        r"\(OSError\)",
    ):
        load_adapters(load_base(tiny_llama_dir), {"x": "org/some-lora"})
    assert seen == ["org/some-lora"]
