"""Build the small inputs the example configs in this folder point at (offline, ~1 minute on a laptop CPU).

    python configs/examples/build_examples.py runs/examples-data

writes into that folder:

- ``chat.jsonl``      48 multi-turn conversations in the chat ``messages`` format (system + two user/assistant turns)
- ``corpus.txt``      plain text, one document per paragraph (the activation corpus of ``chat_jsonl.yaml``)
- ``tiny-base/``      a tiny random Llama (3 blocks, width 32) with a word-level tokenizer and a chat template
- ``tiny-full-ft/``   that model after full fine-tuning (every weight trained) on the chat data: ``full_finetune.yaml``
- ``tiny-lora-run/checkpoint-{4,8,16}/``  LoRA checkpoints of one training run: ``checkpoint_sequence.yaml``

Training is deterministic, so the checkpoint at step N equals step N of one longer run (same seed, same data order).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

STEPS = (4, 8, 16)


def build_chat_data(folder: Path, n: int = 48) -> tuple[Path, Path]:
    from lorascope.data import make_demo_dataset

    folder.mkdir(parents=True, exist_ok=True)
    demo, plain = make_demo_dataset(2 * n, seed=11), make_demo_dataset(2 * n, seed=11, pirate=False)
    with open(folder / "chat.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n):
            a, b = demo[2 * i], demo[2 * i + 1]
            msgs = [
                {"role": "system", "content": "You are a pirate."},
                {"role": "user", "content": a.user_message},
                {"role": "assistant", "content": a.output},
                {"role": "user", "content": b.user_message},
                {"role": "assistant", "content": b.output},
            ]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    paragraphs = [" ".join(x for x in (ex.instruction, ex.input, ex.output) if x) for ex in plain]
    (folder / "corpus.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return folder / "chat.jsonl", folder / "corpus.txt"


def _tiny_model_builder():
    """The tests' tiny random model builder (tests/tiny_models.py in the repository: these inputs are test-sized)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from tiny_models import build_tiny_model

    return build_tiny_model


def build_full_finetune(folder: Path, steps: int = 30) -> tuple[Path, Path]:
    """A tiny base, and a copy of it with every weight trained on the chat data (a real full fine-tune)."""
    from lorascope.data import load_examples
    from lorascope.models import load_base
    from lorascope.models.lora import collate, prepare_training_data, response_nll

    base_dir = _tiny_model_builder()("llama", folder / "tiny-base", seed=0)
    chat, _ = build_chat_data(folder)
    ft = load_base(base_dir)
    data, _ = prepare_training_data(ft.tokenizer, load_examples(chat), max_length=96)
    torch.manual_seed(0)
    model = ft.model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = collate([data[(step * 8 + j) % len(data)] for j in range(8)], ft.tokenizer.pad_token_id)
        nll, count = response_nll(model, batch)
        opt.zero_grad()
        (nll / max(count, 1)).backward()
        opt.step()
    model.eval()
    model.save_pretrained(folder / "tiny-full-ft")
    ft.tokenizer.save_pretrained(folder / "tiny-full-ft")
    return base_dir, folder / "tiny-full-ft"


def build_checkpoints(folder: Path) -> Path:
    """LoRA checkpoints ``checkpoint-{4,8,16}`` of one deterministic training run on the chat data."""
    from lorascope.data import load_examples
    from lorascope.models import load_base, train_lora

    base_dir = folder / "tiny-base"
    if not (base_dir / "config.json").is_file():
        _tiny_model_builder()("llama", base_dir, seed=0)
    chat, _ = build_chat_data(folder)
    base, run = load_base(base_dir), folder / "tiny-lora-run"
    for steps in STEPS:
        train_lora(
            base,
            load_examples(chat),
            4,
            output_dir=run / f"checkpoint-{steps}",
            steps=steps,
            lr=1e-2,
            batch_size=4,
            max_length=96,
            progress=False,
        )
    return run


def build_all(folder: str | Path) -> Path:
    folder = Path(folder)
    build_chat_data(folder)
    build_full_finetune(folder)
    build_checkpoints(folder)
    return folder


if __name__ == "__main__":
    print(build_all(sys.argv[1] if len(sys.argv) > 1 else "runs/examples-data"))
