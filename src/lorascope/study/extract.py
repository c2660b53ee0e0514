"""Stage 2: residual activations of the base model and every adapter on the same documents (one store)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lorascope.study.adapters import Adapter
from lorascope.study.cache import RunState, StageDir


@dataclass(frozen=True)
class Extracted:
    """The activation store of this run and its cache key."""

    path: Path
    key: str

    def open(self):
        from lorascope.activations import open_store

        return open_store(self.path)


def stage_extract(st: RunState, adapters: list[Adapter]) -> Extracted:
    from lorascope.activations import ExtractConfig, extract
    from lorascope.data import load_dataset_spec
    from lorascope.models.residual import check_layers

    cfg = st.config
    e = cfg.extraction
    inputs = {"model": cfg.model.spec, "dtype": cfg.model.dtype, "adapters": {a.name: a.key for a in adapters},
              "data": cfg.data.activations, "n_docs": cfg.data.n_docs, "max_length": cfg.data.max_length,
              "seed": cfg.seed, **e.model_dump()}
    sd = StageDir.make(st.out, "activations", "store", inputs)
    if not sd.done:
        t0 = time.perf_counter()
        base = st.base()
        check_layers(base.model, e.layers)
        peft = st.peft({a.name: a.path for a in adapters})
        examples = load_dataset_spec(cfg.data.activations, limit=cfg.data.n_docs, seed=cfg.seed + 1)
        xcfg = ExtractConfig(layers=list(e.layers), tokens=e.tokens, skip_first=e.skip_first,
                             max_norm_factor=e.max_norm_factor, batch_size=e.batch_size, docs_per_shard=e.shard_docs,
                             max_length=cfg.data.max_length, dtype=e.store_dtype, progress=st.progress,
                             exclude_template=e.exclude_template)
        st.log(f"extracting activations at layers {list(e.layers)} for {len(adapters)} adapters")
        extract(peft, base.tokenizer, examples, sd.path / "store", xcfg, adapters=[a.name for a in adapters])
        sd.mark_done()
        st.finished("extraction", t0)
    return Extracted(sd.path / "store", sd.key)
