"""Stage folders and the state of one study run.

Every stage writes into ``output_dir/<stage>/<label>-<hash of its inputs>/`` and marks completion with
``done.json`` (written last, atomically): a re-run skips complete folders, a changed setting changes the hash of
its stage and of everything downstream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorascope import __version__
from lorascope.config import ExperimentConfig
from lorascope.io import read_json, stable_hash, write_json

RESULTS = "results"


def log(msg: str, progress: bool) -> None:
    """One progress line on stderr (when ``progress``)."""
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[bold cyan]lorascope[/] {msg}")


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
        write_json(self.path / "done.json", {"key": self.key, "inputs": self.inputs, "info": info or {},
                                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def info(self) -> dict[str, Any]:
        return read_json(self.path / "done.json")["info"]


@dataclass
class RunState:
    """The config, the output folder, the models (loaded on first use) and what this call did."""

    config: ExperimentConfig
    out: Path
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    work_done: list[str] = field(default_factory=list)  # stages that did real work in this call
    _base: Any = None
    _peft: Any = None
    _tokenizer: Any = None

    def log(self, msg: str) -> None:
        log(msg, self.progress)

    def finished(self, stage: str, t0: float) -> None:
        """Record that ``stage`` did real work, started at ``t0`` (perf_counter)."""
        self.timings[stage] = time.perf_counter() - t0
        self.work_done.append(stage)

    def base(self):
        if self._base is None:
            from lorascope.models import load_base

            m = self.config.model
            self.log(f"loading base model {m.spec}")
            self._base = load_base(m.spec, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code)
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

            self._peft = load_adapters(self.base(), {k: str(v) for k, v in adapters.items()})
        return self._peft
