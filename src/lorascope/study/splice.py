"""The splice test: how much of the adapter's effect on the output does a reconstruction Δ̂ carry?

For held-out documents, run base and adapted rows in one mixed batch, read h_base and h_ft at block ``layer``,
then rerun the adapted model with the residual at that block replaced by h_base + Δ̂ (Δ̂ from a reconstructor,
e.g. the adapter SAE applied to Δ = h_ft − h_base). With next-token distributions p_ft, p_base, p_splice:

    KL recovered = 1 − Σ_t KL(p_ft ‖ p_splice) / Σ_t KL(p_ft ‖ p_base)

1 means the splice reproduces the adapted outputs; 0 means it is no better than dropping the adapter's change at
that layer (values < 0 are possible: worse than the base residual). Sums run over the selected tokens (padding
and the first ``skip_first`` positions excluded; those positions keep their true adapted residual). Needs the
model, so it lives in the study rather than in geometry/.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lorascope.data.chat import TokenizedExample
from lorascope.models.lora import collate
from lorascope.models.residual import check_layers, decoder_blocks

Reconstructor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (h_base [N,d], h_ft [N,d]) -> Δ̂ [N,d]


def _kl_rows(logp_p: torch.Tensor, logp_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from log-probabilities [N, V] (float64 sums)."""
    return (logp_p.exp() * (logp_p - logp_q)).sum(-1, dtype=torch.float64)


def _block_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def splice_kl(peft_model, pad_id: int, docs: Sequence[TokenizedExample], layer: int, adapter: str,
              reconstructors: dict[str, Reconstructor], batch_size: int = 8,
              skip_first: int = 1) -> dict[str, float]:
    """Return {"kl_adapted_vs_base": mean KL per token, "kl_recovered_<name>": fraction, "n_tokens": N}."""
    check_layers(peft_model, [layer])
    block = decoder_blocks(peft_model)[layer]
    peft_model.eval()
    totals = {"base": 0.0, **{name: 0.0 for name in reconstructors}}
    n_tok = 0
    for i in range(0, len(docs), batch_size):
        chunk = list(docs[i: i + batch_size])
        b = len(chunk)
        batch = collate(chunk * 2, pad_id)
        ids, att = batch["input_ids"], batch["attention_mask"]
        captured: dict[str, torch.Tensor] = {}

        def grab(_m, _inp, out, captured=captured):
            captured["h"] = _block_output(out).detach()

        handle = block.register_forward_hook(grab)
        try:
            logits = peft_model(input_ids=ids, attention_mask=att,
                                adapter_names=["__base__"] * b + [adapter] * b).logits.float()
        finally:
            handle.remove()
        h_base, h_ft = captured["h"][:b], captured["h"][b:]
        sel = att[:b].bool().clone()
        sel[:, :skip_first] = False
        logp_base = torch.log_softmax(logits[:b][sel], -1)
        logp_ft = torch.log_softmax(logits[b:][sel], -1)
        totals["base"] += float(_kl_rows(logp_ft, logp_base).sum())
        n_tok += int(sel.sum())
        for name, recon in reconstructors.items():
            delta_hat = recon(h_base[sel].float(), h_ft[sel].float()).to(h_ft.dtype)
            replaced = h_ft.clone()
            replaced[sel] = h_base[sel] + delta_hat

            def put(_m, _inp, out, replaced=replaced):
                return (replaced, *out[1:]) if isinstance(out, tuple) else replaced

            handle = block.register_forward_hook(put)
            try:
                spliced = peft_model(input_ids=ids[b:], attention_mask=att[b:],
                                     adapter_names=[adapter] * b).logits.float()
            finally:
                handle.remove()
            totals[name] += float(_kl_rows(logp_ft, torch.log_softmax(spliced[sel], -1)).sum())
    out = {"kl_adapted_vs_base": totals["base"] / max(n_tok, 1), "n_tokens": float(n_tok)}
    for name in reconstructors:
        out[f"kl_recovered_{name}"] = 1.0 - totals[name] / totals["base"] if totals["base"] > 0 else float("nan")
    return out
