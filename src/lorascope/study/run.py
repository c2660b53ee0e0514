"""``run(config)``: the whole study, stage by stage, each cached by a hash of its inputs.

    adapters -> extraction -> adapter SAEs (layer × adapter × seed) -> reference SAEs (layer) -> measure
    -> density (free-L0 SAEs, when ``density.enabled``) -> publish

Every stage writes into ``output_dir/<stage>/<name>-<hash>/`` and marks completion with ``done.json`` (written
last, atomically). A re-run skips stages whose hash folder is complete; a changed setting changes the hash of
that stage and of everything downstream, so only those re-run. Interrupted work resumes: the activation store
resumes by shard, SAE training from its last checkpoint, the measure stage by (layer, adapter) part files. One run
at a time per output folder (a lock); ``.tmp-*`` leftovers of killed writers are removed at start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorascope.config import ExperimentConfig
from lorascope.errors import LorascopeError
from lorascope.io import OutputLock, clean_tmp_files, content_key, read_json, write_json
from lorascope.study import publish
from lorascope.study.adapters import stage_adapters
from lorascope.study.cache import RunState
from lorascope.study.density import stage_density
from lorascope.study.explain import explain_layer, gate_adapters, stage_explain
from lorascope.study.extract import Extracted, stage_extract
from lorascope.study.measure import stage_measure
from lorascope.study.saes import StudySAEs, reference_picks, stage_saes


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


def run(config: ExperimentConfig, progress: bool = True, report: bool = True) -> RunResult:
    """Run (or resume, or re-use) the whole study described by ``config``."""
    out = Path(config.output_dir).expanduser()
    t_start = time.perf_counter()
    check_inputs(config)
    with OutputLock(out):
        clean_tmp_files(out)
        write_json(out / "config.json", config.model_dump())
        st = RunState(config, out, progress)
        adapters, sanity = gate_adapters(st, stage_adapters(st))
        extracted = stage_extract(st, adapters)
        saes = stage_saes(st, extracted, adapters)
        measured = stage_measure(st, extracted, adapters, saes, _upstream(config, out, extracted, saes))
        explained = stage_explain(st, extracted, adapters, saes, measured.path, sanity)
        density = stage_density(st, extracted, adapters)
        results = publish.publish(st, explained, density)
        report_path = publish.report(st, explained, density) if report else None
        st.timings["total"] = time.perf_counter() - t_start
        st.write_timings(st.timings["total"])
        st.log(st.stage_summary(st.timings["total"]))
        return RunResult(out, results, report_path, st.work_done, st.timings)


def _upstream(config: ExperimentConfig, out: Path, extracted: Extracted, saes: StudySAEs) -> dict[str, Any]:
    """What the measure stage depends on (its cache key): the store, the SAE folders, the splice model."""
    return {
        "store": extracted.key,
        "adapter_saes": {f"{k[0]}:{k[1]}": [p.parent.name for p in v] for k, v in saes.adapter.items()},
        # relative inside the run folder, so a moved run folder keeps its cached measurements
        "ref": {
            str(k): str(v.relative_to(out)) if v.is_relative_to(out) else content_key(v)
            for k, v in saes.reference.items()
        },  # a path reference: keyed by its bytes, not its name
        "splice_model": config.model.spec,
    }


def _model_config(spec: str) -> dict[str, Any]:
    """A local model folder's config.json (text_config merged in), or {} for other specs."""
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        return {}
    mc = read_json(folder / "config.json")
    return {**mc.get("text_config", {}), **mc}


def _check_reference(config: ExperimentConfig, width: Any) -> None:
    from lorascope.saes import load_sae

    r = config.reference_sae
    for layer, pick in reference_picks(config).items():
        p = pick.path
        try:
            sae = load_sae(p, allow_pickle=r.allow_pickle)
        except LorascopeError as exc:
            if "allow_pickle" not in (exc.fix or ""):
                raise
            raise LorascopeError(
                exc.problem,
                fix="re-save it as a state dict, or, only if you trust the file, set reference_sae.allow_pickle: true",
            ) from exc
        if width is not None and sae.d_in != int(width):
            raise LorascopeError(
                f"reference_sae.path for layer {layer}: {p} has d_in = {sae.d_in}, but the model's "
                f"residual width is {width}",
                fix="use SAEs trained on this model's residual stream",
            )


def check_inputs(config: ExperimentConfig) -> None:
    """Fail fast, before any training, on inputs that would otherwise fail only in a late stage: ``adapters.load``
    entries that are not PEFT folders (or hub ids), model folders or checkpoint folders, layers out of range
    (local model folders, read from config.json), reference SAEs that are missing, unreadable, pickled without
    ``reference_sae.allow_pickle`` or of the wrong width, and data that does not load or (policy ``error``)
    does not fit ``data.max_length``."""
    from lorascope.models.finetunes import expand_load_specs

    expand_load_specs(config.adapters.load)  # every entry names a PEFT folder / hub id, a model or checkpoints
    mc = _model_config(config.model.spec)
    n = mc.get("num_hidden_layers", mc.get("n_layer"))
    bad = [x for x in config.extraction.layers if n is not None and not 0 <= x < int(n)]
    if bad:
        raise LorascopeError(
            f"extraction.layers: layer {bad[0]} is out of range: this model has {n} blocks",
            fix=f"choose layers in 0..{int(n) - 1}",
        )
    if config.reference_sae.source == "path":
        _check_reference(config, mc.get("hidden_size", mc.get("n_embd")))
    if config.explain.enabled:
        explain_layer(config)
    _check_data(config)


def _check_data(config: ExperimentConfig) -> None:
    """The fine-tuning and activation data load (format, fields, encoding; files are small next to a model), and,
    with ``data.long_examples: error``, fit ``data.max_length``, checked on the tokenizer alone. The other
    policies never stop a run: the training stage prints their counts before it loads the model, extraction logs
    them."""
    from lorascope.activations.extract import tokenize_docs
    from lorascope.data import load_dataset_spec
    from lorascope.study.adapters import check_lengths

    d, t = config.data, config.adapters.train
    examples = (
        load_dataset_spec(d.finetune, limit=d.n_finetune, seed=config.seed, columns=d.finetune_columns)
        if t is not None and t.ranks
        else []
    )
    docs = load_dataset_spec(d.activations, limit=d.n_docs, seed=config.seed + 1, columns=d.activations_columns)
    if d.long_examples != "error":
        return
    from lorascope.models.tokenizer import load_tokenizer

    tok = load_tokenizer(config.model.spec, config.model.trust_remote_code)
    if examples:
        check_lengths(config, examples, tok)
    tokenize_docs(tok, docs, d.max_length, d.long_examples)
