"""Which pretrained reference SAE file to use at each layer.

Released suites name their files by a training statistic that differs per layer: Gemma Scope stores one SAE per
(layer, width, L0) under ``layer_{L}/width_16k/average_l0_{L0}/params.npz``, and the L0 values differ per layer
and per model (SAELens lists them in ``sae_lens/pretrained_saes.yaml``; e.g. for ``gemma-scope-9b-pt-res`` at
width 16k its canonical picks are ``average_l0_100`` at layer 9, ``average_l0_68`` at layer 20 and
``average_l0_114`` at layer 31). So one path template cannot name them all. ``reference_sae.path`` accepts:

- a mapping ``{layer: path}`` (explicit, recommended for a paper-scale run);
- a template with ``{layer}`` naming one existing file or folder per layer;
- a glob (``*``, ``?``, ``[``) with ``{layer}``: several candidates per layer; the one whose L0 (parsed from
  ``average_l0_<N>`` / ``l0_<N>`` in its path) is closest to ``target_l0`` is picked (ties: the lower L0), and the
  pick is logged and returned with the candidates it was chosen from.
"""

from __future__ import annotations

import glob
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lorascope.errors import LorascopeError

_L0 = re.compile(r"(?:average_)?l0[_-](\d+(?:\.\d+)?)", re.IGNORECASE)
_GLOB_CHARS = ("*", "?", "[")
_log = logging.getLogger("lorascope")


@dataclass(frozen=True)
class ReferencePick:
    """The reference SAE chosen for one layer, how, and among which candidates (glob only)."""

    layer: int
    path: Path
    rule: str  # "mapping" | "template" | "glob"
    l0: float | None = None
    candidates: tuple[tuple[str, float | None], ...] = field(default_factory=tuple)

    def describe(self) -> str:
        if self.rule != "glob":
            return f"layer {self.layer}: {self.path} ({self.rule})"
        others = ", ".join(f"{c:g}" for _, c in self.candidates if c is not None)
        return f"layer {self.layer}: picked {self.path} (L0 {self.l0:g}; candidates' L0: {others})"


def l0_of(path: str | Path) -> float | None:
    """The L0 written in a path (``.../average_l0_71/params.npz`` -> 71.0), the last one if several; else None."""
    found = _L0.findall(str(path))
    return float(found[-1]) if found else None


def _pick_closest(layer: int, pattern: str, target_l0: float | None) -> ReferencePick:
    matches = sorted(glob.glob(pattern))
    if not matches:
        raise LorascopeError(
            f"reference_sae.path for layer {layer}: nothing matches {pattern}",
            fix="check the folder (download the SAEs first) and the {layer} placeholder",
        )
    cands = tuple((m, l0_of(m)) for m in matches)
    if len(cands) == 1:
        return ReferencePick(layer, Path(matches[0]), "glob", cands[0][1], cands)
    if target_l0 is None:
        raise LorascopeError(
            f"reference_sae.path for layer {layer}: {len(cands)} files match {pattern}",
            fix="set reference_sae.target_l0 to pick the closest L0, or give {layer: path}",
        )
    with_l0 = [(m, v) for m, v in cands if v is not None]
    if not with_l0:
        raise LorascopeError(
            f"reference_sae.path for layer {layer}: no L0 in the names matching {pattern}",
            fix="give an explicit {layer: path} mapping",
        )
    path, l0 = min(with_l0, key=lambda mv: (abs(mv[1] - target_l0), mv[1]))
    return ReferencePick(layer, Path(path), "glob", l0, cands)


def resolve_reference_paths(
    spec: str | Mapping[int | str, str], layers: Sequence[int], target_l0: float | None = None
) -> dict[int, ReferencePick]:
    """{layer: ReferencePick} for ``spec`` (module docstring); every picked path exists. Logs each glob pick."""
    out: dict[int, ReferencePick] = {}
    if isinstance(spec, Mapping):
        given = {int(k): v for k, v in spec.items()}
        missing = [L for L in layers if L not in given]
        if missing:
            raise LorascopeError(
                f"reference_sae.path has no entry for layer {missing[0]}",
                fix=f"give a path for every extraction layer {list(layers)}",
            )
        items = [(L, str(given[L]), "mapping") for L in layers]
    else:
        items = [(L, str(spec), "template") for L in layers]
    for layer, raw, rule in items:
        text = str(Path(raw.replace("{layer}", str(layer))).expanduser())
        if any(c in text for c in _GLOB_CHARS):
            pick = _pick_closest(layer, text, target_l0)
            _log.warning("reference SAE %s", pick.describe())
        else:
            if not Path(text).exists():
                raise LorascopeError(
                    f"reference_sae.path for layer {layer}: {text} does not exist",
                    fix="check the path; use {layer} in a template, a {layer: path} mapping, or a glob with target_l0",
                )
            pick = ReferencePick(layer, Path(text), rule, l0_of(text))
        out[layer] = pick
    return out


__all__ = ["ReferencePick", "l0_of", "resolve_reference_paths"]
