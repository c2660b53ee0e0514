"""One linear probe: scikit-learn's ``LogisticRegression`` behind a fit / decision_function / predict class that
takes and returns torch tensors (SAEBench fits its probes with the same estimator).

Each class gets its own binary one-vs-rest problem with sklearn's ``class_weight="balanced"`` sample weights
(s = N / (2·count of the sample's class)); sklearn minimises  penalty(w) + C·Σ_i s_i·logloss_i  with an
unpenalised intercept. ``standardize`` centres x and divides it by one scalar (its RMS per dimension) before
fitting and folds that back into the weights, so C is in those units and the decision function is invariant to
an affine change of units of x. Weights act on raw x: logits = x @ weight.T + bias.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from lorascope.errors import LorascopeError


@dataclass
class LogisticProbe:
    """Balanced one-vs-rest logistic regression. ``penalty`` "l2" (lbfgs) or "l1" (liblinear, sparse weights)."""

    c: float = 1.0
    penalty: str = "l2"
    standardize: bool = False
    max_iter: int = 1000
    tol: float = 1e-8
    seed: int = 0
    weight: torch.Tensor | None = None  # [C, d] after fit
    bias: torch.Tensor | None = None  # [C]

    def _estimator(self, c: float):
        from sklearn.linear_model import LogisticRegression

        solver = "liblinear" if self.penalty == "l1" else "lbfgs"
        return LogisticRegression(
            C=c,
            l1_ratio=1.0 if self.penalty == "l1" else 0.0,
            solver=solver,
            class_weight="balanced",
            max_iter=self.max_iter,
            tol=self.tol,
            random_state=self.seed,
        )

    def fit(self, x: torch.Tensor, targets: torch.Tensor, c_per_class: list[float] | None = None) -> LogisticProbe:
        """Fit on x [N, d] and binary targets [N] (one problem) or [N, C] (one per column); ``c_per_class``
        overrides ``c`` per column. A column with one class only gets the constant decision."""
        xd = x.detach().double().cpu()
        y = targets.detach().reshape(targets.shape[0], -1).bool().cpu().numpy()
        n, d = xd.shape
        if n == 0:
            raise LorascopeError("no samples to fit a probe on", fix="use more words")
        mu = xd.mean(0) if self.standardize else torch.zeros(d, dtype=torch.float64)
        scale = float(((xd - mu) ** 2).mean().sqrt()) if self.standardize else 1.0
        scale = scale if scale > 0 else 1.0
        xs = ((xd - mu) / scale).numpy()
        w = np.zeros((y.shape[1], d))
        b = np.zeros(y.shape[1])
        for j in range(y.shape[1]):
            if y[:, j].all() or not y[:, j].any():  # one class only: the constant decision (|logit| = 30)
                b[j] = 30.0 if y[:, j].all() else -30.0
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence / deprecation chatter; results are checked by tests
                est = self._estimator(c_per_class[j] if c_per_class else self.c).fit(xs, y[:, j])
            w[j], b[j] = est.coef_[0], est.intercept_[0]
        w_raw = torch.from_numpy(w) / scale
        self.weight = w_raw.float().contiguous()
        self.bias = (torch.from_numpy(b) - w_raw @ mu).float()
        return self

    def decision_function(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, C] on raw x."""
        if self.weight is None:
            raise LorascopeError("the probe is not fitted", fix="call fit(x, targets) first")
        return x.float() @ self.weight.T + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean decisions [N, C] (logit > 0)."""
        return self.decision_function(x) > 0
