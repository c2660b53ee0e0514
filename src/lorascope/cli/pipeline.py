"""`lorascope run CONFIG` (the whole study) and `lorascope report RUN_DIR`."""

from __future__ import annotations

from pathlib import Path

import typer

from lorascope.cli import app


def _parse_set(items: list[str]) -> dict:
    import yaml

    from lorascope.errors import LorascopeError

    out = {}
    for item in items:
        if "=" not in item:
            raise LorascopeError(f"--set {item!r} is not KEY=VALUE", fix="e.g. --set adapter_sae.tokens=20000")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


@app.command("run")
def run_cmd(
    config: Path = typer.Argument(..., help="Experiment YAML (see configs/quickstart.yaml)."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting: KEY=VALUE with dotted keys, repeatable."),
    output_dir: str | None = typer.Option(None, "--out", "-o", help="Override output_dir."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip figures and report.html."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run the whole study (adapters → extraction → SAEs → geometry → report); cached stages are skipped."""
    from lorascope.config import load_config
    from lorascope.study import run

    overrides = _parse_set(set_)
    if output_dir:
        overrides["output_dir"] = output_dir
    cfg = load_config(config, overrides)
    res = run(cfg, progress=not quiet, report=not no_report)
    _summary(res)


def _summary(res) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    df = res.table
    lora = df[df.family == "lora"].pivot_table(index=["adapter", "rank"], columns="metric", values="value")
    if not lora.empty:
        t = Table(title="LoRA adapters: training loss (first/last 5 steps) and held-out loss on the fine-tuning task")
        for col in ("adapter", "rank", "train loss start", "train loss end", "held-out base", "held-out adapted"):
            t.add_column(col)
        for (name, rank), r in lora.sort_index(level="rank").iterrows():
            t.add_row(
                name,
                str(rank),
                *(
                    f"{r.get(m, float('nan')):.3f}"
                    for m in ("train_loss_start", "train_loss_end", "heldout_loss_base", "heldout_loss_adapted")
                ),
            )
        console.print(t)
    console.print(f"[bold]results[/]: {res.results_dir / 'results.parquet'} ({len(res.table)} rows)")
    if res.report:
        console.print(f"[bold]report[/]:  {res.report}")
    console.print(
        "work done this run: "
        + (", ".join(sorted(set(w.split(":")[0] for w in res.work_done))) or "none (everything was cached)")
    )
    try:
        from lorascope.report.findings import findings_markdown

        console.print(findings_markdown(res.table))
    except ImportError:
        pass


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="A run's output_dir (holds results/).")) -> None:
    """(Re)write figures and the self-contained report.html of a finished run."""
    from lorascope.errors import LorascopeError
    from lorascope.report import write_report

    if not (run_dir / "results" / "results.parquet").is_file():
        raise LorascopeError(f"{run_dir} has no results/results.parquet", fix="run `lorascope run CONFIG` first")
    print(write_report(run_dir))
