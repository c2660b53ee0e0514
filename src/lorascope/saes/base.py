"""The one SAE interface every architecture implements (the field's layout: Gemma Scope, SAELens, SAEBench).

Parameters:  W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], optional threshold [d_sae].
Inference:   encode(x [N, d_in]) -> codes [N, d_sae] (dense, zeros for inactive latents);
             decode(codes) -> x_hat [N, d_in]; forward(x) = decode(encode(x)).
Training:    training_loss(x, ctx) -> TrainOutput; the trainer owns optimisation, data and checkpoints and calls
             post_step() after every optimiser step (decoder renormalisation and the like).

A new architecture is one file with a settings class (its fields, defaults and checks, a pydantic model, as
SAELens pairs each architecture with a config class in ``sae_lens/registry.py``) and an SAE subclass decorated
by ``@register("name", SettingsClass)``. The settings are validated once, when the SAE is built; the SAE reads
them from ``self.settings`` and saves them (defaults filled in) as ``cfg.arch``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Any, ClassVar, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError
from torch import nn

from lorascope.distributed import StepShare
from lorascope.errors import LorascopeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class SAEConfig:
    """What is needed to rebuild an SAE. ``arch`` holds architecture fields (k, groups, rank, s, l1_coefficient…);
    ``metadata`` holds provenance (model, layer, hook, adapter, trained_on = "delta" | "base" | …)."""

    architecture: str
    d_in: int
    d_sae: int
    apply_b_dec_to_input: bool = True
    dtype: str = "float32"
    arch: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainContext(NamedTuple):
    """What the trainer tells the SAE at each step. ``share`` is this rank's part of the global batch when the
    trainer runs data-parallel (None in a single process): losses with batch-level statistics pass it to
    ``lorascope.distributed.batch_denominator`` / ``batch_topk`` so those are over the global batch."""

    step: int
    total_steps: int
    sparsity_scale: float  # warmup factor in [0, 1] for the sparsity penalty coefficient
    dead_mask: torch.Tensor | None  # bool [d_sae]: latents that have not fired for a long window (for AuxK)
    share: StepShare | None = None


class TrainOutput(NamedTuple):
    loss: torch.Tensor  # scalar, what the optimiser minimises
    x_hat: torch.Tensor  # [N, d_in]
    active: torch.Tensor  # bool [N, d_sae] (or sparse indices [N, k] for top-k paths; see `active_is_indices`)
    parts: dict[str, torch.Tensor]  # named loss terms (detached scalars) for logging: mse, l1, auxk, nuclear…
    active_is_indices: bool = False


# field types of architecture settings: strict, so a bool is never taken for a number nor a string for an int
# (an int is accepted for a float)
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
OptionalPositiveInt = Annotated[int | None, Strict(), Field(gt=0)]
NonNegativeFloat = Annotated[float, Strict(), Field(ge=0)]
PositiveFloat = Annotated[float, Strict(), Field(gt=0)]
StrictBool = Annotated[bool, Strict()]


class SAESettings(BaseModel):
    """An architecture's own hyperparameters (``cfg.arch``): one subclass per architecture, each field with its
    one default. Checks that need the SAE's width go in :meth:`check_width`; fields that follow from the width
    (left ``None`` by the user) are filled by :meth:`for_width`, which returns a new object."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def check_width(self, d_in: int, d_sae: int) -> None:
        """Raise ValueError when these settings cannot work at this width."""

    def for_width(self, d_in: int, d_sae: int) -> SAESettings:
        """These settings with width-dependent fields filled in (default: unchanged)."""
        return self


_REGISTRY: dict[str, type[SAE]] = {}


def register(name: str, settings: type[SAESettings] = SAESettings):
    """Class decorator: make an SAE architecture available by name (``create_sae(name, …)``, cfg.json), with the
    settings class that validates its ``cfg.arch``."""

    def deco(cls: type[SAE]) -> type[SAE]:
        cls.architecture = name
        cls.settings_class = settings
        _REGISTRY[name] = cls
        return cls

    return deco


def settings_class(name: str) -> type[SAESettings]:
    """The settings class registered with architecture ``name``."""
    return sae_class(name).settings_class


def parse_settings(
    architecture: str, arch: dict[str, Any], d_in: int | None = None, d_sae: int | None = None
) -> SAESettings:
    """Validate ``arch`` for ``architecture`` (and, given the width, fill width-dependent fields); bad values
    raise one LorascopeError naming the setting."""
    cls = settings_class(architecture)
    try:
        s = cls.model_validate(arch)
        if d_in is not None and d_sae is not None:
            s = s.for_width(d_in, d_sae)
            s.check_width(d_in, d_sae)
    except ValidationError as exc:
        raise settings_error(architecture, exc, cls) from exc
    except ValueError as exc:
        raise LorascopeError(f"{architecture} SAE: {exc}", fix="change that setting") from exc
    return s


def settings_error(architecture: str, exc: ValidationError, cls: type[BaseModel]) -> LorascopeError:
    """One readable line for the first error pydantic found in an architecture's settings."""
    err = exc.errors()[0]
    name = ".".join(str(p) for p in err["loc"])
    if err["type"] == "missing":
        return LorascopeError(
            f"{architecture} SAE needs {name} (the setting {name!r} is missing)",
            fix=f"pass {name}=<value> when creating the SAE",
        )
    if err["type"] == "extra_forbidden":
        return LorascopeError(
            f"{architecture} SAE has no setting {name!r}", fix=f"use one of: {', '.join(cls.model_fields)}"
        )
    ctx_err = (err.get("ctx") or {}).get("error")
    msg = f" {ctx_err}" if ctx_err is not None else f": {err['msg']}"
    return LorascopeError(
        f"{architecture} SAE: {name}{msg}" if name else f"{architecture} SAE:{msg}", fix="change that setting"
    )


def known_architectures() -> list[str]:
    return sorted(_REGISTRY)


def sae_class(name: str) -> type[SAE]:
    if name not in _REGISTRY:
        raise LorascopeError(
            f"unknown SAE architecture {name!r}", fix=f"use one of: {', '.join(known_architectures())}"
        )
    return _REGISTRY[name]


def create_sae(
    architecture: str,
    d_in: int,
    d_sae: int,
    *,
    seed: int = 0,
    dtype: str = "float32",
    apply_b_dec_to_input: bool = True,
    metadata: dict | None = None,
    **arch: Any,
) -> SAE:
    """Build a freshly initialised SAE of a registered architecture."""
    if d_in <= 0 or d_sae <= 0:
        raise LorascopeError(f"d_in and d_sae must be positive (got {d_in}, {d_sae})", fix="pass positive sizes")
    cls = sae_class(architecture)
    cfg = SAEConfig(architecture, d_in, d_sae, apply_b_dec_to_input, dtype, dict(arch), dict(metadata or {}))
    sae = cls(cfg)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    return sae


class SAE(nn.Module):
    """Base class: shared parameters, encode/decode plumbing, decoder-norm handling, scale folding."""

    architecture: ClassVar[str] = "base"
    settings_class: ClassVar[type[SAESettings]] = SAESettings
    has_threshold: ClassVar[bool] = False
    # W_enc starts as encoder_init_scale * W_dec.T. TopK-style SAEs use 1/sqrt(3) (the row norm of a default
    # nn.Linear init, as sparsify does): measured to reach a lower FVU at equal tokens than 1.0.
    encoder_init_scale: ClassVar[float] = 1.0

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.settings = parse_settings(cfg.architecture, cfg.arch, cfg.d_in, cfg.d_sae)
        # a new config (the caller's is not changed) recording every setting, defaults included, for cfg.json
        self.cfg = replace(cfg, arch=self.settings.model_dump())
        dt = DTYPES[cfg.dtype]
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, dtype=dt))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dt))
        if self.has_threshold:
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    # ---- initialisation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Random unit-norm decoder rows, encoder = encoder_init_scale × the decoder's transpose, zero biases."""
        w = torch.randn(self.d_sae, self.d_in, generator=generator, dtype=torch.float32)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T * self.encoder_init_scale)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_b_dec(self, x: torch.Tensor) -> None:
        """Data-driven init of b_dec from a first batch (mean; subclasses may use the geometric median)."""
        self.b_dec.copy_(x.float().mean(0).to(self.b_dec.dtype))

    # ---- inference -----------------------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise LorascopeError(
                f"activations have shape {tuple(x.shape)} but this SAE expects [N, {self.d_in}] (d_in = {self.d_in})",
                fix="use an SAE trained for this layer's width, or the matching activations",
            )

    # ---- training ------------------------------------------------------------------------------------------
    def training_loss(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the component of each decoder row's gradient parallel to the row (keeps rows on the sphere)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g = self.W_dec.grad
        g -= (g * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def post_step(self) -> None:
        """Called after each optimiser step: renormalise decoder rows to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """The SAE was trained on ``x * scale``; rewrite weights so it applies to raw ``x`` exactly.

        encode: (x*s - b)W + c = (x - b/s)(sW) + c;  decode: (fW + b)/s = f(W/s) + b/s. Pre-activations (and so
        thresholds and codes) are unchanged.
        """
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    # ---- persistence helpers ---------------------------------------------------------------------------------
    def state_for_save(self) -> dict[str, torch.Tensor]:
        """Inference parameters in the canonical layout (contiguous)."""
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.has_threshold:
            out["threshold"] = self.threshold
        return {k: v.detach().contiguous() for k, v in out.items()}


def lr_for_width(d_sae: int, base: float = 2e-4) -> float:
    """Default learning rate scaled with width: 2e-4 / sqrt(d_sae / 2^14) (EleutherAI sparsify's default,
    ``sparsify/trainer.py``, following the 1/sqrt(width) scaling of Gao et al. 2024)."""
    return base / math.sqrt(d_sae / 2**14)
