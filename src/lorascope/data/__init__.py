"""Fine-tuning and activation data: examples in several formats (auto-detected), loaders, the offline demo task,
chat formatting, token masks and the long-example policy."""

from lorascope.data.chat import (
    LENGTH_POLICIES,
    LengthReport,
    PromptTooLong,
    TokenizedExample,
    format_prompt,
    tokenize_example,
    tokenize_examples,
)
from lorascope.data.demo import DEMO_TASK_DESCRIPTION, demo_behaviour, make_demo_dataset
from lorascope.data.examples import (
    Example,
    load_alpaca,
    load_dataset_spec,
    load_examples,
    load_hf_dataset,
    split_examples,
)
from lorascope.data.formats import FORMATS, detect_format

__all__ = [
    "DEMO_TASK_DESCRIPTION",
    "FORMATS",
    "LENGTH_POLICIES",
    "Example",
    "LengthReport",
    "PromptTooLong",
    "TokenizedExample",
    "demo_behaviour",
    "detect_format",
    "format_prompt",
    "load_alpaca",
    "load_dataset_spec",
    "load_examples",
    "load_hf_dataset",
    "make_demo_dataset",
    "split_examples",
    "tokenize_example",
    "tokenize_examples",
]
