"""Instruction examples and their loaders (Alpaca JSON/JSONL, the Alpaca seed-task layout, HF datasets)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lorascope.errors import LorascopeError


@dataclass(frozen=True)
class Example:
    """One instruction-following example. ``id`` is stable and unique: documents are split by it."""

    id: str
    instruction: str
    input: str = ""
    output: str = ""

    @property
    def user_message(self) -> str:
        return self.instruction if not self.input else f"{self.instruction}\n\n{self.input}"


def _example_id(source: str, index: int, instruction: str) -> str:
    digest = hashlib.sha1(instruction.encode()).hexdigest()[:8]
    return f"{source}:{index}:{digest}"


def _record_to_example(rec: object, where: str, source: str, index: int) -> Example:
    if not isinstance(rec, dict):
        raise LorascopeError(f"{where}: expected a JSON object, got {type(rec).__name__}",
                             fix="give one object per example with instruction/input/output fields")
    if "instances" in rec and "output" not in rec:  # Alpaca seed-task layout: {instruction, instances:[{input,output}]}
        inst = rec.get("instances") or [{}]
        rec = {"instruction": rec.get("instruction"), **(inst[0] if isinstance(inst, list) and inst else {})}
    missing = [k for k in ("instruction", "output") if not isinstance(rec.get(k), str)]
    if missing:
        raise LorascopeError(f"{where}: missing field(s) {', '.join(missing)}",
                             fix="each example needs string fields 'instruction' and 'output' ('input' optional)")
    inp = rec.get("input") or ""
    if not isinstance(inp, str):
        raise LorascopeError(f"{where}: field 'input' must be a string", fix="use \"\" for no input")
    return Example(_example_id(source, index, rec["instruction"]), rec["instruction"], inp, rec["output"])


def load_alpaca(path: str | Path, limit: int | None = None) -> list[Example]:
    """Load Alpaca-format examples from a JSON list or a JSONL file (one object per line).

    Also accepts the Alpaca seed-task layout (``instruction`` + ``instances[0].input/output``). A record with a
    missing field raises an error naming the file and line (JSONL) or index (JSON).
    """
    path = Path(path)
    if not path.is_file():
        raise LorascopeError(f"dataset file {path} does not exist", fix="check the path (Alpaca JSON or JSONL)")
    text = path.read_text(encoding="utf-8")
    examples: list[Example] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LorascopeError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})",
                                 fix="fix the file or use JSONL") from exc
        for i, rec in enumerate(records):
            examples.append(_record_to_example(rec, f"{path} item {i}", path.stem, i))
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LorascopeError(f"{path} line {lineno} is not valid JSON ({exc.msg})",
                                     fix="one JSON object per line") from exc
            examples.append(_record_to_example(rec, f"{path} line {lineno}", path.stem, lineno))
    if not examples:
        raise LorascopeError(f"dataset {path} has no examples", fix="give a non-empty Alpaca JSON/JSONL file")
    return examples[:limit] if limit else examples


def load_hf_dataset(name: str, split: str = "train", limit: int | None = None,
                    fields: tuple[str, str, str] = ("instruction", "input", "output")) -> list[Example]:
    """Load an Alpaca-style dataset from the Hugging Face hub (needs internet and ``pip install datasets``)."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise LorascopeError("loading a hub dataset needs the 'datasets' package",
                             fix="pip install datasets, or give a local Alpaca JSON/JSONL file") from exc
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, …
        raise LorascopeError(f"could not load dataset {name!r} from the hub ({type(exc).__name__})",
                             fix="check the name and your connection, or export it to JSONL and pass the file") from exc
    ins, inp, out = fields
    examples = []
    for i, rec in enumerate(ds):
        if limit and i >= limit:
            break
        examples.append(_record_to_example({"instruction": rec.get(ins), "input": rec.get(inp) or "",
                                            "output": rec.get(out)}, f"{name} row {i}", name, i))
    return examples


def load_dataset_spec(spec: str, limit: int | None = None, seed: int = 0) -> list[Example]:
    """``demo`` (the offline demo task), a path to Alpaca JSON/JSONL, or ``hf:NAME[:SPLIT]``."""
    from lorascope.data.demo import make_demo_dataset

    if spec == "demo":
        return make_demo_dataset(n=limit or 512, seed=seed)
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        return load_hf_dataset(parts[0], parts[1] if len(parts) > 1 else "train", limit)
    return load_alpaca(spec, limit)


def split_examples(examples: list[Example], held_out_fraction: float, seed: int = 0) -> tuple[list[Example],
                                                                                               list[Example]]:
    """Deterministic split by example (document) id hash: the same id always lands on the same side."""
    if not 0 <= held_out_fraction < 1:
        raise LorascopeError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}", fix="e.g. 0.2")
    train, held = [], []
    for ex in examples:
        h = int(hashlib.sha256(f"{seed}:{ex.id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < held_out_fraction else train).append(ex)
    return train, held
