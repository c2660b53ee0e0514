"""Train M SAEs of one architecture and one shape in lock-step, as one stacked module, one pass over the data.

The idea is the one of SAELens's ``MultiSAETrainingRunner`` (and saev's parallel trainer): SAEs that share a
layer and a data stream read each batch once and train together. Here member m may read its own stream (e.g. Δ of
adapter m at the layer, with the same row order as the others) or the same one; what each member sees is exactly
what ``train_sae`` would give it: its own input scale and b_dec from its own first rows, the same LR / sparsity
warm-up and decay (one schedule: the members share the TrainerConfig), its own dead-latent window, its own
AuxK term, per-row decoder renormalisation. Adam is per element, so one Adam over the stacked tensors is M Adams.
No gradient clipping exists in the trainer, so none needs to be split per member.

On CPU the stacked SAEs, logs and final statistics equal ``train_sae``'s bit for bit (tests/saes/test_multi.py);
the final ``seconds`` / ``tokens_per_s`` are the group's. Checkpoints are written per member, in the format and
folder ``train_sae`` uses (the stacked optimiser state is sliced back into a per-member Adam), so a run
checkpointed here can be resumed by ``train_sae`` and vice versa.

Stacked: ``topk`` (sparse kernels) and ``relu`` / ``paper_a``. Anything else (another architecture, members of
different shapes or settings, autocast, a process group, checkpoints at different steps) trains one by one with
``train_sae``, with one log line saying why.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lorascope.distributed import DataParallel
from lorascope.errors import LorascopeError
from lorascope.saes._batches import BatchSource, rebatch, take_rows
from lorascope.saes._stacked import PARAM_NAMES, STACKABLE, StackedSAEs
from lorascope.saes.base import SAE
from lorascope.saes.trainer import (
    CheckpointClock,
    TrainerConfig,
    TrainResult,
    _active_ids,
    _adam,
    _advance,
    _context,
    _device,
    _initialise,
    _load_checkpoint,
    _lr_at,
    _progress_bar,
    _record,
    _Run,
    _save_checkpoint,
    _State,
    _step_stats,
    _wants_stats,
    checkpoint_path,
    finish_run,
    make_run,
    train_sae,
    with_arch_defaults,
)

_log = logging.getLogger(__name__)


def train_saes(
    saes: Sequence[SAE],
    streams: Sequence[Any],
    cfg: TrainerConfig | None = None,
    checkpoint_dirs: Sequence[str | Path | None] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[TrainResult]:
    """Train ``saes[m]`` on ``streams[m]`` (anything ``train_sae`` takes) with one TrainerConfig, stacked when
    they can be (see module docstring), else one by one; each result is what ``train_sae`` returns for it
    (final ``seconds`` / ``tokens_per_s`` are the whole group's wall time)."""
    saes, dirs = list(saes), list(checkpoint_dirs or [None] * len(saes))
    if len(streams) != len(saes) or len(dirs) != len(saes) or not saes:
        raise LorascopeError("train_saes needs one stream and one checkpoint folder per SAE", fix="pass equal lists")
    cfg = with_arch_defaults(cfg or TrainerConfig(), saes[0])
    cfg.validate()
    sources = [BatchSource(s) for s in streams]
    ckpts = [checkpoint_path(cfg, d) for d in dirs]
    reason = why_not_stacked(saes, sources, cfg, ckpts)
    if reason is not None:
        (log or _log.info)(f"training {len(saes)} {saes[0].architecture} SAEs one by one: {reason}")
        return [train_sae(s, b, cfg, d, progress) for s, b, d in zip(saes, streams, dirs, strict=True)]
    run = make_run(cfg, saes[0], sources[0].total_rows(), _device(cfg.device, saes[0], None), None)
    for sae in saes:
        sae.to(run.device).train()
    states = [_State(sae.d_sae) for sae in saes]
    resumed, chunks, member_opts = _start_all(saes, states, sources, ckpts, run)
    stack = StackedSAEs(saes)
    opt = _adam(stack.stacked_params(), cfg, run.base_lr)
    if resumed:
        _stack_optimizer_state(opt, stack, saes, member_opts)
    t0 = time.perf_counter()
    at_start = states[0].tokens
    batches = [rebatch(c, cfg.batch_size, limit_rows=run.total_tokens - at_start) for c in chunks]
    _loop(stack, opt, (saes, states, ckpts), batches, run, progress)
    stack.unstack(saes)
    timing = (time.perf_counter() - t0, states[0].tokens - at_start)
    return [finish_run(sae, st, run, timing, resumed) for sae, st in zip(saes, states, strict=True)]


def why_not_stacked(
    saes: list[SAE], sources: list[BatchSource], cfg: TrainerConfig, ckpts: list[Path | None]
) -> str | None:
    """None when ``saes`` can train as one stacked module, else the reason (one line)."""
    first = saes[0]
    if len(saes) < 2:
        return "a single SAE"
    if first.architecture not in STACKABLE:
        return f"stacked training covers {', '.join(STACKABLE)}, not {first.architecture}"
    shape = lambda s: (s.architecture, s.d_in, s.d_sae, s.cfg.dtype, s.cfg.apply_b_dec_to_input, s.cfg.arch)  # noqa: E731
    if any(shape(s) != shape(first) for s in saes):
        return "the SAEs differ in architecture, shape or settings"
    if first.architecture == "topk" and not all(getattr(s, "sparse_kernels", True) for s in saes):
        return "dense TopK reference path (sparse_kernels=False)"
    if len({s.W_enc.device for s in saes}) > 1:
        return "the SAEs are on different devices"
    if cfg.autocast_dtype is not None:
        return "autocast"
    if cfg.data_parallel and DataParallel.detect() is not None:
        return "data-parallel process group"
    if cfg.total_tokens is None and len({s.total_rows() for s in sources}) > 1:
        return "streams of different lengths and no total_tokens"
    return _checkpoints_disagree(cfg, ckpts)


def _checkpoints_disagree(cfg: TrainerConfig, ckpts: list[Path | None]) -> str | None:
    """A reason when resuming would start the members at different steps."""
    if not cfg.resume:
        return None
    steps = set()
    for path in ckpts:
        if path is None or not path.exists():
            steps.add(0)
            continue
        try:
            steps.add(int(torch.load(path, map_location="cpu", weights_only=True)["step"]))
        except Exception:  # unreadable: train_sae reports it with its own message
            return f"checkpoint {path} cannot be read"
    return None if len(steps) == 1 else f"their checkpoints are at different steps {sorted(steps)}"


def _start_all(
    saes: list[SAE], states: list[_State], sources: list[BatchSource], ckpts: list[Path | None], run: _Run
) -> tuple[bool, list[Iterator[torch.Tensor]], list[torch.optim.Optimizer]]:
    """Each member as ``trainer._start`` starts it: from its checkpoint (into a per-member Adam), or seeded, with
    its own input scale and b_dec from its own first rows. Returns (resumed, chunk streams, member optimisers)."""
    resumed = bool(run.cfg.resume and ckpts[0] is not None and ckpts[0].exists())
    chunks, opts = [], []
    if not resumed:
        torch.manual_seed(run.cfg.seed)
    for sae, st, source, ckpt in zip(saes, states, sources, ckpts, strict=True):
        opt = _member_adam(sae, run)
        if resumed:
            _load_checkpoint(ckpt, sae, opt, st, run.cfg)
            chunks.append(source.open(st.tokens))
        else:
            head, rest = take_rows(source.open(0), run.cfg.init_tokens)
            if head is None:
                raise LorascopeError("the batch source is empty", fix="pass at least one batch of activations")
            sae.check_input(head)
            st.scale = _initialise(sae, head, run.cfg)
            chunks.append(rest)
        opts.append(opt)
    return resumed, chunks, opts


def _member_adam(sae: SAE, run: _Run) -> torch.optim.Optimizer:
    return _adam([getattr(sae, name) for name in PARAM_NAMES], run.cfg, run.base_lr)


def _stack_optimizer_state(
    opt: torch.optim.Optimizer, stack: StackedSAEs, saes: list[SAE], member_opts: list[torch.optim.Optimizer]
) -> None:
    """Adam moments of the members (loaded from their checkpoints) stacked into the group's optimiser."""
    for name, p in zip(PARAM_NAMES, stack.stacked_params(), strict=True):
        member = [o.state.get(getattr(s, name)) for s, o in zip(saes, member_opts, strict=True)]
        if any(not m for m in member):
            continue
        opt.state[p] = {
            "step": member[0]["step"].clone(),
            **{k: torch.stack([m[k] for m in member]).to(p.device) for k in ("exp_avg", "exp_avg_sq")},
        }


def _save_members(
    stack: StackedSAEs, opt: torch.optim.Optimizer, group: tuple[list[SAE], list[_State], list[Path | None]], run: _Run
) -> None:
    """One ``train_sae``-format checkpoint per member: its weights and its slice of the Adam state."""
    saes, states, ckpts = group
    stack.unstack(saes)
    for m, (sae, st, ckpt) in enumerate(zip(saes, states, ckpts, strict=True)):
        member = _member_adam(sae, run)
        for name, p in zip(PARAM_NAMES, stack.stacked_params(), strict=True):
            s = opt.state.get(p)
            if s:
                member.state[getattr(sae, name)] = {
                    "step": s["step"].clone(),
                    "exp_avg": s["exp_avg"][m].clone(),
                    "exp_avg_sq": s["exp_avg_sq"][m].clone(),
                }
        for g in member.param_groups:
            g["lr"] = opt.param_groups[0]["lr"]
        _save_checkpoint(ckpt, sae, member, st, run.cfg)


def _loop(
    stack: StackedSAEs,
    opt: torch.optim.Optimizer,
    group: tuple[list[SAE], list[_State], list[Path | None]],
    batches: list[Iterator[torch.Tensor]],
    run: _Run,
    progress: bool,
) -> None:
    """A lock-step over the members' streams: batch i of every stream makes one step."""
    states = group[1]
    bar = _progress_bar(run.total_steps, states[0].step, progress)
    clock = CheckpointClock(run.cfg, run.total_steps)
    try:
        for xs in zip(*batches, strict=True):
            _train_step(stack, opt, xs, group, run)
            bar.update(1)
            if clock.due(states[0].step):
                _save_members(stack, opt, group, run)
    except ValueError as exc:  # zip(strict=True): one stream ended before the others
        raise LorascopeError(
            f"the SAEs' streams ended at different rows ({exc})", fix="give every SAE the same number of rows"
        ) from exc
    finally:
        bar.close()


def _train_step(
    stack: StackedSAEs,
    opt: torch.optim.Optimizer,
    xs: tuple[torch.Tensor, ...],
    group: tuple[list[SAE], list[_State], list[Path | None]],
    run: _Run,
) -> None:
    """``trainer._train_step`` for every member at once (single process)."""
    saes, states, _ = group
    n = xs[0].shape[0]
    for x, sae in zip(xs, saes, strict=True):
        if x.ndim != 2 or x.shape != xs[0].shape:
            sae.check_input(x)
            raise LorascopeError(f"the SAEs' batches differ in shape ({tuple(x.shape)})", fix="align the streams")
    scaled = [x.to(device=run.device, dtype=stack.W_enc.dtype) for x in xs]
    x = torch.stack([xl * st.scale if st.scale != 1.0 else xl for xl, st in zip(scaled, states, strict=True)])
    outs = stack.training_losses(x, [_context(st, run, None) for st in states])
    opt.zero_grad(set_to_none=True)
    torch.stack([o.loss for o in outs]).sum().backward()
    for m, (o, st) in enumerate(zip(outs, states, strict=True)):
        loss = float(o.loss.detach())
        if not math.isfinite(loss):
            raise LorascopeError(
                f"the training loss of SAE {m} of the group became {loss} at step {st.step} (token {st.tokens})",
                fix="lower the learning rate (TrainerConfig.lr), and check the activations for NaN/inf",
            )
    stack.remove_parallel_grad()
    lr = _lr_at(states[0].step, run.total_steps, run.base_lr, run.cfg)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    stack.post_step()
    for m, (sae, st, o) in enumerate(zip(saes, states, outs, strict=True)):
        fired, l0 = _active_ids(o, n, sae.d_sae)
        _advance(st, n, fired)
        in_window, is_log = _wants_stats(st, run.cfg, run.total_steps)
        if in_window or is_log:
            stats, parts, l0 = _step_stats(sae, o, x[m], l0, None, run)
            _record(st, run.window, stats, (in_window, is_log), lr, float(o.loss.detach()), parts, l0)
