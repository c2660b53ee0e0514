"""`lorascope info PATH`: describe an activation store, an SAE, an adapter, or a results folder."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lorascope.cli import app


def describe(path: Path, allow_pickle: bool = False) -> list[tuple[str, str]]:
    """(key, value) lines describing whatever lorascope artefact ``path`` is (``allow_pickle``: see load_sae)."""
    from lorascope.errors import LorascopeError

    if not path.exists():
        raise LorascopeError(f"{path} does not exist", fix="check the path")
    if (path / "results" / "results.parquet").is_file():
        path = path / "results"
    if (path / "results.parquet").is_file():
        import pandas as pd

        df = pd.read_parquet(path / "results.parquet")
        meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else {}
        return [
            ("kind", "results table"),
            ("rows", str(len(df))),
            ("families", ", ".join(sorted(df.family.unique()))),
            ("layers", str(sorted(int(x) for x in df.layer.unique() if x >= 0))),
            ("adapters", ", ".join(sorted(a for a in df.adapter.unique() if a))),
            ("model", str(meta.get("model", "?"))),
        ]
    if (path / "progress").is_dir() and not (path / "manifest.json").is_file():
        return [
            ("kind", "activation store"),
            (
                "WARNING",
                "incomplete: the extraction was interrupted (no manifest.json yet); re-run the same "
                "extract command to resume it",
            ),
        ]
    if (path / "manifest.json").is_file():
        from lorascope.activations import open_store
        from lorascope.activations.store import missing_shards

        st = open_store(path)
        m, c = st.manifest, st.manifest.get("config", {})
        model = c.get("model", {})
        missing = missing_shards(path, m)
        status = (
            [
                (
                    "WARNING",
                    f"incomplete: {len(missing)} of {len(st.shards)} shard files are missing (first: "
                    f"{missing[0]}); re-run the extraction into a fresh folder",
                )
            ]
            if missing
            else [("status", f"complete ({len(st.shards)} shards)")]
        )
        return [
            ("kind", "activation store"),
            *status,
            ("model", str(model.get("name", model) if isinstance(model, dict) else model)),
            ("d_model", str(st.d_model)),
            ("layers", str(st.layers)),
            ("adapters", ", ".join(st.adapters)),
            ("tokens", str(st.n_tokens)),
            ("documents", str(c.get("n_docs"))),
            ("dtype on disk", str(c.get("dtype"))),
            ("forward", str(c.get("forward_dtype"))),
            ("token selection", json.dumps(c.get("selection", {}))),
            ("shards", str(len(m.get("shards", [])))),
            ("delta", str(m.get("delta_definition", ""))[:90] + "…"),
        ]
    if (path / "adapter_config.json").is_file():
        c = json.loads((path / "adapter_config.json").read_text())
        return [
            ("kind", "PEFT LoRA adapter"),
            ("rank", str(c.get("r"))),
            ("alpha", str(c.get("lora_alpha"))),
            ("target modules", str(c.get("target_modules"))),
            ("base model", str(c.get("base_model_name_or_path"))),
        ]
    from lorascope.saes import load_sae
    from lorascope.saes.formats import nonfinite_tensors

    sae = load_sae(path, allow_pickle=allow_pickle)
    bad = nonfinite_tensors(sae)
    warn = (
        [
            (
                "WARNING",
                f"non-finite weights in {', '.join(f'{k} ({n} NaN/inf)' for k, n in bad.items())}: "
                "this SAE is unusable",
            )
        ]
        if bad
        else []
    )
    return [
        *warn,
        ("kind", f"SAE ({sae.cfg.architecture})"),
        ("d_in", str(sae.d_in)),
        ("d_sae", str(sae.d_sae)),
        ("arch", json.dumps(sae.cfg.arch)),
        ("apply_b_dec_to_input", str(sae.cfg.apply_b_dec_to_input)),
        ("metadata", json.dumps(sae.cfg.metadata)[:200]),
    ]


@app.command("info")
def info_cmd(
    path: Path = typer.Argument(..., help="A store, SAE, adapter or results folder."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Allow SAE files that need full unpickling (runs code: trust the file)."
    ),
) -> None:
    """Describe any lorascope artefact: activation store, SAE (any supported format), adapter, or results."""
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, title=str(path))
    for k, v in describe(path, allow_pickle=allow_pickle):
        table.add_row(k, v)
        if k == "WARNING":
            print(f"warning: {path}: {v}", file=sys.stderr)
    Console().print(table)
