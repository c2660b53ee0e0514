"""Accept numpy arrays and torch tensors alike; check shapes and finiteness with clear errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lorascope.errors import LorascopeError


def as_tensor(
    x: Any, name: str = "input", dtype: torch.dtype | None = None, ndim: int | None = None, check_finite: bool = True
) -> torch.Tensor:
    """Convert ``x`` (numpy array, torch tensor, nested list) to a torch tensor on its current device.

    ``dtype`` converts; ``ndim`` checks the rank; ``check_finite`` raises on NaN/inf naming ``name``.
    """
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.as_tensor(np.asarray(x))
    if dtype is not None:
        t = t.to(dtype)
    if ndim is not None and t.ndim != ndim:
        raise LorascopeError(
            f"{name} must be {ndim}-D, got shape {tuple(t.shape)}",
            fix="pass a [rows, dim] matrix" if ndim == 2 else "check the array's shape",
        )
    if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise LorascopeError(f"{name} contains NaN or inf values", fix="drop or repair the non-finite rows first")
    return t


def same_dim(a: torch.Tensor, b: torch.Tensor, name_a: str = "A", name_b: str = "B") -> None:
    if a.shape[-1] != b.shape[-1]:
        raise LorascopeError(
            f"{name_a} has dimension {a.shape[-1]} but {name_b} has {b.shape[-1]}",
            fix="compare objects from the same model width (same d)",
        )


def paired_activations(h_base, h_ft) -> tuple[torch.Tensor, torch.Tensor]:
    """h_base, h_ft [n, d] of the same tokens as float64 tensors; clear errors for mismatched width or count."""
    hb = as_tensor(h_base, "h_base", torch.float64, ndim=2)
    hf = as_tensor(h_ft, "h_ft", torch.float64, ndim=2)
    same_dim(hb, hf, "h_base", "h_ft")
    if hb.shape[0] != hf.shape[0]:
        raise LorascopeError(
            f"h_base has {hb.shape[0]} tokens but h_ft has {hf.shape[0]}",
            fix="pass base and adapted activations of the same tokens",
        )
    return hb, hf
