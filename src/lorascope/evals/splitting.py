"""Feature splitting by k-sparse probing on SAE latents (Chanin et al.; SAEBench ``k_sparse_probing``).

For each letter:
1. an L1-regularised one-vs-rest probe on all latents ranks them (SAEBench: BCE with class-balancing
   positive weights + ``l1_decay``·mean over letters of Σ|w|, Adam 1e-2 → 1e-5 exponential decay, 50 epochs,
   batch 4096; here zero-initialised and with a seeded shuffle so it is deterministic);
2. for k = 1..max_k, the k latents with the largest (signed, not absolute) L1-probe weight for that letter are
   fitted by a class-balanced L2 logistic regression (sklearn's
   ``LogisticRegression(class_weight="balanced")``, C = 1) and scored by F1 on the test words (logit > 0);
3. k grows while F1 improves by more than ``f1_jump_threshold`` over the best so far; the latents at the last
   accepted k are the letter's **main latents** and their count is the **splitting count** (1 = no split).

Codes are taken from SAEs with unit-norm decoder rows: ``normalised_codes`` multiplies each latent's code by
its decoder row norm (SAEBench folds W_dec norms into the SAE first), so rescaling decoder rows (with the
inverse scale on the codes) changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorascope.errors import LorascopeError
from lorascope.evals.first_letter import LETTERS, binary_f1

F1_JUMP_THRESHOLD = 0.03
MAX_K = 10


# ---- SAE view ----------------------------------------------------------------------------------------------
def decoder_rows(sae) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit-norm decoder rows [F, d] float32, row norms [F]) of any object with ``W_dec`` [F, d]."""
    w = getattr(sae, "W_dec", None)
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise LorascopeError(
            f"{type(sae).__name__} has no 2-D W_dec [d_sae, d_in]",
            fix="pass an SAE or dictionary with W_dec of shape [d_sae, d_in]",
        )
    w = w.detach().float()
    norms = w.norm(dim=1)
    return w / norms.clamp_min(1e-12)[:, None], norms


@torch.no_grad()
def normalised_codes(sae, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Codes as if decoder rows were unit norm: encode(x) · ‖W_dec row‖, float32 [N, F]."""
    _, norms = decoder_rows(sae)
    ref = sae.W_dec
    parts = []
    for lo in range(0, x.shape[0], batch_size):
        chunk = x[lo : lo + batch_size].to(device=ref.device, dtype=ref.dtype)
        parts.append(sae.encode(chunk).detach().float().cpu())
    codes = torch.cat(parts) if parts else torch.zeros(0, norms.shape[0])
    if codes.shape[1] != norms.shape[0]:
        raise LorascopeError(
            f"encode returned {codes.shape[1]} latents but W_dec has {norms.shape[0]} rows",
            fix="pass a consistent SAE / dictionary",
        )
    return codes * norms


# ---- probes ------------------------------------------------------------------------------------------------
def l1_selection_probe(
    codes: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int = len(LETTERS),
    l1_decay: float = 0.01,
    epochs: int = 50,
    batch_size: int = 4096,
    lr: float = 1e-2,
    end_lr: float = 1e-5,
    weight_decay: float = 1e-6,
    seed: int = 0,
) -> torch.Tensor:
    """Weights [n_classes, F] of the L1-regularised one-vs-rest probe that ranks latents (see module doc)."""
    n, f = codes.shape
    y = torch.nn.functional.one_hot(labels.long(), n_classes).float()
    n_pos = y.sum(0)
    pos_weight = (n - n_pos) / n_pos.clamp_min(1.0)
    w = torch.zeros(n_classes, f, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    gamma = math.exp(math.log(end_lr / lr) / max(epochs, 1))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for lo in range(0, n, batch_size):
            idx = perm[lo : lo + batch_size]
            opt.zero_grad()
            loss = loss_fn(codes[idx] @ w.T + b, y[idx]) + l1_decay * w.abs().sum(1).mean()
            loss.backward()
            opt.step()
        sched.step()
    return w.detach()


def balanced_probe(x: torch.Tensor, y: torch.Tensor, c: float = 1.0, max_iter: int = 100,
                   tol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn ``LogisticRegression(C=c, class_weight="balanced")`` on x [N, k], binary y [N]:
    minimises ½‖w‖² + c·Σ_i s_i·logloss_i (s = N / (2·class count)) by damped Newton in float64.
    Returns (w [k], b scalar)."""
    xd = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    yd = y.double().reshape(-1)
    n_pos, n_neg = float(yd.sum()), float((1 - yd).sum())
    if n_pos == 0 or n_neg == 0:
        raise LorascopeError("a k-sparse probe needs both positive and negative training words",
                             fix="use more words (max_words) so every letter has examples")
    s = torch.where(yd > 0, yd.numel() / (2 * n_pos), yd.numel() / (2 * n_neg))
    reg = torch.full((xd.shape[1],), 1.0 / c, dtype=torch.float64)
    reg[-1] = 0.0  # the intercept is not penalised

    def objective(t: torch.Tensor) -> float:
        z = xd @ t
        return float(0.5 * (reg * t * t).sum() + (s * torch.nn.functional.softplus(torch.where(yd > 0, -z, z))).sum())

    theta = torch.zeros(xd.shape[1], dtype=torch.float64)
    f_old = objective(theta)
    for _ in range(max_iter):  # Newton with backtracking: exact for this small convex problem
        prob = torch.sigmoid(xd @ theta)
        grad = reg * theta + xd.T @ (s * (prob - yd))
        hess = (xd * (s * prob * (1 - prob))[:, None]).T @ xd + torch.diag(reg + 1e-12)
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-10:
            cand = theta - t * step
            f_new = objective(cand)
            if f_new <= f_old - 1e-4 * t * float(grad @ step):
                break
            t *= 0.5
        theta, f_prev, f_old = cand, f_old, f_new
        if f_prev - f_new <= tol * max(1.0, abs(f_new)):
            break
    return theta[:-1].float(), theta[-1].float()


@dataclass
class LetterSplitting:
    """k-sparse probing result of one letter: F1 per k (k = 1..max_k), latents per k, and the main latents."""

    letter: str
    f1_by_k: list[float]
    latents_by_k: list[list[int]]
    main_latents: list[int]

    @property
    def splitting_k(self) -> int:
        return len(self.main_latents)


def split_count(f1_by_k: list[float], f1_jump_threshold: float = F1_JUMP_THRESHOLD) -> int:
    """Number of latents kept: grow k while F1 beats the best so far by more than the threshold (SAEBench)."""
    best, kept = -100.0, 0
    for k, f1 in enumerate(f1_by_k, start=1):
        if f1 > best + f1_jump_threshold:
            best, kept = f1, k
        else:
            break
    return kept


def k_sparse_splitting(
    train_codes: torch.Tensor,
    train_labels: torch.Tensor,
    test_codes: torch.Tensor,
    test_labels: torch.Tensor,
    letters: list[int] | None = None,
    max_k: int = MAX_K,
    f1_jump_threshold: float = F1_JUMP_THRESHOLD,
    l1_decay: float = 0.01,
    epochs: int = 50,
    batch_size: int = 4096,
    seed: int = 0,
) -> dict[str, LetterSplitting]:
    """k-sparse probing and splitting for ``letters`` (indices; default all) from codes [N, F], labels [N]."""
    if train_codes.shape[1] != test_codes.shape[1]:
        raise LorascopeError(
            "train and test codes have different widths", fix="encode both with the same SAE"
        )
    l1w = l1_selection_probe(
        train_codes.float(), train_labels, l1_decay=l1_decay, epochs=epochs, batch_size=batch_size, seed=seed
    )
    max_k = min(max_k, train_codes.shape[1])
    out: dict[str, LetterSplitting] = {}
    for c in letters if letters is not None else range(len(LETTERS)):
        ytr, yte = train_labels == c, test_labels == c
        f1s, feats = [], []
        for k in range(1, max_k + 1):
            ids = l1w[c].topk(k).indices
            w, b = balanced_probe(train_codes[:, ids], ytr)
            pred = test_codes[:, ids].float() @ w + b > 0
            f1s.append(binary_f1(pred, yte))
            feats.append(ids.tolist())
        kept = split_count(f1s, f1_jump_threshold)
        out[LETTERS[c]] = LetterSplitting(LETTERS[c], f1s, feats, feats[kept - 1] if kept else [])
    return out


__all__ = [
    "F1_JUMP_THRESHOLD",
    "MAX_K",
    "LetterSplitting",
    "balanced_probe",
    "decoder_rows",
    "k_sparse_splitting",
    "l1_selection_probe",
    "normalised_codes",
    "split_count",
]
