"""The README's Python API tour, on a tiny model (same calls, tiny sizes)."""

import math

from lorascope.activations import ExtractConfig, extract
from lorascope.data import make_demo_dataset
from lorascope.geometry import compare_dictionaries
from lorascope.models import load_adapters, load_base, train_lora
from lorascope.saes import create_sae, load_sae, save_sae, train_sae


def test_readme_api_tour(tiny_llama_dir, tmp_path):
    base = load_base(tiny_llama_dir)
    train_lora(
        base, make_demo_dataset(32), 4, output_dir=tmp_path / "r4", steps=4, lr=3e-3, batch_size=4, progress=False
    )
    peft = load_adapters(base, {"r4": tmp_path / "r4"})
    store = extract(
        peft,
        base.tokenizer,
        make_demo_dataset(40, seed=1),
        tmp_path / "store",
        ExtractConfig(layers=[1], progress=False),
    )
    sae = create_sae("topk", 32, 64, k=4)
    res = train_sae(sae, store.reader(1, kind="delta", adapter="r4", batch_size=64), progress=False)
    assert res.final["tokens"] == store.reader(1, kind="delta", adapter="r4").n_rows
    ref = create_sae("topk", 32, 64, k=4, seed=1)
    train_sae(ref, store.reader(1, kind="base", batch_size=64), progress=False)
    save_sae(ref, tmp_path / "ref")
    rows = compare_dictionaries(sae.W_dec.detach(), load_sae(tmp_path / "ref").W_dec.detach(), "adapter", "ref")
    by = {r.metric: r for r in rows}
    assert math.isfinite(by["mmcs_adapter_to_ref"].value) and by["mmcs_adapter_to_ref"].null_name
