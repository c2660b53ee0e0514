"""Decoder comparison: chunked MMCS / best match / overlap, Hungarian matching, tidy rows."""

import numpy as np
import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry import (
    CompareOptions,
    best_match_both,
    best_match_cosines,
    compare_dictionaries,
    hungarian_match,
    mmcs,
    overlap,
    seed_vs_seed,
)


def _dict(F, d, seed):
    return torch.randn(F, d, generator=torch.Generator().manual_seed(seed))


def _brute(A, B, absolute=False):
    An = A.double() / A.double().norm(dim=1, keepdim=True)
    Bn = B.double() / B.double().norm(dim=1, keepdim=True)
    C = An @ Bn.T
    return C.abs() if absolute else C


@pytest.mark.parametrize("absolute", [False, True])
def test_chunked_best_match_equals_dense(absolute):
    A, B = _dict(37, 12, 0) * 3, _dict(53, 12, 1)
    C = _brute(A, B, absolute)
    # chunk_bytes forces 1-row chunks and 5-row chunks: many chunks, both reductions exercised
    for chunk in (4 * 53, 4 * 53 * 5, 2**20):
        ab, ba = best_match_both(A, B, absolute=absolute, chunk_bytes=chunk)
        torch.testing.assert_close(ab.cosine.double(), C.max(1).values, atol=1e-6, rtol=0)
        torch.testing.assert_close(ba.cosine.double(), C.max(0).values, atol=1e-6, rtol=0)
        assert torch.equal(ab.index, C.argmax(1))
        assert torch.equal(ba.index, C.argmax(0))
    m = mmcs(A.numpy(), B.numpy(), absolute=absolute)  # numpy accepted
    assert m.a_to_b == pytest.approx(float(C.max(1).values.mean()), abs=1e-6)
    assert m.b_to_a == pytest.approx(float(C.max(0).values.mean()), abs=1e-6)
    assert m.kind == ("absolute" if absolute else "signed")


def test_sign_flip_counts_only_with_absolute():
    A = _dict(20, 8, 2)
    m_signed, m_abs = mmcs(A, -A), mmcs(A, -A, absolute=True)
    assert m_abs.a_to_b == pytest.approx(1.0, abs=1e-6)
    assert m_signed.a_to_b < 0.9


def test_overlap_and_alive_masks():
    B = _dict(30, 10, 3)
    A = torch.cat([B[:10] * 2.5, _dict(10, 10, 4)])  # first 10 atoms are copies (rescaled) of B's
    best = best_match_cosines(A, B)
    assert torch.equal(best.index[:10], torch.arange(10))
    assert overlap(A, B, 0.999) == pytest.approx(0.5)
    alive_b = torch.ones(30, dtype=torch.bool)
    alive_b[:5] = False  # kill B atoms 0..4: A atoms 0..4 lose their exact match
    masked = best_match_cosines(A, B, alive_b=alive_b)
    assert (masked.index >= 5).all()
    assert overlap(A, B, 0.999, alive_b=alive_b) == pytest.approx(0.25)
    alive_a = torch.zeros(20, dtype=torch.bool)
    alive_a[:10] = True
    assert mmcs(A, B, alive_a=alive_a).a_to_b == pytest.approx(1.0, abs=1e-6)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(LorascopeError, match="dimension"):
        mmcs(_dict(4, 8, 0), _dict(4, 9, 1))
    bad = _dict(4, 8, 0)
    bad[2, 3] = float("nan")
    with pytest.raises(LorascopeError, match="NaN"):
        mmcs(bad, _dict(4, 8, 1))
    with pytest.raises(LorascopeError, match="zero rows"):
        mmcs(torch.zeros(3, 8), _dict(4, 8, 1))
    with pytest.raises(LorascopeError, match="alive mask"):
        mmcs(_dict(4, 8, 0), _dict(4, 8, 1), alive_a=torch.ones(5, dtype=torch.bool))
    with pytest.raises(LorascopeError, match="tau"):
        overlap(_dict(4, 8, 0), _dict(4, 8, 1), tau=1.5)


def test_hungarian_recovers_permutation_with_sign_flips():
    F, d = 48, 24
    W = _dict(F, d, 5)
    g = torch.Generator().manual_seed(6)
    perm = torch.randperm(F, generator=g)
    signs = torch.where(torch.rand(F, generator=g) < 0.5, -1.0, 1.0)
    B = (W[perm] * signs[:, None]) * 1.7 + 0.01 * torch.randn(F, d, generator=g)
    pairs = hungarian_match(W, B, absolute=True)
    # atom i of W sits at row j of B where perm[j] = i
    inv = torch.argsort(perm)
    assert pairs["a"].tolist() == list(range(F))
    assert pairs["b"].tolist() == inv.tolist()
    assert np.array_equal(np.sign(pairs["cosine"].to_numpy()), signs[inv].numpy())
    assert (np.abs(pairs["cosine"]) > 0.99).all()
    # sparse top-candidate matching gives the same pairs here
    sparse = hungarian_match(W, B, absolute=True, candidates=3)
    assert sparse["b"].tolist() == inv.tolist()
    # signed cosines and no flips: the plain permutation is recovered too
    plain = hungarian_match(W, W[perm])
    assert plain["b"].tolist() == inv.tolist()


def test_hungarian_alive_and_rectangular_and_cap():
    B = _dict(30, 16, 7)
    A = B[[4, 9, 17]] * 0.5
    pairs = hungarian_match(A, B)
    assert pairs["b"].tolist() == [4, 9, 17]
    alive_b = torch.ones(30, dtype=torch.bool)
    alive_b[9] = False
    pairs = hungarian_match(A, B, alive_b=alive_b)
    assert 9 not in pairs["b"].tolist() and len(pairs) == 3
    with pytest.raises(LorascopeError, match="candidates"):
        hungarian_match(A, B, max_dense=10)


def test_compare_dictionaries_rows():
    A, B = _dict(64, 32, 8), _dict(80, 32, 9)
    rows = compare_dictionaries(A, B, "adapter", "ref", CompareOptions(seed=0, n_boot=200), layer=3)
    by = {r.metric: r for r in rows}
    m = mmcs(A, B)
    assert by["mmcs_adapter_to_ref"].value == pytest.approx(m.a_to_b, abs=1e-6)
    assert by["mmcs_ref_to_adapter"].value == pytest.approx(m.b_to_a, abs=1e-6)
    r = by["mmcs_adapter_to_ref"]
    assert r.ci_low <= r.value <= r.ci_high and r.layer == 3 and r.null_name == "random_isotropic"
    # random dictionaries: the value sits near its isotropic null
    assert r.value == pytest.approx(r.null_value, rel=0.1)
    assert {"overlap_adapter_to_ref@0.5", "overlap_ref_to_adapter@0.9", "hungarian_mean_cos"} <= set(by)
    assert all(r.family == "decoder_similarity" and r.note.startswith("signed") for r in rows)
    s = seed_vs_seed(A, A * 2)[0]
    assert s.metric == "mmcs_seed_vs_seed"
    assert s.value == pytest.approx(1.0, abs=1e-6) and s.null_name == "seed_vs_seed"
