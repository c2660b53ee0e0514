"""`lorascope train-sae` (on a store) and `lorascope compare` (two dictionaries)."""

from __future__ import annotations

from pathlib import Path

import typer

from lorascope.cli import app
from lorascope.errors import LorascopeError


@app.command("train-sae")
def train_sae_cmd(
    store: Path = typer.Option(..., "--store", "-s", help="Activation store folder (from `lorascope extract`)."),
    layer: int = typer.Option(..., "--layer", "-l", help="Layer to train on."),
    kind: str = typer.Option("delta", help="delta (adapter SAE), base (reference SAE) or adapted."),
    adapter: str | None = typer.Option(None, help="Adapter name for delta/adapted (default: the only one)."),
    architecture: str = typer.Option("topk", "--architecture", "-a", help="topk, batchtopk, relu, jumprelu, sasa."),
    expansion: int = typer.Option(8, help="d_sae = expansion × d_model."),
    k: int = typer.Option(32, help="Active latents (topk/batchtopk); for sasa k = s·rank."),
    l1_coefficient: float = typer.Option(5.0, help="ReLU-L1 sparsity coefficient."),
    l0_coefficient: float = typer.Option(1e-3, help="JumpReLU L0 coefficient."),
    sasa_rank: int = typer.Option(4, help="SASA group rank r."),
    tokens: int = typer.Option(200_000, help="Training token budget."),
    batch_size: int = typer.Option(1024, help="Batch size (tokens)."),
    lr: float | None = typer.Option(None, help="Learning rate (default 2e-4/sqrt(d_sae/2^14))."),
    held_out_fraction: float = typer.Option(0.2, help="Documents held out (never trained on)."),
    seed: int = typer.Option(0, help="Seed."),
    out: Path = typer.Option(Path("runs/sae"), "--out", "-o", help="Output folder (SAELens format)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an --out folder that holds another SAE."),
) -> None:
    """Train an SAE on a store's activations; resumable (re-run the same command after an interruption)."""
    from pydantic import TypeAdapter, ValidationError

    from lorascope.activations import open_store
    from lorascope.cli import option_error
    from lorascope.config import SAECfg
    from lorascope.io import claimed_output, clean_tmp_files
    from lorascope.study.saes import SAEJob, evaluate_held_out, train_sae_job, trainer_config
    from lorascope.study.splits import derived_init_seed

    try:  # checked before the store is opened; a bad value names its option
        c = TypeAdapter(SAECfg).validate_python(
            {
                "architecture": architecture,
                "expansion": expansion,
                "k": k,
                "l1_coefficient": l1_coefficient,
                "l0_coefficient": l0_coefficient,
                "sasa_rank": sasa_rank,
                "tokens": tokens,
                "batch_size": batch_size,
                "lr": lr,
                "seeds": [seed],
            }
        )
    except ValidationError as exc:
        raise option_error(exc, command="lorascope train-sae") from exc
    st = open_store(store)
    init_seed = derived_init_seed(seed, layer, kind, adapter)
    job = SAEJob(layer, kind, adapter, seed, held_out_fraction, 0, init_seed, {"init_seed": init_seed})
    with claimed_output(
        out,
        "SAE",
        {
            "sae": c.model_dump(),
            "store": st.manifest.get("config_hash"),
            "layer": layer,
            "kind": kind,
            "adapter": adapter,
            "held_out_fraction": held_out_fraction,
        },
        overwrite,
        not_inside=[("the activation store", store)],
    ):
        clean_tmp_files(out)  # leftovers of a killed run (e.g. a half-written checkpoint)
        res = train_sae_job(st, job, c, trainer_config(c, seed, checkpoints=10), out, out / "ckpt")
        ev = evaluate_held_out(st, job, res.sae)
    print(
        f"saved {out}; train FVU {res.final.get('fvu', float('nan')):.4f}; held-out FVU "
        f"{ev.get('fvu', float('nan')):.4f}, L0 {ev.get('l0', float('nan')):.1f}, dead {ev.get('dead', 0):.0f}"
    )


def _parse_taus(text: str) -> tuple[float, ...]:
    """--taus: comma-separated cosine thresholds, each in [-1, 1]."""
    import math

    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise LorascopeError(
            f"--taus {text!r} is not a comma-separated list of numbers", fix="e.g. --taus 0.5,0.7,0.9"
        ) from exc
    bad = [v for v in values if not (math.isfinite(v) and -1 <= v <= 1)]
    if not values or bad:
        raise LorascopeError(
            f"--taus {text!r}: " + (f"{bad[0]} is not a cosine threshold in [-1, 1]" if bad else "no thresholds given"),
            fix="e.g. --taus 0.5,0.7,0.9",
        )
    return values


@app.command("compare")
def compare_cmd(
    sae_a: Path = typer.Argument(..., help="First SAE (any supported format)."),
    sae_b: Path = typer.Argument(..., help="Second SAE."),
    taus: str = typer.Option("0.5,0.7,0.9", help="Overlap thresholds."),
    absolute: bool = typer.Option(False, help="Use |cos| (sign-invariant) instead of signed cosines."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the rows to this CSV."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Allow SAE files that need full unpickling (runs code: trust the file)."
    ),
    store: Path | None = typer.Option(
        None, help="Activation store: compare alive atoms only (active at least once on its held-out rows at --layer)."
    ),
    layer: int | None = typer.Option(None, help="Layer of --store whose held-out rows decide which atoms are alive."),
    kind: str = typer.Option("delta", help="Rows of --store that feed the SAEs: delta or base."),
    adapter: str | None = typer.Option(None, help="Adapter of --store (its Δ rows); default: the only one."),
    held_out_fraction: float = typer.Option(0.2, help="Held-out fraction of --store's split."),
    split_seed: int = typer.Option(0, help="Seed of --store's split."),
) -> None:
    """Compare two dictionaries: MMCS both ways with the random-dictionary null, overlap@τ, Hungarian matching.
    With --store, over the atoms alive on the store's held-out rows (dead atoms' random rows drag MMCS down)."""
    from rich.console import Console
    from rich.table import Table

    from lorascope.geometry import CompareOptions, compare_dictionaries
    from lorascope.io import atomic_path
    from lorascope.results import rows_to_frame
    from lorascope.saes import load_sae
    from lorascope.saes.formats import nonfinite_tensors

    tau_values = _parse_taus(taus)
    if out is not None and out.is_dir():
        raise LorascopeError(f"--out {out} is a folder", fix="give a file path for the CSV, e.g. --out compare.csv")
    a, b = load_sae(sae_a, allow_pickle=allow_pickle), load_sae(sae_b, allow_pickle=allow_pickle)
    for path, sae in ((sae_a, a), (sae_b, b)):
        bad = nonfinite_tensors(sae)
        if bad:
            raise LorascopeError(
                f"{path}: tensor(s) {', '.join(f'{k} ({n} NaN/inf)' for k, n in bad.items())} hold non-finite values",
                fix="re-train or re-export this SAE",
            )
    alive_a = alive_b = None
    if store is not None:
        alive_a, alive_b = _alive_on_store(store, layer, kind, adapter, held_out_fraction, split_seed, a, b)
    rows = compare_dictionaries(
        a.W_dec.detach(),
        b.W_dec.detach(),
        "a",
        "b",
        CompareOptions(taus=tau_values, absolute=absolute),
        alive_a=alive_a,
        alive_b=alive_b,
    )
    table = Table(title=f"{sae_a} vs {sae_b}")
    for col in ("metric", "value", "95% CI", "null"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.metric,
            f"{r.value:.4f}",
            f"[{r.ci_low:.4f}, {r.ci_high:.4f}]",
            f"{r.null_value:.4f} ({r.null_name})" if r.null_name else "",
        )
    Console().print(table)
    if out:
        with atomic_path(out) as tmp:
            rows_to_frame(rows).to_csv(tmp, index=False)


def _alive_on_store(store: Path, layer: int | None, kind: str, adapter: str | None, fraction: float, seed: int, *saes):
    """Per SAE, bool [d_sae]: active at least once on the store's held-out ``kind`` rows at ``layer``."""
    import torch

    from lorascope.activations import HeldOutSplit, open_store
    from lorascope.errors import LorascopeError

    if layer is None or kind not in ("delta", "base"):
        raise LorascopeError("--store needs --layer and --kind delta|base", fix="e.g. --store runs/x/store --layer 6")
    held = open_store(store).held_out(layer, adapter, HeldOutSplit(fraction, seed))
    x = held.delta if kind == "delta" else held.base
    with torch.no_grad():
        return tuple(torch.cat([sae.encode(c.to(sae.W_dec.dtype)) for c in x.split(4096)]).ne(0).any(0) for sae in saes)
