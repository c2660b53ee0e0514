"""Examples (instruction, chat conversation or plain-text document) and their loaders.

File formats and auto-detection live in :mod:`lorascope.data.formats`; this module keeps the :class:`Example`
type, the Alpaca record reader, the HF hub loader and ``load_dataset_spec`` (the one entry point the CLI and the
study call).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lorascope.errors import LorascopeError


@dataclass(frozen=True)
class Example:
    """One example. ``id`` is stable and unique: documents are split by it.

    Three kinds: an instruction example (``instruction`` [+ ``input``] -> ``output``); a chat conversation
    (``messages``: (role, content) turns, roles system/user/assistant; ``instruction``/``output`` then hold the
    first user turn and the last assistant turn, for display); a plain-text document (``text``; no chat template).
    """

    id: str
    instruction: str
    input: str = ""
    output: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    text: str | None = None

    @property
    def kind(self) -> str:
        """``instruction``, ``chat`` or ``text``."""
        return "text" if self.text is not None else "chat" if self.messages else "instruction"

    @property
    def user_message(self) -> str:
        return self.instruction if not self.input else f"{self.instruction}\n\n{self.input}"


def _example_id(source: str, index: int, instruction: str) -> str:
    digest = hashlib.sha1(instruction.encode()).hexdigest()[:8]
    return f"{source}:{index}:{digest}"


def _record_to_example(rec: object, where: str, source: str, index: int) -> Example:
    if not isinstance(rec, dict):
        raise LorascopeError(
            f"{where}: expected a JSON object, got {type(rec).__name__}",
            fix="give one object per example with instruction/input/output fields",
        )
    if "instances" in rec and "output" not in rec:  # Alpaca seed-task layout: {instruction, instances:[{input,output}]}
        inst = rec.get("instances") or [{}]
        rec = {"instruction": rec.get("instruction"), **(inst[0] if isinstance(inst, list) and inst else {})}
    missing = [k for k in ("instruction", "output") if not isinstance(rec.get(k), str)]
    if missing:
        raise LorascopeError(
            f"{where}: missing field(s) {', '.join(missing)}",
            fix="each example needs string fields 'instruction' and 'output' ('input' optional)",
        )
    inp = rec.get("input") or ""
    if not isinstance(inp, str):
        raise LorascopeError(f"{where}: field 'input' must be a string", fix='use "" for no input')
    return Example(_example_id(source, index, rec["instruction"]), rec["instruction"], inp, rec["output"])


def load_examples(
    path: str | Path, limit: int | None = None, columns: Mapping[str, str] | None = None, fmt: str | None = None
) -> list[Example]:
    """Examples of a dataset file in any supported format, auto-detected (see :mod:`lorascope.data.formats`).

    ``.json`` (a list of records), ``.jsonl`` (one record per line) or ``.txt``/``.md`` (one plain-text document
    per blank-line-separated paragraph). UTF-8 with or without BOM. Errors name the file and the line.
    """
    from lorascope.data.formats import records_to_examples
    from lorascope.data.records import read_records

    path = Path(path)
    records = read_records(path)
    if not records:
        raise LorascopeError(f"dataset {path} has no examples", fix="give a non-empty dataset file")
    _, examples = records_to_examples(records, path.stem, columns, fmt)
    return examples[:limit] if limit else examples


def load_alpaca(path: str | Path, limit: int | None = None) -> list[Example]:
    """Load Alpaca-format examples from a JSON list or a JSONL file (one object per line).

    Also accepts the Alpaca seed-task layout (``instruction`` + ``instances[0].input/output``). A record with a
    missing field raises an error naming the file and line (JSONL) or index (JSON).
    """
    return load_examples(path, limit, fmt="alpaca")


def load_hf_dataset(
    name: str, split: str = "train", limit: int | None = None, columns: Mapping[str, str] | None = None
) -> list[Example]:
    """Load a dataset from the Hugging Face hub (needs internet and ``pip install datasets``).

    The format is auto-detected like a file's; ``columns`` maps lorascope's field names to the dataset's
    (``{"instruction": "question", "output": "answer"}`` for GSM8K).
    """
    from lorascope.data.formats import records_to_examples
    from lorascope.data.records import Record

    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise LorascopeError(
            "loading a hub dataset needs the 'datasets' package",
            fix="pip install datasets, or give a local JSON/JSONL/TXT file",
        ) from exc
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, …
        raise LorascopeError(
            f"could not load dataset {name!r} from the hub ({type(exc).__name__})",
            fix="check the name and your connection, or export it to JSONL and pass the file",
        ) from exc
    records = []
    for i, rec in enumerate(ds):
        if limit and i >= limit:
            break
        records.append(Record(dict(rec), f"{name} row {i}", i))
    return records_to_examples(records, name, columns)[1]


def load_dataset_spec(
    spec: str, limit: int | None = None, seed: int = 0, columns: Mapping[str, str] | None = None
) -> list[Example]:
    """``demo`` (the offline demo task), a dataset file (any supported format), or ``hf:NAME[:SPLIT]``.

    ``columns`` renames the dataset's field names to lorascope's before format detection.
    """
    from lorascope.data.demo import make_demo_dataset

    if spec == "demo":
        return make_demo_dataset(n=limit or 512, seed=seed)
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        return load_hf_dataset(parts[0], parts[1] if len(parts) > 1 else "train", limit, columns)
    return load_examples(spec, limit, columns)


def split_examples(
    examples: list[Example], held_out_fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Deterministic split by example (document) id hash: the same id always lands on the same side."""
    if not 0 <= held_out_fraction < 1:
        raise LorascopeError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}", fix="e.g. 0.2")
    train, held = [], []
    for ex in examples:
        h = int(hashlib.sha256(f"{seed}:{ex.id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < held_out_fraction else train).append(ex)
    return train, held
