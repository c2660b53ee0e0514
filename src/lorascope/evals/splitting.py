"""Feature splitting by k-sparse probing on SAE latents (Chanin et al.; SAEBench ``k_sparse_probing``).

For each letter:
1. an L1-regularised one-vs-rest probe on all latents ranks them (SAEBench: BCE with class-balancing
   positive weights + ``l1_decay``·mean over letters of Σ|w|, fitted there by Adam; here the same objective
   solved exactly by scikit-learn, :class:`lorascope.evals.probe.LogisticProbe`);
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

from dataclasses import dataclass

import torch

from lorascope.errors import LorascopeError
from lorascope.evals.first_letter import LETTERS, binary_f1
from lorascope.evals.probe import LogisticProbe

F1_JUMP_THRESHOLD = 0.03
MAX_K = 10
L1_DECAY = 0.01  # SAEBench k-sparse probing: L1 weight of the latent-ranking probe


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
    codes: torch.Tensor, labels: torch.Tensor, n_classes: int = len(LETTERS), l1_decay: float = L1_DECAY, seed: int = 0
) -> torch.Tensor:
    """Weights [n_classes, F] of the L1-regularised one-vs-rest probe that ranks latents (see module doc).

    Per letter, SAEBench's objective  mean_i pw_i·BCE_i + l1_decay·‖w‖₁  (pw: positives weighted n_neg/n_pos)
    equals, up to a factor, sklearn's  ‖w‖₁ + C·Σ_i s_i·logloss_i  with balanced weights s and
    C = 2·n_neg / (N²·l1_decay); it is solved exactly (liblinear) instead of by Adam."""
    n = codes.shape[0]
    y = torch.nn.functional.one_hot(labels.long(), n_classes).bool()
    present = [j for j in range(n_classes) if bool(y[:, j].any()) and not bool(y[:, j].all())]
    w = torch.zeros(n_classes, codes.shape[1])
    if present:
        cs = [2.0 * float((~y[:, j]).sum()) / (n * n * l1_decay) for j in present]
        probe = LogisticProbe(penalty="l1", seed=seed).fit(codes, y[:, present], c_per_class=cs)
        w[present] = probe.weight
    return w


def balanced_probe(x: torch.Tensor, y: torch.Tensor, c: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn ``LogisticRegression(C=c, class_weight="balanced")`` on x [N, k], binary y [N]:
    minimises ½‖w‖² + c·Σ_i s_i·logloss_i (s = N / (2·class count)). Returns (w [k], b scalar)."""
    yb = y.reshape(-1).bool()
    if bool(yb.all()) or not bool(yb.any()):
        raise LorascopeError(
            "a k-sparse probe needs both positive and negative training words",
            fix="use more words (max_words) so every letter has examples",
        )
    probe = LogisticProbe(c=c).fit(x, yb)
    return probe.weight[0], probe.bias[0]


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
    seed: int = 0,
) -> dict[str, LetterSplitting]:
    """k-sparse probing and splitting for ``letters`` (indices; default all) from codes [N, F], labels [N].

    Latents are ranked by ``l1_selection_probe`` at SAEBench's L1 strength ``L1_DECAY``."""
    if train_codes.shape[1] != test_codes.shape[1]:
        raise LorascopeError("train and test codes have different widths", fix="encode both with the same SAE")
    l1w = l1_selection_probe(train_codes.float(), train_labels, l1_decay=L1_DECAY, seed=seed)
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
