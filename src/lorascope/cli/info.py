"""`lorascope info PATH`: describe an activation store, an SAE, an adapter, or a results folder."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lorascope.cli import app


def describe(path: Path) -> list[tuple[str, str]]:
    """(key, value) lines describing whatever lorascope artefact ``path`` is."""
    from lorascope.errors import LorascopeError

    if not path.exists():
        raise LorascopeError(f"{path} does not exist", fix="check the path")
    if (path / "results" / "results.parquet").is_file():
        path = path / "results"
    if (path / "results.parquet").is_file():
        import pandas as pd

        df = pd.read_parquet(path / "results.parquet")
        meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else {}
        return [("kind", "results table"), ("rows", str(len(df))), ("families", ", ".join(sorted(df.family.unique()))),
                ("layers", str(sorted(int(x) for x in df.layer.unique() if x >= 0))),
                ("adapters", ", ".join(sorted(a for a in df.adapter.unique() if a))),
                ("model", str(meta.get("model", "?")))]
    if (path / "manifest.json").is_file():
        from lorascope.activations import open_store

        st = open_store(path)
        m = st.manifest
        return [("kind", "activation store"), ("model", str(m.get("model", {}).get("name", m.get("model")))),
                ("d_model", str(st.d_model)), ("layers", str(st.layers)), ("adapters", ", ".join(st.adapters)),
                ("tokens", str(st.n_tokens)), ("dtype", str(m.get("dtype"))),
                ("token selection", json.dumps(m.get("selection", {}))), ("shards", str(len(m.get("shards", []))))]
    if (path / "adapter_config.json").is_file():
        c = json.loads((path / "adapter_config.json").read_text())
        return [("kind", "PEFT LoRA adapter"), ("rank", str(c.get("r"))), ("alpha", str(c.get("lora_alpha"))),
                ("target modules", str(c.get("target_modules"))), ("base model", str(c.get("base_model_name_or_path")))]
    from lorascope.saes import load_sae

    sae = load_sae(path)
    return [("kind", f"SAE ({sae.cfg.architecture})"), ("d_in", str(sae.d_in)), ("d_sae", str(sae.d_sae)),
            ("arch", json.dumps(sae.cfg.arch)), ("apply_b_dec_to_input", str(sae.cfg.apply_b_dec_to_input)),
            ("metadata", json.dumps(sae.cfg.metadata)[:200])]


@app.command("info")
def info_cmd(path: Path = typer.Argument(..., help="A store, SAE, adapter or results folder.")) -> None:
    """Describe any lorascope artefact: activation store, SAE (any supported format), adapter, or results."""
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, title=str(path))
    for k, v in describe(path):
        table.add_row(k, v)
    Console().print(table)
