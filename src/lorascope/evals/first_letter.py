"""The first-letter task of Chanin et al. ("A is for Absorption") as SAEBench runs it, and its ground-truth
probe.

Vocabulary: every token of the tokenizer whose text is alphabetic (optionally after one leading space), as
SAEBench's ``get_alpha_tokens``. Words are split 80/20 into train/test **by normalised word** (``" Cat"``,
``"cat"`` and ``" cat"`` share a side), so no word is in both. Each word gets one in-context prompt in
SAEBench's few-shot style: ``max_icl`` examples from the same split, one per line,
``"{word} has the first letter: C"``, then ``"{word} has the first letter:"`` for the word itself. The word
token's position is found from the tokenizer's character offsets (never a hard-coded index such as
SAEBench's ``-6``, which is Gemma-specific); words that do not stay a single token inside the prompt are
dropped and counted.

The residual read at that position only depends on the tokens up to the word (causal attention), so the
forward pass is run on the prompt truncated just after the word: identical numbers, fewer tokens.

Probe: a 26-way one-vs-rest logistic regression on the residuals (SAEBench trains the same one-vs-rest model
with class-balancing positive weights; here it is fitted deterministically by full-batch L-BFGS with an L2
penalty on centred, isotropically scaled inputs, then folded back to raw residual units). Per-letter F1 counts
a test word as predicted positive when its letter logit is > 0.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lorascope.errors import LorascopeError

LETTERS = string.ascii_lowercase
_ALPHA = set(string.ascii_letters)
DEFAULT_TEMPLATE = "{word} has the first letter:"


# ---- vocabulary and split ----------------------------------------------------------------------------------
def alpha_vocabulary(tokenizer, allow_leading_space: bool = True) -> list[str]:
    """Texts of the tokenizer's single tokens that are purely alphabetic (SAEBench ``get_alpha_tokens``).

    Ordered by token id, de-duplicated; special tokens never qualify (they contain non-letters).
    """
    vocab = tokenizer.get_vocab()
    out: list[str] = []
    seen: set[str] = set()
    for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        text = tokenizer.convert_tokens_to_string([tok])
        core = text[1:] if allow_leading_space and text.startswith(" ") else text
        if core and all(c in _ALPHA for c in core) and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def first_letter_label(word: str) -> int:
    """Index in ``LETTERS`` of the word's first alphabetic character (case-insensitive)."""
    for c in word:
        if c.isalpha():
            return LETTERS.index(c.lower())
    raise LorascopeError(f"word {word!r} has no letter", fix="pass alphabetic words")


def answer_text(word: str) -> str:
    """SAEBench's answer format: a space and the capitalised first letter (``"cat"`` -> ``" C"``)."""
    return " " + LETTERS[first_letter_label(word)].upper()


def split_words(
    words: Sequence[str], train_fraction: float = 0.8, seed: int = 0, max_words: int | None = None
) -> tuple[list[str], list[str]]:
    """Split words into train/test by normalised word (strip + lower-case), so no word is on both sides.

    ``max_words`` keeps a seeded random subset of whole groups first (for CPU budgets). Returns lists in
    vocabulary order.
    """
    if not 0 < train_fraction < 1:
        raise LorascopeError(f"train_fraction must be in (0, 1) (got {train_fraction})", fix="use e.g. 0.8")
    groups: dict[str, list[str]] = {}
    for w in words:
        groups.setdefault(w.strip().lower(), []).append(w)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    if max_words is not None:
        kept, n = [], 0
        for k in keys:
            if n >= max_words:
                break
            kept.append(k)
            n += len(groups[k])
        keys = kept
    cut = int(round(len(keys) * train_fraction))
    train_keys, test_keys = set(keys[:cut]), set(keys[cut:])
    return (
        [w for w in words if w.strip().lower() in train_keys],
        [w for w in words if w.strip().lower() in test_keys],
    )


# ---- prompts -----------------------------------------------------------------------------------------------
def icl_prompt(
    word: str,
    examples: Sequence[str],
    rng: random.Random,
    template: str = DEFAULT_TEMPLATE,
    max_icl: int = 10,
    separator: str = "\n",
    prepend_separator: bool = False,
) -> tuple[str, int, int]:
    """A few-shot prompt for ``word``; returns (text, start, end) with text[start:end] == word.

    ``max_icl`` examples are drawn without replacement from ``examples`` (never the word itself).
    """
    if "{word}" not in template:
        raise LorascopeError(
            f"prompt template {template!r} has no {{word}} placeholder",
            fix="use e.g. '{word} has the first letter:'",
        )
    pool = [e for e in examples if e != word]
    chosen = rng.sample(pool, min(max_icl, len(pool)))
    lines = [template.format(word=e) + answer_text(e) for e in chosen]
    head = (separator if prepend_separator else "") + "".join(line + separator for line in lines)
    start = len(head) + template.index("{word}")
    return head + template.format(word=word), start, start + len(word)


def word_token_position(tokenizer, text: str, start: int, end: int) -> tuple[list[int], int] | None:
    """(input_ids, position of the token that is exactly the word text[start:end]), or None when the word is
    not one token in this context. Uses the tokenizer's character offsets."""
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    word = text[start:end]
    core_start = start + (len(word) - len(word.lstrip()))
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > core_start]
    if len(hits) != 1:
        return None
    pos = hits[0]
    decoded = tokenizer.decode([ids[pos]])
    if decoded != word and decoded.strip() != word.strip():
        return None
    return ids, pos


@dataclass
class FirstLetterSplit:
    """One side of the split: per prompt the word, its label (0..25), token ids, the word token position."""

    words: list[str]
    labels: torch.Tensor  # long [N]
    input_ids: list[list[int]]
    positions: list[int]
    prompts: list[str] = field(repr=False, default_factory=list)

    def __len__(self) -> int:
        return len(self.words)


@dataclass
class FirstLetterData:
    train: FirstLetterSplit
    test: FirstLetterSplit
    dropped: list[str]  # words that were not a single token inside their prompt
    template: str = DEFAULT_TEMPLATE


def _build_split(
    tokenizer,
    words: list[str],
    rng: random.Random,
    template: str,
    max_icl: int,
    separator: str,
    dropped: list[str],
) -> FirstLetterSplit:
    kept, labels, ids, pos, prompts = [], [], [], [], []
    for w in words:
        text, a, b = icl_prompt(w, words, rng, template, max_icl, separator)
        found = word_token_position(tokenizer, text, a, b)
        if found is None:
            dropped.append(w)
            continue
        kept.append(w)
        labels.append(first_letter_label(w))
        ids.append(found[0])
        pos.append(found[1])
        prompts.append(text)
    return FirstLetterSplit(kept, torch.tensor(labels, dtype=torch.long), ids, pos, prompts)


def build_first_letter_data(
    tokenizer,
    *,
    max_words: int | None = None,
    train_fraction: float = 0.8,
    seed: int = 0,
    template: str = DEFAULT_TEMPLATE,
    max_icl: int = 10,
    separator: str = "\n",
    words: Sequence[str] | None = None,
) -> FirstLetterData:
    """The first-letter dataset: vocabulary (or ``words``), split by word, one ICL prompt per word."""
    vocab = list(words) if words is not None else alpha_vocabulary(tokenizer)
    if len(vocab) < 4:
        raise LorascopeError(
            f"only {len(vocab)} alphabetic tokens in the vocabulary",
            fix="use a tokenizer with a word vocabulary",
        )
    train_w, test_w = split_words(vocab, train_fraction, seed, max_words)
    rng = random.Random(seed + 1)
    dropped: list[str] = []
    train = _build_split(tokenizer, train_w, rng, template, max_icl, separator, dropped)
    test = _build_split(tokenizer, test_w, rng, template, max_icl, separator, dropped)
    return FirstLetterData(train, test, dropped, template)


# ---- residuals ---------------------------------------------------------------------------------------------
@torch.no_grad()
def word_residuals(
    model: torch.nn.Module,
    split: FirstLetterSplit,
    layer: int,
    batch_size: int = 32,
    autocast_dtype: torch.dtype | None = None,
    pad_token_id: int = 0,
    collect: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Residual stream after block ``layer`` at each prompt's word token: float32 [N, d_model].

    Prompts are cut just after the word (exact by causality), sorted by length and right-padded. ``collect``:
    if a dict is given, it receives {prompt index: float32 [T_i, d]} residuals at every position of the cut
    prompt (e.g. to train an SAE on the same forward passes).
    """
    from lorascope.models.residual import ResidualCapture

    capture = ResidualCapture(model, [layer])
    n = len(split)
    out: torch.Tensor | None = None
    order = sorted(range(n), key=lambda i: (split.positions[i], i))
    model_was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            lens = [split.positions[i] + 1 for i in idx]
            width = max(lens)
            ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, (i, ln) in enumerate(zip(idx, lens, strict=True)):
                ids[r, :ln] = torch.tensor(split.input_ids[i][:ln])
                mask[r, :ln] = 1
            ids, mask = ids.to(device), mask.to(device)
            if autocast_dtype is not None:
                with torch.autocast(device.type, dtype=autocast_dtype):
                    hidden = capture(ids, mask)[layer]
            else:
                hidden = capture(ids, mask)[layer]
            hidden = hidden.cpu()
            rows = hidden[torch.arange(len(idx)), torch.tensor(lens) - 1].float()
            if collect is not None:
                for r, (i, ln) in enumerate(zip(idx, lens, strict=True)):
                    collect[i] = hidden[r, :ln].float().clone()
            if out is None:
                out = torch.empty(n, rows.shape[1], dtype=torch.float32)
            out[torch.tensor(idx)] = rows
    finally:
        model.train(model_was_training)
    if out is None:
        raise LorascopeError("no prompts to run", fix="use a larger vocabulary or max_words")
    return out


def binary_f1(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """F1 of boolean predictions (0.0 when there are no true or predicted positives, as sklearn)."""
    pred, truth = pred.bool(), truth.bool()
    tp = int((pred & truth).sum())
    denom = int(pred.sum()) + int(truth.sum())
    return 0.0 if denom == 0 else 2.0 * tp / denom


@dataclass
class LetterProbe:
    """The ground-truth first-letter probe: logits = x @ weight.T + bias, weight [26, d], bias [26]."""

    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.weight.T + self.bias

    def direction(self, letter: int) -> torch.Tensor:
        """Unit-norm probe direction of one letter [d]."""
        w = self.weight[letter]
        return w / w.norm().clamp_min(1e-12)


def train_letter_probe(x: torch.Tensor, labels: torch.Tensor, l2: float = 1e-2, max_iter: int = 500) -> LetterProbe:
    """26-way one-vs-rest logistic probe on residuals x [N, d], labels [N] in 0..25: per letter, balanced
    logistic regression minimising  mean_i s_i·BCE_i + (l2/2)·‖w‖²  on standardised x (sklearn's objective with
    C = 1 / (l2·N); :class:`lorascope.evals.probe.LogisticProbe`).

    Default ``l2`` = 1e-2 (standardised units): chosen by 4-fold CV grouped by word on SmolLM2-135M layer-12
    train words (mean CV F1 0.683 vs 0.672 at 1e-3 and 0.655 at 0.3; benchmarks/absorption_smollm2.py).
    """
    from lorascope.evals.probe import LogisticProbe

    y = torch.nn.functional.one_hot(labels.long(), num_classes=len(LETTERS))
    probe = LogisticProbe(c=1.0 / (l2 * x.shape[0]), standardize=True, max_iter=max_iter).fit(x, y)
    return LetterProbe(probe.weight, probe.bias)


def per_letter_f1(probe: LetterProbe, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """F1 of each letter's one-vs-rest decision (logit > 0) on x [N, d]; NaN for letters not in labels."""
    logits = probe.logits(x)
    out: dict[str, float] = {}
    for c, letter in enumerate(LETTERS):
        truth = labels == c
        out[letter] = binary_f1(logits[:, c] > 0, truth) if bool(truth.any()) else float("nan")
    return out


__all__ = [
    "DEFAULT_TEMPLATE",
    "LETTERS",
    "FirstLetterData",
    "FirstLetterSplit",
    "LetterProbe",
    "alpha_vocabulary",
    "answer_text",
    "binary_f1",
    "build_first_letter_data",
    "first_letter_label",
    "icl_prompt",
    "per_letter_f1",
    "split_words",
    "train_letter_probe",
    "word_residuals",
    "word_token_position",
]
