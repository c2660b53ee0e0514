"""`lorascope evaluate`: SAEBench core metrics of an SAE on base-model activations (lorascope.evals.core)."""

from __future__ import annotations

from pathlib import Path

import typer

from lorascope.cli import app


@app.command("evaluate")
def evaluate_cmd(
    sae: Path = typer.Option(..., "--sae", "-s", help="SAE folder or file (any format load_sae reads)."),
    model: str = typer.Option(
        "embedded",
        "--model",
        "-m",
        help="Base model: 'embedded' (SmolLM2-135M-Instruct), a local HF folder, .gguf or hub "
        "id. Must be the model the SAE was trained on.",
    ),
    layer: int | None = typer.Option(
        None, "--layer", "-l", help="Block whose output residual the SAE reads (default: the SAE's metadata 'layer')."
    ),
    data: str = typer.Option("demo", "--data", "-d", help="'demo', an Alpaca JSON/JSONL file, or hf:NAME[:SPLIT]."),
    n_docs: int = typer.Option(64, "--n-docs", min=1, help="Documents to evaluate on."),
    max_length: int = typer.Option(256, help="Tokens per document (prompt + response) at most."),
    skip_first: int = typer.Option(1, min=0, help="Positions per document left unscored and unreplaced (BOS/sink)."),
    batch_size: int = typer.Option(8, min=1, help="Documents per forward pass."),
    seed: int = typer.Option(0, help="Seed of the demo data generator."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the metrics as JSON here."),
) -> None:
    """CE-loss score, KL score, FVU / explained variance, L0, fraction alive and decoder redundancy of an SAE
    spliced into the model after block LAYER (SAEBench's core eval)."""
    from rich.console import Console
    from rich.table import Table

    from lorascope.data import load_dataset_spec, tokenize_example
    from lorascope.errors import LorascopeError
    from lorascope.evals.core import CoreOptions, core_metrics
    from lorascope.io import write_json
    from lorascope.models import load_base
    from lorascope.saes import load_sae

    loaded = load_sae(sae)  # cheap and catches a bad path before the model loads
    if layer is None:
        meta_layer = loaded.cfg.metadata.get("layer")
        if meta_layer is None:
            raise LorascopeError(f"cannot tell the layer of {sae} from its metadata", fix="pass --layer L")
        layer = int(meta_layer)
    examples = load_dataset_spec(data, limit=n_docs, seed=seed)[:n_docs]
    base = load_base(model)
    if loaded.d_in != base.d_model:
        raise LorascopeError(
            f"the SAE reads width {loaded.d_in} but {base.name} has width {base.d_model}",
            fix="evaluate the SAE on the model it was trained on",
        )
    docs = [tokenize_example(base.tokenizer, ex, max_length=max_length) for ex in examples]
    options = CoreOptions(batch_size=batch_size, skip_first=skip_first, max_length=max_length)
    m = core_metrics(base.model, base.tokenizer, loaded, layer, docs, options=options)
    table = Table(
        title=f"SAEBench core metrics: {sae} on {base.name} block {layer} "
        f"({int(m['n_tokens'])} tokens, {int(m['n_docs'])} documents)"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "ce_score",
        "kl_score",
        "ce_clean",
        "ce_sae",
        "ce_zero",
        "kl_sae",
        "kl_zero",
        "fvu",
        "explained_variance",
        "l0",
        "frac_alive",
        "mean_max_decoder_cos",
    ):
        table.add_row(key, f"{m[key]:.4f}")
    Console().print(table)
    if out is not None:
        write_json(out, {"sae": str(sae), "model": base.name, "layer": layer, "data": data, **m})
