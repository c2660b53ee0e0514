"""``run(config)``: the whole study, stage by stage, each cached by a hash of its inputs.

    adapters -> extraction -> adapter SAEs (layer × adapter × seed) -> reference SAEs (layer) -> geometry -> report

Every stage writes into ``output_dir/<stage>/<name>-<hash>/`` and marks completion with ``done.json`` (written
last, atomically). A re-run skips stages whose hash folder is complete; a changed setting changes the hash of
that stage and of everything downstream, so only those re-run. Interrupted work resumes: the activation store
resumes by shard, SAE training from its last checkpoint, geometry by (layer, adapter) part files. One run at a
time per output folder (a lock); ``.tmp-*`` leftovers of killed writers are removed at start.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorascope import __version__
from lorascope.config import ExperimentConfig, SAECfg
from lorascope.errors import LorascopeError
from lorascope.io import OutputLock, atomic_dir, clean_tmp_files, read_json, stable_hash, write_json

RESULTS = "results"


def _log(msg: str, progress: bool) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[bold cyan]lorascope[/] {msg}")


@dataclass
class StageDir:
    """A cached stage output: ``root/<stage>/<label>-<hash of inputs>``."""

    path: Path
    key: str
    inputs: dict[str, Any]

    @classmethod
    def make(cls, root: Path, stage: str, label: str, inputs: dict[str, Any]) -> StageDir:
        key = stable_hash({"lorascope": __version__.split(".")[0], **inputs})
        return cls(root / stage / f"{label}-{key}", key, inputs)

    @property
    def done(self) -> bool:
        return (self.path / "done.json").is_file()

    def mark_done(self, info: dict[str, Any] | None = None) -> None:
        write_json(self.path / "done.json", {"key": self.key, "inputs": self.inputs, "info": info or {},
                                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def info(self) -> dict[str, Any]:
        return read_json(self.path / "done.json")["info"]


@dataclass
class RunState:
    config: ExperimentConfig
    out: Path
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    work_done: list[str] = field(default_factory=list)  # stages that did real work in this call
    _base: Any = None
    _peft: Any = None

    def base(self):
        if self._base is None:
            from lorascope.models import load_base

            m = self.config.model
            _log(f"loading base model {m.spec}", self.progress)
            self._base = load_base(m.spec, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code)
        return self._base

    def peft(self, adapters: dict[str, Path]):
        if self._peft is None:
            from lorascope.models import load_adapters

            self._peft = load_adapters(self.base(), {k: str(v) for k, v in adapters.items()})
        return self._peft


# ---- stage 1: adapters ------------------------------------------------------------------------------------------
def stage_adapters(st: RunState) -> dict[str, dict[str, Any]]:
    """Train adapters at the configured ranks (or take the given folders): {name: {path, rank, key, losses}}."""
    from lorascope.data import load_dataset_spec, split_examples
    from lorascope.models import LoraSettings, held_out_loss, load_adapters, train_lora

    cfg = st.config
    out: dict[str, dict[str, Any]] = {}
    for name, folder in cfg.adapters.load.items():
        path = Path(folder).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise LorascopeError(f"adapters.load.{name}: {path} is not a PEFT adapter folder (no adapter_config.json)",
                                 fix="point at a folder saved by PEFT, or remove the entry")
        rank = int(json.loads((path / "adapter_config.json").read_text()).get("r", -1))
        out[name] = {"path": path, "rank": rank, "key": stable_hash({"load": str(path.resolve()),
                                                                       "mtime": path.stat().st_mtime})}
    t = cfg.adapters.train
    if t is None or not t.ranks:
        return out
    data_inputs = {"model": cfg.model.spec, "finetune": cfg.data.finetune, "n": cfg.data.n_finetune,
                   "max_length": cfg.data.max_length, "seed": cfg.seed}
    todo = []
    for r in t.ranks:
        settings = {**t.model_dump(exclude={"ranks"}), "rank": r}
        sd = StageDir.make(st.out, "adapters", f"rank_{r}", {**data_inputs, **settings})
        out[f"rank_{r}"] = {"path": sd.path / "adapter", "rank": r, "key": sd.key, "stage": sd}
        if not sd.done:
            todo.append((r, sd))
    if todo:
        t0 = time.perf_counter()
        base = st.base()
        examples = load_dataset_spec(cfg.data.finetune, limit=cfg.data.n_finetune, seed=cfg.seed)
        train, held = split_examples(examples, 0.15, seed=cfg.seed)
        for r, sd in todo:
            _log(f"training LoRA rank {r} ({t.steps} steps)", st.progress)
            s = LoraSettings(rank=r, alpha=t.alpha, dropout=t.dropout, target_modules=t.target_modules,
                             steps=t.steps, lr=t.lr, batch_size=t.batch_size, max_length=cfg.data.max_length,
                             seed=cfg.seed, autocast_bf16=t.autocast_bf16)
            res = train_lora(base, train, s, output_dir=sd.path / "adapter", progress=st.progress)
            pm = load_adapters(base, {"a": sd.path / "adapter"})
            losses = held_out_loss(pm, base.tokenizer, held[:16], ["__base__", "a"], max_length=cfg.data.max_length)
            pm.unload()
            sd.mark_done({"losses": res.losses, "loss_start": res.loss_start, "loss_end": res.loss_end,
                          "heldout_loss_base": losses["__base__"], "heldout_loss_adapted": losses["a"],
                          "tokens_seen": res.tokens_seen})
        st.timings["adapters"] = time.perf_counter() - t0
        st.work_done.append("adapters")
    for v in out.values():
        if "stage" in v:
            v["info"] = v.pop("stage").info()
    return out


# ---- stage 2: extraction ------------------------------------------------------------------------------------------
def stage_extract(st: RunState, adapters: dict[str, dict[str, Any]]) -> tuple[Path, str]:
    from lorascope.activations import ExtractConfig, extract
    from lorascope.data import load_dataset_spec

    cfg = st.config
    e = cfg.extraction
    inputs = {"model": cfg.model.spec, "dtype": cfg.model.dtype, "adapters": {k: v["key"] for k, v in adapters.items()},
              "data": cfg.data.activations, "n_docs": cfg.data.n_docs, "max_length": cfg.data.max_length,
              "seed": cfg.seed, **e.model_dump()}
    sd = StageDir.make(st.out, "activations", "store", inputs)
    if not sd.done:
        t0 = time.perf_counter()
        base = st.base()
        from lorascope.models.residual import check_layers

        check_layers(base.model, e.layers)
        peft = st.peft({k: v["path"] for k, v in adapters.items()})
        examples = load_dataset_spec(cfg.data.activations, limit=cfg.data.n_docs, seed=cfg.seed + 1)
        xcfg = ExtractConfig(layers=list(e.layers), tokens=e.tokens, skip_first=e.skip_first,
                             max_norm_factor=e.max_norm_factor, batch_size=e.batch_size, docs_per_shard=e.shard_docs,
                             max_length=cfg.data.max_length, dtype=e.store_dtype, progress=st.progress)
        _log(f"extracting activations at layers {list(e.layers)} for {len(adapters)} adapters", st.progress)
        extract(peft, base.tokenizer, examples, sd.path / "store", xcfg, adapters=list(adapters))
        sd.mark_done()
        st.timings["extraction"] = time.perf_counter() - t0
        st.work_done.append("extraction")
    return sd.path / "store", sd.key


# ---- stage 3/4: SAEs ----------------------------------------------------------------------------------------------
def training_stream(store, layer: int, kind: str, adapter: str | None, batch: int, seed: int, frac: float,
                    split_seed: int):
    """A re-openable, endless, deterministic stream of training rows (a new shuffle each epoch)."""

    def factory():
        epoch = 0
        while True:
            reader = store.reader(layer, kind=kind, adapter=adapter, split="train", batch_size=batch, seed=seed,
                                  epoch=epoch, held_out_fraction=frac, split_seed=split_seed)
            if len(reader) == 0:
                raise LorascopeError(f"no training tokens at layer {layer}",
                                     fix="extract more documents or lower data.held_out_fraction")
            yield from reader
            epoch += 1

    return factory


def train_one_sae(st: RunState, store_path: Path, store_key: str, layer: int, kind: str, adapter: str | None,
                  c: SAECfg, seed: int, label: str) -> Path:
    from lorascope.activations import open_store
    from lorascope.saes import create_sae, save_sae
    from lorascope.saes.trainer import TrainerConfig, train_sae

    inputs = {"store": store_key, "layer": layer, "kind": kind, "adapter": adapter, "seed": seed,
              "held_out_fraction": st.config.data.held_out_fraction,
              **c.model_dump(exclude={"seeds", "path", "source", "allow_pickle"})}
    sd = StageDir.make(st.out, "saes", label, inputs)
    if sd.done:
        return sd.path / "sae"
    t0 = time.perf_counter()
    store = open_store(store_path)
    d = store.d_model
    d_sae, arch = c.sae_width(d), c.sae_settings()
    meta = {"model_name": st.config.model.spec, "layer": layer, "hook_name": f"blocks.{layer}.hook_resid_post",
            "trained_on": kind, "adapter": adapter or "", "lorascope_label": label}
    # every SAE gets its own initialisation: SAEs sharing a random init start with identical decoders, which
    # inflates any cross-SAE cosine for as long as training has not moved them far (measured: MMCS 0.99 at init)
    init_seed = int(stable_hash({"seed": seed, "label": label}, 8), 16)
    sae = create_sae(c.architecture, d, d_sae, seed=init_seed, metadata={**meta, "init_seed": init_seed}, **arch)
    tcfg = TrainerConfig(total_tokens=c.tokens, batch_size=c.batch_size, lr=c.lr, seed=seed,
                         device=st.config.model.device,
                         warmup_steps=min(100, max(1, c.tokens // c.batch_size // 10)),
                         checkpoint_every=max(1, c.tokens // c.batch_size // 5), resume=True)
    _log(f"training {c.architecture} SAE {label} ({d}→{d_sae}, {c.tokens} tokens)", st.progress)
    stream = training_stream(store, layer, kind, adapter, c.batch_size, seed, st.config.data.held_out_fraction,
                             st.config.seed)
    res = train_sae(sae, stream, tcfg, checkpoint_dir=sd.path / "ckpt", progress=st.progress)
    save_sae(res.sae, sd.path / "sae")
    sd.mark_done({"final": res.final, "log": res.log[-50:]})
    st.timings[f"sae:{label}"] = time.perf_counter() - t0
    st.work_done.append(f"sae:{label}")
    return sd.path / "sae"


def stage_saes(st: RunState, store_path: Path, store_key: str, adapters: dict[str, dict[str, Any]]
               ) -> tuple[dict[tuple[int, str], list[Path]], dict[int, Path]]:
    cfg = st.config
    adapter_saes: dict[tuple[int, str], list[Path]] = {}
    for layer in cfg.extraction.layers:
        for name in adapters:
            adapter_saes[(layer, name)] = [
                train_one_sae(st, store_path, store_key, layer, "delta", name, cfg.adapter_sae, seed,
                              f"L{layer}__{name}__seed{seed}") for seed in cfg.adapter_sae.seeds]
    ref: dict[int, Path] = {}
    r = cfg.reference_sae
    for layer in cfg.extraction.layers:
        if r.source == "path":
            p = Path(r.path.format(layer=layer)).expanduser()
            if not p.exists():
                raise LorascopeError(f"reference_sae.path for layer {layer}: {p} does not exist",
                                     fix="use {layer} in the path to name one SAE per layer")
            ref[layer] = p
        else:
            ref[layer] = train_one_sae(st, store_path, store_key, layer, "base", None, r, r.seeds[0],
                                       f"L{layer}__reference")
    return adapter_saes, ref


# ---- stage 5: geometry ---------------------------------------------------------------------------------------------
def _lora_update(adapter_path: Path, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B, A) of the adapted map that writes into the residual stream at ``layer`` (MLP down projection), if any."""
    from safetensors.torch import load_file

    f = adapter_path / "adapter_model.safetensors"
    if not f.is_file():
        return None
    sd = load_file(str(f))
    for mod in ("mlp.down_proj", "mlp.c_proj"):
        a = [k for k in sd if f".{layer}.{mod}.lora_A" in k or f"h.{layer}.{mod}.lora_A" in k]
        b = [k for k in sd if f".{layer}.{mod}.lora_B" in k or f"h.{layer}.{mod}.lora_B" in k]
        if a and b:
            return sd[b[0]].float(), sd[a[0]].float()  # PEFT layout: B [out, r], A [r, in] (also for Conv1D)
    return None


def stage_geometry(st: RunState, store_path: Path, adapters: dict[str, dict[str, Any]],
                   adapter_saes: dict[tuple[int, str], list[Path]], ref: dict[int, Path], upstream: dict) -> Path:
    import numpy as np

    from lorascope.activations import open_store
    from lorascope.analysis import LayerAdapterInputs, Settings, analyse_layer_adapter, cross_adapter_cka
    from lorascope.io import atomic_path
    from lorascope.results import ResultRow, row_from_record
    from lorascope.saes import load_sae

    cfg = st.config
    g = cfg.geometry
    sd = StageDir.make(st.out, "geometry", "tables", {"upstream": upstream, **g.model_dump()})
    if sd.done:
        return sd.path
    t0 = time.perf_counter()
    store = open_store(store_path)
    settings = Settings(taus=tuple(g.taus), subspace_k=g.subspace_k, n_boot=g.bootstrap,
                        cka_max_tokens=g.cka_max_tokens, seed=cfg.seed)
    parts = sd.path / "parts"
    frac, split_seed = cfg.data.held_out_fraction, cfg.seed
    for layer in cfg.extraction.layers:
        reference = load_sae(ref[layer], allow_pickle=cfg.reference_sae.allow_pickle)
        deltas = {}
        for name, info in adapters.items():
            part = parts / f"L{layer}__{name}.json"
            held = store.held_out(layer, name, held_out_fraction=frac, split_seed=split_seed)
            n = min(held.base.shape[0], g.eval_tokens)
            deltas[name] = held.delta[: g.cka_max_tokens]
            if part.is_file():
                continue
            _log(f"geometry: layer {layer}, {name} ({n} held-out tokens)", st.progress)
            inp = LayerAdapterInputs(layer, name, info["rank"], held.base[:n], held.delta[:n],
                                     [load_sae(p) for p in adapter_saes[(layer, name)]], reference,
                                     _lora_update(Path(info["path"]), layer))
            res = analyse_layer_adapter(inp, settings)
            if "info" in info:
                i = info["info"]
                for metric in ("loss_start", "loss_end", "heldout_loss_base", "heldout_loss_adapted"):
                    res.rows.append(ResultRow("lora", metric if metric.startswith("heldout") else f"train_{metric}",
                                              float(i[metric]), layer=-1, adapter=name, rank=info["rank"]))
            write_json(parts / f"L{layer}__{name}__contexts.ctx", _contexts(st, store, inp, held, n, layer, name))
            with atomic_path(parts / f"L{layer}__{name}.npz") as tmp:
                with open(tmp, "wb") as fh:
                    np.savez_compressed(fh, **res.arrays)
            write_json(part, [r.as_record() for r in res.rows])
        cka_part = parts / f"L{layer}__cka.json"
        if not cka_part.is_file() and len(deltas) > 1:
            write_json(cka_part, [r.as_record() for r in cross_adapter_cka(
                layer, deltas, {k: v["rank"] for k, v in adapters.items()}, g.cka_max_tokens)])
        ref_part = parts / f"L{layer}__reference.json"
        if not ref_part.is_file():
            from lorascope.saes.trainer import evaluate_sae

            held = store.held_out(layer, next(iter(adapters)), held_out_fraction=frac, split_seed=split_seed)
            ev = evaluate_sae(reference, held.base[: g.eval_tokens])
            write_json(ref_part, [ResultRow("reconstruction", "fvu_ref_on_base", ev["fvu"], layer=layer,
                                            n=int(ev["n_tokens"]), d=store.d_model).as_record(),
                                  ResultRow("density", "l0_ref_on_base", ev["l0"], layer=layer,
                                            n=int(ev["n_tokens"]), d=store.d_model).as_record()])
    if g.splice:
        _splice_parts(st, store, adapters, adapter_saes, ref, parts)
    rows = []
    for f in sorted(parts.glob("*.json")):
        rows += [row_from_record(r) for r in read_json(f)]
    _write_results(st, sd.path, rows, adapters, store)
    sd.mark_done({"rows": len(rows)})
    st.timings["geometry"] = time.perf_counter() - t0
    st.work_done.append("geometry")
    return sd.path


def _contexts(st: RunState, store, inp, held, n: int, layer: int, name: str) -> list[dict]:
    """Top-activating held-out contexts of the adapter SAE's strongest features (by total activation mass)."""
    from lorascope.report import top_activating_contexts

    r = st.config.report
    if r.top_features == 0 or n == 0:
        return []
    sae = inp.adapter_saes[0]
    with torch.no_grad():
        codes = torch.cat([sae.encode(inp.delta[i: i + 4096]) for i in range(0, n, 4096)])
    top = torch.argsort(codes.clamp_min(0).sum(0), descending=True)[: r.top_features].tolist()
    used = sorted(set(held.doc_index[:n].tolist()))
    docs = {i: store.doc_tokens(i) for i in used}
    doc_list = [docs.get(i, []) for i in range(max(used) + 1)]
    tok = st.base().tokenizer
    return top_activating_contexts(codes, held.token_id[:n], held.doc_index[:n], held.position[:n], doc_list,
                                   lambda ids: tok.decode(ids), top, r.contexts_per_feature, layer=layer,
                                   adapter=name)


def _splice_parts(st: RunState, store, adapters, adapter_saes, ref, parts: Path) -> None:
    from lorascope.activations.extract import tokenize_docs
    from lorascope.data import load_dataset_spec
    from lorascope.results import ResultRow
    from lorascope.saes import load_sae
    from lorascope.splice import splice_kl

    cfg = st.config
    todo = [(layer, name) for layer in cfg.extraction.layers for name in adapters
            if not (parts / f"L{layer}__{name}__splice.json").is_file()]
    if not todo:
        return
    base = st.base()
    peft = st.peft({k: v["path"] for k, v in adapters.items()})
    examples = load_dataset_spec(cfg.data.activations, limit=cfg.data.n_docs, seed=cfg.seed + 1)
    mask = store.split_docs("held_out", cfg.data.held_out_fraction, cfg.seed)
    held_ids = {doc for doc, keep in zip(store.doc_ids, mask.tolist(), strict=True) if keep}
    docs = [d for d in tokenize_docs(base.tokenizer, examples, cfg.data.max_length) if d.doc_id in held_ids]
    docs = docs[: cfg.geometry.splice_docs]
    for layer, name in todo:
        _log(f"splice test: layer {layer}, {name} ({len(docs)} docs)", st.progress)
        sae = load_sae(adapter_saes[(layer, name)][0])
        reference = load_sae(ref[layer], allow_pickle=cfg.reference_sae.allow_pickle)

        def recon_adapter(hb, hf, sae=sae):
            return sae(hf - hb)

        def recon_ref_diff(hb, hf, reference=reference):
            return reference(hf) - reference(hb)

        res = splice_kl(peft, base.tokenizer.pad_token_id, docs, layer, name,
                        {"adapter_sae": recon_adapter, "ref_diff": recon_ref_diff},
                        skip_first=cfg.extraction.skip_first)
        rank = adapters[name]["rank"]
        rows = [ResultRow("splice", k, v, layer=layer, adapter=name, rank=rank, n=int(res["n_tokens"]))
                for k, v in res.items() if k != "n_tokens"]
        write_json(parts / f"L{layer}__{name}__splice.json", [r.as_record() for r in rows])


def _write_results(st: RunState, geo_dir: Path, rows, adapters, store) -> None:
    """results.parquet/csv + arrays + meta.json into geo_dir (then mirrored to output_dir/results)."""
    import shutil

    from lorascope.io import atomic_path
    from lorascope.results import rows_to_frame

    df = rows_to_frame(rows).sort_values(["family", "metric", "layer", "rank", "adapter"], kind="stable")
    res = geo_dir / RESULTS
    (res / "arrays").mkdir(parents=True, exist_ok=True)
    with atomic_path(res / "results.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(res / "results.csv") as tmp:
        df.to_csv(tmp, index=False)
    for f in (geo_dir / "parts").glob("*.npz"):
        with atomic_path(res / "arrays" / f.name) as tmp:
            shutil.copyfile(f, tmp)
    contexts = []
    for f in sorted((geo_dir / "parts").glob("*.ctx")):
        contexts += read_json(f)
    write_json(res / "contexts.json", contexts)
    cfg = st.config
    write_json(res / "meta.json", {"name": cfg.name, "model": cfg.model.spec, "d_model": store.d_model,
                                   "n_layers": store.manifest.get("config", {}).get("model", {}).get("n_layers"),
                                   "layers": list(cfg.extraction.layers),
                                   "adapters": {k: v["rank"] for k, v in adapters.items()},
                                   "config": cfg.model_dump(), "lorascope_version": __version__,
                                   "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


# ---- the whole run -------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    output_dir: Path
    results_dir: Path
    report: Path | None
    work_done: list[str]
    timings: dict[str, float]

    @property
    def table(self):
        import pandas as pd

        return pd.read_parquet(self.results_dir / "results.parquet")


def check_inputs(config: ExperimentConfig) -> None:
    """Fail fast, before any training, on inputs that would otherwise fail only in a late stage: adapter folders
    without adapter_config.json, layers out of range (local model folders, read from config.json) and reference
    SAEs that are missing, unreadable, pickled without ``reference_sae.allow_pickle`` or of the wrong width."""
    from lorascope.saes import load_sae

    for name, path in config.adapters.load.items():
        if not (Path(path).expanduser() / "adapter_config.json").is_file():
            raise LorascopeError(f"adapters.load.{name}: {path} is not a PEFT adapter folder (no adapter_config.json)",
                                 fix="point at a folder saved by PEFT, or remove the entry")
    folder = Path(config.model.spec).expanduser()
    mc: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        mc = read_json(folder / "config.json")
        mc = {**mc.get("text_config", {}), **mc}
    n = mc.get("num_hidden_layers", mc.get("n_layer"))
    bad = [x for x in config.extraction.layers if n is not None and not 0 <= x < int(n)]
    if bad:
        raise LorascopeError(f"extraction.layers: layer {bad[0]} is out of range: this model has {n} blocks",
                             fix=f"choose layers in 0..{int(n) - 1}")
    r = config.reference_sae
    if r.source != "path":
        return
    width = mc.get("hidden_size", mc.get("n_embd"))
    for layer in config.extraction.layers:
        p = Path(r.path.format(layer=layer)).expanduser()
        if not p.exists():
            raise LorascopeError(f"reference_sae.path for layer {layer}: {p} does not exist",
                                 fix="use {layer} in the path to name one SAE per layer")
        try:
            sae = load_sae(p, allow_pickle=r.allow_pickle)
        except LorascopeError as exc:
            if "allow_pickle" not in (exc.fix or ""):
                raise
            raise LorascopeError(exc.problem, fix="re-save it as a state dict, or, only if you trust the file, "
                                                  "set reference_sae.allow_pickle: true") from exc
        if width is not None and sae.d_in != int(width):
            raise LorascopeError(f"reference_sae.path for layer {layer}: {p} has d_in = {sae.d_in}, but the model's "
                                 f"residual width is {width}", fix="use SAEs trained on this model's residual stream")


def run(config: ExperimentConfig, progress: bool = True, report: bool = True) -> RunResult:
    """Run (or resume, or re-use) the whole study described by ``config``."""
    out = Path(config.output_dir).expanduser()
    t_start = time.perf_counter()
    check_inputs(config)
    with OutputLock(out):
        clean_tmp_files(out)
        write_json(out / "config.json", config.model_dump())
        st = RunState(config, out, progress)
        adapters = stage_adapters(st)
        store_path, store_key = stage_extract(st, adapters)
        adapter_saes, ref = stage_saes(st, store_path, store_key, adapters)
        upstream = {"store": store_key, "adapter_saes": {f"{k[0]}:{k[1]}": [p.parent.name for p in v]
                                                         for k, v in adapter_saes.items()},
                    # relative inside the run folder, so a moved run folder keeps its cached geometry
                    "ref": {str(k): str(v.relative_to(out) if v.is_relative_to(out) else v) for k, v in ref.items()},
                    "splice_model": config.model.spec}
        geo = stage_geometry(st, store_path, adapters, adapter_saes, ref, upstream)
        results = _publish(st, geo)
        report_path = _report(st, results, geo) if report else None
        st.timings["total"] = time.perf_counter() - t_start
        return RunResult(out, results, report_path, st.work_done, st.timings)


def _publish(st: RunState, geo: Path) -> Path:
    """Mirror the geometry stage's results into output_dir/results (the stable place users and the report read)."""
    import shutil

    src, dst = geo / RESULTS, st.out / RESULTS
    marker = dst / "source.json"
    if marker.is_file() and read_json(marker).get("geometry") == geo.name:
        return dst
    with atomic_dir(dst) as tmp:  # a killed publish leaves the old results folder or none, never a mixture
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        meta = read_json(tmp / "meta.json")
        meta["timings"] = st.timings
        write_json(tmp / "meta.json", meta)
        write_json(tmp / "source.json", {"geometry": geo.name})
    return dst


def _report(st: RunState, results: Path, geo: Path) -> Path | None:
    try:
        from lorascope.report import write_report
    except ImportError:
        return None
    path = st.out / "report.html"
    stamp = st.out / "figures" / "source.json"
    if path.is_file() and stamp.is_file() and read_json(stamp).get("geometry") == geo.name:
        return path
    _log("writing figures and report.html", st.progress)
    path = write_report(st.out)
    write_json(stamp, {"geometry": geo.name})
    st.work_done.append("report")
    return path
