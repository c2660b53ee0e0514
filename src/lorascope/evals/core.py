"""SAEBench "core" metrics for any SAE on base-model residual activations.

Follows SAEBench's core eval (github.com/adamkarvonen/SAEBench, ``sae_bench/evals/core/main.py``:
``get_recons_loss``, ``get_downstream_reconstruction_metrics``, ``calculate_max_cosine_sim``). On the same tokens
the model runs three times: clean; with the residual after block ``layer`` replaced by the SAE's reconstruction
x̂ = sae(x) (scored positions only; the first ``skip_first`` positions of each document keep their true
residual, as SAEBench keeps special tokens); and with that residual zero-ablated at *every* position (SAEBench's
``standard_zero_ablate_hook``). Per scored token (means over all scored tokens of all documents):

    CE score = (CE_zero − CE_sae) / (CE_zero − CE_clean)        (next-token cross-entropy)
    KL score = (KL_zero − KL_sae) / KL_zero                      (KL(p_clean ‖ p_·) over the vocabulary)

so 1 = the splice is indistinguishable from the clean model and 0 = as bad as deleting the residual. Also:

- ``fvu`` = Σ‖x − x̂‖² / Σ‖x − μ‖² with μ the mean over the whole evaluation set and ``explained_variance`` =
  1 − fvu (SAEBench averages a per-token ratio against the batch mean instead; that is not the FVU);
- ``l0`` = mean number of non-zero codes per token; ``frac_alive`` = fraction of latents non-zero on at least
  one evaluated token;
- ``mean_max_decoder_cos`` = mean over latents of the largest cosine between its decoder row and any *other*
  row (redundancy; SAEBench's ``max_decoder_cosine_sim``, averaged).

Positions scored: inside the attention mask and at index ≥ ``skip_first``; CE additionally needs the next token
inside the document.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorascope.errors import LorascopeError
from lorascope.geometry.metrics import ReconstructionStats
from lorascope.models.residual import check_layers, decoder_blocks
from lorascope.saes.base import SAE


def _token_lists(tokenizer: Any, docs: Sequence[Any], max_length: int) -> list[list[int]]:
    """Token ids per document: strings are tokenised (truncated to ``max_length``); TokenizedExample or id
    sequences are used as they are."""
    out: list[list[int]] = []
    for d in docs:
        if isinstance(d, str):
            ids = tokenizer(d, add_special_tokens=True)["input_ids"][:max_length]
        else:
            ids = list(getattr(d, "input_ids", d))
        if len(ids) >= 2:
            out.append([int(i) for i in ids])
    if not out:
        raise LorascopeError("no evaluation document has 2 or more tokens", fix="pass longer documents")
    return out


def _pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(t) for t in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), n), dtype=torch.long)
    for i, t in enumerate(batch):
        ids[i, : len(t)] = torch.tensor(t)
        att[i, : len(t)] = 1
    return ids, att


def _block_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _run(
    model: torch.nn.Module, block: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor, replace: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, T, V] float32, block output [B, T, d]); ``replace(h) -> h'`` swaps the block output."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_m, _inp, out):
        h = _block_out(out)
        seen["h"] = h.detach()
        if replace is None:
            return None
        new = replace(h).to(h.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = block.register_forward_hook(hook)
    try:
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits.float()
    finally:
        handle.remove()
    return logits, seen["h"]


def _per_token_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at positions t where mask[:, t] (mask already requires t+1 in the document)."""
    lp = torch.log_softmax(logits[:, :-1][mask], -1)
    return -lp.gather(1, ids[:, 1:][mask][:, None]).squeeze(1).double()


def _per_token_kl(clean: torch.Tensor, other: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    p = torch.log_softmax(clean[sel], -1)
    q = torch.log_softmax(other[sel], -1)
    return (p.exp() * (p - q)).sum(-1, dtype=torch.float64)


@torch.no_grad()
def mean_max_decoder_cosine(sae: SAE, chunk: int = 1024) -> float:
    """Mean over latents of max_{j ≠ i} cos(W_dec[i], W_dec[j]) (SAEBench's max_decoder_cosine_sim, averaged)."""
    w = sae.W_dec.detach().double()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = w.shape[0]
    if n < 2:
        return float("nan")
    best = torch.empty(n, dtype=torch.float64)
    for i in range(0, n, chunk):
        sims = w[i : i + chunk] @ w.T
        rows = torch.arange(i, min(i + chunk, n))
        sims[rows - i, rows] = -float("inf")
        best[i : i + chunk] = sims.max(1).values
    return float(best.mean())


def _references(
    model: torch.nn.Module,
    block: torch.nn.Module,
    ids: torch.Tensor,
    att: torch.Tensor,
    sel: torch.Tensor,
    ce_mask: torch.Tensor,
) -> dict[str, Any]:
    """What does not depend on the SAE: the block output, clean log-probs at scored positions, clean and
    zero-ablation CE / KL sums."""
    clean, h = _run(model, block, ids, att)
    zeroed, _ = _run(model, block, ids, att, torch.zeros_like)
    return {
        "h": h,
        "clean_lp": torch.log_softmax(clean[sel], -1),
        "ce_clean": float(_per_token_ce(clean, ids, ce_mask).sum()),
        "ce_zero": float(_per_token_ce(zeroed, ids, ce_mask).sum()),
        "kl_zero": float(_per_token_kl(clean, zeroed, sel).sum()),
    }


@dataclass(frozen=True)
class CoreOptions:
    """Batching and scoring options of ``core_metrics``: documents per forward pass, leading positions of each
    document left unscored (1 skips BOS), and the token cut applied to string documents."""

    batch_size: int = 8
    skip_first: int = 1
    max_length: int = 256


@torch.no_grad()
def core_metrics(
    model: torch.nn.Module,
    tokenizer: Any,
    sae: SAE,
    layer: int,
    docs: Sequence[Any],
    *,
    options: CoreOptions = CoreOptions(),
    cache: dict | None = None,
) -> dict[str, float]:
    """SAEBench core metrics of ``sae`` spliced after block ``layer`` of ``model`` on ``docs`` (module docstring).

    ``docs``: strings (tokenised with ``tokenizer``), TokenizedExample, or token-id sequences. ``cache``: pass the
    same empty dict to several calls with the same model, layer, docs and settings to compute the clean and
    zero-ablation references once (then one forward pass per batch per SAE). Returns ce_score, kl_score,
    ce_clean, ce_sae, ce_zero, kl_sae, kl_zero, fvu, explained_variance, l0, frac_alive, mean_max_decoder_cos,
    n_tokens (scored positions), n_docs.
    """
    batch_size, skip_first, max_length = options.batch_size, options.skip_first, options.max_length
    check_layers(model, [layer])
    block = decoder_blocks(model)[layer]
    if not 0 <= skip_first:
        raise LorascopeError(f"skip_first must be ≥ 0 (got {skip_first})", fix="use e.g. 1 (skip BOS)")
    seqs = _token_lists(tokenizer, docs, max_length)
    pad_id = int(getattr(tokenizer, "pad_token_id", None) or getattr(tokenizer, "eos_token_id", None) or 0)
    model.eval()
    sae.eval()
    cache = {} if cache is None else cache
    key = (layer, skip_first, batch_size, tuple(map(tuple, seqs)))
    if cache.get("key") != key:
        cache.clear()
        cache["key"] = key
    stats = ReconstructionStats()
    sums = dict.fromkeys(("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"), 0.0)
    n_ce = n_kl = 0
    for b, i in enumerate(range(0, len(seqs), batch_size)):
        ids, att = _pad(seqs[i : i + batch_size], pad_id)
        sel = att.bool().clone()
        sel[:, :skip_first] = False
        if not bool(sel.any()):
            continue
        ce_mask = sel[:, :-1] & att[:, 1:].bool()
        ref = cache.get(b) or cache.setdefault(b, _references(model, block, ids, att, sel, ce_mask))
        ce_sae, kl_sae = _sae_sums(model, block, sae, (ids, att, sel, ce_mask), ref, stats)
        sums["ce_sae"] += ce_sae
        sums["kl_sae"] += kl_sae
        for k in ("ce_clean", "ce_zero", "kl_zero"):
            sums[k] += ref[k]
        n_ce += int(ce_mask.sum())
        n_kl += int(sel.sum())
    if n_kl == 0 or n_ce == 0:
        raise LorascopeError("no positions to score", fix="pass longer documents or lower skip_first")
    return _summarise(sums, n_ce, n_kl, stats, sae, len(seqs))


def _sae_sums(
    model: torch.nn.Module,
    block: torch.nn.Module,
    sae: SAE,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ref: dict[str, Any],
    stats: ReconstructionStats,
) -> tuple[float, float]:
    """One batch with the SAE's reconstruction spliced in at the selected positions: updates ``stats`` and returns
    the batch's CE sum and KL(clean ‖ spliced) sum. ``batch``: (ids, attention mask, selected, CE mask)."""
    ids, att, sel, ce_mask = batch
    x = ref["h"][sel].to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
    sae.check_input(x)
    codes = sae.encode(x)
    x_hat = sae.decode(codes)
    stats.update(x, x_hat, codes)

    def splice(hh: torch.Tensor) -> torch.Tensor:
        out = hh.clone()
        out[sel] = x_hat.to(device=hh.device, dtype=hh.dtype)
        return out

    spliced, _ = _run(model, block, ids, att, splice)
    ce_sae = float(_per_token_ce(spliced, ids, ce_mask).sum())
    lq = torch.log_softmax(spliced[sel], -1)
    kl_sae = float((ref["clean_lp"].exp() * (ref["clean_lp"] - lq)).sum(-1, dtype=torch.float64).sum())
    return ce_sae, kl_sae


def _summarise(
    sums: dict[str, float], n_ce: int, n_kl: int, stats: ReconstructionStats, sae: SAE, n_docs: int
) -> dict[str, float]:
    m = {k: v / (n_ce if k.startswith("ce") else n_kl) for k, v in sums.items()}
    ce_gap = m["ce_zero"] - m["ce_clean"]
    m["ce_score"] = (m["ce_zero"] - m["ce_sae"]) / ce_gap if ce_gap != 0 else float("nan")
    m["kl_score"] = (m["kl_zero"] - m["kl_sae"]) / m["kl_zero"] if m["kl_zero"] > 0 else float("nan")
    alive = stats.active_counts
    m.update(
        fvu=stats.fvu,
        explained_variance=stats.explained_variance,
        l0=stats.sum_l0 / max(stats.n_codes, 1),
        frac_alive=float((alive > 0).double().mean()) if alive is not None else float("nan"),
        mean_max_decoder_cos=mean_max_decoder_cosine(sae),
        n_tokens=float(n_kl),
        n_docs=float(n_docs),
    )
    return m


__all__ = ["core_metrics", "mean_max_decoder_cosine"]
