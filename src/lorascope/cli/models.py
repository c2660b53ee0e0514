"""`lorascope train-lora`: train LoRA adapters at one or more ranks."""

from __future__ import annotations

from pathlib import Path

import typer

from lorascope.cli import app


@app.command("train-lora")
def train_lora_cmd(
    model: str = typer.Option(
        "embedded",
        "--model",
        "-m",
        help="Base model: 'embedded' (SmolLM2-135M-Instruct, offline), a local HF folder, "
        "a .gguf file, or a hub id such as google/gemma-2-9b.",
    ),
    rank: list[int] = typer.Option(..., "--rank", "-r", help="LoRA rank r (> 0). Repeat for several adapters."),
    data: str = typer.Option(
        "demo",
        "--data",
        "-d",
        help="'demo' (offline pirate-voice task), a dataset file (chat `messages` / ShareGPT / "
        "Alpaca / `text` JSON or JSONL, or .txt; auto-detected), or hf:NAME[:SPLIT].",
    ),
    n_examples: int = typer.Option(512, help="Number of examples to use (demo: how many to generate)."),
    out: Path = typer.Option(Path("runs/adapters"), "--out", "-o", help="Folder; each adapter goes to OUT/rank_R."),
    steps: int = typer.Option(60, help="Optimizer steps."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate."),
    alpha: float | None = typer.Option(None, help="LoRA alpha (default 2·r, so alpha/r = 2 at every rank)."),
    dropout: float = typer.Option(0.0, help="LoRA dropout in [0, 1)."),
    target_modules: str = typer.Option(
        "all-linear", help="Comma-separated module names (q_proj,v_proj) or 'all-linear'."
    ),
    batch_size: int = typer.Option(8, help="Examples per step."),
    max_length: int = typer.Option(192, help="Max tokens per example (prompt is never truncated)."),
    long_examples: str = typer.Option(
        "truncate",
        help="Examples longer than --max-length: 'truncate' the response "
        "(an example whose prompt alone is too long is skipped), "
        "'skip' them, or 'error'.",
    ),
    seed: int = typer.Option(0, help="Seed for data order and LoRA init (training is deterministic on CPU)."),
    dtype: str = typer.Option("float32", help="Base model dtype: float32 or bfloat16."),
    held_out: float = typer.Option(0.2, help="Fraction of examples held out for the base-vs-adapted loss."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub (off by default)."),
) -> None:
    """Train LoRA adapters (PEFT format) and print the loss of base vs adapted on held-out examples."""
    from rich.console import Console
    from rich.table import Table

    from lorascope.cli import check_options
    from lorascope.config import DataCfg
    from lorascope.data import load_dataset_spec, split_examples
    from lorascope.models import LoraSettings, held_out_loss, load_adapters, load_base, train_lora
    from lorascope.models.lora import prepare_training_data
    from lorascope.models.tokenizer import load_tokenizer

    check_options(
        DataCfg,
        {"n_finetune": "--n-examples", "held_out_fraction": "--held-out"},
        n_finetune=n_examples,
        held_out_fraction=held_out,
    )
    settings = [
        LoraSettings(
            rank=r,
            alpha=alpha,
            dropout=dropout,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            max_length=max_length,
            seed=seed,
            length_policy=long_examples,
            target_modules=target_modules
            if target_modules == "all-linear"
            else [t.strip() for t in target_modules.split(",") if t.strip()],
        )
        for r in rank
    ]
    examples = load_dataset_spec(data, limit=n_examples, seed=seed)
    train, held = split_examples(examples, held_out, seed=seed)
    _, lengths = prepare_training_data(load_tokenizer(model, trust_remote_code), train, max_length, long_examples)
    Console(stderr=True).print(f"fine-tuning examples: {lengths.summary()}")  # checked before the model load
    base = load_base(model, dtype=dtype, trust_remote_code=trust_remote_code)
    results = {}
    for s in settings:
        results[f"rank_{s.rank}"] = train_lora(base, train, s, output_dir=out / f"rank_{s.rank}")
    peft_model = load_adapters(base, {k: r.adapter_dir for k, r in results.items()})
    losses = held_out_loss(peft_model, base.tokenizer, held[:64], ["__base__", *results], max_length=max_length)
    table = Table(title=f"LoRA on {base.name} ({len(train)} train / {min(len(held), 64)} held-out examples)")
    for col in (
        "adapter",
        "train loss start",
        "train loss end",
        "held-out loss base",
        "held-out loss adapted",
        "folder",
    ):
        table.add_column(col)
    for k, r in results.items():
        table.add_row(
            k,
            f"{r.loss_start:.3f}",
            f"{r.loss_end:.3f}",
            f"{losses['__base__']:.3f}",
            f"{losses[k]:.3f}",
            str(r.adapter_dir),
        )
    Console().print(table)
