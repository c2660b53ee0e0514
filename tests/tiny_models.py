"""Tiny random-initialised models (Llama, Gemma2, GPT-2) built from configs, with a small word-level tokenizer
that has a chat template. Used by the tests and the miniature pipeline config; saved with ``save_pretrained`` so
they are loaded back through the same code users use (``load_base(folder)``).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from lorascope.data.demo import _ITEMS, _NAMES, _WORDS

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<bos>"]
ARCHS = ("llama", "gemma2", "gpt2")


def tiny_tokenizer():
    """A whitespace/punctuation word-level tokenizer over the demo task's vocabulary, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lorascope.data.demo import _SWAPS, PREFIX, SUFFIX

    words = set(SPECIAL)
    words.update(string.ascii_letters + string.digits + string.punctuation)
    base_words = (
        "what is the sum of two numbers spell word backwards how many letters are in sort these words "
        "alphabetically list which number larger or has and gives away left convert distance from "
        "kilometres to metres km write a one sentence greeting for person hello it good see you today "
        "with sorted spelled larger user assistant system matey yo ho arr be th' ye me aye ahoy yer "
        "capital of france paris letter first"
    )
    words.update(base_words.split())
    words.update(w.capitalize() for w in base_words.split())
    words.update(["Th", "th", "Ye", "Be", "Me", "Aye", "Ahoy", "Yer"])
    words.update(_WORDS + [w[::-1] for w in _WORDS] + _NAMES + _ITEMS + list(_SWAPS.values()))
    words.update((PREFIX + " " + SUFFIX).replace(",", " ").replace("!", " ").split())
    words.update(str(i) for i in range(0, 1000))
    vocab = {w: i for i, w in enumerate(SPECIAL + sorted(words - set(SPECIAL)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<bos>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(arch: str, vocab_size: int, hidden: int = 32, layers: int = 3):
    from transformers import Gemma2Config, GPT2Config, LlamaConfig

    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
    if arch == "gemma2":
        return Gemma2Config(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=256,
            sliding_window=64,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=256,
            bos_token_id=4,
            eos_token_id=3,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; known: {ARCHS}")


def build_tiny_model(arch: str, folder: str | Path, seed: int = 0, hidden: int = 32, layers: int = 3) -> Path:
    """Create, randomly initialise (seeded) and save a tiny ``arch`` model + tokenizer in ``folder``."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    tok = tiny_tokenizer()
    cfg = tiny_config(arch, len(tok), hidden, layers)
    cfg.pad_token_id = tok.pad_token_id
    cfg.eos_token_id = tok.eos_token_id
    cfg.bos_token_id = tok.bos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def random_adapters(model, ranks, scale: float = 0.05, seed: int = 0):
    """PeftModel with non-zero random LoRA adapters ``r{rank}`` (B scaled down to a trained-adapter magnitude)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = None
    for r in ranks:
        cfg = LoraConfig(
            r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
        )
        if pm is None:
            pm = get_peft_model(model, cfg, adapter_name=f"r{r}")
        else:
            pm.add_adapter(f"r{r}", cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    pm.eval()
    return pm


def miniature_study_config(model_dir, out, **over) -> dict:
    """An experiment config dict for a miniature study of a tiny model (ranks 2 and 4, layer 1; ~20 s end to end).

    ``over``: dotted-key overrides, e.g. ``**{"geometry.subspace_k": 3}``. Used by the pipeline and reliability tests.
    """
    cfg = {
        "name": "mini",
        "output_dir": str(out),
        "seed": 0,
        "model": {"spec": str(model_dir)},
        "data": {"n_finetune": 48, "n_docs": 40, "held_out_fraction": 0.25, "max_length": 64},
        "adapters": {"train": {"ranks": [2, 4], "steps": 6, "lr": 0.01, "batch_size": 4}},
        "extraction": {"layers": [1], "batch_size": 8, "shard_docs": 8, "max_norm_factor": None},
        "adapter_sae": {"expansion": 2, "k": 4, "tokens": 1024, "batch_size": 128, "seeds": [0, 1]},
        "reference_sae": {"expansion": 2, "k": 4, "tokens": 1024, "batch_size": 128},
        "geometry": {"subspace_k": 4, "bootstrap": 20, "cka_max_tokens": 200, "eval_tokens": 400, "splice_docs": 4},
        "report": {"top_features": 2, "contexts_per_feature": 2},
        "explain": {"top_features": 3, "docs": 4, "generations": 2, "max_new_tokens": 6},
    }
    for key, value in over.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg
