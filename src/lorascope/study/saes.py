"""Stages 3-4: the SAEs. ``train_sae_job`` trains one SAE on one (layer, kind, adapter) slice of a store; the study
and the ``train-sae`` / ``train-saes-distributed`` commands all call it.

Adapter SAEs are trained on Δ = h_adapted − h_base (one per layer × adapter × seed), reference SAEs on base
activations (one per layer), or loaded from ``reference_sae.path``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorascope.io import stable_hash
from lorascope.study.adapters import Adapter
from lorascope.study.cache import RunState, StageDir
from lorascope.study.extract import Extracted


@dataclass(frozen=True)
class SAEJob:
    """One SAE to train: which rows (layer, kind, adapter, train split), its seeds and its provenance."""

    layer: int
    kind: str  # "delta" | "base" | "adapted"
    adapter: str | None
    seed: int  # data order and the trainer's RNG
    held_out_fraction: float
    split_seed: int = 0
    init_seed: int | None = None  # weight initialisation; None: ``seed``
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def holdout(self):
        """The held-out split of ``held_out_fraction`` and ``split_seed`` (lorascope.activations.split)."""
        from lorascope.activations.split import HeldOutSplit

        return HeldOutSplit(self.held_out_fraction, self.split_seed)


def trainer_config(
    section: Any,
    seed: int,
    checkpoints: int,
    warmup_steps: int | None = None,
    device: str | None = None,
    autocast: str | None = None,
    data_parallel: bool = True,
):
    """TrainerConfig for an SAE section (tokens, batch_size, lr): ``checkpoints`` resumable checkpoints per run;
    ``data_parallel=False`` trains on this rank alone inside a process group (one SAE per rank)."""
    from lorascope.saes.trainer import TrainerConfig

    steps = section.tokens // section.batch_size
    extra = {} if warmup_steps is None else {"warmup_steps": warmup_steps}
    return TrainerConfig(
        total_tokens=section.tokens,
        batch_size=section.batch_size,
        lr=section.lr,
        seed=seed,
        device=device,
        autocast_dtype=autocast,
        checkpoint_every=max(1, steps // checkpoints),
        resume=True,
        data_parallel=data_parallel,
        **extra,
    )


def train_sae_job(
    store, job: SAEJob, section: Any, trainer, sae_dir: Path | None, checkpoint_dir: Path, progress: bool = True
):
    """Build the SAE that ``section`` describes (an ``adapter_sae``-style config section) for the store's width,
    train it on ``job``'s rows with ``trainer`` (a TrainerConfig; resumes from ``checkpoint_dir``), save it to
    ``sae_dir`` (SAELens layout; None: not saved, e.g. on non-writing ranks) and return the TrainResult."""
    from lorascope.saes import create_sae, save_sae
    from lorascope.saes.trainer import train_sae
    from lorascope.study.splits import sae_split_record

    meta = {
        "layer": job.layer,
        "hook_name": f"blocks.{job.layer}.hook_resid_post",
        "trained_on": job.kind,
        "adapter": job.adapter or "",
        **job.metadata,
        "split": sae_split_record(store, job.holdout),
    }
    init_seed = job.seed if job.init_seed is None else job.init_seed
    sae = create_sae(
        section.architecture,
        store.d_model,
        section.sae_width(store.d_model),
        seed=init_seed,
        metadata=meta,
        **section.sae_settings(),
    )
    stream = store.training_stream(job.layer, job.kind, job.adapter, section.batch_size, job.seed, job.holdout)
    res = train_sae(sae, stream, trainer, checkpoint_dir=checkpoint_dir, progress=progress)
    if sae_dir is not None:
        save_sae(res.sae, sae_dir)
    return res


def evaluate_held_out(store, job: SAEJob, sae) -> dict[str, Any]:
    """The SAE's reconstruction and sparsity on the held-out documents of its own rows ({} when there are none)."""
    from lorascope.saes.trainer import evaluate_sae

    held = store.held_out(job.layer, job.adapter, job.holdout)
    x = held.delta if job.kind == "delta" else held.base if job.kind == "base" else held.adapted
    return evaluate_sae(sae, x) if x.shape[0] else {}


# ---- the study's SAEs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudySAEs:
    """Folders of the adapter SAEs, {(layer, adapter): [one per seed]}, and of the reference SAE per layer."""

    adapter: dict[tuple[int, str], list[Path]]
    reference: dict[int, Path]


def _study_sae(
    st: RunState, extracted: Extracted, job: SAEJob, section: Any, label: str, opened: Callable[[], Any] | None = None
) -> Path:
    """Train (or find cached) one of the study's SAEs; returns its folder. ``opened``: the store opened once for
    all the stage's SAEs (each shard's checksum is then verified once per run, not once per SAE)."""
    inputs = {
        "store": extracted.key,
        "layer": job.layer,
        "kind": job.kind,
        "adapter": job.adapter,
        "seed": job.seed,
        "held_out_fraction": job.held_out_fraction,
        **section.model_dump(exclude={"seeds", "path", "source", "allow_pickle"}),
    }
    sd = StageDir.make(st.out, "saes", label, inputs)
    if sd.done:
        return sd.path / "sae"
    t0 = time.perf_counter()
    store = opened() if opened is not None else extracted.open()
    # every SAE gets its own initialisation: SAEs sharing a random init start with identical decoders, which
    # inflates any cross-SAE cosine for as long as training has not moved them far (measured: MMCS 0.99 at init)
    init_seed = int(stable_hash({"seed": job.seed, "label": label}, 8), 16)
    job = SAEJob(
        job.layer,
        job.kind,
        job.adapter,
        job.seed,
        job.held_out_fraction,
        job.split_seed,
        init_seed,
        {"model_name": st.config.model.spec, "lorascope_label": label, "init_seed": init_seed},
    )
    steps = section.tokens // section.batch_size
    trainer = trainer_config(
        section, job.seed, checkpoints=5, warmup_steps=min(100, max(1, steps // 10)), device=st.config.model.device
    )
    d = store.d_model
    st.log(f"training {section.architecture} SAE {label} ({d}→{section.sae_width(d)}, {section.tokens} tokens)")
    res = train_sae_job(store, job, section, trainer, sd.path / "sae", sd.path / "ckpt", st.progress)
    sd.mark_done({"final": res.final, "log": res.log[-50:]})
    st.finished(f"sae:{label}", t0)
    return sd.path / "sae"


def reference_picks(config) -> dict:
    """{layer: ReferencePick} of ``reference_sae.path`` (a {layer} template, a {layer: path} mapping, or a glob
    with ``target_l0``; :func:`lorascope.saes.pretrained.resolve_reference_paths`); every picked path exists."""
    from lorascope.saes.pretrained import resolve_reference_paths

    r = config.reference_sae
    return resolve_reference_paths(r.path, config.extraction.layers, r.target_l0)


def stage_saes(st: RunState, extracted: Extracted, adapters: list[Adapter]) -> StudySAEs:
    cfg = st.config
    frac, split_seed = cfg.data.held_out_fraction, cfg.seed
    opened = functools.cache(extracted.open)
    adapter_saes = {
        (layer, a.name): [
            _study_sae(
                st,
                extracted,
                SAEJob(layer, "delta", a.name, seed, frac, split_seed),
                cfg.adapter_sae,
                f"L{layer}__{a.name}__seed{seed}",
                opened,
            )
            for seed in cfg.adapter_sae.seeds
        ]
        for layer in cfg.extraction.layers
        for a in adapters
    }
    r = cfg.reference_sae
    picks = reference_picks(cfg) if r.source == "path" else {}
    for pick in picks.values():
        st.log(f"reference SAE {pick.describe()}")
    ref = {
        layer: picks[layer].path
        if r.source == "path"
        else _study_sae(
            st, extracted, SAEJob(layer, "base", None, r.seeds[0], frac, split_seed), r, f"L{layer}__reference", opened
        )
        for layer in cfg.extraction.layers
    }
    return StudySAEs(adapter_saes, ref)
