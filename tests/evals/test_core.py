"""SAEBench core metrics (evals/core.py) on a tiny random Llama: exact end points and golden values."""

from __future__ import annotations

import math

import pytest
import torch

from lorascope.data import make_demo_dataset, tokenize_example
from lorascope.evals.core import CoreOptions, core_metrics, mean_max_decoder_cosine
from lorascope.models import load_base
from lorascope.models.residual import decoder_blocks
from lorascope.saes.base import create_sae


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    base = load_base(tiny_llama_dir)
    docs = [tokenize_example(base.tokenizer, ex) for ex in make_demo_dataset(5, seed=2)]
    return base, docs


def _identity_relu(d: int):
    """relu(x) − relu(−x) = x exactly: a ReLU 'SAE' whose reconstruction is its input."""
    sae = create_sae("relu", d, 2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _constant_relu(d: int, value: torch.Tensor):
    """Every code 0 (b_enc very negative): the reconstruction is b_dec = ``value`` on every token."""
    sae = create_sae("relu", d, 4)
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)
        sae.b_dec.copy_(value)
    return sae


def test_identity_sae_scores_one_and_fvu_zero(tiny):
    base, docs = tiny
    m = core_metrics(
        base.model, base.tokenizer, _identity_relu(base.d_model), 1, docs, options=CoreOptions(batch_size=2)
    )
    assert m["ce_score"] == 1.0 and m["kl_score"] == 1.0 and m["kl_sae"] == 0.0
    assert m["ce_sae"] == m["ce_clean"] and m["fvu"] == 0.0 and m["explained_variance"] == 1.0
    assert m["kl_zero"] > 0 and m["ce_zero"] != m["ce_clean"]  # (a random tiny model: either sign)
    assert m["n_tokens"] == sum(len(d) - 1 for d in docs) and m["n_docs"] == 5


def test_zero_output_sae_equals_zero_ablation(tiny):
    base, docs = tiny
    sae = _constant_relu(base.d_model, torch.zeros(base.d_model))
    m = core_metrics(base.model, base.tokenizer, sae, 0, docs, options=CoreOptions(batch_size=3, skip_first=0))
    assert m["ce_score"] == 0.0 and m["kl_score"] == 0.0
    assert m["l0"] == 0.0 and m["frac_alive"] == 0.0


def _hf_loss(model, ids, hook=None, layer=1):
    block = decoder_blocks(model)[layer]
    h = block.register_forward_hook(hook) if hook else None
    try:
        return float(model(input_ids=ids, labels=ids).loss)
    finally:
        if h:
            h.remove()


def test_golden_values_against_hf_loss_and_hand_counts(tiny):
    """One unpadded document, skip_first=0: the three CE means are transformers' own LM loss under the same hooks;
    an SAE that outputs the eval-set mean μ has FVU exactly 1."""
    base, docs = tiny
    model, doc = base.model, docs[0]
    ids = torch.tensor([doc.input_ids])
    captured = {}
    _hf_loss(model, ids, lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    mu = captured["h"][0].double().mean(0).float()

    def put(value):
        def hook(_m, _i, out):
            h = out[0] if isinstance(out, tuple) else out
            new = torch.zeros_like(h) + value
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return hook

    ce_clean = _hf_loss(model, ids)
    ce_mu = _hf_loss(model, ids, put(mu))
    ce_zero = _hf_loss(model, ids, put(0.0))
    m = core_metrics(
        model, base.tokenizer, _constant_relu(base.d_model, mu), 1, [doc], options=CoreOptions(skip_first=0)
    )
    assert m["ce_clean"] == pytest.approx(ce_clean, rel=1e-5)
    assert m["ce_sae"] == pytest.approx(ce_mu, rel=1e-5) and m["ce_zero"] == pytest.approx(ce_zero, rel=1e-5)
    assert m["ce_score"] == pytest.approx((ce_zero - ce_mu) / (ce_zero - ce_clean), rel=1e-3)  # float32 HF loss
    assert m["fvu"] == pytest.approx(1.0, abs=1e-6) and m["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert m["n_tokens"] == len(doc)


def test_raw_strings_are_tokenised_and_layer_is_checked(tiny):
    base, _ = tiny
    from lorascope.errors import LorascopeError

    m = core_metrics(base.model, base.tokenizer, _identity_relu(base.d_model), 2, ["hello there world", "a b c d"])
    assert m["ce_score"] == 1.0 and m["n_docs"] == 2
    with pytest.raises(LorascopeError, match="out of range"):
        core_metrics(base.model, base.tokenizer, _identity_relu(base.d_model), 99, ["hello there"])
    with pytest.raises(LorascopeError, match="expects"):
        core_metrics(base.model, base.tokenizer, _identity_relu(base.d_model + 1), 0, ["hello there"])


def test_mean_max_decoder_cosine_golden():
    sae = create_sae("relu", 3, 4)
    e = torch.eye(3)
    with torch.no_grad():
        sae.W_dec.copy_(torch.stack([e[0], 2 * e[0], e[1], (e[0] + e[1])]))
    # maxima excluding self: rows 0, 1 -> 1 (each other); row 2 -> 1/√2 (row 3); row 3 -> 1/√2
    want = (1 + 1 + 1 / math.sqrt(2) + 1 / math.sqrt(2)) / 4
    assert mean_max_decoder_cosine(sae, chunk=3) == pytest.approx(want, rel=1e-12)


def test_cli_evaluate_writes_metrics_and_rejects_missing_layer(tiny, tiny_llama_dir, tmp_path, capsys):
    import json

    from lorascope.cli import main
    from lorascope.saes.formats import save_sae

    base, _ = tiny
    folder = save_sae(_identity_relu(base.d_model), tmp_path / "ident")
    out = tmp_path / "core.json"
    main(
        [
            "evaluate",
            "--model",
            str(tiny_llama_dir),
            "--sae",
            str(folder),
            "--layer",
            "1",
            "--n-docs",
            "3",
            "--out",
            str(out),
        ]
    )
    m = json.loads(out.read_text())
    assert m["ce_score"] == 1.0 and m["kl_score"] == 1.0 and m["fvu"] == 0.0 and m["n_docs"] == 3
    assert "ce_score" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--model", str(tiny_llama_dir), "--sae", str(folder)])
    assert exc.value.code == 2 and "pass --layer L" in capsys.readouterr().err


def test_reference_cache_gives_identical_numbers(tiny):
    base, docs = tiny
    sae = create_sae("topk", base.d_model, 64, k=4, seed=3)
    cache: dict = {}
    first = core_metrics(base.model, base.tokenizer, sae, 1, docs, options=CoreOptions(batch_size=2), cache=cache)
    again = core_metrics(base.model, base.tokenizer, sae, 1, docs, options=CoreOptions(batch_size=2), cache=cache)
    plain = core_metrics(base.model, base.tokenizer, sae, 1, docs, options=CoreOptions(batch_size=2))
    assert first == again == plain and 0 < first["fvu"] and first["l0"] == 4.0
    # new key: recomputed
    other = core_metrics(base.model, base.tokenizer, sae, 2, docs, options=CoreOptions(batch_size=2), cache=cache)
    assert other == core_metrics(base.model, base.tokenizer, sae, 2, docs, options=CoreOptions(batch_size=2))
    assert other["fvu"] != first["fvu"]
