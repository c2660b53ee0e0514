"""`lorascope extract`: base and delta residual-stream activations for one or more adapters into a store."""

from __future__ import annotations

from pathlib import Path

import typer

from lorascope.cli import app
from lorascope.errors import LorascopeError


def _parse_adapters(specs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LorascopeError(f"--adapter {spec!r} is not NAME=PATH", fix="e.g. --adapter rank_8=runs/rank_8")
        if name in out:
            raise LorascopeError(f"adapter name {name!r} is given twice", fix="give each adapter a distinct name")
        out[name] = path
    return out


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise LorascopeError(f"--layers {text!r} is not a comma-separated list of integers",
                             fix="e.g. --layers 5,15,25") from exc


@app.command("extract")
def extract_cmd(
    model: str = typer.Option("embedded", "--model", "-m",
                              help="Base model: 'embedded' (SmolLM2-135M-Instruct), a HF folder, a .gguf or a hub id."),
    adapter: list[str] = typer.Option(..., "--adapter", "-a", help="NAME=PATH of a PEFT adapter folder; repeat."),
    data: str = typer.Option("demo", "--data", "-d", help="'demo', an Alpaca JSON/JSONL file, or hf:NAME[:SPLIT]."),
    layers: str = typer.Option(..., "--layers", "-l", help="Comma-separated block indices, e.g. 5,15,25."),
    tokens: str = typer.Option("all", help="Which tokens become rows: all, prompt or response."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder of the activation store (resumable)."),
    n_docs: int = typer.Option(256, help="Number of documents (demo: how many to generate)."),
    batch_size: int = typer.Option(8, help="Documents per forward pass (each runs 1 + n_adapters rows)."),
    docs_per_shard: int = typer.Option(32, help="Documents per shard file (the unit of resume)."),
    max_length: int = typer.Option(256, help="Max tokens per document (prompt is never truncated)."),
    dtype: str = typer.Option("float32", help="On-disk dtype: float32 or bfloat16 (deltas are computed in fp32)."),
    forward_dtype: str = typer.Option("float32", help="float32, or bf16-autocast (faster, adds error to deltas)."),
    skip_first: int = typer.Option(1, help="Drop the first N positions of every document (BOS / first token)."),
    max_norm_factor: float = typer.Option(10.0, help="Drop positions whose base norm exceeds this x the batch "
                                                     "median (attention sinks); 0 disables."),
    seed: int = typer.Option(0, help="Seed of the demo data generator."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (tokens/s, ETA)."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub (off by default)."),
) -> None:
    """Extract h_base and h_Δ = h_adapted − h_base at the given layers for every adapter (one forward per batch)."""
    from rich.console import Console
    from rich.table import Table

    from lorascope.activations import ExtractConfig, extract
    from lorascope.data import load_dataset_spec
    from lorascope.models import load_adapters, load_base

    adapters = _parse_adapters(adapter)
    cfg = ExtractConfig(layers=_parse_layers(layers), tokens=tokens, skip_first=skip_first,
                        max_norm_factor=max_norm_factor or None, batch_size=batch_size,
                        docs_per_shard=docs_per_shard, max_length=max_length, dtype=dtype,
                        forward_dtype=forward_dtype, progress=progress)
    examples = load_dataset_spec(data, limit=n_docs, seed=seed)
    base = load_base(model, trust_remote_code=trust_remote_code)
    peft_model = load_adapters(base, adapters)
    store = extract(peft_model, base.tokenizer, examples, out, cfg)
    c = store.manifest["counts"]
    table = Table(title=f"{store.n_tokens} rows from {c['tokens']} tokens of {len(examples)} documents "
                        f"(dropped: {c['skipped_first']} first positions, {c['excluded_norm']} high-norm, "
                        f"{c['other_part']} outside '{tokens}') -> {out}")
    for col in ("layer", "adapter", "mean |Δ|", "mean |Δ|/|h|", "energy Σ|Δ|²/Σ|h|²", "participation ratio",
                "PCs for 90%"):
        table.add_column(col)
    for L in store.layers:
        for a in store.adapters:
            s = store.stats(L, a)
            table.add_row(str(L), a, f"{s['delta_norm']['mean']:.4g}", f"{s['relative_norm']['mean']:.4g}",
                          f"{s['energy_ratio']:.4g}", f"{s.get('participation_ratio') or float('nan'):.2f}",
                          str(s.get("n_components_90", "")))
    Console(width=160).print(table)
