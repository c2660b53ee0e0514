"""Stage folders and the state of one study run.

Every stage writes into ``output_dir/<stage>/<label>-<hash of its inputs>/`` and marks completion with
``done.json`` (written last, atomically): a re-run skips complete folders, a changed setting changes the hash of
its stage and of everything downstream.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorascope import __version__
from lorascope._memory import release_freed_memory
from lorascope.config import ExperimentConfig
from lorascope.io import read_json, stable_hash, write_json

RESULTS = "results"
TIMINGS = "timings.json"
STAGES = ("model_load", "adapters", "extraction", "saes", "geometry", "report")


def log(msg: str, progress: bool) -> None:
    """One progress line on stderr (when ``progress``)."""
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[bold cyan]lorascope[/] {msg}")


def data_key_extras(columns: Any, long_examples: str) -> dict[str, Any]:
    """Data settings that enter a stage's cache key only when not at their default (so caches written before the
    settings existed stay valid): the dataset's column mapping and the long-example policy."""
    extras: dict[str, Any] = {}
    if columns:
        extras["columns"] = columns
    if long_examples != "truncate":
        extras["long_examples"] = long_examples
    return extras


@dataclass
class StageDir:
    """A cached stage output: ``root/<stage>/<label>-<hash of inputs>``."""

    path: Path
    key: str
    inputs: dict[str, Any]

    @classmethod
    def make(cls, root: Path, stage: str, label: str, inputs: dict[str, Any]) -> StageDir:
        key = stable_hash({"lorascope": __version__.split(".")[0], **inputs})
        return cls(root / stage / f"{label}-{key}", key, inputs)

    @property
    def done(self) -> bool:
        return (self.path / "done.json").is_file()

    def mark_done(self, info: dict[str, Any] | None = None) -> None:
        write_json(
            self.path / "done.json",
            {
                "key": self.key,
                "inputs": self.inputs,
                "info": info or {},
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )

    def info(self) -> dict[str, Any]:
        return read_json(self.path / "done.json")["info"]


@dataclass
class RunState:
    """The config, the output folder, the models (loaded on first use) and what this call did.

    ``timings``: seconds per stage that did work (``sae:<label>`` per SAE), as meta.json records them;
    :meth:`write_timings` turns them into ``output_dir/timings.json`` (see :meth:`timing_record`). Model loading
    is timed apart (``model_load``) and not counted in the stage that happened to trigger it."""

    config: ExperimentConfig
    out: Path
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    work_done: list[str] = field(default_factory=list)  # stages that did real work in this call
    detail: dict[str, float] = field(default_factory=dict)  # "<stage>/<part>": seconds
    _base: Any = None
    _peft: Any = None
    _loads: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of model loads
    _tokenizer: Any = None
    memo: dict[str, Any] = field(default_factory=dict)  # values computed once per run and shared by adapters

    def log(self, msg: str) -> None:
        log(msg, self.progress)

    def finished(self, stage: str, t0: float, release: bool = True) -> None:
        """Record that ``stage`` did real work, started at ``t0`` (perf_counter), less any model load inside it;
        the timing record on disk is rewritten. ``release``: hand freed memory back to the OS (a full garbage
        collection of the study's process; one per group of stages that end together is enough)."""
        self.timings[stage] = self._since(t0)
        self.work_done.append(stage)
        self.write_timings()
        if release:
            release_freed_memory()  # the stage's freed buffers go back to the OS, not under the next stage's peak

    def _since(self, t0: float) -> float:
        """Seconds from ``t0`` to now, less the model loads in between."""
        now = time.perf_counter()
        return now - t0 - sum(max(0.0, min(e, now) - max(s, t0)) for s, e in self._loads)

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add the seconds of the ``with`` body (less model loading) to ``detail[part]``, e.g. "geometry/splice"."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.detail[part] = self.detail.get(part, 0.0) + self._since(t0)

    def timing_record(self, total: float | None = None) -> dict[str, Any]:
        """{"stages": {stage: s}, "detail": {part: s}, "reused": [...], "total": s or None}: the format
        benchmarks/study_stages.py reads. ``saes`` sums the ``sae:<label>`` entries (each also in ``detail``);
        ``reused``: stages that did no work in this call (cached from an earlier run)."""
        stages: dict[str, float] = {}
        detail = dict(self.detail)
        for name, sec in self.timings.items():
            if name.startswith("sae:"):
                stages["saes"] = stages.get("saes", 0.0) + sec
                detail[name] = sec
            elif name != "total":
                stages[name] = sec
        if self._loads:
            stages["model_load"] = sum(e - s for s, e in self._loads)
        ran = {"saes" if w.startswith("sae:") else w for w in self.work_done}
        reused = [s for s in STAGES[1:] if s not in ran and s not in stages]
        return {"stages": stages, "detail": detail, "reused": reused, "total": total}

    def write_timings(self, total: float | None = None) -> None:
        """Write ``output_dir/timings.json`` atomically (after every stage, and with ``total`` at the end)."""
        write_json(self.out / TIMINGS, self.timing_record(total))

    def stage_summary(self, total: float) -> str:
        """One line: seconds per stage (reused stages marked), then the total."""
        rec = self.timing_record(total)
        parts = [f"{s} {rec['stages'][s]:.1f}s" for s in STAGES if s in rec["stages"]]
        parts += [f"{s} reused" for s in rec["reused"]]
        return "stage seconds: " + ", ".join(parts) + f"; total {total:.1f}s"

    def _timed_load(self, load):
        t0 = time.perf_counter()
        try:
            return load()
        finally:
            self._loads.append((t0, time.perf_counter()))

    def base(self):
        if self._base is None:
            from lorascope.models import load_base

            m = self.config.model
            self.log(f"loading base model {m.spec}")
            self._base = self._timed_load(
                lambda: load_base(m.spec, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code)
            )
        return self._base

    def tokenizer(self):
        """The base model's tokenizer (without loading the model when it is not loaded yet)."""
        if self._base is not None:
            return self._base.tokenizer
        if self._tokenizer is None:
            from lorascope.models.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.config.model.spec, self.config.model.trust_remote_code)
        return self._tokenizer

    def peft(self, adapters: dict[str, Path]):
        if self._peft is None:
            from lorascope.models import load_adapters

            base = self.base()
            self._peft = self._timed_load(lambda: load_adapters(base, {k: str(v) for k, v in adapters.items()}))
        return self._peft
