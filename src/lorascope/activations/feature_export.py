"""Export adapter-SAE features for a feature browser (SAEDashboard / Neuronpedia-style JSON).

Each feature record carries its id, decoder vector, and top activating windows, each window as parallel ``tokens``
(strings) and ``values`` (activation per token) with ``maxValue`` and ``maxValueTokenIndex`` — the activation
record layout Neuronpedia's API and SAEDashboard's Neuronpedia exports use — plus any extra per-feature fields
(stability, module attribution, causal effect). Windows are de-duplicated: two windows with the same tokens are
one window (a chat template repeated across documents would otherwise fill the list).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lorascope.errors import LorascopeError
from lorascope.io import write_json

FORMAT = "lorascope-feature-browser/1"


def top_windows(
    doc_tokens: Sequence[Sequence[str]],
    doc_acts: Sequence[Sequence[float]],
    n: int = 10,
    before: int = 12,
    after: int = 4,
    doc_ids: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The ``n`` strongest distinct windows of one feature: ``doc_tokens[i]`` token strings and ``doc_acts[i]``
    its activations in document i. Peaks are taken in decreasing activation (ties: earlier document/position);
    a window whose tokens equal an already chosen window's is skipped. Only activations > 0 count."""
    peaks = []
    for i, acts in enumerate(doc_acts):
        if len(acts) != len(doc_tokens[i]):
            raise LorascopeError(
                f"document {i}: {len(doc_tokens[i])} tokens but {len(acts)} activations",
                fix="pass one activation per token",
            )
        peaks += [(-float(a), i, p) for p, a in enumerate(acts) if a > 0]
    peaks.sort()
    out, seen = [], set()
    for _neg, i, p in peaks:
        lo, hi = max(0, p - before), min(len(doc_tokens[i]), p + after + 1)
        key = tuple(doc_tokens[i][lo:hi])
        if key in seen:
            continue
        seen.add(key)
        values = [float(v) for v in doc_acts[i][lo:hi]]
        out.append(
            {
                "docId": doc_ids[i] if doc_ids is not None else str(i),
                "tokens": list(key),
                "values": values,
                "maxValue": values[p - lo],
                "maxValueTokenIndex": p - lo,
            }
        )
        if len(out) == n:
            break
    return out


def feature_record(
    index: int, decoder_row: torch.Tensor, windows: list[dict[str, Any]], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One feature: ``index``, ``decoder`` (list of floats), ``activations`` (windows) and ``extra`` fields."""
    vec = [float(x) for x in decoder_row.detach().double().flatten().tolist()]
    if not all(math.isfinite(x) for x in vec):
        raise LorascopeError(f"feature {index}: decoder vector is not finite", fix="check the SAE weights")
    for w in windows:
        if len(w["tokens"]) != len(w["values"]) or not 0 <= w["maxValueTokenIndex"] < len(w["tokens"]):
            raise LorascopeError(
                f"feature {index}: malformed window {w.get('docId')!r}", fix="build windows with top_windows()"
            )
    rec = {
        "index": int(index),
        "decoder": vec,
        "maxActValue": max((w["maxValue"] for w in windows), default=0.0),
        "activations": windows,
    }
    rec.update(dict(extra or {}))
    return rec


def export_features_json(
    path: str | Path,
    model_id: str,
    layer: int,
    adapter: str,
    features: Sequence[dict[str, Any]],
    hook: str = "resid_post_delta",
) -> dict[str, Any]:
    """Write ``{format, modelId, source, layer, adapter, hook, d_model, features: [...]}`` atomically; returns it.

    ``source`` follows Neuronpedia's ``<layer>-<set name>`` convention (here ``<layer>-lorascope-<adapter>``).
    """
    dims = {len(f["decoder"]) for f in features}
    if len(dims) > 1:
        raise LorascopeError(
            f"features have decoder vectors of different lengths {sorted(dims)}", fix="export one dictionary at a time"
        )
    ids = [f["index"] for f in features]
    if len(set(ids)) != len(ids):
        raise LorascopeError("feature indices repeat in the export", fix="pass each feature once")
    doc = {
        "format": FORMAT,
        "modelId": model_id,
        "source": f"{layer}-lorascope-{adapter}",
        "layer": int(layer),
        "adapter": adapter,
        "hook": hook,
        "d_model": dims.pop() if dims else 0,
        "features": list(features),
    }
    write_json(path, doc)
    return doc


__all__ = ["FORMAT", "export_features_json", "feature_record", "top_windows"]
