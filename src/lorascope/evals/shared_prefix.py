"""The first-letter task over a tokenizer's whole alphabetic vocabulary at CPU cost: words share few-shot prefixes.

SAEBench gives every word its own random few-shot prefix, so each word costs a forward pass of the whole prompt
(~80 tokens with 10 examples). Over SmolLM2's ~47k alphabetic tokens that is ~3.7M tokens — hours on two CPU
cores. Here the words of one split are shuffled and cut into groups of ``words_per_prefix``; each group gets one
random prefix of ``max_icl`` examples drawn from the same split (never a word of the group), so every prompt is
still "examples from the same split, then the word", as in SAEBench. The prefix runs once, its key/value cache is
repeated over the group, and each word costs one token; every forward stops after the block that is read. The
residual at the word token is exactly what a separate forward of that prompt gives (causal attention; checked
in tests against ``word_residuals``). What changes is only the sampling: words of a group see the same examples
instead of independent draws. SmolLM2: 47,078 alphabetic tokens, none dropped, 737 prefixes of 80 tokens.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence
from typing import NamedTuple

import torch

from lorascope.errors import LorascopeError
from lorascope.evals.first_letter import (
    DEFAULT_TEMPLATE,
    FirstLetterData,
    FirstLetterSplit,
    alpha_vocabulary,
    answer_text,
    first_letter_label,
    split_words,
    word_token_position,
)


class PromptFormat(NamedTuple):
    """How one first-letter example is written: ``template`` holds ``{word}``; examples are joined by ``separator``."""

    template: str = DEFAULT_TEMPLATE
    separator: str = "\n"


def build_shared_prefix_data(
    tokenizer,
    *,
    words_per_prefix: int = 64,
    max_words: int | None = None,
    train_fraction: float = 0.8,
    seed: int = 0,
    max_icl: int = 10,
    prompt_format: PromptFormat = PromptFormat(),
    words: Sequence[str] | None = None,
) -> FirstLetterData:
    """First-letter data (default: the whole alphabetic vocabulary, split by word) with one few-shot prefix per
    group of ``words_per_prefix`` words. Words that are not one token right after their prefix are dropped."""
    template, separator = prompt_format
    if words_per_prefix < 1:
        raise LorascopeError(f"words_per_prefix must be >= 1 (got {words_per_prefix})", fix="use e.g. 64")
    vocab = list(words) if words is not None else alpha_vocabulary(tokenizer)
    if len(vocab) < 4:
        raise LorascopeError(
            f"only {len(vocab)} alphabetic tokens in the vocabulary", fix="use a tokenizer with a word vocabulary"
        )
    train_w, test_w = split_words(vocab, train_fraction, seed, max_words)
    rng = random.Random(seed + 1)
    dropped: list[str] = []
    sides = [
        _shared_split(tokenizer, w, rng, template, max_icl, separator, words_per_prefix, dropped)
        for w in (train_w, test_w)
    ]
    return FirstLetterData(sides[0], sides[1], dropped, template)


def _shared_split(
    tokenizer,
    words: list[str],
    rng: random.Random,
    template: str,
    max_icl: int,
    separator: str,
    per_prefix: int,
    dropped: list[str],
) -> FirstLetterSplit:
    order = list(words)
    rng.shuffle(order)
    per_prefix = max(1, min(per_prefix, len(words) - max_icl))  # every group keeps max_icl examples to draw from
    kept, ids, pos, prompts = [], [], [], []
    for lo in range(0, len(order), per_prefix):
        group = order[lo : lo + per_prefix]
        members = set(group)
        pool = [w for w in words if w not in members]
        examples = rng.sample(pool, min(max_icl, len(pool)))
        head = "".join(template.format(word=e) + answer_text(e) + separator for e in examples)
        head_ids = tokenizer(head)["input_ids"]
        start = len(head) + template.index("{word}")
        for w in group:
            text = head + template.format(word=w)
            found = word_token_position(tokenizer, text, start, start + len(w))
            if found is None or found[1] != len(head_ids) or found[0][: found[1]] != head_ids:
                dropped.append(w)
                continue
            kept.append(w)
            ids.append(found[0][: found[1] + 1])
            pos.append(found[1])
            prompts.append(text)
    labels = torch.tensor([first_letter_label(w) for w in kept], dtype=torch.long)
    return FirstLetterSplit(kept, labels, ids, pos, prompts)


def shares_prefixes(split: FirstLetterSplit) -> bool:
    """Whether some prompts of ``split`` share their prefix (then ``shared_prefix_residuals`` saves work)."""
    prefixes = {tuple(ids[:p]) for ids, p in zip(split.input_ids, split.positions, strict=True)}
    return len(prefixes) < len(split)


class _Stop(Exception):
    """Raised by the hook on block ``layer``: nothing above it is needed."""


@torch.no_grad()
def shared_prefix_residuals(
    model: torch.nn.Module, split: FirstLetterSplit, layer: int, batch_size: int = 256
) -> torch.Tensor:
    """Residual stream after block ``layer`` at each prompt's word token, float32 [N, d_model]: prompts with the
    same prefix (``input_ids[:position]``) run the prefix once (its cache filled up to block ``layer``) and the
    words as one-token continuations; every forward stops after block ``layer``."""
    from transformers import DynamicCache

    from lorascope.models.residual import check_layers, decoder_blocks

    layer = check_layers(model, [layer])[0]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, p) in enumerate(zip(split.input_ids, split.positions, strict=True)):
        groups.setdefault(tuple(ids[:p]), []).append(i)
    if not groups:
        raise LorascopeError("no prompts to run", fix="use a larger vocabulary or max_words")
    cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    def run(ids: torch.Tensor, cache) -> torch.Tensor:
        captured.clear()
        try:
            model(input_ids=ids, use_cache=cache is not None, **({cache_key: cache} if cache is not None else {}))
        except _Stop:
            pass
        return captured[0]

    device = next(model.parameters()).device
    handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    was_training = model.training
    model.eval()
    out = None
    try:
        for prefix, members in groups.items():
            prefix_cache = None
            if prefix:
                prefix_cache = DynamicCache()
                run(torch.tensor([prefix], device=device), prefix_cache)
            for lo in range(0, len(members), batch_size):
                idx = members[lo : lo + batch_size]
                words = torch.tensor([[split.input_ids[i][split.positions[i]]] for i in idx], device=device)
                cache = _repeat_cache(prefix_cache, len(idx)) if prefix_cache is not None else None
                hs = run(words, cache)[:, -1].float().cpu()
                if out is None:
                    out = torch.empty(len(split), hs.shape[1], dtype=torch.float32)
                out[torch.tensor(idx)] = hs
    finally:
        handle.remove()
        model.train(was_training)
    return out


def _repeat_cache(cache, n: int):
    """A copy of a batch-1 key/value cache repeated to batch ``n`` (the original stays untouched)."""
    import copy

    rep = copy.deepcopy(cache)
    rep.batch_repeat_interleave(n)
    return rep


__all__ = ["PromptFormat", "build_shared_prefix_data", "shared_prefix_residuals", "shares_prefixes"]
