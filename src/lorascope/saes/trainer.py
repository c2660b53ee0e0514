"""Train any registered SAE on any stream of [N, d_in] activation batches; evaluate it.

What the trainer does (the practice of Gao et al. 2024, "Scaling and evaluating sparse autoencoders", and of
EleutherAI sparsify's trainer):
- scales inputs by one constant so their mean norm is sqrt(d_in) (estimated on the first ``init_tokens`` rows;
  ``input_norm="mean_norm"`` divides by the mean norm instead, as arXiv 2605.28896 normalises Δ)
  and folds that constant back into the weights at the end, so the returned SAE applies to raw activations;
- initialises b_dec from the same rows (geometric median by Weiszfeld iterations, mean, or zeros);
- Adam (fused when available), linear LR warmup, linear decay to 0 over the last ``decay_fraction`` of steps,
  default LR ``lr_for_width(d_sae)``; linear warmup of the sparsity coefficient (TrainContext.sparsity_scale);
- keeps decoder rows unit-norm through the SAE's ``remove_parallel_grad`` / ``post_step`` hooks;
- tracks, per latent, tokens since it last fired; latents silent for ``dead_window_tokens`` are "dead"
  (TrainContext.dead_mask, used by AuxK);
- checkpoints (weights, optimiser, step, tokens, RNG, dead tracking, input scale, log) atomically every
  ``checkpoint_every`` steps (skipping those within ``checkpoint_min_seconds`` of the last); ``resume=True``
  continues from the last one and ends at bit-identical weights (CPU) provided the batch source yields the same
  rows again (see ``_batches`` for what can be passed).

Data-parallel (``torchrun``, after ``lorascope.distributed.init_distributed``): detected from
``torch.distributed``; the single-process path is unchanged. Every rank reads the same stream, rank r trains on
rows [floor(r·n/W), floor((r+1)·n/W)) of each global batch of n rows, and gradients are summed with weights
n_r/n (``lorascope.distributed.DataParallel``), so the update equals the single-process one for the same global
batch up to float summation order. docs/distributed.md lists what is exact and what is approximate.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lorascope.distributed import DataParallel, StepShare
from lorascope.errors import LorascopeError
from lorascope.geometry.metrics import ReconstructionStats
from lorascope.io import atomic_path
from lorascope.saes._batches import BatchSource, rebatch, take_rows
from lorascope.saes.base import DTYPES, SAE, TrainContext, TrainOutput, lr_for_width

CHECKPOINT_NAME = "checkpoint.pt"
INPUT_NORMS = ("sqrt_d_in", "mean_norm")
# TrainerConfig fields an architecture's recipe may set, with the value used when neither the caller nor the recipe
# sets them (lr None: lr_for_width(d_sae))
RECIPE_FIELDS: dict[str, Any] = {
    "lr": None,
    "betas": (0.9, 0.999),
    "warmup_steps": 100,
    "decay_fraction": 0.2,
    "sparsity_warmup_fraction": 0.05,
    "scale_inputs": True,
    "b_dec_init": "geometric_median",
}


@dataclass
class TrainerConfig:
    """Training hyperparameters. Token counts are rows of the batch stream."""

    total_tokens: int | None = None  # None: the length of an in-memory source (tensor / list of chunks)
    batch_size: int = 4096
    # Fields left None take the architecture's recipe value (``SAE.trainer_defaults()``, e.g. SASA's published
    # recipe) when it has one, else the trainer's standard value in RECIPE_FIELDS (shown in each comment); a value
    # set explicitly is always kept, even one equal to the standard value.
    lr: float | None = None  # None: the recipe's lr, else lr_for_width(d_sae)
    betas: tuple[float, float] | None = None  # (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int | None = None  # 100
    decay_fraction: float | None = None  # 0.2: linear decay to 0 over this final fraction of the steps
    sparsity_warmup_fraction: float | None = None  # 0.05: sparsity coefficient ramps 0 -> 1 over this fraction
    scale_inputs: bool | None = None  # True: scale by one constant (see input_norm); folded back at the end
    # "sqrt_d_in": mean norm -> sqrt(d_in); "mean_norm": divide by sigma = mean ||x|| (arXiv 2605.28896 eq. 6,
    # mean norm 1); None: the SAE class's ``input_norm`` attribute, else "sqrt_d_in". Estimated on the first
    # init_tokens rows (exact over the training set when init_tokens >= its rows).
    input_norm: str | None = None
    init_tokens: int = 4096  # rows used to estimate the input scale and initialise b_dec
    b_dec_init: str | None = None  # "geometric_median" (standard) | "mean" | "zeros"
    dead_window_tokens: int | None = None  # None: min(10M, total_tokens // 4)
    autocast_dtype: str | None = None  # e.g. "bfloat16": forward matmuls in that dtype (needs fast bf16 GEMM)
    device: str | None = None  # None: the SAE's device
    log_every: int = 10  # steps between log entries (the last step is always logged)
    final_window_steps: int = 10  # final stats are over the last this-many training batches
    checkpoint_every: int | None = None  # steps; needs checkpoint_dir
    # a checkpoint step writes only when at least this many seconds have passed since the run (or its resume)
    # started or since the last checkpoint: short runs skip writes they would hardly need (an interrupt loses at
    # most this long plus ``checkpoint_every`` steps of work); 0: every ``checkpoint_every`` steps
    checkpoint_min_seconds: float = 0.0
    resume: bool = False
    seed: int = 0  # seeds torch's global RNG at the start of a fresh run (restored from checkpoints on resume)
    data_parallel: bool = True  # in a running process group, train over all ranks (False: this rank alone)

    def validate(self) -> None:
        c = replace(self, **{k: v for k, v in RECIPE_FIELDS.items() if getattr(self, k) is None})  # standard values
        if c.batch_size <= 0:
            raise LorascopeError(f"batch_size must be positive (got {c.batch_size})", fix="use e.g. 4096")
        if c.total_tokens is not None and c.total_tokens <= 0:
            raise LorascopeError(
                f"total_tokens must be positive (got {c.total_tokens})",
                fix="pass the number of activation rows to train on",
            )
        if c.lr is not None and not c.lr > 0:
            raise LorascopeError(f"lr must be positive (got {c.lr})", fix="use e.g. lr=2e-4 or leave it unset")
        if not 0 <= c.decay_fraction <= 1 or not 0 <= c.sparsity_warmup_fraction <= 1:
            raise LorascopeError(
                "decay_fraction and sparsity_warmup_fraction must be in [0, 1]",
                fix="use fractions such as 0.2 and 0.05",
            )
        if c.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise LorascopeError(
                f"unknown b_dec_init {c.b_dec_init!r}", fix="use 'geometric_median', 'mean' or 'zeros'"
            )
        if c.input_norm not in (None, *INPUT_NORMS):
            raise LorascopeError(
                f"unknown input_norm {c.input_norm!r}", fix=f"use one of {', '.join(INPUT_NORMS)} or None"
            )
        if c.autocast_dtype is not None and c.autocast_dtype not in DTYPES:
            raise LorascopeError(
                f"unknown autocast_dtype {c.autocast_dtype!r}",
                fix=f"use one of {', '.join(DTYPES)} or None",
            )


@dataclass
class TrainResult:
    """The trained SAE (folded to raw-activation scale), a log for learning curves, and final stats."""

    sae: SAE
    log: list[dict[str, float]]  # step, tokens, lr, loss, loss parts, fvu, l0, dead_frac
    final: dict[str, float]  # fvu, mse (raw units), cosine, l0, dead_frac, steps, tokens, seconds, tokens_per_s
    input_scale: float
    config: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 8, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld iterations for the point minimising sum_n ||x_n - m|| (float64) [d]. The [N, d] temporaries go
    into one reused buffer (the same values as fresh tensors, ~2.5x faster at 20k x 576 rows)."""
    x = x.double()
    m = x.mean(0)
    buf = torch.empty_like(x)
    for _ in range(iters):
        w = 1.0 / torch.linalg.vector_norm(torch.sub(x, m, out=buf), dim=1).clamp_min(eps)
        m = torch.mul(x, w[:, None], out=buf).sum(0) / w.sum()
    return m


def with_arch_defaults(cfg: TrainerConfig, sae: SAE) -> TrainerConfig:
    """``cfg`` with every recipe field the caller left None filled in: the architecture's own value
    (``sae.trainer_defaults()``, e.g. SASA's published recipe) when it has one, else RECIPE_FIELDS' value."""
    own = getattr(sae, "trainer_defaults", None)
    recipe = own() if callable(own) else {}
    unknown = set(recipe) - set(RECIPE_FIELDS)
    if unknown:
        raise LorascopeError(
            f"{sae.architecture} trainer_defaults sets {sorted(unknown)}, which are not recipe fields",
            fix=f"set only {', '.join(RECIPE_FIELDS)}",
        )
    changes = {k: recipe.get(k, std) for k, std in RECIPE_FIELDS.items() if getattr(cfg, k) is None}
    return replace(cfg, **changes)


def _adam(params: list[torch.nn.Parameter], cfg: TrainerConfig, lr: float) -> torch.optim.Adam:
    try:
        return torch.optim.Adam(params, lr=lr, betas=cfg.betas, eps=cfg.adam_eps, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=cfg.betas, eps=cfg.adam_eps, foreach=True)


def _lr_at(step: int, total: int, base: float, cfg: TrainerConfig) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    decay_steps = int(total * cfg.decay_fraction)
    if decay_steps > 0 and step >= total - decay_steps:
        return base * warm * (total - step) / decay_steps
    return base * warm


def _active_ids(out: TrainOutput, n: int, d_sae: int) -> tuple[torch.Tensor, float]:
    """(fired-in-batch mask [d_sae], L0) from a TrainOutput's ``active``."""
    if out.active_is_indices:
        ids = out.active[out.active >= 0]
        return torch.bincount(ids.reshape(-1), minlength=d_sae) > 0, ids.numel() / n
    return out.active.any(0), float(out.active.sum()) / n


class CheckpointClock:
    """When a training loop writes a checkpoint: at steps that are multiples of ``checkpoint_every`` (never at
    the last step: the trained SAE is saved then) and at least ``checkpoint_min_seconds`` after the loop started
    or the last write. Which steps write changes nothing else: a resume from any checkpoint ends at the same
    weights."""

    def __init__(self, cfg: TrainerConfig, total_steps: int):
        self.every, self.min_seconds, self.total = cfg.checkpoint_every, cfg.checkpoint_min_seconds, total_steps
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        if not self.every or step % self.every or step >= self.total:
            return False
        if time.monotonic() - self.last < self.min_seconds:
            return False
        self.last = time.monotonic()
        return True


class _State:
    """Everything a checkpoint restores besides the model and optimiser."""

    def __init__(self, d_sae: int):
        self.step = 0
        self.tokens = 0
        self.scale = 1.0
        self.since_fired = torch.zeros(d_sae, dtype=torch.int64)
        self.log: list[dict[str, float]] = []
        self.window: list[ReconstructionStats] = []


def _save_checkpoint(path: Path, sae: SAE, opt: torch.optim.Optimizer, st: _State, cfg: TrainerConfig) -> None:
    blob = {
        "format": "lorascope-sae-checkpoint/1",
        "sae_config": sae.cfg.to_dict(),
        "model": sae.state_dict(),
        "optimizer": opt.state_dict(),
        "step": st.step,
        "tokens": st.tokens,
        "scale": st.scale,
        "since_fired": st.since_fired,
        "rng": torch.get_rng_state(),
        "log": st.log,
        "window": [asdict(w) for w in st.window],
        "batch_size": cfg.batch_size,
    }
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def _load_checkpoint(path: Path, sae: SAE, opt: torch.optim.Optimizer, st: _State, cfg: TrainerConfig) -> None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / foreign file
        raise LorascopeError(
            f"cannot read checkpoint {path}: {exc}",
            fix="delete it to start over, or point checkpoint_dir elsewhere",
        ) from exc
    saved = blob.get("sae_config", {})
    mine = sae.cfg.to_dict()
    for key in ("architecture", "d_in", "d_sae", "arch"):
        if saved.get(key) != mine[key]:
            raise LorascopeError(
                f"checkpoint {path} is for a different SAE ({key}: {saved.get(key)!r} vs {mine[key]!r})",
                fix="resume with the same SAE settings or another folder",
            )
    if blob["batch_size"] != cfg.batch_size:
        raise LorascopeError(
            f"checkpoint {path} used batch_size {blob['batch_size']}, not {cfg.batch_size}",
            fix="resume with the same batch_size",
        )
    sae.load_state_dict(blob["model"])
    opt.load_state_dict(blob["optimizer"])
    st.step, st.tokens, st.scale = int(blob["step"]), int(blob["tokens"]), float(blob["scale"])
    st.since_fired = blob["since_fired"].clone()
    st.log = list(blob["log"])
    st.window = [ReconstructionStats(**w) for w in blob["window"]]
    torch.set_rng_state(blob["rng"])


def _initialise(sae: SAE, head: torch.Tensor, cfg: TrainerConfig) -> float:
    """Input scale from the first rows; data-driven b_dec (in scaled units)."""
    head = head.double()
    scale = 1.0
    if cfg.scale_inputs:
        mean_norm = float(head.norm(dim=1).mean())
        if not math.isfinite(mean_norm) or mean_norm <= 0:
            raise LorascopeError(
                f"the first {head.shape[0]} activation rows have mean norm {mean_norm}",
                fix="check the activations (all zero or non-finite?)",
            )
        norm = cfg.input_norm or getattr(sae, "input_norm", None) or "sqrt_d_in"
        scale = 1.0 / mean_norm if norm == "mean_norm" else math.sqrt(sae.d_in) / mean_norm
    with torch.no_grad():
        if cfg.b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(head * scale).to(sae.b_dec.dtype))
        elif cfg.b_dec_init == "mean":
            sae.b_dec.copy_((head * scale).mean(0).to(sae.b_dec.dtype))
        else:
            sae.b_dec.zero_()
    return scale


@dataclass
class _Run:
    """What every step of one training run shares."""

    cfg: TrainerConfig
    total_steps: int
    base_lr: float
    window: int  # dead-latent window in tokens
    device: torch.device
    amp: Any  # autocast context (disabled unless cfg.autocast_dtype)
    dp: DataParallel | None  # data parallelism across a process group, or None
    total_tokens: int  # rows to train on in all (cfg.total_tokens or the source's length)


def train_sae(
    sae: SAE,
    batches: Any,
    cfg: TrainerConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``sae`` in place on a stream of [N, d_in] batches (see ``_batches`` for what ``batches`` may be).

    Returns the same SAE folded to raw-activation scale (it applies to un-scaled inputs), a log with one entry
    every ``cfg.log_every`` steps, and final statistics over the last ``cfg.final_window_steps`` batches.
    """
    cfg = with_arch_defaults(cfg or TrainerConfig(), sae)
    cfg.validate()
    source = BatchSource(batches)
    ckpt = checkpoint_path(cfg, checkpoint_dir)
    dp = DataParallel.detect() if cfg.data_parallel else None
    run = make_run(cfg, sae, source.total_rows(), _device(cfg.device, sae, dp), dp)
    sae.to(run.device).train()
    opt = _adam([p for p in sae.parameters() if p.requires_grad], cfg, run.base_lr)
    st = _State(sae.d_sae)
    resumed, chunks = _start(sae, opt, st, source, ckpt, run)
    t0 = time.perf_counter()
    tokens_at_start = st.tokens
    _loop(sae, opt, st, rebatch(chunks, cfg.batch_size, limit_rows=run.total_tokens - st.tokens), ckpt, run, progress)
    return finish_run(sae, st, run, (time.perf_counter() - t0, st.tokens - tokens_at_start), resumed)


def checkpoint_path(cfg: TrainerConfig, checkpoint_dir: str | Path | None) -> Path | None:
    """The checkpoint file in ``checkpoint_dir`` (None without one; an error if checkpoints are asked for)."""
    if cfg.checkpoint_every and checkpoint_dir is None:
        raise LorascopeError(
            "checkpoint_every is set but no checkpoint_dir was given",
            fix="pass checkpoint_dir=... to train_sae",
        )
    return Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None


def make_run(
    cfg: TrainerConfig, sae: SAE, source_rows: int | None, device: torch.device, dp: DataParallel | None
) -> _Run:
    """What every step shares: step count, base LR, dead-latent window, device, autocast context."""
    total_tokens = cfg.total_tokens or source_rows
    if not total_tokens:
        raise LorascopeError(
            "total_tokens is needed when the batch source has no known length",
            fix="set TrainerConfig(total_tokens=...)",
        )
    amp_dtype = DTYPES[cfg.autocast_dtype] if cfg.autocast_dtype else torch.bfloat16
    return _Run(
        cfg,
        math.ceil(total_tokens / cfg.batch_size),
        cfg.lr or lr_for_width(sae.d_sae),
        cfg.dead_window_tokens or min(10_000_000, max(total_tokens // 4, 1)),
        device,
        torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.autocast_dtype is not None),
        dp,
        total_tokens,
    )


def finish_run(sae: SAE, st: _State, run: _Run, timing: tuple[float, int], resumed: bool) -> TrainResult:
    """Fold the input scale into the trained SAE and collect its result; ``timing`` = (seconds, tokens run)."""
    if st.step == 0:
        raise LorascopeError("no batches were trained on", fix="check that the batch source yields rows")
    final = _final_stats(st, run.window, *timing)
    sae.eval()
    sae.fold_input_scale(st.scale)
    extra = {"lr": run.base_lr, "total_steps": run.total_steps, "dead_window_tokens": run.window, "resumed": resumed}
    return TrainResult(sae, st.log, final, st.scale, {**asdict(run.cfg), **extra})


def _start(
    sae: SAE, opt: torch.optim.Optimizer, st: _State, source: BatchSource, ckpt: Path | None, run: _Run
) -> tuple[bool, Any]:
    """Resume from the checkpoint, or seed, scale the inputs and initialise b_dec from the first rows. Returns
    (resumed, the batch chunks still to train on)."""
    resumed = bool(run.cfg.resume and ckpt is not None and ckpt.exists())
    if run.dp is not None:
        run.dp.check_agree(
            resumed,
            f"the checkpoint {ckpt} is visible on some ranks only",
            "put checkpoint_dir on a filesystem every rank can read",
        )
    if resumed:
        _load_checkpoint(ckpt, sae, opt, st, run.cfg)
        chunks = source.open(st.tokens)
    else:
        torch.manual_seed(run.cfg.seed)
        head, chunks = take_rows(source.open(0), run.cfg.init_tokens)
        if head is None:
            raise LorascopeError("the batch source is empty", fix="pass at least one batch of activations")
        sae.check_input(head)
        st.scale = _initialise(sae, head, run.cfg)
    if run.dp is not None:
        run.dp.start(sae)
    return resumed, chunks


def _loop(
    sae: SAE, opt: torch.optim.Optimizer, st: _State, batches: Any, ckpt: Path | None, run: _Run, progress: bool
) -> None:
    """The training loop: a step per global batch, the progress bar, periodic checkpoints."""
    bar = _progress_bar(run.total_steps, st.step, progress and (run.dp is None or run.dp.is_main))
    clock = CheckpointClock(run.cfg, run.total_steps)
    try:
        for x in batches:
            _train_step(sae, opt, x, st, run)
            bar.update(1)
            if st.log and st.log[-1]["step"] == st.step:
                e = st.log[-1]
                bar.set_postfix(fvu=f"{e['fvu']:.4f}", l0=f"{e['l0']:.1f}", dead=f"{e['dead_frac']:.3f}")
            if (run.dp is None or run.dp.is_main) and clock.due(st.step):  # every rank holds the same state
                _save_checkpoint(ckpt, sae, opt, st, run.cfg)
    finally:
        bar.close()


def _context(st: _State, run: _Run, share: StepShare | None) -> TrainContext:
    """What the SAE sees this step: step counts, sparsity-coefficient warmup factor, dead-latent mask and, under
    data parallelism, this rank's share of the global batch (for global-batch statistics)."""
    warm_steps = run.cfg.sparsity_warmup_fraction * run.total_steps
    return TrainContext(
        st.step,
        run.total_steps,
        min(1.0, (st.step + 1) / warm_steps) if warm_steps > 0 else 1.0,
        st.since_fired >= run.window,
        share,
    )


def _train_step(sae: SAE, opt: torch.optim.Optimizer, x: torch.Tensor, st: _State, run: _Run) -> None:
    """One optimiser step on the global batch ``x``. Under data parallelism this rank trains on its slice of the
    rows, its gradients (weighted by its share of the rows) are summed over ranks, and every rank applies the
    same update; in a single process the slice is the whole batch and nothing is reduced."""
    if x.ndim != 2 or x.shape[1] != sae.d_in:
        sae.check_input(x)  # names both widths
    n, dp = x.shape[0], run.dp
    share = dp.share(n) if dp is not None else None
    lo, hi = dp.bounds(n) if dp is not None else (0, n)
    xl = x[lo:hi].to(device=run.device, dtype=sae.W_enc.dtype)
    xs = xl * st.scale if st.scale != 1.0 else xl
    with run.amp:
        out = sae.training_loss(xs, _context(st, run, share))
    opt.zero_grad(set_to_none=True)
    (out.loss if share is None else out.loss * share.weight).backward()
    fired, l0 = _active_ids(out, xs.shape[0], sae.d_sae)
    if dp is None:
        loss = float(out.loss.detach())
    else:  # the data-parallel lines: sum the weighted gradients, fired masks and losses over ranks
        loss, fired = dp.reduce_grads(sae, out.loss.detach() * share.weight, fired)
    if not math.isfinite(loss):
        raise LorascopeError(
            f"the training loss became {loss} at step {st.step} (token {st.tokens})",
            fix="lower the learning rate (TrainerConfig.lr), and check the activations for NaN/inf or extreme norms",
        )
    sae.remove_parallel_grad()
    lr = _lr_at(st.step, run.total_steps, run.base_lr, run.cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    sae.post_step()
    if dp is not None:
        dp.sync_state(sae)  # estimated state (BatchTopK's threshold) agrees on every rank
    _advance(st, n, fired)
    in_window, is_log = _wants_stats(st, run.cfg, run.total_steps)
    if in_window or is_log:
        stats, parts, l0 = _step_stats(sae, out, xs, l0, share, run)
        _record(st, run.window, stats, (in_window, is_log), lr, loss, parts, l0)


def _step_stats(
    sae: SAE, out: TrainOutput, xs: torch.Tensor, l0: float, share: StepShare | None, run: _Run
) -> tuple[ReconstructionStats, dict[str, float], float]:
    """Reconstruction statistics, loss parts and L0 of this step (merged over ranks under data parallelism)."""
    stats = ReconstructionStats()
    if run.dp is None or run.dp.contributes_stats(share):
        stats.update(xs.detach(), out.x_hat.detach())
        stats.sum_l0, stats.n_codes = l0 * xs.shape[0], xs.shape[0]  # L0 from the selection (no dense codes)
    if run.dp is None:
        return stats, {k: float(v) for k, v in out.parts.items()}, l0
    parts = {k: float(v) * share.weight for k, v in out.parts.items()}
    return run.dp.reduce_stats(stats, parts, l0 * share.weight, sae.d_in, run.device)


def _advance(st: _State, n: int, fired: torch.Tensor) -> None:
    st.since_fired += n
    st.since_fired[fired.cpu()] = 0
    st.step += 1
    st.tokens += n


def _wants_stats(st: _State, cfg: TrainerConfig, total_steps: int) -> tuple[bool, bool]:
    return st.step > total_steps - cfg.final_window_steps, st.step % cfg.log_every == 0 or st.step == total_steps


def _record(
    st: _State,
    window: int,
    stats: ReconstructionStats,
    flags: tuple[bool, bool],
    lr: float,
    loss: float,
    parts: dict[str, float],
    l0: float,
) -> None:
    """Keep this step's statistics for the final window and/or append a log entry (``flags``: in window, log)."""
    in_window, is_log = flags
    if in_window:
        st.window.append(stats)
    if is_log:
        entry = {"step": float(st.step), "tokens": float(st.tokens), "lr": lr, "loss": loss}
        entry.update(parts)
        entry.update(fvu=stats.fvu, l0=l0, dead_frac=float((st.since_fired >= window).float().mean()))
        st.log.append(entry)


def _final_stats(st: _State, window: int, seconds: float, tokens_run: int) -> dict[str, float]:
    total = ReconstructionStats()
    for w in st.window:  # merge the per-batch accumulators (sums add up exactly)
        if total.sum_x is None:
            total.d, total.sum_x = w.d, torch.zeros_like(w.sum_x)
        total.n += w.n
        total.sum_sq_err += w.sum_sq_err
        total.sum_sq_x += w.sum_sq_x
        total.sum_x += w.sum_x
        total.sum_cos += w.sum_cos
        total.sum_l0 += w.sum_l0
        total.n_codes += w.n_codes
    out = {
        "fvu": total.fvu,
        "mse": total.mse / st.scale**2,
        "cosine": total.cosine,
        "l0": total.l0,
        "dead_frac": float((st.since_fired >= window).float().mean()),
        "steps": float(st.step),
        "tokens": float(st.tokens),
        "seconds": seconds,
        "tokens_per_s": tokens_run / seconds if seconds > 0 else float("nan"),
    }
    return out


def _device(spec: str | None, sae: SAE, dp: DataParallel | None) -> torch.device:
    """cfg.device resolved ("cuda" = cuda:LOCAL_RANK under torchrun); default: the SAE's device, or this rank's GPU
    when the process group runs on NCCL."""
    from lorascope.distributed import select_device

    if spec:
        return select_device(spec)
    if dp is not None and dp.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return sae.W_enc.device


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train SAE", unit="step", leave=False)


@torch.no_grad()
def evaluate_sae(sae: SAE, batches: Any, max_tokens: int | None = None, batch_size: int = 4096) -> dict[str, Any]:
    """Reconstruction and sparsity of ``sae`` on raw activations: fvu, explained_variance, mse, cosine, l0,
    dead (count of latents never active in the window), n_tokens, and density [d_sae] (float64 tensor)."""
    was_training = sae.training
    sae.eval()
    stats = ReconstructionStats()
    try:
        for x in rebatch(BatchSource(batches).open(0), batch_size, limit_rows=max_tokens):
            x = x.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
            sae.check_input(x)
            codes = sae.encode(x)
            stats.update(x, sae.decode(codes), codes)
    finally:
        sae.train(was_training)
    if stats.n == 0:
        raise LorascopeError("no activations to evaluate on", fix="pass at least one batch")
    return {**stats.as_dict(), "density": stats.density}
