"""The splice test: how much of the adapter's effect on the output does a reconstruction Δ̂ carry?

For held-out documents, run base and adapted rows in one mixed batch, read h_base and h_ft at block ``layer``,
then rerun the adapted model with the residual at that block replaced by h_base + Δ̂ at the selected positions
(Δ̂ from a reconstructor, e.g. the adapter SAE applied to Δ = h_ft − h_base). With next-token distributions
p_ft, p_base and p_splice over the selected tokens:

    raw recovery       = 1 − Σ_t KL(p_ft ‖ p_splice) / Σ_t KL(p_ft ‖ p_base)
    recovery (relative) = 1 − Σ_t KL(p_ft ‖ p_splice) / Σ_t KL(p_ft ‖ p_splice₀)

where splice₀ is the splice with Δ̂ = 0. The adapted model keeps its adapter in every block after ``layer``, so
Δ̂ = 0 already "recovers" part of KL(p_ft ‖ p_base) at any block but the last; raw recovery therefore flatters
every reconstructor, and the relative one is the number to report (0 = no better than doing nothing at this
layer, 1 = the adapted outputs exactly, < 0 = worse than doing nothing). Two baselines are always run: ``zero``
(Δ̂ = 0) and, when ``mean_delta`` is given, ``mean_delta`` (Δ̂ = the mean Δ over *training* documents, the
best constant). Per-document KL sums are returned so the caller can bootstrap over documents (the splice is the
activation-patching logic of Meng et al. 2022 and the "loss recovered" of SAE evaluations, e.g. SAEBench,
Karvonen et al. 2025, with the baseline made explicit).

Token positions follow the extraction's rule (``lorascope.activations.tokens.select_positions``): pass the
extraction's ``TokenSelection`` and the layers it captured (``norm_layers``; the outlier-norm rule looks at every
captured layer), or — exact — the positions the store kept for each document (``keep_positions``, from the
store's ``doc_index``/``position`` rows). The outlier rule's median is taken over the splice batch's candidate
positions, as extraction does over its batch, so without ``keep_positions`` the selection matches the store
only when documents are batched as in extraction. Positions outside the selection keep their adapted residual.
Needs the model, so it lives beside the study rather than in geometry/.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lorascope.activations.tokens import TokenSelection, select_positions
from lorascope.data.chat import TokenizedExample
from lorascope.errors import LorascopeError
from lorascope.models.lora import collate
from lorascope.models.residual import check_layers
from lorascope.models.suffix import BASE, SuffixForward, kl_rows_chunked

Reconstructor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (h_base [N,d], h_ft [N,d]) -> Δ̂ [N,d]
BASELINES = ("zero", "mean_delta")


class SpliceResult(NamedTuple):
    """Outcome of :func:`splice_kl`. ``kl``: mean KL(p_ft ‖ p_splice) per selected token for every reconstructor
    (the baselines included); ``recovered``: relative to the zero-Δ̂ splice; ``recovered_raw``: relative to
    p_base; ``doc_kl``: per-document KL sums [n_docs] under "base" and every reconstructor name, with
    ``doc_tokens`` [n_docs] selected tokens per document (in the order of ``docs``)."""

    kl_adapted_vs_base: float
    n_tokens: int
    kl: dict[str, float]
    recovered: dict[str, float]
    recovered_raw: dict[str, float]
    doc_kl: dict[str, list[float]]
    doc_tokens: list[int]

    def legacy(self) -> dict[str, float]:
        """The dict the previous ``splice_kl`` returned: ``kl_adapted_vs_base``, ``kl_recovered_<name>`` (raw
        recovery, caller's reconstructors only) and ``n_tokens``. ``res["key"]`` and ``res.items()`` read it, so
        callers of the old API keep working; new code should use the fields (and ``recovered``)."""
        out = {"kl_adapted_vs_base": self.kl_adapted_vs_base, "n_tokens": float(self.n_tokens)}
        out.update({f"kl_recovered_{n}": v for n, v in self.recovered_raw.items() if n not in BASELINES})
        return out

    def __getitem__(self, key):  # type: ignore[override]
        return self.legacy()[key] if isinstance(key, str) else tuple.__getitem__(self, key)

    def items(self):
        return self.legacy().items()

    def to_dict(self) -> dict[str, float]:
        """Flat numbers: the legacy keys (``kl_adapted_vs_base``, ``kl_recovered_<name>`` = raw recovery,
        ``n_tokens``) plus ``kl_<name>`` and ``kl_recovered_rel_<name>`` (relative to Δ̂ = 0)."""
        out = {"kl_adapted_vs_base": self.kl_adapted_vs_base, "n_tokens": float(self.n_tokens)}
        for name in self.kl:
            out[f"kl_{name}"] = self.kl[name]
            out[f"kl_recovered_{name}"] = self.recovered_raw[name]
            out[f"kl_recovered_rel_{name}"] = self.recovered[name]
        return out


def _block_output(out):
    return out[0] if isinstance(out, tuple) else out


def _reconstructors(reconstructors: dict[str, Reconstructor], mean_delta) -> dict[str, Reconstructor]:
    clash = [n for n in reconstructors if n in BASELINES]
    if clash:
        raise LorascopeError(
            f"reconstructor name(s) {clash} are reserved for the baselines",
            fix="rename them; zero and mean_delta splices are always run",
        )
    out: dict[str, Reconstructor] = {"zero": lambda hb, hf: torch.zeros_like(hb)}
    if mean_delta is not None:
        mu = torch.as_tensor(mean_delta).reshape(-1)
        out["mean_delta"] = lambda hb, hf, mu=mu: mu.to(hb).expand_as(hb)
    return {**out, **reconstructors}


def _selected(
    att: torch.Tensor,
    chunk: Sequence[TokenizedExample],
    caps: dict[int, torch.Tensor],
    b: int,
    selection: TokenSelection,
    keep_positions,
    start: int,
) -> torch.Tensor:
    """bool [b, T]: positions of the batch's documents to splice and score (the extraction's rule)."""
    if keep_positions is not None:
        sel = torch.zeros(b, att.shape[1], dtype=torch.bool)
        for i in range(b):
            pos = torch.as_tensor(list(keep_positions[start + i]), dtype=torch.long)
            if pos.numel() and (int(pos.max()) >= int(att[i].sum()) or int(pos.min()) < 0):
                raise LorascopeError(
                    f"keep_positions of document {start + i} point outside it",
                    fix="pass the positions the store kept for these documents, in order",
                )
            sel[i, pos] = True
        return sel
    norms = {L: h[:b].float().norm(dim=-1).cpu() for L, h in caps.items()}
    resp = torch.tensor([d.response_start for d in chunk])
    return select_positions(att[:b], resp, norms, selection)[0]


@dataclass(frozen=True)
class SpliceOptions:
    """How :func:`splice_kl` batches, selects positions and bounds memory (none of it changes a number but the
    selection). ``batch_size``: documents per forward; ``skip_first``: leading tokens skipped by the default
    selection. ``mean_delta`` [d]: mean Δ over the *training* documents at this layer and adapter (None: no mean
    baseline). ``selection``: the extraction's ``TokenSelection`` (None: all non-padding tokens from
    ``skip_first`` on, no norm rule — the old behaviour); ``norm_layers``: the layers extraction captured (None:
    ``[layer]``); ``keep_positions``: per document, the exact positions the store kept (overrides ``selection``).
    ``recon_device``: where the reconstructors run (their inputs are moved there, Δ̂ back to the model's device);
    ``max_logit_bytes``: the most float32 logits one suffix forward may hold (bounds memory, not the result)."""

    batch_size: int = 8
    skip_first: int = 1
    mean_delta: torch.Tensor | None = None
    selection: TokenSelection | None = None
    norm_layers: Sequence[int] | None = None
    keep_positions: Sequence[Sequence[int]] | None = None
    recon_device: str | torch.device = "cpu"
    max_logit_bytes: int = 1 << 29


@dataclass(frozen=True)
class SpliceCell:
    """One (layer, adapter) of :func:`splice_cells`: the reconstructors spliced at block ``layer`` of adapter
    ``adapter``, its ``mean_delta`` baseline [d] (None: no mean baseline) and, per document, the exact positions the
    store kept (``keep_positions``; None: the options' selection rule with norms at ``options.norm_layers`` or
    ``[layer]``)."""

    layer: int
    adapter: str
    reconstructors: dict[str, Reconstructor]
    mean_delta: torch.Tensor | None = None
    keep_positions: Sequence[Sequence[int]] | None = None

    @property
    def key(self) -> tuple[int, str]:
        return self.layer, self.adapter


@torch.no_grad()
def splice_kl(
    peft_model,
    pad_id: int,
    docs: Sequence[TokenizedExample],
    layer: int,
    adapter: str,
    reconstructors: dict[str, Reconstructor],
    options: SpliceOptions | None = None,
) -> SpliceResult:
    """Splice every reconstructor (plus the ``zero`` and ``mean_delta`` baselines) at block ``layer``, with the
    batching, position selection and memory bound of ``options`` (:class:`SpliceOptions`; None: its defaults).
    Returns a :class:`SpliceResult` (``.to_dict()`` gives the previous flat dict plus the new keys). One cell of
    :func:`splice_cells`, which runs several layers and adapters on one shared forward."""
    opt = options or SpliceOptions()
    cell = SpliceCell(layer, adapter, reconstructors, opt.mean_delta, opt.keep_positions)
    return splice_cells(peft_model, pad_id, docs, [cell], opt)[cell.key]


@torch.no_grad()
def splice_cells(
    peft_model,
    pad_id: int,
    docs: Sequence[TokenizedExample],
    cells: Sequence[SpliceCell],
    options: SpliceOptions | None = None,
) -> dict[tuple[int, str], SpliceResult]:
    """The splice of every cell (layer × adapter) on the same documents, as :func:`splice_kl` would give it for each
    cell alone (to float tolerance), keyed by ``(layer, adapter)``. ``options`` gives the batching, the selection
    rule and the memory bound (its ``mean_delta``/``keep_positions`` are the cells' own here).

    Per batch of documents: one mixed forward of the base rows and every adapter's rows up to the deepest block any
    cell needs (the prefix is shared by every layer and every splice); per adapter, the base and adapted
    log-probabilities from that block on, at the union of its cells' positions (shared by its layers); then per
    cell only the blocks after its layer, for every reconstructor's spliced rows stacked along the batch, with
    logits only at the selected positions."""
    opt = options or SpliceOptions()
    run = _CellRun.make(peft_model, docs, cells, opt)
    for start in range(0, len(docs), opt.batch_size):
        chunk = list(docs[start : start + opt.batch_size])
        batch = collate(chunk * (1 + len(run.adapters)), pad_id)
        run.batch(chunk, start, batch["input_ids"].to(run.device), batch["attention_mask"].to(run.device))
    return {key: _result(run.doc_kl[key], run.doc_tokens[key]) for key in run.cells}


@dataclass
class _CellRun:
    """State of one :func:`splice_cells` call: the cells by key, their reconstructors (baselines first), one
    :class:`SuffixForward` per cell and one per adapter from the deepest captured block, and the per-document sums
    so far."""

    cells: dict[tuple[int, str], SpliceCell]
    recons: dict[tuple[int, str], dict[str, Reconstructor]]
    suffix: dict[tuple[int, str], SuffixForward]
    head: dict[str, SuffixForward]
    layers: list[int]
    opt: SpliceOptions
    device: torch.device
    doc_kl: dict[tuple[int, str], dict[str, list[float]]]
    doc_tokens: dict[tuple[int, str], list[int]]

    @property
    def adapters(self) -> list[str]:
        return list(self.head)

    @classmethod
    def make(cls, peft_model, docs, cells: Sequence[SpliceCell], opt: SpliceOptions) -> _CellRun:
        keys = [c.key for c in cells]
        if not cells or len(set(keys)) != len(keys):
            raise LorascopeError(
                f"splice cells must be given, each (layer, adapter) once; got {keys}",
                fix="pass one SpliceCell per (layer, adapter)",
            )
        wanted = {c.layer for c in cells} | set(opt.norm_layers or [])
        layers = check_layers(peft_model, sorted(wanted))
        for c in cells:
            check_keep_positions(c.keep_positions, docs)
        recons = {c.key: _reconstructors(c.reconstructors, c.mean_delta) for c in cells}
        peft_model.eval()
        bound = opt.max_logit_bytes
        return cls(
            cells=dict(zip(keys, cells, strict=True)),
            recons=recons,
            suffix={c.key: SuffixForward(peft_model, c.layer, c.adapter, bound) for c in cells},
            head={a: SuffixForward(peft_model, layers[-1], a, bound) for a in dict.fromkeys(c.adapter for c in cells)},
            layers=layers,
            opt=opt,
            device=next(peft_model.parameters()).device,
            doc_kl={k: {name: [] for name in ("base", *recons[k])} for k in keys},
            doc_tokens={k: [] for k in keys},
        )

    def batch(self, chunk: list[TokenizedExample], start: int, ids: torch.Tensor, att: torch.Tensor) -> None:
        """Adds one batch of documents (``ids``/``att``: the batch repeated once per row group: base, then each
        adapter) to every cell's sums."""
        b = len(chunk)
        first = next(iter(self.head.values()))
        names = [BASE] * b + [a for a in self.adapters for _ in range(b)]
        caps = first.prefix(self.layers, ids, att, names)
        for s in (*self.head.values(), *self.suffix.values()):
            s.tuple_out = first.tuple_out
        ids, att, att_cpu = ids[:b], att[:b], att[:b].cpu()
        for i, adapter in enumerate(self.adapters):
            keys = [k for k, c in self.cells.items() if c.adapter == adapter]
            sels = {k: self._selected(k, att_cpu, chunk, caps, start) for k in keys}
            union = torch.stack(list(sels.values())).any(0)
            h = {layer: (cap[:b], cap[(i + 1) * b : (i + 2) * b]) for layer, cap in caps.items()}
            deepest = h[self.layers[-1]]
            logps = self.head[adapter].log_probs({"ft": deepest[1], "base": deepest[0]}, ids, att, union.to(ids.device))
            _, logp_ft = next(logps)
            kl_base = kl_rows_chunked(logp_ft, next(logps)[1]).cpu()
            where = union.flatten().cumsum(0) - 1  # row of each union position in logp_ft
            for k in keys:
                sel = sels[k]
                idx = where[sel.flatten()]
                ref = logp_ft if bool(sel.eq(union).all()) else logp_ft[idx.to(logp_ft.device)]
                self._cell(k, h[self.cells[k].layer], ids, att, sel, ref, kl_base[idx])
            del logp_ft

    def _selected(self, key, att_cpu: torch.Tensor, chunk, caps, start: int) -> torch.Tensor:
        cell = self.cells[key]
        selection = self.opt.selection or TokenSelection("all", self.opt.skip_first, None)
        norm_caps = {layer: caps[layer] for layer in (self.opt.norm_layers or [cell.layer])}
        return _selected(att_cpu, chunk, norm_caps, len(chunk), selection, cell.keep_positions, start)

    def _cell(self, key, h: tuple, ids, att, sel: torch.Tensor, logp_ft: torch.Tensor, kl_base: torch.Tensor) -> None:
        """One cell's spliced rows through the blocks after its layer; KL(p_ft ‖ p_splice) per document."""
        b = ids.shape[0]
        rows = sel.nonzero(as_tuple=True)[0]
        self.doc_tokens[key] += sel.sum(1).tolist()
        self.doc_kl[key]["base"] += _per_doc(b, rows, kl_base)
        sel = sel.to(ids.device)
        inputs = {
            name: _spliced(recon, h[0], h[1], sel, self.opt.recon_device) for name, recon in self.recons[key].items()
        }
        for name, logp in self.suffix[key].log_probs(inputs, ids, att, sel):
            self.doc_kl[key][name] += _per_doc(b, rows, kl_rows_chunked(logp_ft, logp).cpu())
            del logp


def check_keep_positions(keep_positions: Sequence[Sequence[int]] | None, docs: Sequence[TokenizedExample]) -> None:
    """Raises unless ``keep_positions`` is None or has one entry per document."""
    if keep_positions is not None and len(keep_positions) != len(docs):
        raise LorascopeError(
            f"keep_positions has {len(keep_positions)} entries for {len(docs)} documents",
            fix="pass one list of positions per document",
        )


def _per_doc(b: int, rows: torch.Tensor, kl: torch.Tensor) -> list[float]:
    """Per-document sums [b] of per-token KL values (``rows``: the document of each selected token)."""
    return torch.zeros(b, dtype=torch.float64).index_add_(0, rows, kl).tolist()


def _spliced(
    recon: Reconstructor, h_base: torch.Tensor, h_ft: torch.Tensor, sel: torch.Tensor, recon_device
) -> torch.Tensor:
    """The adapted residual with h_base + Δ̂ at the selected positions (Δ̂ computed on ``recon_device``)."""
    hb, hf = h_base[sel].float().to(recon_device), h_ft[sel].float().to(recon_device)
    delta_hat = recon(hb, hf).to(device=h_ft.device, dtype=h_ft.dtype)
    replaced = h_ft.clone()
    replaced[sel] = h_base[sel] + delta_hat
    return replaced


def _result(doc_kl: dict[str, list[float]], doc_tokens: list[int]) -> SpliceResult:
    n_tok = sum(doc_tokens)
    totals = {name: sum(v) for name, v in doc_kl.items()}
    base, zero = totals["base"], totals["zero"]
    names = [n for n in doc_kl if n != "base"]
    nan = float("nan")
    return SpliceResult(
        kl_adapted_vs_base=base / max(n_tok, 1),
        n_tokens=n_tok,
        kl={n: totals[n] / max(n_tok, 1) for n in names},
        recovered={n: 1.0 - totals[n] / zero if zero > 0 else nan for n in names},
        recovered_raw={n: 1.0 - totals[n] / base if base > 0 else nan for n in names},
        doc_kl=doc_kl,
        doc_tokens=doc_tokens,
    )


__all__ = ["BASELINES", "Reconstructor", "SpliceCell", "SpliceOptions", "SpliceResult", "splice_cells", "splice_kl"]
