"""`lorascope extract`: base and delta residual-stream activations for one or more adapters into a store;
`lorascope train-saes-distributed`: many independent SAEs (layer × adapter × seed) spread over torchrun ranks.

Both detect ``torchrun`` (RANK / WORLD_SIZE in the environment) and run on every rank; see docs/distributed.md.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from lorascope.cli import app
from lorascope.errors import LorascopeError


def _parse_adapters(specs: list[str], option: str = "--adapter") -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LorascopeError(f"{option} {spec!r} is not NAME=PATH", fix=f"e.g. {option} rank_8=runs/rank_8")
        if name in out:
            raise LorascopeError(f"adapter name {name!r} is given twice", fix="give each adapter a distinct name")
        out[name] = path
    return out


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise LorascopeError(
            f"--layers {text!r} is not a comma-separated list of integers", fix="e.g. --layers 5,15,25"
        ) from exc


def _check_prompts_fit(tokenizer, examples, max_length: int, policy: str) -> None:
    """Under the long-example policy, the documents fit in --max-length tokens: checked on the tokenizer alone."""
    from lorascope.activations.extract import tokenize_docs

    try:
        if not tokenize_docs(tokenizer, examples, max_length, policy):  # nothing fits: the strict policy says why
            tokenize_docs(tokenizer, examples, max_length, "error")
    except LorascopeError as exc:
        if "max_length" not in exc.problem:
            raise
        raise LorascopeError(
            f"--max-length {max_length} is too short: {exc.problem}",
            fix="raise --max-length, or shorten the instruction",
        ) from exc


def _load_entries(adapter: list[str], full_model: list[str], checkpoints: list[str]) -> list:
    """--adapter / --full-model / --checkpoints as ``adapters.load`` entries (lorascope.models.finetunes)."""
    from lorascope.models.finetunes import expand_load_specs

    load: dict[str, object] = dict(_parse_adapters(adapter))
    for name, path in _parse_adapters(full_model, "--full-model").items():
        load[name] = {"model": path} if name not in load else None
    for name, path in _parse_adapters(checkpoints, "--checkpoints").items():
        load[name] = {"checkpoints": path} if name not in load else None
    repeated = [name for name, spec in load.items() if spec is None]
    if repeated:
        raise LorascopeError(f"fine-tune name {repeated[0]!r} is given twice", fix="give each one a distinct name")
    if not load:
        raise LorascopeError(
            "nothing to compare with the base model",
            fix="give --adapter NAME=DIR, --full-model NAME=DIR or --checkpoints NAME=DIR",
        )
    return expand_load_specs(load)


def _parse_columns(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        ours, sep, theirs = spec.partition("=")
        if not sep or not ours or not theirs:
            raise LorascopeError(f"--column {spec!r} is not OURS=YOURS", fix="e.g. --column output=answer")
        out[ours] = theirs
    return out


def _extract_store(
    model: str, entries: list, examples, out: Path, cfg, dist, trust_remote_code: bool, resident: str, claim
):
    """PEFT adapters only: one mixed batch per step (``extract``); any whole model: every fine-tune as its own
    model on the same batches (``extract_full``, single process)."""
    from lorascope.activations import extract, extract_full
    from lorascope.models import load_adapters, load_base
    from lorascope.models.tokenizer import load_tokenizer

    if all(e.kind == "peft" for e in entries):
        # documents too long for --max-length fail on the tokenizer alone, before the model's weights are loaded
        base = load_base(
            model,
            device=str(dist.device),
            trust_remote_code=trust_remote_code,
            check_tokenizer=lambda tok: _check_prompts_fit(tok, examples, cfg.max_length, cfg.length_policy),
        )
        peft_model = load_adapters(base, {e.name: e.path for e in entries})
        claim()
        return extract(peft_model, base.tokenizer, examples, out, cfg, rank=dist.rank, world_size=dist.world_size)
    if dist.world_size > 1:
        raise LorascopeError(
            "whole-model fine-tunes (--full-model, or model checkpoints) run in one process", fix="run without torchrun"
        )
    tok = load_tokenizer(model, trust_remote_code)
    _check_prompts_fit(tok, examples, cfg.max_length, cfg.length_policy)
    claim()
    return extract_full(
        model,
        {e.name: e.path for e in entries},
        tok,
        examples,
        out,
        cfg,
        resident=resident,
        load={"device": str(dist.device)},
    ).store


@app.command("extract")
def extract_cmd(
    model: str = typer.Option(
        "embedded",
        "--model",
        "-m",
        help="Base model: 'embedded' (SmolLM2-135M-Instruct), a HF folder, a .gguf or a hub id.",
    ),
    adapter: list[str] = typer.Option(
        [], "--adapter", "-a", help="NAME=PATH of a PEFT adapter folder (or hub id when online); repeat."
    ),
    full_model: list[str] = typer.Option(
        [], "--full-model", help="NAME=DIR of a whole fine-tuned (or merged) model compared with --model; repeat."
    ),
    checkpoints: list[str] = typer.Option(
        [], "--checkpoints", help="NAME=DIR of a folder of checkpoint-<step>/ folders: entries NAME_step_<N>; repeat."
    ),
    data: str = typer.Option(
        "demo",
        "--data",
        "-d",
        help="'demo', a dataset file (chat messages / ShareGPT / Alpaca / text JSON(L) or .txt), or hf:NAME[:SPLIT].",
    ),
    column: list[str] = typer.Option(
        [], "--column", help="OURS=YOURS: read your field YOURS as lorascope's OURS (e.g. output=answer); repeat."
    ),
    long_examples: str = typer.Option(
        "truncate",
        help="Longer than --max-length: truncate the response (skip if the prompt alone does not fit), skip, or error.",
    ),
    resident: str = typer.Option(
        "one", help="Whole models: 'one' resident at a time (activations spilled to disk) or 'both' at once."
    ),
    layers: str = typer.Option(..., "--layers", "-l", help="Comma-separated block indices, e.g. 5,15,25."),
    tokens: str = typer.Option("all", help="Which tokens become rows: all, prompt or response."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder of the activation store (resumable)."),
    n_docs: int = typer.Option(256, help="Number of documents (demo: how many to generate)."),
    batch_size: int = typer.Option(8, help="Documents per forward pass (each runs 1 + n_adapters rows)."),
    docs_per_shard: int = typer.Option(32, help="Documents per shard file (the unit of resume)."),
    max_length: int = typer.Option(256, help="Max tokens per document (see --long-examples)."),
    dtype: str = typer.Option("float32", help="On-disk dtype: float32 or bfloat16 (deltas are computed in fp32)."),
    forward_dtype: str = typer.Option("float32", help="float32, or bf16-autocast (faster, adds error to deltas)."),
    skip_first: int = typer.Option(1, help="Drop the first N positions of every document (BOS / first token)."),
    max_norm_factor: float = typer.Option(
        10.0, help="Drop positions whose base norm exceeds this x the batch median (attention sinks); 0 disables."
    ),
    seed: int = typer.Option(0, help="Seed of the demo data generator."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (tokens/s, ETA)."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub (off by default)."),
    device: str = typer.Option("auto", help="auto (cuda:LOCAL_RANK if a GPU is visible, else cpu), cpu, cuda, cuda:N."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an --out folder that holds something else."),
) -> None:
    """Extract h_base and h_Δ = h_adapted − h_base at the given layers for every adapter (one forward per batch).

    Whole fine-tuned models (--full-model, or checkpoints that are models) are run as their own models on the same
    batches, one resident at a time by default (--resident); then every fine-tune goes that way, in one process.

    Under ``torchrun --nproc_per_node N -m lorascope extract …`` the documents' shards are split over the ranks
    (round-robin), each rank writes its own shards into the one store, and rank 0 merges the manifest.
    """
    from pydantic import Field
    from rich.console import Console
    from rich.table import Table

    from lorascope.activations import ExtractConfig
    from lorascope.activations.full import RESIDENT_MODES
    from lorascope.cli import check_options
    from lorascope.config import DataCfg, ExtractionCfg
    from lorascope.data import load_dataset_spec
    from lorascope.data.chat import LENGTH_POLICIES
    from lorascope.distributed import cleanup, init_distributed
    from lorascope.io import check_output, claimed_output

    # Every count and threshold is checked before anything is loaded (same rules as the experiment YAML).
    check_options(DataCfg, n_docs=n_docs, max_length=max_length)
    check_options(
        ExtractionCfg,
        {"shard_docs": "--docs-per-shard"},
        batch_size=batch_size,
        shard_docs=docs_per_shard,
        skip_first=skip_first,
    )
    check_options({"max_norm_factor": (float, Field(ge=0, description="0 disables"))}, max_norm_factor=max_norm_factor)
    if long_examples not in LENGTH_POLICIES or resident not in RESIDENT_MODES:
        bad, options = (
            (f"--long-examples {long_examples!r}", LENGTH_POLICIES)
            if long_examples not in LENGTH_POLICIES
            else (f"--resident {resident!r}", RESIDENT_MODES)
        )
        raise LorascopeError(f"{bad} is not a known choice", fix=f"use one of {', '.join(options)}")
    entries = _load_entries(adapter, full_model, checkpoints)
    adapters = {e.name: str(e.path) for e in entries}
    dist = init_distributed(device)

    def where(spec: str) -> str:  # paths count by location, so a re-run from another folder still matches
        return str(Path(spec).resolve()) if Path(spec).exists() else spec

    settings = {
        "model": where(model),
        "adapters": {k: where(v) for k, v in adapters.items()},
        "data": where(data),
        "n_docs": n_docs,
        "seed": seed,
        "layers": _parse_layers(layers),
        "tokens": tokens,
        "batch_size": batch_size,
        "docs_per_shard": docs_per_shard,
        "max_length": max_length,
        "dtype": dtype,
        "forward_dtype": forward_dtype,
        "skip_first": skip_first,
        "max_norm_factor": max_norm_factor,
    }
    if dist.world_size == 1:  # under torchrun the store's own config hash guards it (every rank writes into it)
        check_output(out, "activation store", settings, overwrite)  # nothing is created before the loads succeed
    cfg = ExtractConfig(
        layers=_parse_layers(layers),
        tokens=tokens,
        skip_first=skip_first,
        max_norm_factor=max_norm_factor or None,
        batch_size=batch_size,
        docs_per_shard=docs_per_shard,
        max_length=max_length,
        dtype=dtype,
        forward_dtype=forward_dtype,
        progress=progress and dist.is_main,
        length_policy=long_examples,
    )
    examples = load_dataset_spec(data, limit=n_docs, seed=seed, columns=_parse_columns(column))

    def claim() -> None:  # the folder is claimed only once the loads have succeeded
        if dist.world_size == 1:
            with claimed_output(out, "activation store", settings, overwrite):
                pass

    store = _extract_store(model, entries, examples, out, cfg, dist, trust_remote_code, resident, claim)
    cleanup()
    if not dist.is_main:
        return
    c = store.manifest["counts"]
    table = Table(
        title=f"{store.n_tokens} rows from {c['tokens']} tokens of {len(examples)} documents "
        f"(dropped: {c['skipped_first']} first positions, {c['excluded_norm']} high-norm, "
        f"{c['other_part']} outside '{tokens}') -> {out}"
    )
    for col in (
        "layer",
        "adapter",
        "mean |Δ|",
        "mean |Δ|/|h|",
        "energy Σ|Δ|²/Σ|h|²",
        "participation ratio",
        "PCs for 90%",
    ):
        table.add_column(col)
    for L in store.layers:
        for a in store.adapters:
            s = store.stats(L, a)
            table.add_row(
                str(L),
                a,
                f"{s['delta_norm']['mean']:.4g}",
                f"{s['relative_norm']['mean']:.4g}",
                f"{s['energy_ratio']:.4g}",
                f"{s.get('participation_ratio') or float('nan'):.2f}",
                str(s.get("n_components_90", "")),
            )
    Console(width=160).print(table)


def _job_label(layer: int, adapter: str | None, seed: int) -> str:
    return f"L{layer}__{adapter or 'base'}__seed{seed}"


@app.command("train-saes-distributed")
def train_saes_distributed_cmd(
    store: Path = typer.Option(..., "--store", "-s", help="Activation store folder (from `lorascope extract`)."),
    layers: str = typer.Option("all", "--layers", "-l", help="Comma-separated layers, or 'all' (the store's)."),
    adapters: str = typer.Option("all", help="Comma-separated adapter names, or 'all' (ignored for --kind base)."),
    kind: str = typer.Option("delta", help="delta (adapter SAEs), base (reference SAEs) or adapted."),
    seeds: str = typer.Option("0", help="Comma-separated SAE seeds (one SAE per seed)."),
    architecture: str = typer.Option("topk", "--architecture", "-a", help="topk, batchtopk, relu, jumprelu, sasa."),
    expansion: int = typer.Option(8, help="d_sae = expansion × d_model."),
    k: int = typer.Option(32, help="Active latents (topk/batchtopk); for sasa k = s·rank."),
    tokens: int = typer.Option(200_000, help="Training token budget per SAE."),
    batch_size: int = typer.Option(1024, help="Batch size (tokens)."),
    lr: float | None = typer.Option(None, help="Learning rate (default 2e-4/sqrt(d_sae/2^14))."),
    held_out_fraction: float = typer.Option(0.2, help="Documents held out (never trained on)."),
    device: str = typer.Option("auto", help="auto (cuda:LOCAL_RANK if a GPU is visible, else cpu), cpu, cuda, cuda:N."),
    autocast: str | None = typer.Option(None, help="e.g. bfloat16: mixed precision (GPUs only: slow on CPUs)."),
    out: Path = typer.Option(Path("runs/saes"), "--out", "-o", help="Root folder: one SAELens folder per SAE."),
    data_parallel: bool = typer.Option(
        False,
        "--data-parallel/--jobs",
        help="--jobs: one SAE per rank at a time; --data-parallel: all ranks train "
        "each SAE together (global batch split over ranks).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars (rank 0)."),
) -> None:
    """Train one SAE per (layer, adapter, seed) into OUT/L{layer}__{adapter}__seed{seed} (resumable, skipped when
    done). Under torchrun, ``--jobs`` (default) gives each rank every WORLD_SIZE-th job (layer-major,
    ``lorascope.distributed.my_jobs``) trained single-process on its device; ``--data-parallel`` trains the jobs
    one after another with every rank taking its slice of each global batch (for SAEs too big for one device's
    throughput). Results are the same either way up to float summation order.
    """
    from rich.console import Console
    from rich.table import Table

    from lorascope.activations import open_store
    from lorascope.config import parse_sae_section
    from lorascope.distributed import barrier, cleanup, init_distributed, my_jobs
    from lorascope.io import OutputLock, read_json, write_json
    from lorascope.study.saes import SAEJob, evaluate_held_out, train_sae_job, trainer_config
    from lorascope.study.splits import derived_init_seed

    dist = init_distributed(device)
    st = open_store(store)
    chosen = st.layers if layers.strip() == "all" else _parse_layers(layers)
    missing = [L for L in chosen if L not in st.layers]
    if missing:
        raise LorascopeError(f"layer(s) {missing} are not in the store", fix=f"choose from {st.layers}")
    names: list[str | None] = (
        [None]
        if kind == "base"
        else (st.adapters if adapters.strip() == "all" else [a for a in adapters.split(",") if a])
    )
    seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    c = parse_sae_section(
        {
            "architecture": architecture,
            "expansion": expansion,
            "k": k,
            "tokens": tokens,
            "batch_size": batch_size,
            "lr": lr,
            "seeds": seed_list,
        },
        "train-saes-distributed",
    )
    jobs = [(L, a, sd) for L in chosen for a in names for sd in seed_list]
    mine = jobs if data_parallel else my_jobs(jobs, dist.rank, dist.world_size)
    writer = dist.is_main or not data_parallel
    for layer, adapter, seed in mine:
        folder = out / _job_label(layer, adapter, seed)
        if (folder / "done.json").is_file():
            continue
        lock = OutputLock(folder) if writer else contextlib.nullcontext()
        with lock:
            init_seed = derived_init_seed(seed, layer, kind, adapter)
            job = SAEJob(layer, kind, adapter, seed, held_out_fraction, 0, init_seed, {"init_seed": init_seed})
            tcfg = trainer_config(
                c, seed, checkpoints=10, device=str(dist.device), autocast=autocast, data_parallel=data_parallel
            )
            res = train_sae_job(
                st, job, c, tcfg, folder if writer else None, folder / "ckpt", progress and dist.is_main
            )
            if writer:
                ev = evaluate_held_out(st, job, res.sae)
                write_json(
                    folder / "done.json",
                    {
                        "rank": dist.rank,
                        "final": res.final,
                        "held_out": {n: v for n, v in ev.items() if n != "density"},
                    },
                )
        if data_parallel:
            barrier()  # done.json is written before any rank looks at the next job
    barrier()
    cleanup()
    if not dist.is_main:
        return
    table = Table(title=f"{len(jobs)} SAEs on {dist.world_size} rank(s) -> {out}")
    for col in ("SAE", "rank", "train FVU", "held-out FVU", "L0", "tokens/s"):
        table.add_column(col)
    for job in jobs:
        done = read_json(out / _job_label(*job) / "done.json")
        h = done["held_out"]
        table.add_row(
            _job_label(*job),
            str(done["rank"]),
            f"{done['final']['fvu']:.4f}",
            f"{h.get('fvu', float('nan')):.4f}",
            f"{h.get('l0', float('nan')):.1f}",
            f"{done['final']['tokens_per_s']:.0f}",
        )
    Console(width=160).print(table)
