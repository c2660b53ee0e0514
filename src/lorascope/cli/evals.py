"""`lorascope absorption`: first-letter probe, feature splitting and absorption (SAEBench definitions)."""

from __future__ import annotations

from pathlib import Path

import typer

from lorascope.cli import app


@app.command("absorption")
def absorption_cmd(
    sae: list[Path] = typer.Option(
        ...,
        "--sae",
        "-s",
        help="SAE folder or file (SAELens, Gemma Scope, sparsify, dictionary_learning). "
        "Repeat for several SAEs of the same layer (the probe is shared).",
    ),
    model: str = typer.Option(
        "embedded",
        "--model",
        "-m",
        help="Base model: 'embedded' (SmolLM2-135M-Instruct), a local HF folder, .gguf or "
        "hub id. Must be the model the SAE was trained on.",
    ),
    layer: int | None = typer.Option(
        None, "--layer", "-l", help="Block whose output residual the SAE reads (default: the SAE's metadata 'layer')."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Folder for absorption.csv (tidy rows, family 'absorption') and absorption.json (per-letter details).",
    ),
    max_words: int | None = typer.Option(
        None, help="Sample this many words of the tokenizer's alphabetic tokens (default: all of them)."
    ),
    words_per_prefix: int = typer.Option(
        64,
        help="Words sharing one few-shot prefix (its cache is reused: the whole "
        "vocabulary at CPU cost); 1 = SAEBench's own prefix per word.",
    ),
    seed: int = typer.Option(0, help="Seed of the word sample, split and few-shot examples."),
    batch_size: int = typer.Option(32, help="Prompts per forward pass."),
    bf16: bool = typer.Option(
        False,
        "--bf16",
        help="Run the model under bfloat16 autocast. Measure first: on a CPU "
        "without fast bf16 it was 10x slower than fp32.",
    ),
    force: bool = typer.Option(False, help="Score even when fewer than 20 letters pass probe F1 > 0.6."),
) -> None:
    """Measure feature splitting and absorption of SAEs on the first-letter task and print a table."""
    import torch
    from pydantic import Field
    from rich.console import Console
    from rich.table import Table

    from lorascope.cli import check_options
    from lorascope.errors import LorascopeError
    from lorascope.evals.absorption import ProbeOptions, evaluate_absorption, prepare_probe
    from lorascope.models import load_base
    from lorascope.saes import load_sae

    check_options(
        {"max_words": (int, Field(gt=0)), "batch_size": (int, Field(gt=0)), "layer": (int | None, Field(None, ge=0))},
        max_words=max_words,
        batch_size=batch_size,
        layer=layer,
    )
    saes = [(p.name if p.is_dir() else p.stem, load_sae(p)) for p in sae]
    if layer is None:
        layers = {s.cfg.metadata.get("layer") for _, s in saes}
        if len(layers) != 1 or None in layers:
            raise LorascopeError("cannot tell the SAE's layer from its metadata", fix="pass --layer L")
        layer = int(layers.pop())
    base = load_base(model)
    options = ProbeOptions(
        max_words=max_words,
        seed=seed,
        batch_size=batch_size,
        words_per_prefix=words_per_prefix,
        autocast_dtype=torch.bfloat16 if bf16 else None,
    )
    probe = prepare_probe(base.model, base.tokenizer, layer, options=options)
    reports = [evaluate_absorption(probe, s, label, force=force, seed=seed) for label, s in saes]
    console = Console()
    f1 = Table(
        title=f"First-letter probe, {base.name} layer {layer}: test F1 per letter "
        f"({len(probe.test_words)} test words; {len(probe.letters_passing())} letters > 0.6)"
    )
    for letter in probe.probe_f1:
        f1.add_column(letter, justify="right")
    f1.add_row(*[f"{v:.2f}" for v in probe.probe_f1.values()])
    console.print(f1)
    table = Table(title="Splitting and absorption (SAEBench definitions)")
    for col in ("SAE", "status", "letters", "absorption fraction", "full absorption", "splitting k", "note"):
        table.add_column(col)
    for r in reports:
        table.add_row(
            r.sae_label,
            r.status,
            str(len(r.letters)),
            f"{r.absorption_fraction:.4f}",
            f"{r.full_absorption_rate:.4f}",
            f"{r.splitting_k:.2f}",
            r.reason,
        )
    console.print(table)
    if out is not None:
        from dataclasses import asdict

        from lorascope.io import atomic_path, write_json
        from lorascope.results import rows_to_frame

        frame = rows_to_frame([row for r in reports for row in r.to_rows()])
        with atomic_path(out / "absorption.csv") as tmp:
            frame.to_csv(tmp, index=False)
        write_json(
            out / "absorption.json",
            {
                "model": base.name,
                "layer": layer,
                "max_words": max_words,
                "words_per_prefix": words_per_prefix,
                "seed": seed,
                "reports": [asdict(r) for r in reports],
            },
        )
        console.print(f"wrote {out / 'absorption.csv'} and {out / 'absorption.json'}")
