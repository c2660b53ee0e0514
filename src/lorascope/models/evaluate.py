"""Held-out loss of base vs adapters, and greedy generation (for summaries and smoke tests)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorascope.data.chat import format_prompt, tokenize_examples
from lorascope.data.examples import Example
from lorascope.models.grouped import BASE
from lorascope.models.lora import collate, label_targets, response_nll
from lorascope.models.residual import selected_logits


@torch.no_grad()
def held_out_loss(
    peft_model,
    tokenizer,
    examples: Sequence[Example],
    variants: Sequence[str],
    batch_size: int = 8,
    max_length: int = 192,
) -> dict[str, float]:
    """Mean response-token NLL (nats/token) of each variant: ``"__base__"`` or an adapter name.

    Every batch runs once with each row tagged by variant (``adapter_names``): on CPU one forward per variant's
    rows, elsewhere one PEFT mixed batch (:mod:`lorascope.models.grouped`).
    """
    data, _ = tokenize_examples(tokenizer, examples, max_length)  # long examples: truncated / skipped
    totals = {v: 0.0 for v in variants}
    counts = {v: 0 for v in variants}
    peft_model.eval()
    for i in range(0, len(data), batch_size):
        chunk = data[i : i + batch_size]
        batch = collate(chunk * len(variants), tokenizer.pad_token_id)
        batch = {k: v.to(next(peft_model.parameters()).device) for k, v in batch.items()}
        names = [v for v in variants for _ in chunk]
        targets, mask = label_targets(batch["labels"])
        logits = selected_logits(
            peft_model,
            mask,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            adapter_names=names,
        )
        token_nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        rows = mask.nonzero(as_tuple=True)[0]
        nll = torch.zeros(len(names), dtype=token_nll.dtype, device=token_nll.device).index_add_(0, rows, token_nll)
        n = mask.sum(1)
        for row, v in enumerate(names):
            totals[v] += float(nll[row])
            counts[v] += int(n[row])
    return {v: totals[v] / max(counts[v], 1) for v in variants}


@torch.no_grad()
def generate(model, tokenizer, user_message: str, max_new_tokens: int = 40, adapter: str | None = None) -> str:
    """Greedy answer to one user message through the chat template (``adapter`` selects a PEFT adapter)."""
    ids = tokenizer(format_prompt(tokenizer, user_message), add_special_tokens=False, return_tensors="pt")
    ids = ids.to(next(model.parameters()).device)
    kwargs = {"adapter_names": [adapter]} if adapter is not None else {}
    out = model.generate(
        **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, **kwargs
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


__all__ = ["BASE", "generate", "held_out_loss", "response_nll"]
