"""The unoptimised splice (one full mixed forward, then one full forward per reconstructor), kept as the test
oracle the fast path in :mod:`lorascope.study.splice` must equal to float tolerance (tests/test_splice_identity.py)
and as the "before" of benchmarks/splice.py. Same arguments as ``splice_kl``; ``options.recon_device`` and
``options.max_logit_bytes`` are ignored (the reconstructors run where the model is, all logits are computed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorascope.activations.tokens import TokenSelection
from lorascope.data.chat import TokenizedExample
from lorascope.models.lora import collate
from lorascope.models.residual import check_layers, decoder_blocks
from lorascope.models.suffix import kl_rows as _kl_rows
from lorascope.study.splice import (
    Reconstructor,
    SpliceOptions,
    SpliceResult,
    _block_output,
    _reconstructors,
    _result,
    _selected,
    check_keep_positions,
)


@torch.no_grad()
def reference_splice_kl(
    peft_model,
    pad_id: int,
    docs: Sequence[TokenizedExample],
    layer: int,
    adapter: str,
    reconstructors: dict[str, Reconstructor],
    options: SpliceOptions | None = None,
) -> SpliceResult:
    """Splice every reconstructor (plus the ``zero`` and ``mean_delta`` baselines) at block ``layer``.
    Returns a :class:`SpliceResult` (``.to_dict()`` gives the previous flat dict plus the new keys).
    """
    opt = options or SpliceOptions()
    batch_size, keep_positions = opt.batch_size, opt.keep_positions
    layers = check_layers(peft_model, sorted({layer, *(opt.norm_layers or [layer])}))
    blocks = decoder_blocks(peft_model)
    selection = opt.selection or TokenSelection("all", opt.skip_first, None)
    check_keep_positions(keep_positions, docs)
    recons = _reconstructors(reconstructors, opt.mean_delta)
    peft_model.eval()
    doc_kl = {name: [] for name in ("base", *recons)}
    doc_tokens: list[int] = []
    for start in range(0, len(docs), batch_size):
        chunk = list(docs[start : start + batch_size])
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


def _mixed_forward(
    peft_model, blocks, layers: list[int], ids: torch.Tensor, att: torch.Tensor, names: list[str]
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
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


def _spliced_logp(
    peft_model,
    block,
    recon: Reconstructor,
    h_base: torch.Tensor,
    h_ft: torch.Tensor,
    sel: torch.Tensor,
    ids: torch.Tensor,
    att: torch.Tensor,
    adapter: str,
) -> torch.Tensor:
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
