"""Top-activating contexts: pick each feature's strongest tokens and cut a text window around them.

Pure functions: the pipeline supplies activations and token bookkeeping; nothing here touches a model.
Output is what contexts.json holds: one dict per feature with a list of contexts
``{doc_id, text_before, token, text_after, activation}``.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorascope.errors import LorascopeError


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


@dataclass(frozen=True)
class TokenSource:
    """Where each activation row came from: its token id, its document (an index into ``docs``) and its position.

    token_ids, doc_index, positions: [N] (numpy or torch); docs: the token-id list of every document; decode: token
    ids -> text. Raises LorascopeError if the three columns differ in length.
    """

    token_ids: Any
    doc_index: Any
    positions: Any
    docs: Sequence[Sequence[int]]
    decode: Callable[[list[int]], str]

    def __post_init__(self) -> None:
        for name in ("token_ids", "doc_index", "positions"):
            object.__setattr__(self, name, _as_numpy(getattr(self, name)).astype(np.int64).reshape(-1))
        if not len(self.token_ids) == len(self.doc_index) == len(self.positions):
            raise LorascopeError(
                f"lengths differ: token_ids {len(self.token_ids)}, doc_index {len(self.doc_index)}, "
                f"positions {len(self.positions)}",
                fix="pass one entry per activation row",
            )

    def __len__(self) -> int:
        return len(self.token_ids)

    def window(self, i: int, width: int, act: float) -> dict[str, Any]:
        """The context of row ``i``: ``width`` tokens of text on each side, clipped at the document's edges."""
        d, p = int(self.doc_index[i]), int(self.positions[i])
        if not 0 <= d < len(self.docs) or not 0 <= p < len(self.docs[d]):
            raise LorascopeError(
                f"token {i} points at document {d} position {p}, outside the documents",
                fix="pass the docs the activations were extracted from",
            )
        ids = [int(t) for t in self.docs[d]]
        if ids[p] != int(self.token_ids[i]):
            raise LorascopeError(
                f"token {i}: docs[{d}][{p}] is {ids[p]} but token_ids says {int(self.token_ids[i])}",
                fix="keep token_ids, doc_index and positions aligned with docs",
            )
        return {
            "doc_id": d,
            "text_before": self.decode(ids[max(0, p - width) : p]),
            "token": self.decode([ids[p]]),
            "text_after": self.decode(ids[p + 1 : p + 1 + width]),
            "activation": act,
        }


def top_activating_contexts(
    acts: Any,
    source: TokenSource,
    features: int | Iterable[int],
    n_per_feature: int,
    *,
    window: int = 12,
    layer: int = -1,
    adapter: str = "",
    column_of: Callable[[int], int] | None = None,
) -> list[dict[str, Any]]:
    """Top ``n_per_feature`` activating tokens of each feature, with ``window`` tokens of text on each side.

    acts: [N] (one feature; ``features`` names it) or [N, F] (``features`` are column indices, or pass
    ``column_of`` to map a feature id to its column); ``source`` says which token each of the N rows is.
    Only strictly positive activations count; ties break by the lower token index; a window whose text equals an
    already chosen one is skipped (no two identical windows). Density = fraction of the N
    tokens with activation > 0; max_act = max activation (0 if the feature never fires).
    Raises LorascopeError if token bookkeeping disagrees with ``source.docs``.
    """
    a = _as_numpy(acts).astype(np.float64, copy=False)
    feats = [int(features)] if isinstance(features, (int, np.integer)) else [int(f) for f in features]
    a, cols = _columns(a, feats, column_of)
    n = a.shape[0]
    if len(source) != n:
        raise LorascopeError(
            f"lengths differ: acts {n}, token_ids {len(source)}", fix="pass one entry per activation row"
        )
    if n_per_feature < 1 or window < 0:
        raise LorascopeError("n_per_feature must be >= 1 and window >= 0", fix="choose valid sizes")
    out: list[dict[str, Any]] = []
    for f, c in zip(feats, cols, strict=True):
        col = a[:, c]
        firing = col > 0
        out.append(
            {
                "layer": int(layer),
                "adapter": str(adapter),
                "feature": f,
                "density": float(firing.mean()) if n else 0.0,
                "max_act": float(col.max()) if n and firing.any() else 0.0,
                "contexts": _distinct_top(col, source, n_per_feature, window),
            }
        )
    return out


def _columns(a: np.ndarray, feats: list[int], column_of: Callable[[int], int] | None) -> tuple[np.ndarray, list[int]]:
    """acts as [N, F'] and the column of each requested feature; raises LorascopeError on a shape mismatch."""
    if a.ndim == 1:
        if len(feats) != 1:
            raise LorascopeError(
                f"1-D activations belong to one feature, got {len(feats)} feature ids",
                fix="pass acts of shape [N, F] or a single feature id",
            )
        return a[:, None], [0]
    if a.ndim != 2:
        raise LorascopeError(f"acts must be [N] or [N, F], got shape {a.shape}", fix="reshape the activations")
    cols = [column_of(f) if column_of else f for f in feats]
    bad = [c for c in cols if not 0 <= c < a.shape[1]]
    if bad:
        raise LorascopeError(
            f"feature columns {bad} are outside acts' {a.shape[1]} columns",
            fix="pass column indices into acts, or column_of to map ids to columns",
        )
    return a, cols


def _distinct_top(col: np.ndarray, source: TokenSource, n: int, window: int) -> list[dict[str, Any]]:
    """The strongest firing tokens' windows, strongest first; a window identical to one already shown is skipped."""
    chosen: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()
    for i in np.argsort(-col, kind="stable"):
        if len(chosen) == n or not col[i] > 0:
            break
        w = source.window(int(i), window, float(col[i]))
        key = (w["text_before"], w["token"], w["text_after"])
        if key not in seen:
            seen.add(key)
            chosen.append(w)
    return chosen


def _visible(text: str) -> str:
    """HTML-escaped text with newlines/tabs shown as symbols so each context stays on one line."""
    return html.escape(text, quote=True).replace("\r", "").replace("\n", "↵").replace("\t", "→")


def context_html(ctx: dict[str, Any]) -> str:
    """One context as an HTML snippet; the activating token is in a <mark>. Every string is escaped."""
    act = float(ctx.get("activation", float("nan")))
    return (
        f'<div class="ctx"><span class="act">{act:.3g}</span> '
        f'<span class="txt">{_visible(str(ctx.get("text_before", "")))}'
        f'<mark title="activation {act:.4g}">{_visible(str(ctx.get("token", "")))}</mark>'
        f"{_visible(str(ctx.get('text_after', '')))}</span></div>"
    )


def feature_html(entry: dict[str, Any]) -> str:
    """One feature's block: heading (layer, adapter, feature, density, max activation) and its contexts."""
    head = (
        f"L{int(entry.get('layer', -1))} · {html.escape(str(entry.get('adapter', '')))} · "
        f"feature {int(entry.get('feature', -1))}"
    )
    stats = (
        f"density {100 * float(entry.get('density', float('nan'))):.3g}% · "
        f"max {float(entry.get('max_act', float('nan'))):.3g}"
    )
    body = "".join(context_html(c) for c in entry.get("contexts", [])) or '<p class="muted">no firing tokens</p>'
    return f'<div class="feature"><h4>{head} <span class="muted">{stats}</span></h4>{body}</div>'
