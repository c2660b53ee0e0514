"""A tiny GGUF file written with the ``gguf`` package (a 2-layer Llama with a byte-level BPE tokenizer), so the GGUF
path of ``load_base`` and its safetensors cache are tested without the 98 MB embedded model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2's byte-level BPE uses for bytes (Radford et al. 2019, encoder.py)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + i for i, _ in enumerate(b for b in range(256) if b not in keep)]
    return sorted({chr(c) for c in keep + shifted})


def write_tiny_gguf(path: Path, seed: int = 0, d: int = 32, layers: int = 2, ff: int = 64) -> Path:
    """Write a random 2-layer Llama GGUF (Q8_0 matrices, F32 norms, tied embeddings) with a chat template."""
    import gguf

    rng = np.random.default_rng(seed)
    heads, kv_heads = 4, 2
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "e r"]
    tokens = specials + _byte_level_alphabet() + [m.replace(" ", "") for m in merges]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    for add, value in [
        (w.add_block_count, layers),
        (w.add_context_length, 128),
        (w.add_embedding_length, d),
        (w.add_feed_forward_length, ff),
        (w.add_head_count, heads),
        (w.add_head_count_kv, kv_heads),
        (w.add_rope_freq_base, 10000.0),
        (w.add_layer_norm_rms_eps, 1e-5),
        (w.add_vocab_size, len(tokens)),
        (w.add_rope_dimension_count, d // heads),
        (w.add_tokenizer_model, "gpt2"),
        (w.add_tokenizer_pre, "smollm"),
        (w.add_token_list, tokens),
        (w.add_token_types, [3] * len(specials) + [1] * (len(tokens) - len(specials))),
        (w.add_token_merges, merges),
        (w.add_bos_token_id, 1),
        (w.add_eos_token_id, 2),
        (w.add_unk_token_id, 0),
        (w.add_pad_token_id, 2),
        (w.add_add_bos_token, False),
    ]:
        add(value)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )

    def q8_0(name: str, shape: tuple[int, int]) -> None:
        weights = (0.2 * rng.standard_normal(shape)).astype(np.float32)
        qtype = gguf.GGMLQuantizationType.Q8_0
        w.add_tensor(name, gguf.quants.quantize(weights, qtype), raw_dtype=qtype)

    def f32(name: str, n: int) -> None:
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    kv = kv_heads * d // heads
    q8_0("token_embd.weight", (len(tokens), d))
    for i in range(layers):
        f32(f"blk.{i}.attn_norm.weight", d)
        f32(f"blk.{i}.ffn_norm.weight", d)
        for name, shape in [
            ("attn_q", (d, d)),
            ("attn_k", (kv, d)),
            ("attn_v", (kv, d)),
            ("attn_output", (d, d)),
            ("ffn_gate", (ff, d)),
            ("ffn_up", (ff, d)),
            ("ffn_down", (d, ff)),
        ]:
            q8_0(f"blk.{i}.{name}.weight", shape)
    f32("output_norm.weight", d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
