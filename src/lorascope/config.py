"""The experiment YAML, validated by pydantic. Unknown keys and bad values are rejected with the dotted path of
the offending key (``adapter_sae.k: Input should be greater than 0``).

Every field has a documented default; ``configs/quickstart.yaml`` is the embedded offline study and
``configs/gemma2_9b_gemmascope.yaml`` the paper-scale one for a GPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from lorascope.errors import LorascopeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelCfg(_Strict):
    spec: str = Field("embedded", description="'embedded' (SmolLM2-135M-Instruct), HF folder, .gguf, or hub id")
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = Field("cpu", description="cpu, cuda, cuda:N")
    trust_remote_code: bool = False


class DataCfg(_Strict):
    finetune: str = Field(
        "demo",
        description="'demo', a dataset file (chat messages / ShareGPT / Alpaca / text "
        "JSON(L) or .txt, auto-detected), or hf:NAME[:SPLIT]",
    )
    n_finetune: int = Field(512, gt=0)
    activations: str = Field(
        "demo",
        description="dataset run for activations (same forms as finetune; a "
        "different dataset from finetune is recommended)",
    )
    finetune_columns: dict[str, str] = Field(default_factory=dict, description="{lorascope_field: your_field}")
    activations_columns: dict[str, str] = Field(default_factory=dict, description="{lorascope_field: your_field}")
    long_examples: Literal["truncate", "skip", "error"] = Field(
        "truncate",
        description="longer than max_length: truncate the response (skip if the prompt alone does not "
        "fit), skip, or error",
    )
    n_docs: int = Field(400, gt=0, description="documents (examples) to extract activations from")
    held_out_fraction: float = Field(0.2, gt=0, lt=1, description="documents held out from SAE training")
    max_length: int = Field(160, ge=8)


class TrainAdaptersCfg(_Strict):
    ranks: list[int] = Field(default_factory=lambda: [4, 8, 16, 32])
    steps: int = Field(30, gt=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, gt=0)
    alpha: float | None = Field(None, gt=0, description="None: alpha = 2·r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    autocast_bf16: bool = Field(False, description="bf16 autocast for LoRA training (faster on CPU/GPU)")
    gradient_checkpointing: bool | None = Field(
        None,
        description="recompute activations in the backward pass: same adapter, less memory, ~15% slower; "
        "None: on when batch_size × data.max_length > 512 tokens",
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="processes training ranks side by side on CPU (at most one per core and per rank), the "
        "cores shared among them; the adapters are the same bit for bit. None: one process. Worth it when a "
        "rank trains for minutes (each process loads the model: ~10 s); memory adds up: each process holds the "
        "model and its own activations (quickstart: 4.8 GiB over 2 processes, 2.3 GiB the largest)",
    )

    @model_validator(mode="after")
    def _ranks_positive(self) -> TrainAdaptersCfg:
        bad = [r for r in self.ranks if r <= 0]
        if bad:
            raise ValueError(f"ranks must be positive integers, got {bad}")
        return self


class LoadSpecCfg(_Strict):
    """A fine-tune that is not one PEFT folder: a whole model, or a folder of training checkpoints."""

    model: str | None = Field(None, description="a fully fine-tuned (or merged) model folder, compared with the base")
    checkpoints: str | None = Field(None, description="a folder of checkpoint-<step>/ sub-folders, one entry each")

    @model_validator(mode="after")
    def _one(self) -> LoadSpecCfg:
        if (self.model is None) == (self.checkpoints is None):
            raise ValueError("give exactly one of model or checkpoints")
        return self


class AdaptersCfg(_Strict):
    train: TrainAdaptersCfg | None = Field(default_factory=TrainAdaptersCfg)
    load: dict[str, str | LoadSpecCfg] = Field(
        default_factory=dict,
        description="existing fine-tunes: {name: PEFT folder or hub id}, {name: {model: DIR}} "
        "or {name: {checkpoints: DIR}} (lorascope.models.finetunes)",
    )

    @field_validator("load", mode="before")
    @classmethod
    def _load_specs(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value
        out = {}
        for name, spec in value.items():
            if isinstance(spec, dict):
                try:
                    spec = LoadSpecCfg.model_validate(spec)
                except ValidationError as exc:
                    err = exc.errors()[0]
                    where = ".".join(str(p) for p in err["loc"])
                    what = (
                        f"unknown key '{where}'"
                        if err["type"] == "extra_forbidden"
                        else err["msg"].removeprefix("Value error, ")
                    )
                    raise ValueError(f"{name}: {what} (give {{model: DIR}} or {{checkpoints: DIR}})") from None
            out[name] = spec
        return out

    @model_validator(mode="after")
    def _some(self) -> AdaptersCfg:
        if not self.load and (self.train is None or not self.train.ranks):
            raise ValueError("no adapters: give train.ranks or load")
        return self


class ExtractionCfg(_Strict):
    layers: list[int] = Field(default_factory=lambda: [7, 15, 25])
    tokens: Literal["all", "prompt", "response"] = "all"
    skip_first: int = Field(1, ge=0, description="positions dropped at the start of each document (sinks/BOS)")
    max_norm_factor: float | None = Field(10.0, gt=0, description="drop tokens whose base norm > this × median")
    batch_size: int = Field(16, gt=0)
    store_dtype: Literal["float32", "bfloat16"] = "float32"
    shard_docs: int = Field(64, gt=0, description="documents per shard")
    exclude_template: bool = Field(
        True,
        description="drop chat-template scaffolding (system prompt, role markers: "
        "positions identical in >= 90% of documents); recorded in the "
        "store manifest",
    )


class SAETrainingCfg(_Strict):
    """What the study needs besides an architecture's own settings (those come from the class registered with the
    architecture, e.g. :class:`lorascope.saes.TopKSettings`, so a new setting there is a new YAML key here)."""

    expansion: int = Field(8, gt=0, description="d_sae = expansion × d_model (for sasa: groups × rank)")
    tokens: int = Field(200_000, gt=0, description="training token budget")
    batch_size: int = Field(1024, gt=0)
    lr: float | None = Field(None, gt=0, description="None: 2e-4/sqrt(d_sae/2^14)")
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1],
        min_length=1,
        description="two or more seeds give the seed-vs-seed alignment ceiling",
    )

    def sae_width(self, d_model: int) -> int:
        return self.expansion * d_model

    def sae_settings(self) -> dict[str, Any]:
        """The architecture's own settings (what ``create_sae(architecture, …, **settings)`` takes)."""
        from lorascope.saes import settings_class

        return self.model_dump(include=set(settings_class(self.architecture).model_fields))


class ReferenceExtrasCfg(SAETrainingCfg):
    source: Literal["train", "path"] = Field("train", description="train on base activations, or load from path")
    path: str | dict[int, str] | None = Field(
        None,
        description="pretrained SAE per layer: a template with {layer}, a {layer: path} mapping, or a glob "
        "with target_l0 (lorascope.saes.pretrained.resolve_reference_paths)",
    )
    target_l0: float | None = Field(None, gt=0, description="with a glob path: pick the file whose L0 is closest")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    allow_pickle: bool = Field(
        False,
        description="allow a pickled reference SAE (e.g. dictionary_learning ae.pt "
        "that needs full unpickling): only for files you trust",
    )
    allow_overlap: bool = Field(
        False,
        description="evaluate a path reference SAE even if it was trained on this "
        "run's held-out documents (flagged in the report); default: refuse",
    )

    @model_validator(mode="after")
    def _path(self) -> ReferenceExtrasCfg:
        if self.source == "path" and not self.path:
            raise ValueError("reference_sae.source is 'path' but reference_sae.path is empty")
        return self


# study defaults of the settings an architecture requires (create_sae has no default for them)
STUDY_DEFAULTS: dict[str, dict[str, Any]] = {"topk": {"k": 32}, "batchtopk": {"k": 32}, "sasa": {"k": 32}}
# keys of the flat pre-union section, each read by some architectures only: ignored by the others, as before
LEGACY_KEYS = ("k", "l1_coefficient", "l0_coefficient", "sasa_rank")
LEGACY_SASA_RANK = 4


def _legacy_sasa(data: dict[str, Any]) -> dict[str, Any]:
    """sasa from the flat keys: ``sasa_rank`` is its rank, ``k`` its active latents s·rank."""
    rank = data.get("rank", data.get("sasa_rank", LEGACY_SASA_RANK))
    out = {**data, "rank": rank}
    if "s" not in data:
        k = data.get("k", STUDY_DEFAULTS["sasa"]["k"])
        if isinstance(rank, int) and rank > 0 and isinstance(k, int) and k % rank:
            raise ValueError(
                f"sasa needs k divisible by sasa_rank (k={k}, rank={rank}): k = s·rank, e.g. k=32 with sasa_rank=4"
            )
        out["s"] = k // rank if isinstance(rank, int) and rank > 0 and isinstance(k, int) else k
    return out


def _upgrade_sae_section(data: Any) -> Any:
    """A new dict for the union: ``architecture`` defaults to topk, required settings get the study defaults,
    and the old flat keys map onto the chosen architecture (the input is not changed)."""
    if not isinstance(data, dict):
        return data
    arch = data.get("architecture", "topk")
    from lorascope.saes import known_architectures, settings_class

    if arch not in known_architectures():
        return {**data, "architecture": arch}
    fields = settings_class(arch).model_fields
    out = {"architecture": arch, **STUDY_DEFAULTS.get(arch, {}), **data}
    if arch == "sasa":
        out = _legacy_sasa(out)
    return {key: v for key, v in out.items() if key not in LEGACY_KEYS or key in fields}


def _sae_union(base: type[SAETrainingCfg], prefix: str) -> Any:
    """``base`` × every registered architecture's settings, discriminated by ``architecture``."""
    from lorascope.saes import known_architectures, settings_class

    members = tuple(
        create_model(
            f"{prefix}{name.title()}Cfg", __base__=(base, settings_class(name)), architecture=(Literal[name], name)
        )
        for name in known_architectures()
    )
    return Annotated[
        Union[members],  # noqa: UP007
        Field(discriminator="architecture"),
        BeforeValidator(_upgrade_sae_section),
    ]


SAECfg = _sae_union(SAETrainingCfg, "AdapterSAE")
ReferenceCfg = _sae_union(ReferenceExtrasCfg, "ReferenceSAE")


class GeometryCfg(_Strict):
    taus: list[float] = Field(default_factory=lambda: [0.5, 0.7, 0.9])
    subspace_k: int = Field(16, gt=0)
    bootstrap: int = Field(200, ge=0, description="bootstrap resamples for CIs (0: none)")
    cka_max_tokens: int = Field(4000, ge=16)
    eval_tokens: int = Field(20_000, gt=0, description="held-out tokens for reconstruction metrics")
    splice: bool = Field(True, description="splice h_base + Δ̂ into the adapted forward; report KL recovered")
    splice_docs: int = Field(24, gt=0)
    cka_permutations: int = Field(49, ge=1, description="document permutations of every CKA null")
    subspace_draws: int = Field(10, ge=1, description="random dictionaries per selection-aware subspace null")


class DensityCfg(_Strict):
    """Feature density with a free-L0 SAE (``lorascope.saes.density``): per (layer, adapter), one SAE trained on
    the training documents' Δ at a fixed sparsity coefficient, L0 and FVU on held-out Δ; optionally also L0 at the
    coefficient where held-out FVU reaches ``matched_fvu_target`` (3-6 training runs per cell)."""

    enabled: bool = Field(False, description="train the free-L0 density SAEs (the density finding reads them)")
    architecture: Literal["paper_a", "relu", "jumprelu"] = "paper_a"
    l1_coefficient: float = Field(0.2, gt=0, description="fixed sparsity coefficient (l0_coefficient for jumprelu)")
    expansion: int = Field(2, gt=0, description="d_sae = expansion × d_model")
    tokens: int = Field(20_000, gt=0, description="training tokens per SAE")
    batch_size: int = Field(512, gt=0)
    lr: float = Field(0.01, gt=0)
    matched_fvu_target: float | None = Field(None, gt=0, lt=1, description="None: no matched-FVU search")
    max_runs: int = Field(5, ge=2, description="training runs per cell for the matched-FVU search")


class ReportCfg(_Strict):
    top_features: int = Field(8, ge=0)
    contexts_per_feature: int = Field(5, gt=0)


class ExplainCfg(_Strict):
    """'What the adapter changed': feature ranking, module attribution and causal checks at one layer."""

    enabled: bool = True
    layer: int | None = Field(None, description="layer to explain (None: the middle of extraction.layers)")
    top_features: int = Field(5, gt=0, description="top features (stability × Δ energy) per adapter")
    contexts_per_feature: int = Field(5, gt=0, description="de-duplicated top windows per feature")
    tokens: int = Field(4000, gt=0, description="held-out tokens for ranking, stability and template share")
    docs: int = Field(8, gt=0, description="held-out fine-tuning examples for attribution and steering")
    generations: int = Field(4, ge=0, description="greedy generations per condition (demo task marker rates)")
    max_new_tokens: int = Field(24, gt=0)
    steer_scales: list[PositiveFloat] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        description="multiples of the patched feature/PCA edits and of mean Δ the demo generations are run at",
    )
    attribution: bool = True
    intruders: bool = True
    latent_scaling: bool = True


class ExperimentConfig(_Strict):
    name: str = "lorascope-study"
    output_dir: str = "runs/study"
    seed: int = 0
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    adapters: AdaptersCfg = Field(default_factory=AdaptersCfg)
    extraction: ExtractionCfg = Field(default_factory=ExtractionCfg)
    adapter_sae: SAECfg = Field(default_factory=lambda: {"architecture": "topk"}, validate_default=True)
    reference_sae: ReferenceCfg = Field(default_factory=lambda: {"architecture": "topk"}, validate_default=True)
    geometry: GeometryCfg = Field(default_factory=GeometryCfg)
    density: DensityCfg = Field(default_factory=DensityCfg)
    report: ReportCfg = Field(default_factory=ReportCfg)
    explain: ExplainCfg = Field(default_factory=ExplainCfg)


def _set_key_for(loc: str, set_keys: Iterable[str]) -> str | None:
    """The ``--set`` key that produced the value at ``loc`` (the key itself, a parent or a child), if any."""
    return next((k for k in set_keys if loc and (k == loc or loc.startswith(k + ".") or k.startswith(loc + "."))), None)


def _format_validation_error(exc: ValidationError, source: str, set_keys: Iterable[str] = ()) -> str:
    """One line for the first error, blaming its source: the config file, or the ``--set KEY`` it came from."""
    err = exc.errors()[0]
    from lorascope.saes import known_architectures

    parts = [str(p) for p in err["loc"]]
    tag = 1 if parts[:1] in (["adapter_sae"], ["reference_sae"]) else 0  # the union's architecture tag
    if len(parts) > tag + 1 and parts[tag] in known_architectures():
        parts = parts[:tag] + parts[tag + 1 :]
    loc = ".".join(parts) or "(top level)"
    key = _set_key_for(loc, set_keys)
    if key is not None:
        where = f"--set {key}"
        if err["type"] == "extra_forbidden":
            return f"{where}: unknown key" + ("" if key == loc else f" '{loc}'")
        return f"{where}: {err['msg']}" if key == loc else f"{where}: {loc}: {err['msg']}"
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key '{loc}'"
    return f"{source}: {loc}: {err['msg']}"


def parse_config(data: dict, source: str = "config", set_keys: Iterable[str] = ()) -> ExperimentConfig:
    """Validate a config mapping; errors name ``source`` (the file) or, for keys in ``set_keys``, the ``--set``."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise LorascopeError(
            _format_validation_error(exc, source, set_keys),
            fix="see configs/quickstart.yaml for every key and its default",
        ) from exc


def parse_sae_section(data: dict[str, Any], source: str = "adapter_sae") -> Any:
    """One ``adapter_sae``-style section (a dict with ``architecture`` and its settings) validated alone, as the
    CLI commands that train a single SAE build it."""
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(SAECfg).validate_python(data)
    except ValidationError as exc:
        raise LorascopeError(
            _format_validation_error(exc, source), fix="check the SAE settings (architecture, k, …)"
        ) from exc


def load_config(path: str | Path, overrides: dict | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML file (``overrides`` are merged on top, dotted keys allowed)."""
    path = Path(path)
    if not path.is_file():
        raise LorascopeError(f"config file {path} does not exist", fix="check the path, e.g. configs/quickstart.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise LorascopeError(f"{path} is not valid YAML{where}", fix="fix the syntax (indentation, colons)") from exc
    if not isinstance(data, dict):
        raise LorascopeError(f"{path} must be a YAML mapping of settings", fix="see configs/quickstart.yaml")
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                section = ".".join(parents[: i + 1])
                raise LorascopeError(
                    f"--set {key}: '{section}' is a value, not a section with keys",
                    fix=f"set {section} itself, e.g. --set {section}=VALUE",
                )
        node[leaf] = value
    return parse_config(data, str(path), set_keys=list(overrides or {}))
