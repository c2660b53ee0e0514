"""Prompt formatting through the model's chat template, token masks (prompt vs response), and the long-example
policy.

A tokenized example keeps ``response_start``: tokens before it are the prompt (chat template, system prompt,
user turn, assistant header); tokens from it on are the response. The LoRA loss uses the ``label_spans``
(default: everything from ``response_start``); activation extraction can select all / prompt / response tokens.

Kinds (see :class:`lorascope.data.examples.Example`):

- instruction: prompt = chat template of the user message + assistant header; response = output + end-of-turn.
- chat (multi-turn): the conversation rendered with the chat template; every assistant turn (its text and its
  end-of-turn markup) is trained, nothing else; ``response_start`` = the first assistant turn. Each turn's span is
  found by rendering the conversation up to that turn (the template's own text, never re-implemented).
- text: the document tokenized as is (the tokenizer's own BOS, no chat template); every token is trained and
  ``response_start`` = 0 (a generic corpus: use ``tokens: all`` when extracting).

Long examples (:func:`tokenize_examples`), policy ``truncate`` (default): the response (chat: everything after the
first assistant header; text: the tail) is cut to fit ``max_length``; an example whose *prompt alone* does not
fit is skipped. ``skip``: every example that does not fit is skipped. ``error``: the first one aborts with its
id. The counts (kept / truncated / skipped) come back in a :class:`LengthReport`; one long example never aborts
a run under the first two policies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lorascope.data.examples import Example
from lorascope.errors import LorascopeError

FALLBACK_TEMPLATE = "### Instruction:\n{user}\n\n### Response:\n"
LENGTH_POLICIES = ("truncate", "skip", "error")


@dataclass(frozen=True)
class TokenizedExample:
    doc_id: str
    input_ids: list[int]
    response_start: int  # index of the first response token (== len(input_ids) when there is no response)
    label_spans: tuple[tuple[int, int], ...] = ()  # trained [start, end) spans; () -> [response_start, len)
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    def trained_spans(self) -> tuple[tuple[int, int], ...]:
        return self.label_spans or ((self.response_start, len(self.input_ids)),)


class PromptTooLong(LorascopeError):
    """The prompt of one example alone exceeds ``max_length`` (skipped under the default policy)."""


@dataclass
class LengthReport:
    """What the long-example policy did: kept whole, truncated, skipped (with the ids of the latter two)."""

    max_length: int
    policy: str
    kept: int = 0
    truncated_ids: list[str] = field(default_factory=list)
    skipped_ids: list[str] = field(default_factory=list)

    @property
    def truncated(self) -> int:
        return len(self.truncated_ids)

    @property
    def skipped(self) -> int:
        return len(self.skipped_ids)

    def summary(self) -> str:
        return (
            f"{self.kept} kept, {self.truncated} truncated, {self.skipped} skipped "
            f"(max_length {self.max_length}, policy {self.policy})"
        )

    def to_dict(self) -> dict:
        return {
            "max_length": self.max_length,
            "policy": self.policy,
            "kept": self.kept,
            "truncated": self.truncated,
            "skipped": self.skipped,
            "truncated_ids": self.truncated_ids[:20],
            "skipped_ids": self.skipped_ids[:20],
        }


def render_chat(tokenizer, turns: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
    """The chat template's text for ``turns``; a template that refuses a system turn gets it folded into the
    first user turn; no template: a plain ``### Instruction`` / ``### Response`` layout."""
    msgs = [{"role": r, "content": c} for r, c in turns]
    if not getattr(tokenizer, "chat_template", None):
        return _fallback_render(tokenizer, msgs, add_generation_prompt)
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception:
        if not msgs or msgs[0]["role"] != "system" or len(msgs) < 2:
            raise
        merged = [{"role": msgs[1]["role"], "content": f"{msgs[0]['content']}\n\n{msgs[1]['content']}"}, *msgs[2:]]
        return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=add_generation_prompt)


def _fallback_render(tokenizer, msgs: list[dict], add_generation_prompt: bool) -> str:
    eos = getattr(tokenizer, "eos_token", None) or ""
    parts = []
    for m in msgs:
        if m["role"] == "system":
            parts.append(f"{m['content']}\n\n")
        elif m["role"] == "user":
            parts.append(FALLBACK_TEMPLATE.format(user=m["content"]))
        else:
            parts.append(f"{m['content']}{eos}\n\n")
    text = "".join(parts)
    if add_generation_prompt and msgs and msgs[-1]["role"] == "assistant":
        text += "### Response:\n"
    return text


def format_prompt(tokenizer, user_message: str) -> str:
    """The prompt text up to and including the assistant header (chat template when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
        )
    return FALLBACK_TEMPLATE.format(user=user_message)


def _end_of_turn_ids(tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return [] if eos is None else [int(eos)]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _chat_segments(tokenizer, ex: Example) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) segments: assistant turns are trained, the rest is not."""
    turns = ex.messages
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        head = render_chat(tokenizer, turns[:i], add_generation_prompt=True) if i else ""
        full = render_chat(tokenizer, turns[: i + 1], add_generation_prompt=False)
        if not head.startswith(done) or not full.startswith(head):
            raise LorascopeError(
                f"example {ex.id}: this tokenizer's chat template re-renders earlier turns, so "
                "assistant turns cannot be located",
                fix="split the conversation into single-turn examples, or use a model whose template appends turns",
            )
        segments += [(head[len(done) :], False), (full[len(head) :], True)]
        done = full
    rest = render_chat(tokenizer, turns, add_generation_prompt=False)
    if rest.startswith(done) and len(rest) > len(done):
        segments.append((rest[len(done) :], False))
    if not segments:  # no assistant turn: a prompt only
        segments.append((rest, False))
    return segments


def _tokenize_chat(tokenizer, ex: Example, max_length: int, with_response: bool) -> TokenizedExample:
    segments = _chat_segments(tokenizer, ex)
    prompt_ids = _ids(tokenizer, segments[0][0])
    if len(prompt_ids) >= max_length:
        raise PromptTooLong(
            f"example {ex.id}: prompt is {len(prompt_ids)} tokens, max_length is {max_length}",
            fix="raise max_length, shorten the prompt, or keep the default policy (skip it)",
        )
    if not with_response or len(segments) == 1 or not segments[1][1]:
        return TokenizedExample(ex.id, prompt_ids, len(prompt_ids))
    ids, spans, truncated = list(prompt_ids), [], False
    for text, trained in segments[1:]:
        seg = _ids(tokenizer, text)
        room = max_length - len(ids)
        if len(seg) > room:
            seg, truncated = seg[:room], True
        if trained and seg:
            spans.append((len(ids), len(ids) + len(seg)))
        ids += seg
        if truncated:
            break
    return TokenizedExample(ex.id, ids, len(prompt_ids), tuple(spans), truncated)


def tokenize_example(tokenizer, ex: Example, max_length: int = 256, with_response: bool = True) -> TokenizedExample:
    """Token ids of prompt (+ response), cut to ``max_length``: the response is truncated, never the prompt
    (a prompt that does not fit raises :class:`PromptTooLong`)."""
    if ex.kind == "text":
        ids = list(tokenizer(ex.text)["input_ids"])
        return TokenizedExample(ex.id, ids[:max_length], 0, (), len(ids) > max_length)
    if ex.kind == "chat":
        return _tokenize_chat(tokenizer, ex, max_length, with_response)
    prompt_ids = _ids(tokenizer, format_prompt(tokenizer, ex.user_message))
    if len(prompt_ids) >= max_length:
        raise PromptTooLong(
            f"example {ex.id}: prompt is {len(prompt_ids)} tokens, max_length is {max_length}",
            fix="raise max_length, shorten the instruction, or keep the default policy (skip it)",
        )
    ids, truncated = list(prompt_ids), False
    if with_response and ex.output:
        resp = _ids(tokenizer, ex.output) + _end_of_turn_ids(tokenizer)
        truncated = len(resp) > max_length - len(ids)
        ids += resp[: max_length - len(ids)]
    return TokenizedExample(ex.id, ids, len(prompt_ids), (), truncated)


def tokenize_examples(
    tokenizer, examples: Sequence[Example], max_length: int, policy: str = "truncate", with_response: bool = True
) -> tuple[list[TokenizedExample], LengthReport]:
    """Tokenize every example under the long-example ``policy`` (module docstring); needs the tokenizer only,
    so it runs before any model is loaded. Returns the kept examples and the counts."""
    if policy not in LENGTH_POLICIES:
        raise LorascopeError(f"unknown long-example policy {policy!r}", fix=f"use one of {', '.join(LENGTH_POLICIES)}")
    report = LengthReport(max_length, policy)
    out = []
    for ex in examples:
        try:
            t = tokenize_example(tokenizer, ex, max_length, with_response)
        except PromptTooLong:
            if policy == "error":
                raise
            report.skipped_ids.append(ex.id)
            continue
        if t.truncated and policy != "truncate":
            if policy == "error":
                raise LorascopeError(
                    f"example {ex.id} is longer than max_length {max_length}",
                    fix="raise max_length, or use the 'truncate' or 'skip' policy",
                )
            report.skipped_ids.append(ex.id)
            continue
        if t.truncated:
            report.truncated_ids.append(ex.id)
        else:
            report.kept += 1
        out.append(t)
    return out, report


__all__ = [
    "FALLBACK_TEMPLATE",
    "LENGTH_POLICIES",
    "LengthReport",
    "PromptTooLong",
    "TokenizedExample",
    "format_prompt",
    "render_chat",
    "tokenize_example",
    "tokenize_examples",
]
