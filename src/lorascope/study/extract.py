"""Stage 2: residual activations of the base model and every fine-tune on the same documents (one store).

PEFT adapters run as rows of one mixed batch (:func:`lorascope.activations.extract`); when any fine-tune is a
whole model (``adapters.load: {name: {model: DIR}}``), every fine-tune runs as its own model on the same batches
(:func:`lorascope.activations.full.extract_full`, one model resident at a time). Either way the store is the same.

The stage also records in the store's manifest ("split") which documents are texts the trained adapters were
fine-tuned on: they are never held out (lorascope.activations.reader), so the held-out Δ of an adapter is never
measured on its own training data, even when ``data.finetune`` and ``data.activations`` coincide.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lorascope.study.adapters import Adapter
from lorascope.study.cache import RunState, StageDir, data_key_extras

SPLIT_VERSION = 2


@dataclass(frozen=True)
class Extracted:
    """The activation store of this run and its cache key."""

    path: Path
    key: str

    def open(self):
        from lorascope.activations import open_store

        return open_store(self.path)


def activation_examples(st: RunState) -> list:
    """The documents activations are extracted from (also the splice test's, which must tokenise them alike)."""
    from lorascope.data import load_dataset_spec

    d, seed = st.config.data, st.config.seed
    return load_dataset_spec(d.activations, limit=d.n_docs, seed=seed + 1, columns=d.activations_columns)


def _inputs(st: RunState, adapters: list[Adapter]) -> dict:
    cfg = st.config
    inputs = {
        "model": cfg.model.spec,
        "dtype": cfg.model.dtype,
        "adapters": {a.name: a.key for a in adapters},
        "data": cfg.data.activations,
        "n_docs": cfg.data.n_docs,
        "max_length": cfg.data.max_length,
        "seed": cfg.seed,
        **cfg.extraction.model_dump(),
        "split": SPLIT_VERSION,  # content-hash split, LoRA training texts never held out: downstream caches differ
    }
    # new settings enter the key only when not at their default, so existing caches stay valid
    inputs.update(data_key_extras(cfg.data.activations_columns, cfg.data.long_examples))
    return inputs


def stage_extract(st: RunState, adapters: list[Adapter]) -> Extracted:
    from lorascope.activations import ExtractConfig, extract, extract_full
    from lorascope.models.residual import check_layers

    cfg = st.config
    e = cfg.extraction
    sd = StageDir.make(st.out, "activations", "store", _inputs(st, adapters))
    if not sd.done:
        t0 = time.perf_counter()
        examples = activation_examples(st)
        xcfg = ExtractConfig(
            layers=list(e.layers),
            tokens=e.tokens,
            skip_first=e.skip_first,
            max_norm_factor=e.max_norm_factor,
            batch_size=e.batch_size,
            docs_per_shard=e.shard_docs,
            max_length=cfg.data.max_length,
            dtype=e.store_dtype,
            progress=st.progress,
            length_policy=cfg.data.long_examples,
            exclude_template=e.exclude_template,
        )
        st.log(f"extracting activations at layers {list(e.layers)} for {len(adapters)} fine-tunes")
        if all(a.kind == "peft" for a in adapters):
            base = st.base()
            check_layers(base.model, e.layers)
            peft = st.peft({a.name: a.path for a in adapters})
            extract(peft, base.tokenizer, examples, sd.path / "store", xcfg, adapters=[a.name for a in adapters])
        else:  # a whole model among them: every fine-tune runs as its own model, one resident at a time
            st.log("a fine-tune is a whole model: base and fine-tunes run one after another on the same batches")
            extract_full(
                cfg.model.spec,
                {a.name: str(a.path) for a in adapters},
                st.tokenizer(),
                examples,
                sd.path / "store",
                xcfg,
                load={"dtype": cfg.model.dtype, "device": cfg.model.device},
            )
        record_lora_exclusions(st, adapters, sd.path / "store", examples)
        sd.mark_done()
        st.finished("extraction", t0)
    return Extracted(sd.path / "store", sd.key)


def record_lora_exclusions(st: RunState, adapters: list[Adapter], path: Path, examples: list) -> None:
    """Write the store's "split" record (documents that are LoRA training texts; never held out) into its
    manifest, and log how many held-out documents that removes. Adapters loaded from ``adapters.load`` have
    unknown training data: said once in the log, nothing excluded for them."""
    from lorascope.activations import open_store
    from lorascope.io import write_json
    from lorascope.study.adapters import finetune_examples
    from lorascope.study.splits import lora_exclusions, study_holdout

    trained = [a.name for a in adapters if a.training is not None]
    unknown = [a.name for a in adapters if a.training is None]
    if unknown:
        st.log(f"held-out split: training data of loaded fine-tunes unknown ({', '.join(unknown)}): not deduplicated")
    store = open_store(path, verify="none")
    lora_train = finetune_examples(st.config)[0] if trained else []
    record = lora_exclusions(store, examples, lora_train, trained, unknown)
    holdout = study_holdout(st.config)
    before = int(store.split_docs("held_out", holdout).sum())
    store.manifest["split"] = record
    after = int(store.split_docs("held_out", holdout).sum())
    record["held_out_dropped"] = {"fraction": holdout.fraction, "seed": holdout.seed, "n_docs": before - after}
    write_json(path / "manifest.json", store.manifest)
    if trained:
        st.log(
            f"held-out split: {before - after} of {before} held-out documents are LoRA training texts "
            f"(dropped from the held-out set, kept for SAE training); {after} held out"
        )
