"""Prompt formatting through the model's chat template, and token masks (prompt vs response).

A tokenized example keeps ``response_start``: tokens before it are the prompt (chat template, system prompt,
user turn, assistant header); tokens from it on are the response (answer + end-of-turn token). The LoRA loss
uses response tokens only; activation extraction can select all / prompt / response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorascope.data.examples import Example
from lorascope.errors import LorascopeError

FALLBACK_TEMPLATE = "### Instruction:\n{user}\n\n### Response:\n"


@dataclass(frozen=True)
class TokenizedExample:
    doc_id: str
    input_ids: list[int]
    response_start: int  # index of the first response token (== len(input_ids) when there is no response)

    def __len__(self) -> int:
        return len(self.input_ids)


def format_prompt(tokenizer, user_message: str) -> str:
    """The prompt text up to and including the assistant header (chat template when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_message}], tokenize=False,
                                             add_generation_prompt=True)
    return FALLBACK_TEMPLATE.format(user=user_message)


def _end_of_turn_ids(tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return [] if eos is None else [int(eos)]


def tokenize_example(tokenizer, ex: Example, max_length: int = 256, with_response: bool = True) -> TokenizedExample:
    """Token ids of prompt (+ response + end-of-turn). Truncates the response (never the prompt) to ``max_length``."""
    prompt_ids = tokenizer(format_prompt(tokenizer, ex.user_message), add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= max_length:
        raise LorascopeError(f"example {ex.id}: prompt is {len(prompt_ids)} tokens, max_length is {max_length}",
                             fix="raise max_length or shorten the instruction")
    ids = list(prompt_ids)
    if with_response and ex.output:
        resp = tokenizer(ex.output, add_special_tokens=False)["input_ids"] + _end_of_turn_ids(tokenizer)
        ids += resp[: max_length - len(ids)]
    return TokenizedExample(ex.id, ids, len(prompt_ids))
