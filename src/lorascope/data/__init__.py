"""Fine-tuning and activation data: examples, loaders, the offline demo task, chat formatting and token masks."""

from lorascope.data.chat import TokenizedExample, format_prompt, tokenize_example
from lorascope.data.demo import DEMO_TASK_DESCRIPTION, demo_behaviour, make_demo_dataset
from lorascope.data.examples import Example, load_alpaca, load_dataset_spec, load_hf_dataset, split_examples

__all__ = [
    "DEMO_TASK_DESCRIPTION", "Example", "TokenizedExample", "demo_behaviour", "format_prompt", "load_alpaca",
    "load_dataset_spec", "load_hf_dataset", "make_demo_dataset", "split_examples", "tokenize_example",
]
