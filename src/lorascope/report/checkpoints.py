"""The report's per-checkpoint section: for a run over a folder of training checkpoints, one table per (sequence,
layer) with one row per step, so a reader sees when the change appears (Δ norm), when it lines up with the base
model's features (alignment), how sparse it is (density), and what the adapter SAE's strongest features fire on.

Built only from the results table (the ``checkpoint/checkpoint_step`` rows say which adapters are checkpoints of
which sequence, at which step) and contexts.json; a run without checkpoints gets no section. Each checkpoint has
its own adapter SAE, so feature ids are not comparable across rows: the top features are shown by the token on
which each fires hardest.
"""

from __future__ import annotations

import html
import math
from typing import Any

from lorascope import results_schema as schema

# (column heading, metric) of each per-checkpoint value, in table order
COLUMNS: tuple[tuple[str, str], ...] = (
    ("mean ‖Δ‖", schema.DELTA_NORM_MEAN),
    ("mean ‖Δ‖/‖h‖", schema.REL_DELTA_NORM_MEAN),
    ("effective rank", schema.EFFECTIVE_RANK_PR),
    ("MMCS adapter→ref", schema.MMCS_ADAPTER_TO_REF),
    ("FVU adapter SAE", schema.FVU_ADAPTER_SAE),
    ("L0 adapter SAE", schema.L0_ADAPTER_SAE),
    ("dead fraction", schema.DEAD_FRACTION_ADAPTER_SAE),
    ("KL recovered vs Δ̂ = 0 (adapter SAE)", schema.KL_RECOVERED_REL_ADAPTER_SAE),
)
TOP_FEATURES_SHOWN = 3


def checkpoint_steps(df) -> dict[str, dict[str, int]]:
    """{sequence: {adapter: step}} from the ``checkpoint_step`` rows (empty when the run has no sequence)."""
    rows = df[(df["family"] == schema.CHECKPOINT) & (df["metric"] == schema.CHECKPOINT_STEP)]
    out: dict[str, dict[str, int]] = {}
    for rec in rows.itertuples(index=False):
        out.setdefault(str(rec.note), {})[str(rec.adapter)] = int(rec.value)
    return out


def checkpoint_table(df, contexts: list[dict[str, Any]], steps: dict[str, int], layer: int) -> list[dict[str, Any]]:
    """One dict per checkpoint (step order): ``step``, ``checkpoint``, each metric of :data:`COLUMNS` (NaN when the
    run has none) and ``top_features`` (the strongest token of each of the first features in contexts.json)."""
    values = df[(df["layer"] == layer) & df["adapter"].isin(list(steps))]
    by_key = {(str(r.adapter), str(r.metric)): float(r.value) for r in values.itertuples(index=False)}
    out = []
    for adapter, step in sorted(steps.items(), key=lambda kv: kv[1]):
        row: dict[str, Any] = {"step": step, "checkpoint": adapter}
        for _, metric in COLUMNS:
            row[metric] = by_key.get((adapter, metric), math.nan)
        feats = [c for c in contexts if int(c.get("layer", -1)) == layer and str(c.get("adapter", "")) == adapter]
        row["top_features"] = [
            (int(f.get("feature", -1)), str(f["contexts"][0].get("token", "")))
            for f in feats[:TOP_FEATURES_SHOWN]
            if f.get("contexts")
        ]
        out.append(row)
    return out


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "<td class='num'>—</td>" if not math.isfinite(v) else f"<td class='num'>{v:.4g}</td>"
    return f"<td class='num'>{html.escape(str(v))}</td>"


def _table_html(rows: list[dict[str, Any]]) -> str:
    head = "".join(
        f"<th>{html.escape(h)}</th>" for h in ("step", "checkpoint", *(c for c, _ in COLUMNS), "top features (token)")
    )
    body = []
    for r in rows:
        feats = ", ".join(f"#{f} {html.escape(repr(tok))}" for f, tok in r["top_features"]) or "—"
        cells = (
            _cell(r["step"])
            + f"<td>{html.escape(r['checkpoint'])}</td>"
            + "".join(_cell(r[m]) for _, m in COLUMNS)
            + f"<td>{feats}</td>"
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table class='data checkpoints'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def checkpoints_section(df, contexts: list[dict[str, Any]]) -> str:
    """The HTML section (empty string when the run has no checkpoint sequence)."""
    sequences = checkpoint_steps(df)
    if not sequences:
        return ""
    layers = sorted(int(x) for x in df.loc[df["layer"] >= 0, "layer"].unique())
    parts = []
    for name, steps in sorted(sequences.items()):
        for layer in layers:
            rows = checkpoint_table(df, contexts, steps, layer)
            parts.append(f"<h3>{html.escape(name)} · layer {layer}</h3><div class='scroll'>{_table_html(rows)}</div>")
    return (
        "<section id='checkpoints'><h2>Across training checkpoints</h2><p class='muted'>One row per "
        "checkpoint, in step order; every value is the same statistic as in the results table (held-out "
        "tokens). Each checkpoint has its own adapter SAE, so its top features are shown by the token they fire "
        "on hardest, not by id.</p>" + "".join(parts) + "</section>"
    )


__all__ = ["COLUMNS", "checkpoint_steps", "checkpoint_table", "checkpoints_section"]
