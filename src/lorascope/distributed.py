"""Running lorascope on several processes with PyTorch's own distributed engine (``torchrun``).

- :func:`init_distributed` reads the variables ``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT), picks the device (``cuda:LOCAL_RANK`` on GPUs) and the backend (NCCL for CUDA, Gloo for CPU) and
  joins the process group. Outside ``torchrun`` it does nothing and reports rank 0 of 1, so the same code runs
  single-process unchanged.
- :func:`my_jobs` splits independent jobs (layer × adapter × seed SAEs) round-robin over ranks.
- :func:`max_batch_size` is a memory-aware SAE batch size (formula in its docstring).
- Helpers an SAE's ``training_loss`` calls with the step's share (``TrainContext.share``) so that batch-level
  statistics are computed over the *global* batch when the trainer runs data-parallel
  (:func:`batch_denominator`, :func:`batch_topk`); with no share (a single process) they are exactly the
  single-process expressions.

See docs/distributed.md for launch commands (multi-GPU, multi-node, Slurm).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lorascope.errors import LorascopeError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 7200.0  # collectives wait this long (extraction ranks may finish hours apart)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank in 0..world_size-1, local rank on its node, its device and backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when no process group was started (single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise LorascopeError(
            f"environment variable {name}={value!r} is not an integer", fix="launch with torchrun, or unset it"
        ) from exc


def launched_by_torchrun() -> bool:
    """True when RANK and WORLD_SIZE are set (torchrun, or srun/mpirun exporting the same variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) outside one."""
    if not launched_by_torchrun():
        return 0, 1, 0
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise LorascopeError(
            f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})", fix="launch with torchrun, which sets both"
        )
    return rank, world, _env_int("LOCAL_RANK", rank)


def select_device(spec: str | None = None, local_rank: int | None = None) -> torch.device:
    """Resolve ``spec``: None/"auto" (cuda:LOCAL_RANK if a GPU is visible, else cpu), "cpu", "cuda" (cuda:LOCAL_RANK
    under torchrun, the current GPU otherwise) or "cuda:N"."""
    if local_rank is None:
        local_rank = env_ranks()[2]
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise LorascopeError("device 'mps' was asked for but Metal is not available", fix="use the device cpu")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LorascopeError(
                f"device {spec!r} was asked for but no CUDA GPU is visible",
                fix="use the device cpu, or check CUDA_VISIBLE_DEVICES and the driver",
            )
        n = torch.cuda.device_count()
        if spec == "cuda":
            index = local_rank if launched_by_torchrun() else torch.cuda.current_device()
        else:
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError as exc:
                raise LorascopeError(f"device {spec!r} is not cuda:N", fix="e.g. cuda:0") from exc
        if not 0 <= index < n:
            raise LorascopeError(
                f"device cuda:{index} does not exist ({n} GPU(s) visible)",
                fix=f"use cuda:0..cuda:{n - 1}, or at most {n} processes per node",
            )
        return torch.device("cuda", index)
    raise LorascopeError(f"unknown device {spec!r}", fix="use cpu, cuda, cuda:N, mps or auto")


def choose_backend(device: torch.device) -> str:
    """NCCL for CUDA devices (when built with it), Gloo otherwise."""
    if device.type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def is_initialized() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: str | None = None, backend: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Join the process group described by the torchrun environment; a no-op (rank 0 of 1) outside torchrun.

    Safe to call twice (the second call reuses the group). ``timeout_s``: how long a collective (e.g. the
    barrier before merging an extraction's manifest) may wait for the slowest rank; default
    $LORASCOPE_DIST_TIMEOUT or 7200 s.
    """
    if timeout_s is None:
        timeout_s = float(os.environ.get("LORASCOPE_DIST_TIMEOUT") or DEFAULT_TIMEOUT_S)
    rank, world, local = env_ranks()
    dev = select_device(device, local)
    if world == 1:
        return DistInfo(0, 1, 0, dev, None)
    if not dist.is_available():
        raise LorascopeError("this PyTorch build has no torch.distributed", fix="install a standard PyTorch build")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, dist.get_backend())
    chosen = backend or choose_backend(dev)
    kwargs: dict[str, Any] = {"backend": chosen, "timeout": timedelta(seconds=timeout_s)}
    if chosen == "nccl":
        kwargs["device_id"] = dev
    dist.init_process_group(**kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, chosen)


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that writes shared files and prints."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup() -> None:
    """Leave the process group (no-op when none was started)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def my_jobs(jobs: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's share of independent jobs: ``jobs[rank::world_size]`` (deterministic round-robin).

    Every job goes to exactly one rank; the ranks' lists differ in length by at most one.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise LorascopeError(f"rank {rank} is not in 0..{world_size - 1}", fix="check the launcher's ranks")
    return list(jobs[rank::world_size])


def rank_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [lo, hi) of an n-row global batch that ``rank`` trains on: floor(rank·n/W), floor((rank+1)·n/W)."""
    return rank * n // world_size, (rank + 1) * n // world_size


# ---- memory-aware batch size ------------------------------------------------------------------------------------
def available_memory(device: torch.device | str) -> int:
    """Free bytes: ``torch.cuda.mem_get_info`` on a GPU; MemAvailable (/proc/meminfo) or free pages on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def max_batch_size(
    d_in: int,
    d_sae: int,
    dtype: str | torch.dtype = torch.float32,
    free_bytes: int | None = None,
    device: torch.device | str = "cpu",
    fraction: float = 0.8,
    max_batch: int = 1 << 16,
) -> int:
    """Largest power-of-two SAE training batch whose estimated memory fits ``fraction`` of the free memory.

    Estimate (bytes):  fixed = 16·P  with P = 2·d_in·d_sae + d_sae + d_in  (float32 weights, gradients and the
    two Adam moments), and per row  e·(4·d_sae + 8·d_in)  with e the activation element size (2 for bf16
    autocast, 4 for float32): the [B, d_sae] pre-activations, codes and their gradients (dense paths; TopK's
    sparse path needs fewer) and ~8 [B, d_in] tensors (input, scaled input, reconstruction, error, residual,
    gradients). B = 2^floor(log2((fraction·free − fixed) / per_row)), capped at ``max_batch``.
    ``free_bytes`` defaults to :func:`available_memory` of ``device`` (shared with others: keep ``fraction`` < 1).
    """
    if isinstance(dtype, str):
        from lorascope.saes.base import DTYPES

        if dtype not in DTYPES:
            raise LorascopeError(f"unknown dtype {dtype!r}", fix=f"use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if d_in <= 0 or d_sae <= 0 or not 0 < fraction <= 1:
        raise LorascopeError("d_in, d_sae must be positive and fraction in (0, 1]", fix="check the arguments")
    free = available_memory(device) if free_bytes is None else int(free_bytes)
    e = torch.empty((), dtype=dtype).element_size()
    fixed = 16 * (2 * d_in * d_sae + d_sae + d_in)
    per_row = e * (4 * d_sae + 8 * d_in)
    budget = fraction * free - fixed
    if budget < per_row:
        need = (fixed + per_row) / fraction / 2**30
        raise LorascopeError(
            f"an SAE {d_in}→{d_sae} needs about {need:.2f} GiB but {free / 2**30:.2f} GiB is free",
            fix="use a smaller d_sae, a device with more memory, or free memory",
        )
    return int(min(max_batch, 2 ** int(math.floor(math.log2(budget / per_row)))))


# ---- global-batch statistics for data-parallel SAE training -----------------------------------------------------
@dataclass(frozen=True)
class StepShare:
    """This rank's part of the current global batch: ``n_local`` of ``n_global`` rows (``split``), or the whole
    batch on every rank (``not split``: batches with fewer rows than ranks)."""

    n_local: int
    n_global: int
    split: bool

    @property
    def weight(self) -> float:
        """Factor applied to this rank's gradients before they are summed over ranks."""
        return self.n_local / self.n_global if self.split else 1.0 / get_world_size()


def batch_denominator(t: torch.Tensor, share: StepShare | None = None) -> torch.Tensor:
    """Σ_n ||t_n − mean(t)||² over the batch, as a normaliser of a loss term  Σ_local(...) / denominator.

    ``share`` is the step's data-parallel share (``TrainContext.share``; None in a single process).
    Single process: exactly ``(t - t.mean(0)).pow(2).sum()``. In a split data-parallel step: the global centred
    sum of squares D (from all-reduced Σt, Σ||t||², n, in float64) times this rank's weight n_local / n_global,
    so that the trainer's weighted gradient sum equals the gradient of Σ_global(...) / D exactly. ``t`` is
    treated as a constant (no gradient flows through the normaliser, as with the detached AuxK residual).
    """
    if share is None or not share.split or not is_initialized():
        return (t - t.mean(0)).pow(2).sum()
    with torch.no_grad():
        t64 = t.detach().double()
        packed = torch.cat(
            [
                t64.sum(0),
                t64.pow(2).sum().reshape(1),
                torch.tensor([float(t.shape[0])], dtype=torch.float64, device=t.device),
            ]
        )
        dist.all_reduce(packed)
        d = t.shape[1]
        s, sq, n = packed[:d], packed[d], packed[d + 1]
        total = (sq - (s * s).sum() / n).clamp_min(0.0)
        return (total * share.weight).to(t.dtype)


def batch_topk(
    values: torch.Tensor, k_per_row: int, n_rows: int, share: StepShare | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK selection: the ``n_rows·k_per_row`` largest entries of the flat ``values`` of the batch.

    Returns (values, flat indices), unsorted. Single process: ``values.topk(min(n·k, numel))``. In a split
    data-parallel step the count is over the *global* batch (N·k with N the global rows): each rank contributes
    its local top candidates, one all-gather finds the global N·k-th largest value τ, and this rank keeps its
    entries ≥ τ. Exact except for ties at τ (then every tied entry is kept).
    """
    if share is None or not share.split or not is_initialized():
        return values.topk(min(n_rows * k_per_row, values.numel()), sorted=False)
    world = get_world_size()
    k_global = share.n_global * k_per_row
    width = values.numel() // max(n_rows, 1)
    cap = max(
        min(k_global, (hi - lo) * width) for lo, hi in (rank_bounds(share.n_global, r, world) for r in range(world))
    )
    m = min(k_global, values.numel())
    cand_v, cand_i = values.topk(m, sorted=False)
    pad = torch.full((cap,), -math.inf, dtype=values.dtype, device=values.device)
    pad[:m] = cand_v.detach()
    gathered = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(gathered, pad)
    everything = torch.cat(gathered)
    if everything.numel() <= k_global:
        tau = torch.tensor(-math.inf, dtype=values.dtype, device=values.device)
    else:
        tau = everything.topk(k_global, sorted=False).values.min()
    keep = cand_v >= tau
    return cand_v[keep], cand_i[keep]


# ---- data-parallel SAE training (used by lorascope.saes.trainer) ------------------------------------------------
class DataParallel:
    """Collectives of one data-parallel SAE training run; every rank ends each step with identical state.

    Per step one all-reduce carries the weighted gradients (weight n_r/n, so the sum is the gradient of the mean
    over the global batch), a has-gradient flag per parameter, the fired-latent mask (dead-latent tracking is
    over the global batch) and the weighted loss; on log / final-window steps a second float64 all-reduce merges
    the reconstruction statistics. Estimated, non-trained state (BatchTopK's threshold) is reduced with MIN
    (the EMA of the global smallest kept activation), update counters with MAX.
    """

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.backend = dist.get_backend()
        self.params: list[torch.nn.Parameter] = []
        self.sync: list[tuple[torch.Tensor, Any]] = []

    @classmethod
    def detect(cls) -> DataParallel | None:
        """An instance when a process group with > 1 rank is running, else None (single-process path)."""
        return cls() if is_initialized() else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def check_agree(self, flag: bool, problem: str, fix: str) -> None:
        """Raise on every rank unless ``flag`` is the same on all of them."""
        t = torch.tensor([float(flag)], device=self._device())
        dist.all_reduce(t)
        if 0 < float(t) < self.world:
            raise LorascopeError(problem, fix=fix)

    def start(self, sae: torch.nn.Module) -> None:
        """Make every rank hold rank 0's weights and list what is reduced each step."""
        for t in sae.state_dict().values():
            dist.broadcast(t, 0)
        self.params = [p for p in sae.parameters() if p.requires_grad]
        self.sync = []
        for name, t in [*sae.named_parameters(), *sae.named_buffers()]:
            if isinstance(t, torch.nn.Parameter) and t.requires_grad:
                continue
            if t.is_floating_point() and name.split(".")[-1] == "threshold":
                self.sync.append((t.data, dist.ReduceOp.MIN))
            elif not t.is_floating_point():
                self.sync.append((t.data, dist.ReduceOp.MAX))

    def share(self, n: int) -> StepShare:
        lo, hi = self.bounds(n)
        return StepShare(hi - lo, n, n >= self.world)

    def bounds(self, n: int) -> tuple[int, int]:
        """This rank's rows of an n-row batch; batches with fewer rows than ranks run whole on every rank."""
        return rank_bounds(n, self.rank, self.world) if n >= self.world else (0, n)

    def reduce_grads(
        self, sae: torch.nn.Module, loss_w: torch.Tensor, fired: torch.Tensor
    ) -> tuple[float, torch.Tensor]:
        """Sum weighted gradients over ranks in place; returns (global loss, fired-anywhere mask [d_sae] on CPU)."""
        dtype = torch.float32
        for p in self.params:
            dtype = torch.promote_types(dtype, p.dtype)
        dev = loss_w.device
        pieces = [
            p.grad.reshape(-1).to(dtype) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype, device=dev)
            for p in self.params
        ]
        flags = torch.tensor([float(p.grad is not None) for p in self.params], dtype=dtype, device=dev)
        buf = torch.cat([*pieces, flags, fired.to(dev, dtype), loss_w.reshape(1).to(dtype)])
        dist.all_reduce(buf)
        n_grad = sum(p.numel() for p in self.params)
        has_grad = (buf[n_grad : n_grad + len(self.params)] > 0.5).tolist()
        offset = 0
        for p, has in zip(self.params, has_grad, strict=True):
            n = p.numel()
            p.grad = buf[offset : offset + n].view_as(p).to(p.dtype) if has else None
            offset += n
        start = n_grad + len(self.params)
        mask = buf[start : start + fired.numel()] > 0.5
        return float(buf[-1]), mask.cpu()

    def sync_state(self, sae: torch.nn.Module) -> None:
        for t, op in self.sync:
            dist.all_reduce(t, op)

    def contributes_stats(self, share: StepShare) -> bool:
        """Whether this rank's rows enter the merged statistics (all ranks, or rank 0 when the batch is whole)."""
        return share.split or self.is_main

    def reduce_stats(
        self, stats: Any, parts: dict[str, float], l0_w: float, d: int, device: torch.device
    ) -> tuple[Any, dict[str, float], float]:
        """Merge per-rank ReconstructionStats, weighted loss parts and weighted L0 over ranks (float64)."""
        keys = sorted(parts)
        head = [
            stats.n,
            stats.sum_sq_err,
            stats.sum_sq_x,
            stats.sum_cos,
            stats.sum_l0,
            stats.n_codes,
            *[parts[k] for k in keys],
            l0_w,
        ]
        dev = self._device()
        sum_x = stats.sum_x.to(dev) if stats.sum_x is not None else torch.zeros(d, dtype=torch.float64, device=dev)
        vec = torch.cat([torch.tensor(head, dtype=torch.float64, device=dev), sum_x.double()])
        dist.all_reduce(vec)
        h = vec[: len(head)].tolist()
        out = type(stats)()
        out.n, out.d, out.sum_sq_err, out.sum_sq_x, out.sum_cos = int(round(h[0])), d, h[1], h[2], h[3]
        out.sum_l0, out.n_codes = h[4], int(round(h[5]))
        out.sum_x = vec[len(head) :].to(device)
        return out, {k: h[6 + i] for i, k in enumerate(keys)}, h[-1]


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DataParallel",
    "DistInfo",
    "StepShare",
    "available_memory",
    "barrier",
    "batch_denominator",
    "batch_topk",
    "choose_backend",
    "cleanup",
    "env_ranks",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_initialized",
    "is_main_process",
    "launched_by_torchrun",
    "max_batch_size",
    "my_jobs",
    "rank_bounds",
    "select_device",
]
