"""M SAEs of one architecture and one shape as one module: weights stacked [M, …], one batched step.

The training loss of each member is written with batched products (``torch.baddbmm`` / ``torch.bmm``) and,
for TopK, the sparse kernels of ``_sparse`` run on the M members at once by numbering member m's tokens
m·B + n and its latents m·d_sae + f (a block-diagonal selection: no pair ever crosses members). The summed
loss Σ_m L_m has ∂/∂θ_m = ∂L_m/∂θ_m, so one backward gives every member its own gradient. Each member's
operations are the ones ``TopKSAE.training_loss`` / ``ReLUSAE.training_loss`` perform, in the same order, and
where a batched kernel would round differently from the one-SAE kernel (the unstable latent sort of the sparse
backward, matrix-vector products, per-token means) the member's own call is made, so on CPU the results equal
one-by-one training bit for bit (tests/saes/test_multi.py). ``torch.baddbmm`` / ``torch.bmm`` round like
``addmm`` / ``mm`` per member on CPU (checked by those tests); a GPU's batched GEMM may not (float tolerance there).
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from lorascope.distributed import batch_denominator
from lorascope.saes._sparse import Selection, decode_sparse, topk_rows
from lorascope.saes.base import SAE, TrainContext, TrainOutput

STACKABLE = ("topk", "relu", "paper_a")
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


class StackedSAEs(nn.Module):
    """The parameters of ``members`` stacked along a new first axis; ``unstack`` writes them back."""

    def __init__(self, members: list[SAE]):
        super().__init__()
        first = members[0]
        self.architecture, self.M, self.d_in, self.d_sae = first.architecture, len(members), first.d_in, first.d_sae
        self.settings, self.apply_b_dec = first.settings, first.cfg.apply_b_dec_to_input
        for name in PARAM_NAMES:
            stacked = torch.stack([getattr(m, name).detach() for m in members]).contiguous()
            self.register_parameter(name, nn.Parameter(stacked))

    @torch.no_grad()
    def unstack(self, members: list[SAE]) -> None:
        for m, sae in enumerate(members):
            for name in PARAM_NAMES:
                getattr(sae, name).copy_(getattr(self, name)[m])

    def stacked_params(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in PARAM_NAMES]

    # ---- the step ------------------------------------------------------------------------------------------
    def training_losses(self, x: torch.Tensor, ctxs: list[TrainContext]) -> list[TrainOutput]:
        """One TrainOutput per member for x [M, B, d_in] (member m reads x[m])."""
        if self.architecture == "topk":
            return _topk_losses(self, x.to(self.W_enc.dtype), ctxs)
        return _relu_losses(self, x.to(self.W_enc.dtype), ctxs)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Per decoder row (each member's rows), as ``SAE.remove_parallel_grad``."""
        if not self._unit_decoder() or self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        g = self.W_dec.grad
        g -= (g * w).sum(-1, keepdim=True) * w

    @torch.no_grad()
    def post_step(self) -> None:
        if self._unit_decoder():
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def _unit_decoder(self) -> bool:
        return self.architecture == "topk" or bool(self.settings.unit_decoder)


def _per_member(t: torch.Tensor, fn) -> torch.Tensor:
    """[fn(t[0]), …, fn(t[M-1])]: a per-token mean over each member on its own, reduced as for one SAE (a mean over
    the last axis of [M, B] may sum in another order; these scalars are cheap)."""
    return torch.stack([fn(t[m]) for m in range(t.shape[0])])


# ---- ReLU / paper_a ----------------------------------------------------------------------------------------------
def _relu_losses(s: StackedSAEs, x: torch.Tensor, ctxs: list[TrainContext]) -> list[TrainOutput]:
    """``ReLUSAE.training_loss`` for every member at once."""
    x_c = x - s.b_dec[:, None] if s.apply_b_dec else x
    f = torch.relu(torch.bmm(x_c, s.W_enc) + s.b_enc[:, None])
    x_hat = torch.bmm(f, s.W_dec) + s.b_dec[:, None]
    mse = _per_member(x_hat.float() - x.float(), lambda e: e.pow(2).sum(1).mean())
    if s.settings.l1_penalty == "plain":
        l1 = _per_member(f.float(), lambda fm: fm.sum(1).mean())
    else:
        norms = s.W_dec.norm(dim=-1)
        l1 = torch.stack([(f[m] @ norms[m]).mean() for m in range(s.M)])
    coef = s.settings.l1_coefficient
    active = f.detach() > 0
    return [
        TrainOutput(
            mse[m] + coef * ctxs[m].sparsity_scale * l1[m],
            x_hat[m],
            active[m],
            {"mse": mse[m].detach(), "l1": l1[m].detach()},
        )
        for m in range(s.M)
    ]


# ---- TopK ------------------------------------------------------------------------------------------------------
class _MemberSelection(Selection):
    """A Selection over M members' pairs (member m's pairs are ``spans[m]`` = [start, end), latents offset by
    m·d_sae) whose latent-major order sorts each member's latent ids on their own, with the call ``Selection``
    makes for one SAE: the sort is not stable, so sorting all M·nnz ids at once would order the pairs of a latent
    differently, and the encoder/decoder weight gradients (sums over those pairs) would round differently."""

    def __init__(self, cols, bag_offsets, n_tokens: int, d_sae: int, spans: list[tuple[int, int]]):
        super().__init__(cols, bag_offsets, n_tokens, len(spans) * d_sae)
        self.d_sae, self.spans = d_sae, spans

    @cached_property
    def _latent_major(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        orders = []
        for m, (lo, hi) in enumerate(self.spans):
            local = (self.cols[lo:hi] - m * self.d_sae).to(torch.int32)
            orders.append(torch.sort(local)[1] + lo)
        order = torch.cat(orders)
        counts = torch.bincount(self.cols, minlength=self.n_latents)
        offsets = torch.zeros(self.n_latents, dtype=torch.int64, device=self.cols.device)
        offsets[1:] = counts.cumsum(0)[:-1]
        return order, offsets, self.rows[order]


class _StackedEncodeValues(torch.autograd.Function):
    """Pre-activations at the selected pairs (already computed without grad) with a backward that touches only
    those pairs: ``_sparse._EncodeValues`` for M members whose tokens and latents are numbered member-major."""

    @staticmethod
    def forward(ctx, values, x_c, W_enc, b_enc, b_dec, sel: Selection, apply_b_dec: bool):
        ctx.sel, ctx.apply_b_dec = sel, apply_b_dec
        ctx.save_for_backward(x_c, W_enc)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        x_c, W_enc = ctx.saved_tensors  # x_c [M·B, d_in] (x − b_dec), W_enc [M, d_in, d_sae]
        sel: Selection = ctx.sel
        M, d_in, d_sae = W_enc.shape
        grad = grad.float()
        g_w = sel.scatter_rows(grad, x_c).view(M, d_sae, d_in).transpose(1, 2).contiguous().to(W_enc.dtype)
        g_sum = torch.zeros(M * d_sae, dtype=torch.float32, device=grad.device).index_add_(0, sel.cols, grad)
        g_sum = g_sum.view(M, d_sae)
        g_bd = None
        if ctx.apply_b_dec:
            # one matrix-vector product per member, the very kernel the one-SAE backward uses (a batched product
            # rounds differently)
            g_bd = -torch.stack([W_enc[m].float() @ g_sum[m] for m in range(M)]).to(W_enc.dtype)
        return None, None, g_w, g_sum.to(W_enc.dtype), g_bd, None, None


def _codes_and_recon(s: StackedSAEs, x_c: torch.Tensor, vals: torch.Tensor, sel: Selection) -> tuple:
    """ReLU'd codes at ``sel`` [nnz] and their reconstruction without b_dec [M, B, d_in]."""
    codes = F.relu(_StackedEncodeValues.apply(vals, x_c, s.W_enc, s.b_enc, s.b_dec, sel, s.apply_b_dec))
    recon = decode_sparse(codes, s.W_dec.view(s.M * s.d_sae, s.d_in), sel)
    return codes, recon.view(s.M, -1, s.d_in)


def _topk_losses(s: StackedSAEs, x: torch.Tensor, ctxs: list[TrainContext]) -> list[TrainOutput]:
    """``TopKSAE.training_loss`` (sparse kernels) for every member at once."""
    M, B, _ = x.shape
    with torch.no_grad():
        x_c = (x - s.b_dec[:, None] if s.apply_b_dec else x).to(s.W_enc.dtype)
        pre = torch.baddbmm(s.b_enc[:, None], x_c, s.W_enc)
    v, i = topk_rows(pre.view(M * B, s.d_sae), s.settings.k)
    k = i.shape[1]
    cols = (i.view(M, B, k) + _offsets(M, s.d_sae, x.device)).reshape(-1)
    offsets = torch.arange(0, M * B * k, k, device=x.device)
    sel = _MemberSelection(cols, offsets, M * B, s.d_sae, [(m * B * k, (m + 1) * B * k) for m in range(M)])
    x_c_flat = x_c.reshape(M * B, s.d_in)
    codes, recon = _codes_and_recon(s, x_c_flat, v.reshape(-1), sel)
    x_hat = recon + s.b_dec[:, None]
    err = x_hat.float() - x.float()
    mse = _per_member(err, lambda e: e.pow(2).sum(1).mean())
    aux = _auxk_losses(s, (x_c_flat, pre), -err.detach(), ctxs)
    ids = (torch.where(codes.detach() > 0, sel.cols, -1).view(M, B, -1) - _offsets(M, s.d_sae, x.device)).clamp_min(-1)
    out = []
    for m in range(M):
        loss, parts = mse[m], {"mse": mse[m].detach()}
        if aux[m] is not None:
            loss = loss + s.settings.auxk_coefficient * aux[m]
            parts["auxk"] = aux[m].detach()
        out.append(TrainOutput(loss, x_hat[m], ids[m], parts, active_is_indices=True))
    return out


def _offsets(M: int, d_sae: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(M, device=device) * d_sae)[:, None, None]


def _auxk_losses(
    s: StackedSAEs, xc_pre: tuple[torch.Tensor, torch.Tensor], residual: torch.Tensor, ctxs: list[TrainContext]
) -> list[torch.Tensor | None]:
    """Each member's AuxK term (``TopKSAE._auxk_loss``), None where it has no dead latent; the members' top-k_aux
    dead latents are decoded in one batched sparse pass."""
    x_c_flat, pre = xc_pre
    M, B, _ = pre.shape
    k_aux = s.settings.k_aux or max(s.d_in // 2, 1)
    picks: list[torch.Tensor | None] = [None] * M
    for m, ctx in enumerate(ctxs):
        if ctx.dead_mask is None or s.settings.auxk_coefficient == 0:
            continue
        dead = torch.nonzero(ctx.dead_mask, as_tuple=True)[0].to(pre.device)
        if dead.numel():
            v, local = topk_rows(pre[m][:, dead], min(k_aux, dead.numel()))
            picks[m] = (v, dead[local] + m * s.d_sae)
    if all(p is None for p in picks):
        return picks
    per_token = torch.tensor([0 if p is None else p[1].shape[1] for p in picks], device=pre.device)
    counts = per_token.repeat_interleave(B)
    offsets = torch.zeros(M * B, dtype=torch.int64, device=pre.device)
    offsets[1:] = counts.cumsum(0)[:-1]
    cols = torch.cat([p[1].reshape(-1) for p in picks if p is not None])
    vals = torch.cat([p[0].reshape(-1) for p in picks if p is not None])
    ends = (per_token * B).cumsum(0).tolist()
    spans = [(end - int(n) * B, end) for end, n in zip(ends, per_token.tolist(), strict=True)]
    _, e_hat = _codes_and_recon(s, x_c_flat, vals, _MemberSelection(cols, offsets, M * B, s.d_sae, spans))
    return [
        None
        if picks[m] is None
        else (e_hat[m].float() - residual[m]).pow(2).sum() / batch_denominator(residual[m]).clamp_min(1e-12)
        for m in range(M)
    ]
