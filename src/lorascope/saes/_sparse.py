"""Sparse training kernels for top-k style SAEs (CPU-friendly, exact).

A training step of a TopK SAE needs the dense encoder GEMM only to *select* latents. Everything after the
selection touches N*k (token, latent) pairs instead of N*d_sae:

- decode: ``F.embedding_bag`` over the selected latents with the codes as per-sample weights (W_dec must be
  contiguous [d_sae, d_in]; a transposed view is ~100x slower);
- encoder backward: dL/dW_enc[:, f] = sum over tokens n where f is selected of g[n, f] * x_c[n]. Sorting the
  pairs by latent turns this into one more ``embedding_bag`` (bags = latents, rows of x_c gathered). No dX is
  computed: the input needs no gradient, and the b_dec gradient through ``x - b_dec`` is -W_enc @ grad_b_enc;
- decoder backward: dL/dW_dec is the same latent-major ``embedding_bag`` over the output gradient, and
  dL/dcodes is a sampled dense-dense product (``torch.sparse.sampled_addmm``) at the selected pairs.

All results equal the dense formulas up to float summation order (tests/saes/test_sparse_kernels.py).
"""

from __future__ import annotations

import warnings
from functools import cached_property

import torch
import torch.nn.functional as F


class Selection:
    """Selected (token, latent) pairs of one batch, token-major with latents ascending inside each token.

    ``cols`` [nnz] latent ids, ``bag_offsets`` [N] start of each token's pairs (embedding_bag offsets).
    The latent-major view (``order``, ``latent_offsets``, ``rows_by_latent``) is built once, lazily.
    """

    def __init__(self, cols: torch.Tensor, bag_offsets: torch.Tensor, n_tokens: int, n_latents: int):
        self.cols = cols
        self.bag_offsets = bag_offsets
        self.n_tokens = n_tokens
        self.n_latents = n_latents

    @classmethod
    def from_topk(cls, indices: torch.Tensor, n_latents: int) -> Selection:
        """From per-token indices [N, k] (each row sorted ascending)."""
        n, k = indices.shape
        offsets = torch.arange(0, n * k, k, device=indices.device)
        return cls(indices.reshape(-1), offsets, n, n_latents)

    @classmethod
    def from_flat(cls, flat: torch.Tensor, n_tokens: int, n_latents: int) -> Selection:
        """From sorted flat indices ``token * n_latents + latent`` [nnz]."""
        rows = torch.div(flat, n_latents, rounding_mode="floor")
        counts = torch.bincount(rows, minlength=n_tokens)
        offsets = torch.zeros(n_tokens, dtype=torch.int64, device=flat.device)
        offsets[1:] = counts.cumsum(0)[:-1]
        return cls(flat - rows * n_latents, offsets, n_tokens, n_latents)

    @property
    def nnz(self) -> int:
        return self.cols.numel()

    @cached_property
    def rows(self) -> torch.Tensor:
        counts = torch.diff(self.bag_offsets, append=self.bag_offsets.new_tensor([self.nnz]))
        return torch.repeat_interleave(torch.arange(self.n_tokens, device=self.cols.device), counts)

    @cached_property
    def _latent_major(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cols32 = self.cols.to(torch.int32)  # int32 sort is the fastest on CPU
        _, order = torch.sort(cols32)
        counts = torch.bincount(self.cols, minlength=self.n_latents)
        offsets = torch.zeros(self.n_latents, dtype=torch.int64, device=self.cols.device)
        offsets[1:] = counts.cumsum(0)[:-1]
        return order, offsets, self.rows[order]

    def scatter_rows(self, values: torch.Tensor, dense_rows: torch.Tensor) -> torch.Tensor:
        """Sum over pairs (n, f) of values[pair] * dense_rows[n], accumulated at f: [n_latents, d]."""
        order, offsets, rows_by_latent = self._latent_major
        return F.embedding_bag(
            rows_by_latent,
            dense_rows,
            offsets,
            mode="sum",
            per_sample_weights=values[order].to(dense_rows.dtype),
        )

    def row_dots(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """<a[n], b[f]> at every selected pair -> [nnz]; a [N, d], b [n_latents, d]."""
        crow = torch.cat([self.bag_offsets, self.bag_offsets.new_tensor([self.nnz])])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            pattern = torch.sparse_csr_tensor(
                crow,
                self.cols,
                a.new_zeros(self.nnz),
                (self.n_tokens, self.n_latents),
                check_invariants=False,
            )
            return torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0).values()

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """Dense codes [N, n_latents] with ``values`` at the selected pairs."""
        out = values.new_zeros(self.n_tokens, self.n_latents)
        out[self.rows, self.cols] = values
        return out


class _EncodeValues(torch.autograd.Function):
    """Pre-activations at the selected pairs, with a backward that touches only those pairs."""

    @staticmethod
    def forward(ctx, values, x, W_enc, b_enc, b_dec, sel: Selection, apply_b_dec: bool):
        ctx.sel, ctx.apply_b_dec = sel, apply_b_dec
        ctx.save_for_backward(x, W_enc, b_dec)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        x, W_enc, b_dec = ctx.saved_tensors
        sel: Selection = ctx.sel
        grad = grad.float()
        g_w = g_b = g_bd = None
        if ctx.needs_input_grad[2]:
            x_c = (x - b_dec if ctx.apply_b_dec else x).to(W_enc.dtype)
            g_w = sel.scatter_rows(grad, x_c).T.contiguous().to(W_enc.dtype)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            g_sum = torch.zeros(sel.n_latents, dtype=torch.float32, device=grad.device).index_add_(0, sel.cols, grad)
            if ctx.needs_input_grad[3]:
                g_b = g_sum.to(W_enc.dtype)
            if ctx.needs_input_grad[4] and ctx.apply_b_dec:
                g_bd = -(W_enc.float() @ g_sum).to(b_dec.dtype)
        return None, None, g_w, g_b, g_bd, None, None


def encode_values(
    values: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    sel: Selection,
    apply_b_dec: bool,
) -> torch.Tensor:
    """Attach gradients to pre-activations ``values`` [nnz] already computed (without grad) at ``sel``.

    Gradients flow to W_enc [d_in, d_sae], b_enc and (through x - b_dec) b_dec; never to x.
    """
    return _EncodeValues.apply(values, x, W_enc, b_enc, b_dec, sel, apply_b_dec)


class _DecodeSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, W_dec, sel: Selection):
        ctx.sel = sel
        ctx.save_for_backward(values, W_dec)
        return F.embedding_bag(sel.cols, W_dec, sel.bag_offsets, mode="sum", per_sample_weights=values.to(W_dec.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        values, W_dec = ctx.saved_tensors
        sel: Selection = ctx.sel
        grad_out = grad_out.contiguous().to(W_dec.dtype)
        g_v = sel.row_dots(grad_out, W_dec).to(values.dtype) if ctx.needs_input_grad[0] else None
        g_w = sel.scatter_rows(values, grad_out) if ctx.needs_input_grad[1] else None
        return g_v, g_w, None


def decode_sparse(values: torch.Tensor, W_dec: torch.Tensor, sel: Selection) -> torch.Tensor:
    """sum_j values[j] * W_dec[cols[j]] per token -> [N, d_in] (no b_dec); differentiable in both."""
    return _DecodeSparse.apply(values, W_dec, sel)


def topk_rows(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row, indices sorted ascending within each row: (values [N, k], indices [N, k])."""
    v, i = pre.topk(k, dim=1, sorted=False)
    i, perm = i.sort(dim=1)
    return v.gather(1, perm), i
