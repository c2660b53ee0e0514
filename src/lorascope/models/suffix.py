"""Run a model from the residual stream at block L onwards: the prefix up to L once, then only the blocks after L.

Interventions at one block (the splice test's reconstructions, steering edits, ablations) change nothing before
block L, so every one of them shares the prefix forward: :meth:`SuffixForward.prefix` runs base and adapted rows
once in a mixed batch (PEFT's ``adapter_names``), and :meth:`SuffixForward.log_probs` runs any number of edited
residuals through blocks L+1… in grouped forwards, each through the base or the adapted blocks, with the LM head
applied only at the positions that are scored. The numbers are those of a full forward with the residual at L
replaced (to float tolerance: tests/test_splice_identity.py and tests/test_steering.py hold both to an unoptimised
oracle). Used by :mod:`lorascope.study.splice` and :class:`lorascope.models.steering.CausalProbe`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import torch

from lorascope.models.grouped import BASE
from lorascope.models.residual import ResidualCapture, decoder_blocks, selected_logits, unwrap_model


def kl_rows(logp_p: torch.Tensor, logp_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from log-probabilities [N, V] (float64 sums)."""
    return (logp_p.exp() * (logp_p - logp_q)).sum(-1, dtype=torch.float64)


def kl_rows_chunked(logp_p: torch.Tensor, logp_q: torch.Tensor, rows: int = 128) -> torch.Tensor:
    """:func:`kl_rows` over blocks of rows (the same numbers; temporaries of ``rows`` × V, not N × V)."""
    return torch.cat([kl_rows(logp_p[i : i + rows], logp_q[i : i + rows]) for i in range(0, logp_p.shape[0], rows)])


def log_softmax_inplace(logits: torch.Tensor, rows: int = 128) -> torch.Tensor:
    """log_softmax over the last dimension written back into ``logits`` block by block (row-wise, so the same
    numbers as one call; temporaries of ``rows`` × V instead of a second N × V tensor)."""
    for i in range(0, logits.shape[0], rows):
        logits[i : i + rows] = torch.log_softmax(logits[i : i + rows], -1)
    return logits


class SuffixForward:
    """Runs only the blocks after ``layer`` on given residuals at ``layer``: the model's own forward, with every
    block up to ``layer`` swapped for a pass-through (block ``layer`` returns the given residual), so masks,
    rotary embeddings and sliding windows are built by the model itself. The LM head sees only the selected
    positions (a forward pre-hook), unless the head is itself a LoRA layer (then all logits are computed).
    ``max_logit_bytes`` bounds the float32 logits one grouped forward may hold (memory, not the result)."""

    def __init__(self, peft_model, layer: int, adapter: str, max_logit_bytes: int = 1 << 29):
        self.model, self.layer, self.adapter = peft_model, layer, adapter
        self.blocks = decoder_blocks(peft_model)
        self.head = unwrap_model(peft_model).get_output_embeddings()
        self.head_selects = self.head is not None and not hasattr(self.head, "lora_A")
        self.vocab = int(unwrap_model(peft_model).config.get_text_config().vocab_size)
        self.max_logit_bytes = max_logit_bytes
        self.tuple_out = False

    def prefix(self, layers: list[int], ids: torch.Tensor, att: torch.Tensor, names: list[str]):
        """The mixed base/adapted forward up to the deepest of ``layers`` (their residuals; ``names``: the adapter
        of each row, :data:`BASE` for the base); notes whether the blocks return tuples (older transformers), so
        the pass-through blocks answer in the same form."""

        def note(_m, _i, out):
            self.tuple_out = isinstance(out, tuple)

        handle = self.blocks[self.layer].register_forward_hook(note)
        try:
            return ResidualCapture(self.model, layers)(ids, att, names)
        finally:
            handle.remove()

    def log_probs(
        self,
        inputs: dict[str, torch.Tensor],
        ids: torch.Tensor,
        att: torch.Tensor,
        sel: torch.Tensor,
        base: Iterable = ("base",),
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[tuple]:
        """Yields (name, log-probabilities [n_sel, V] in ``dtype`` at the selected positions ``sel`` [B, T]) in
        ``inputs``' order (each input a residual [B, T, d] at ``layer``; any hashable names); names in ``base`` run
        the base blocks, every other name the adapted ones."""
        names, base = list(inputs), set(base)
        b, t = ids.shape
        width = torch.finfo(dtype).bits // 8
        per_group = width * int(sel.sum()) * self.vocab if self.head_selects else width * b * t * self.vocab
        step = max(1, self.max_logit_bytes // max(per_group, 1))
        for i in range(0, len(names), step):
            group = names[i : i + step]
            adapters = [BASE if n in base else self.adapter for n in group]
            hidden = torch.cat([inputs[n] for n in group])
            parts = list(zip(group, self._forward(hidden, ids, att, sel, adapters).chunk(len(group)), strict=True))
            while parts:  # hold no reference to a part once it is handed out (one N × V buffer alive, not two)
                name, part = parts.pop(0)
                yield name, log_softmax_inplace(part.to(dtype))
                del part

    def _forward(
        self, hidden: torch.Tensor, ids: torch.Tensor, att: torch.Tensor, sel: torch.Tensor, adapters: list[str]
    ) -> torch.Tensor:
        from lorascope.models.grouped import adapter_runs, only_adapter

        b = ids.shape[0]
        adapter_names = [a for a in adapters for _ in range(b)]
        runs = adapter_runs(self.model, adapter_names)
        if runs is None:
            return self._logits(hidden, ids, att, sel, adapter_names=adapter_names)
        parts = []
        for name, s, e in runs:  # one forward per adapter's run of rows (lorascope.models.grouped)
            with only_adapter(self.model, name):
                parts.append(self._logits(hidden[s:e], ids, att, sel))
        return torch.cat(parts)

    def _logits(self, hidden: torch.Tensor, ids: torch.Tensor, att: torch.Tensor, sel: torch.Tensor, **kwargs):
        """Selected logits of the suffix forward of ``hidden`` (g·B rows: g copies of the batch ``ids``)."""
        g = hidden.shape[0] // ids.shape[0]
        rows_sel = sel.repeat(g, 1)
        saved = [blk.__dict__.get("forward") for blk in self.blocks[: self.layer + 1]]
        for blk in self.blocks[: self.layer]:
            blk.forward = functools.partial(_pass_through, self.tuple_out)
        self.blocks[self.layer].forward = functools.partial(_inject, self.tuple_out, hidden)
        try:
            return selected_logits(
                self.model,
                rows_sel,
                input_ids=ids.repeat(g, 1),
                attention_mask=att.repeat(g, 1),
                **kwargs,
            ).float()
        finally:
            for blk, old in zip(self.blocks[: self.layer + 1], saved, strict=True):
                del blk.forward
                if old is not None:
                    blk.forward = old


def _pass_through(as_tuple: bool, *args, **kwargs):
    """A block skipped in the suffix forward: returns its input residual unchanged."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden,) if as_tuple else hidden


def _inject(as_tuple: bool, hidden: torch.Tensor, *_args, **_kwargs):
    """Block ``layer`` in the suffix forward: returns the given (edited) residual."""
    return (hidden,) if as_tuple else hidden


__all__ = ["BASE", "SuffixForward", "kl_rows", "kl_rows_chunked", "log_softmax_inplace"]
