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


# the study's SAE groups: at most one checkpoint a minute (the quickstart's groups train for under a minute each and
# wrote 5 checkpoints of every member, ~1.4 GB with fsync per layer; an interruption now loses at most a minute)
CHECKPOINT_MIN_SECONDS = 60.0


def trainer_config(
    section: Any,
    seed: int,
    checkpoints: int,
    warmup_steps: int | None = None,
    device: str | None = None,
    autocast: str | None = None,
    data_parallel: bool = True,
    checkpoint_min_seconds: float = 0.0,
):
    """TrainerConfig for an SAE section (tokens, batch_size, lr): ``checkpoints`` resumable checkpoints per run,
    skipping those within ``checkpoint_min_seconds`` of the last (``TrainerConfig.checkpoint_min_seconds``);
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
        checkpoint_min_seconds=checkpoint_min_seconds,
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
    from lorascope.saes import save_sae
    from lorascope.saes.trainer import train_sae

    sae, stream = job_sae_and_stream(store, job, section)
    res = train_sae(sae, stream, trainer, checkpoint_dir=checkpoint_dir, progress=progress)
    if sae_dir is not None:
        save_sae(res.sae, sae_dir)
    return res


def job_sae_and_stream(store, job: SAEJob, section: Any) -> tuple[Any, Any]:
    """The freshly initialised SAE of ``job`` (its metadata filled in) and its training stream: the store's
    ``training_stream`` of the job's (layer, kind, adapter) rows, shuffled by ``job.seed``."""
    from lorascope.saes import create_sae
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
    return sae, stream


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


@dataclass(frozen=True)
class _Planned:
    """One of the study's SAEs: its job (init seed and provenance filled in), config section, label, stage folder."""

    job: SAEJob
    section: Any
    label: str
    stage: StageDir


def _plan(st: RunState, extracted: Extracted, job: SAEJob, section: Any, label: str) -> _Planned:
    """The stage folder (cache key) of one SAE and its job as it will be trained."""
    inputs = {
        "store": extracted.key,
        "layer": job.layer,
        "kind": job.kind,
        "adapter": job.adapter,
        "seed": job.seed,
        "held_out_fraction": job.held_out_fraction,
        **section.model_dump(exclude={"seeds", "path", "source", "allow_pickle"}),
    }
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
    return _Planned(job, section, label, StageDir.make(st.out, "saes", label, inputs))


def _study_trainer(st: RunState, p: _Planned):
    steps = p.section.tokens // p.section.batch_size
    return trainer_config(
        p.section,
        p.job.seed,
        checkpoints=5,
        warmup_steps=min(100, max(1, steps // 10)),
        device=st.config.model.device,
        checkpoint_min_seconds=CHECKPOINT_MIN_SECONDS,
    )


def _group_key(p: _Planned) -> tuple:
    """SAEs with equal keys train in lock-step (saes.multi): same layer, same trainer settings (seed included, so
    each SAE's checkpoints hold what its own run would), same architecture, width and settings."""
    s = p.section
    shape = (s.architecture, s.expansion, tuple(sorted(s.sae_settings().items())), s.tokens, s.batch_size, s.lr)
    return (p.job.layer, p.job.seed, p.job.held_out_fraction, p.job.split_seed, shape)


def _train_group(st: RunState, group: list[_Planned], opened: Callable[[], Any]) -> None:
    """Train a group of the study's SAEs in one pass (stacked where ``saes.multi`` can, else one by one), then
    save each one and mark its stage done, exactly as if it had been trained alone. Each SAE reads its own stream
    (``job_sae_and_stream``), the one it reads alone, so grouping changes no SAE's data or order."""
    from lorascope.saes import save_sae
    from lorascope.saes.multi import train_saes

    t0 = time.perf_counter()
    store = opened()
    built = [job_sae_and_stream(store, p.job, p.section) for p in group]
    d, sec = store.d_model, group[0].section
    for p in group:
        st.log(f"training {sec.architecture} SAE {p.label} ({d}→{sec.sae_width(d)}, {sec.tokens} tokens)")
    if len(group) > 1:
        st.log(f"  {len(group)} SAEs at layer {group[0].job.layer} in one pass")
    results = train_saes(
        [b[0] for b in built],
        [b[1] for b in built],
        _study_trainer(st, group[0]),
        [p.stage.path / "ckpt" for p in group],
        st.progress,
        log=st.log,
    )
    share = (time.perf_counter() - t0) / len(group)  # the group's wall time, split evenly (the stage total is exact)
    for i, (p, res) in enumerate(zip(group, results, strict=True)):
        save_sae(res.sae, p.stage.path / "sae")
        p.stage.mark_done({"final": res.final, "log": res.log[-50:]})
        st.finished(f"sae:{p.label}", time.perf_counter() - share, release=i == len(group) - 1)


def _train_planned(st: RunState, extracted: Extracted, planned: list[_Planned]) -> None:
    """Train every planned SAE whose stage is not done yet, grouped by ``_group_key`` (the store is opened once,
    so each shard's checksum is verified once per run, not once per SAE)."""
    opened = functools.cache(extracted.open)
    groups: dict[tuple, list[_Planned]] = {}
    for p in planned:
        if not p.stage.done:
            groups.setdefault(_group_key(p), []).append(p)
    for group in groups.values():
        _train_group(st, group, opened)


def reference_picks(config) -> dict:
    """{layer: ReferencePick} of ``reference_sae.path`` (a {layer} template, a {layer: path} mapping, or a glob
    with ``target_l0``; :func:`lorascope.saes.pretrained.resolve_reference_paths`); every picked path exists."""
    from lorascope.saes.pretrained import resolve_reference_paths

    r = config.reference_sae
    return resolve_reference_paths(r.path, config.extraction.layers, r.target_l0)


def stage_saes(st: RunState, extracted: Extracted, adapters: list[Adapter]) -> StudySAEs:
    """The study's SAEs: per layer, one per adapter × seed on Δ and a reference SAE on base activations (or the
    pretrained one ``reference_sae.path`` picks); trained where their stage folder is not done yet."""
    cfg = st.config
    frac, split_seed = cfg.data.held_out_fraction, cfg.seed
    adapter_plan = {
        (layer, a.name): [
            _plan(
                st,
                extracted,
                SAEJob(layer, "delta", a.name, seed, frac, split_seed),
                cfg.adapter_sae,
                f"L{layer}__{a.name}__seed{seed}",
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
    ref_plan = {
        layer: _plan(
            st, extracted, SAEJob(layer, "base", None, r.seeds[0], frac, split_seed), r, f"L{layer}__reference"
        )
        for layer in cfg.extraction.layers
        if r.source != "path"
    }
    _train_planned(st, extracted, [p for ps in adapter_plan.values() for p in ps] + list(ref_plan.values()))
    return StudySAEs(
        {key: [p.stage.path / "sae" for p in ps] for key, ps in adapter_plan.items()},
        {
            layer: picks[layer].path if r.source == "path" else ref_plan[layer].stage.path / "sae"
            for layer in cfg.extraction.layers
        },
    )
