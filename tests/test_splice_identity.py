"""The fast splice (prefix once, only the blocks after the layer, all reconstructors in one forward, logits at the
selected positions) equals the unoptimised one (one full forward per reconstructor, kept at the end of this file)
on every field of SpliceResult, for a Llama, a Gemma-2 and a GPT-2, at a middle and at the last layer."""

import math
from collections.abc import Sequence

import pytest
import torch

from lorascope.activations.tokens import TokenSelection
from lorascope.data import make_demo_dataset, tokenize_example
from lorascope.data.chat import TokenizedExample
from lorascope.errors import LorascopeError
from lorascope.models import load_base
from lorascope.models.lora import collate
from lorascope.models.residual import check_layers, decoder_blocks
from lorascope.models.testing import random_adapters
from lorascope.study.splice import (
    Reconstructor,
    SpliceResult,
    _block_output,
    _kl_rows,
    _reconstructors,
    _result,
    _selected,
    splice_kl,
)

TOL = 1e-5


def _recons(d: int) -> dict:
    torch.manual_seed(7)
    w = torch.randn(d, d) / d**0.5
    return {"exact": lambda hb, hf: hf - hb, "half": lambda hb, hf: 0.5 * (hf - hb),
            "linear": lambda hb, hf, w=w: (hf - hb) @ w,
            "ref_diff": lambda hb, hf, w=w: torch.tanh(hf @ w) - torch.tanh(hb @ w)}


def _close(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= TOL * max(1.0, abs(b))


def _assert_same(fast, ref) -> None:
    assert fast.n_tokens == ref.n_tokens and fast.doc_tokens == ref.doc_tokens
    assert _close(fast.kl_adapted_vs_base, ref.kl_adapted_vs_base)
    for field in ("kl", "recovered", "recovered_raw"):
        a, b = getattr(fast, field), getattr(ref, field)
        assert list(a) == list(b), field
        assert all(_close(a[k], b[k]) for k in a), (field, a, b)
    assert list(fast.doc_kl) == list(ref.doc_kl)
    for name in fast.doc_kl:
        assert all(_close(x, y) for x, y in zip(fast.doc_kl[name], ref.doc_kl[name], strict=True)), name


@pytest.fixture(scope="module", params=["llama", "gemma2", "gpt2"])
def world(request, tiny_model_dirs):
    base = load_base(tiny_model_dirs[request.param])
    pm = random_adapters(base.model, [2, 4], scale=0.5, seed=1)
    docs = [tokenize_example(base.tokenizer, ex) for ex in make_demo_dataset(7, seed=2)]
    return base, pm, docs


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_fast_splice_equals_the_reference(world, layer):
    base, pm, docs = world
    d = base.model.config.hidden_size
    mean = torch.randn(d, generator=torch.Generator().manual_seed(3)) * 0.1
    kw = dict(batch_size=3, mean_delta=mean)
    ref = reference_splice_kl(pm, base.tokenizer.pad_token_id, docs, layer, "r4", _recons(d), **kw)
    fast = splice_kl(pm, base.tokenizer.pad_token_id, docs, layer, "r4", _recons(d), **kw)
    assert ref.kl_adapted_vs_base > 0 and ref.kl["zero"] > 0 or layer == base.num_layers - 1
    _assert_same(fast, ref)
    # the memory bound splits the suffix into one forward per splice without changing a number
    one_by_one = splice_kl(pm, base.tokenizer.pad_token_id, docs, layer, "r4", _recons(d), max_logit_bytes=1, **kw)
    _assert_same(one_by_one, ref)


def test_fast_splice_equals_the_reference_with_the_norm_rule(world):
    base, pm, docs = world
    sel = TokenSelection("all", 1, 1.2)
    kw = dict(batch_size=4, selection=sel, norm_layers=[0, 1, 2])
    d = base.model.config.hidden_size
    ref = reference_splice_kl(pm, base.tokenizer.pad_token_id, docs, 1, "r2", _recons(d), **kw)
    fast = splice_kl(pm, base.tokenizer.pad_token_id, docs, 1, "r2", _recons(d), **kw)
    assert ref.n_tokens < sum(len(doc) - 1 for doc in docs)  # the norm rule dropped positions
    _assert_same(fast, ref)


# ---- the unoptimised splice, verbatim from before the fast path: the reference ----

@torch.no_grad()
def reference_splice_kl(peft_model, pad_id: int, docs: Sequence[TokenizedExample], layer: int, adapter: str,
              reconstructors: dict[str, Reconstructor], batch_size: int = 8, skip_first: int = 1, *,
              mean_delta=None, selection: TokenSelection | None = None, norm_layers: Sequence[int] | None = None,
              keep_positions: Sequence[Sequence[int]] | None = None) -> SpliceResult:
    """Splice every reconstructor (plus the ``zero`` and ``mean_delta`` baselines) at block ``layer``.

    ``mean_delta`` [d]: mean Δ over the *training* documents at this layer and adapter (omit: no mean baseline).
    ``selection``: the extraction's ``TokenSelection`` (default: all non-padding tokens from ``skip_first`` on,
    no norm rule — the old behaviour); ``norm_layers``: the layers extraction captured (default ``[layer]``);
    ``keep_positions``: per document, the exact positions the store kept (overrides ``selection``).
    Returns a :class:`SpliceResult` (``.to_dict()`` gives the previous flat dict plus the new keys).
    """
    layers = check_layers(peft_model, sorted({layer, *(norm_layers or [layer])}))
    blocks = decoder_blocks(peft_model)
    selection = selection or TokenSelection("all", skip_first, None)
    if keep_positions is not None and len(keep_positions) != len(docs):
        raise LorascopeError(f"keep_positions has {len(keep_positions)} entries for {len(docs)} documents",
                             fix="pass one list of positions per document")
    recons = _reconstructors(reconstructors, mean_delta)
    peft_model.eval()
    doc_kl = {name: [] for name in ("base", *recons)}
    doc_tokens: list[int] = []
    for start in range(0, len(docs), batch_size):
        chunk = list(docs[start: start + batch_size])
        b = len(chunk)
        batch = collate(chunk * 2, pad_id)
        ids, att = batch["input_ids"], batch["attention_mask"]
        logits, caps = _mixed_forward(peft_model, blocks, layers, ids, att, ["__base__"] * b + [adapter] * b)
        sel = _selected(att, chunk, caps, b, selection, keep_positions, start)
        rows = sel.nonzero(as_tuple=True)[0]
        doc_tokens += sel.sum(1).tolist()
        h_base, h_ft = caps[layer][:b], caps[layer][b:]
        logp_ft = torch.log_softmax(logits[b:][sel], -1)
        doc_kl["base"] += _per_doc(b, rows, _kl_rows(logp_ft, torch.log_softmax(logits[:b][sel], -1)))
        for name, recon in recons.items():
            logp = _spliced_logp(peft_model, blocks[layer], recon, h_base, h_ft, sel, ids[b:], att[b:], adapter)
            doc_kl[name] += _per_doc(b, rows, _kl_rows(logp_ft, logp))
    return _result(doc_kl, doc_tokens)


def _per_doc(b: int, rows: torch.Tensor, kl: torch.Tensor) -> list[float]:
    """Per-document sums [b] of per-token KL values (``rows``: the document of each selected token)."""
    return torch.zeros(b, dtype=torch.float64).index_add_(0, rows, kl).tolist()


def _mixed_forward(peft_model, blocks, layers: list[int], ids: torch.Tensor, att: torch.Tensor,
                   names: list[str]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Logits (float32) of one mixed base/adapted forward and the residual outputs of ``layers``' blocks."""
    caps: dict[int, torch.Tensor] = {}

    def grab(layer: int):
        def hook(_m, _i, out):
            caps[layer] = _block_output(out).detach()
        return hook

    handles = [blocks[L].register_forward_hook(grab(L)) for L in layers]
    try:
        logits = peft_model(input_ids=ids, attention_mask=att, adapter_names=names).logits.float()
    finally:
        for h in handles:
            h.remove()
    return logits, caps


def _spliced_logp(peft_model, block, recon: Reconstructor, h_base: torch.Tensor, h_ft: torch.Tensor,
                  sel: torch.Tensor, ids: torch.Tensor, att: torch.Tensor, adapter: str) -> torch.Tensor:
    """Log-probabilities at the selected positions of the adapted model with h_base + Δ̂ at ``block``."""
    delta_hat = recon(h_base[sel].float(), h_ft[sel].float()).to(h_ft.dtype)
    replaced = h_ft.clone()
    replaced[sel] = h_base[sel] + delta_hat

    def put(_m, _inp, out, replaced=replaced):
        return (replaced, *out[1:]) if isinstance(out, tuple) else replaced

    handle = block.register_forward_hook(put)
    try:
        spliced = peft_model(input_ids=ids, attention_mask=att, adapter_names=[adapter] * ids.shape[0]).logits
    finally:
        handle.remove()
    return torch.log_softmax(spliced.float()[sel], -1)
