"""The sparse training path (embedding_bag decode, latent-major encoder backward) equals the dense path."""

from __future__ import annotations

import pytest
import torch

from lorascope.saes import create_sae
from lorascope.saes._sparse import Selection, decode_sparse, encode_values, topk_rows
from lorascope.saes.base import TrainContext


def _loss_and_grads(sae, x, dead_mask, sparse: bool):
    sae.sparse_kernels = sparse
    sae.zero_grad(set_to_none=True)
    out = sae.training_loss(x, TrainContext(0, 10, 1.0, dead_mask))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_path_equals_dense_path(arch, with_dead):
    torch.manual_seed(0)
    sae = create_sae(arch, 24, 96, k=5, seed=1, k_aux=7)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(24) * 0.1)
        sae.b_enc.copy_(torch.randn(96) * 0.1)
    x = torch.randn(50, 24)
    dead = (torch.arange(96) % 5 == 0) if with_dead else None
    sae.eval()  # keep BatchTopK's threshold fixed between the two calls
    out_s, g_s = _loss_and_grads(sae, x, dead, sparse=True)
    out_d, g_d = _loss_and_grads(sae, x, dead, sparse=False)
    assert torch.allclose(out_s.x_hat, out_d.x_hat, atol=1e-5)
    assert torch.allclose(out_s.loss, out_d.loss, rtol=1e-5)
    assert set(out_s.parts) == set(out_d.parts) == ({"mse", "auxk"} if with_dead else {"mse"})
    assert torch.equal(out_s.active, out_d.active)
    assert set(g_s) == set(g_d) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in g_s:
        assert torch.allclose(g_s[name], g_d[name], atol=1e-4, rtol=1e-4), name


def test_kernels_match_dense_formulas_directly():
    torch.manual_seed(0)
    n, d, f, k = 40, 12, 30, 4
    x = torch.randn(n, d)
    W = torch.randn(d, f, requires_grad=True)
    b = torch.randn(f, requires_grad=True)
    bd = torch.randn(d, requires_grad=True)
    Wd = torch.randn(f, d, requires_grad=True)
    target = torch.randn(n, d)

    pre = (x - bd) @ W + b
    v, i = topk_rows(pre.detach(), k)
    assert torch.all(i[:, 1:] > i[:, :-1])  # indices ascend within each row
    dense_codes = torch.zeros(n, f).scatter(1, i, pre.gather(1, i))
    loss_d = ((dense_codes @ Wd - target) ** 2).sum()
    gd = torch.autograd.grad(loss_d, [W, b, bd, Wd])

    sel = Selection.from_topk(i, f)
    vals = encode_values(v.reshape(-1), x, W, b, bd, sel, True)
    out = decode_sparse(vals, Wd, sel)
    loss_s = ((out - target) ** 2).sum()
    gs = torch.autograd.grad(loss_s, [W, b, bd, Wd])
    assert torch.allclose(out, dense_codes @ Wd, atol=1e-5)
    for a, c in zip(gd, gs, strict=True):
        assert torch.allclose(a, c, atol=1e-3, rtol=1e-4)
    assert torch.equal(sel.dense(v.reshape(-1)), torch.zeros(n, f).scatter(1, i, v))


def test_selection_from_flat_matches_from_topk():
    i = torch.tensor([[0, 3], [1, 2], [0, 4]])
    flat = (i + torch.arange(3)[:, None] * 5).flatten()
    a, b = Selection.from_topk(i, 5), Selection.from_flat(flat, 3, 5)
    assert torch.equal(a.cols, b.cols) and torch.equal(a.bag_offsets, b.bag_offsets)
    assert torch.equal(a.rows, torch.tensor([0, 0, 1, 1, 2, 2]))
    # variable bag sizes, including an empty token
    s = Selection.from_flat(torch.tensor([1, 2, 3, 11, 12]), 3, 5)
    assert s.bag_offsets.tolist() == [0, 3, 3] and s.rows.tolist() == [0, 0, 0, 2, 2]
