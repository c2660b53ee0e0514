"""Save/load: exact round trips for every architecture, SAELens config keys, and every external format written
here from its format description (random weights) and checked against that format's own encode formula."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lorascope.errors import LorascopeError
from lorascope.saes import create_sae, load_sae, save_sae
from lorascope.saes.formats import detect_format

D, F = 12, 40


def x_data(n=25, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def randomise(sae, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae


@pytest.mark.parametrize(
    "arch,kw",
    [("relu", {}), ("topk", {"k": 5}), ("batchtopk", {"k": 5}), ("jumprelu", {"threshold_init": 0.2})],
)
def test_round_trip_is_exact(tmp_path, arch, kw):
    sae = randomise(
        create_sae(
            arch,
            D,
            F,
            metadata={"model_name": "m", "hook_name": "blocks.3.hook_resid_post", "trained_on": "delta"},
            **kw,
        )
    )
    if arch == "batchtopk":
        sae.threshold.data.fill_(0.3)
    save_sae(sae, tmp_path / "sae")
    again = load_sae(tmp_path / "sae")
    assert type(again) is type(sae) and again.cfg == sae.cfg
    x = x_data()
    assert torch.equal(again.encode(x), sae.encode(x))
    assert torch.equal(again.forward(x), sae.forward(x))
    save_sae(again, tmp_path / "sae")  # overwriting an existing folder works and leaves no temp folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_saelens_v6_config_keys(tmp_path):
    save_sae(create_sae("batchtopk", D, F, k=4, metadata={"model_name": "gpt2", "hook_name": "h"}), tmp_path / "b")
    save_sae(create_sae("topk", D, F, k=4), tmp_path / "t")
    save_sae(create_sae("relu", D, F), tmp_path / "r")
    b = json.loads((tmp_path / "b" / "cfg.json").read_text())
    for key in (
        "d_in",
        "d_sae",
        "dtype",
        "device",
        "apply_b_dec_to_input",
        "normalize_activations",
        "reshape_activations",
        "metadata",
    ):
        assert key in b
    assert b["architecture"] == "jumprelu" and b["normalize_activations"] == "none"
    assert b["metadata"]["model_name"] == "gpt2" and b["metadata"]["hook_name"] == "h"
    assert b["metadata"]["sae_lens_version"].startswith("6.")  # read as a v6 config, not the pre-6 path
    assert json.loads((tmp_path / "t" / "cfg.json").read_text())["k"] == 4
    assert json.loads((tmp_path / "r" / "cfg.json").read_text())["architecture"] == "standard"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "b" / "sae_weights.safetensors"), "pt") as fh:
        assert sorted(fh.keys()) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
        assert fh.get_tensor("W_enc").shape == (D, F) and fh.get_tensor("W_dec").shape == (F, D)


def test_saelens_loads_our_folder(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = randomise(create_sae("batchtopk", D, F, k=4))
    sae.threshold.data.fill_(0.25)
    save_sae(sae, tmp_path / "s")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "s"))
    x = x_data()
    assert torch.allclose(theirs.encode(x), sae.encode(x)) and torch.allclose(
        theirs.decode(sae.encode(x)), sae.forward(x)
    )


def write_saelens_folder(folder, cfg, tensors):
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_saelens_v6_jumprelu_and_pre6_topk(tmp_path):
    W_enc, W_dec, b_enc, b_dec, thr = (
        rand(D, F, seed=1),
        rand(F, D, seed=2),
        rand(F, seed=3),
        rand(D, seed=4),
        rand(F, seed=5).abs(),
    )
    write_saelens_folder(
        tmp_path / "v6",
        {
            "architecture": "jumprelu",
            "d_in": D,
            "d_sae": F,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {"sae_lens_version": "6.5.0", "hook_name": "h"},
        },
        {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec, "threshold": thr},
    )
    sae = load_sae(tmp_path / "v6")
    x = x_data()
    pre = x @ W_enc + b_enc
    f = torch.relu(pre) * (pre > thr)
    assert torch.allclose(sae.encode(x), f) and torch.allclose(sae.forward(x), f @ W_dec + b_dec, atol=1e-5)

    write_saelens_folder(
        tmp_path / "old",
        {
            "d_in": D,
            "d_sae": F,
            "dtype": "torch.float32",
            "hook_point": "hp",
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": 3},
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "model_name": "gpt2",
        },
        {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec},
    )
    old = load_sae(tmp_path / "old")
    assert old.cfg.architecture == "topk" and old.cfg.arch["k"] == 3 and old.cfg.metadata["hook_name"] == "hp"
    pre = (x - b_dec) @ W_enc + b_enc
    v, i = pre.topk(3, dim=1)
    f = torch.zeros_like(pre).scatter(1, i, torch.relu(v))
    assert torch.allclose(old.encode(x), f) and torch.allclose(old.forward(x), f @ W_dec + b_dec, atol=1e-5)


def test_gemma_scope_params_npz(tmp_path):
    folder = tmp_path / "layer_3" / "width_16k" / "average_l0_50"
    folder.mkdir(parents=True)
    p = {
        "W_enc": rand(D, F, seed=1).numpy(),
        "W_dec": rand(F, D, seed=2).numpy(),
        "b_enc": rand(F, seed=3).numpy(),
        "b_dec": rand(D, seed=4).numpy(),
        "threshold": np.abs(rand(F, seed=5).numpy()),
    }
    np.savez(folder / "params.npz", **p)
    sae = load_sae(folder)
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.apply_b_dec_to_input is False
    x = x_data().numpy().astype(np.float64)
    pre = x @ p["W_enc"] + p["b_enc"]  # Gemma Scope: no b_dec subtracted from the input
    f = np.maximum(pre, 0) * (pre > p["threshold"])
    assert np.allclose(sae.encode(torch.from_numpy(x).float()).detach().numpy(), f, atol=1e-5)
    assert np.allclose(
        sae.forward(torch.from_numpy(x).float()).detach().numpy(), f @ p["W_dec"] + p["b_dec"], atol=1e-4
    )
    (folder / "params.npz").write_bytes((folder / "params.npz").read_bytes()[:100])
    with pytest.raises(LorascopeError, match="params.npz"):
        load_sae(folder)


def test_sparsify_folder(tmp_path):
    enc_w, enc_b, W_dec, b_dec = rand(F, D, seed=1), rand(F, seed=2), rand(F, D, seed=3), rand(D, seed=4)
    for hook in ("layers.3", "layers.5"):
        (tmp_path / hook).mkdir()
        (tmp_path / hook / "cfg.json").write_text(
            json.dumps({"expansion_factor": 4, "normalize_decoder": True, "num_latents": F, "k": 4, "d_in": D})
        )
        save_file(
            {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec},
            str(tmp_path / hook / "sae.safetensors"),
        )
    with pytest.raises(LorascopeError, match="hookpoint"):
        load_sae(tmp_path)
    sae = load_sae(tmp_path, hookpoint="layers.5")
    x = x_data()
    pre = torch.relu((x - b_dec) @ enc_w.T + enc_b)  # sparsify: relu(W(x - b_dec) + b), then top-k
    v, i = pre.topk(4, dim=1)
    f = torch.zeros_like(pre).scatter(1, i, v)
    assert torch.allclose(sae.encode(x), f, atol=1e-5)
    assert torch.allclose(sae.forward(x), f @ W_dec + b_dec, atol=1e-4)
    assert load_sae(tmp_path / "layers.3").cfg.arch["k"] == 4


def _dl_folder(tmp_path, name, state, trainer):
    folder = tmp_path / name
    folder.mkdir()
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": trainer}))
    return folder


def test_dictionary_learning_classes(tmp_path):
    enc_w, enc_b, dec_w, bias = rand(F, D, seed=1), rand(F, seed=2), rand(D, F, seed=3), rand(D, seed=4)
    x = x_data()
    # AutoEncoder: relu(encoder(x - bias)); decoder(f) + bias (decoder.weight is [d, F])
    f = torch.relu((x - bias) @ enc_w.T + enc_b)
    ae = load_sae(
        _dl_folder(
            tmp_path,
            "ae",
            {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w, "bias": bias},
            {"dict_class": "AutoEncoder"},
        )
    )
    assert torch.allclose(ae.encode(x), f, atol=1e-5) and torch.allclose(ae.forward(x), f @ dec_w.T + bias, atol=1e-4)
    # BatchTopKSAE: post_relu * (post_relu > threshold), threshold a scalar buffer
    st = {
        "encoder.weight": enc_w,
        "encoder.bias": enc_b,
        "decoder.weight": dec_w,
        "b_dec": bias,
        "k": torch.tensor(4, dtype=torch.int),
        "threshold": torch.tensor(0.7),
    }
    btk = load_sae(_dl_folder(tmp_path, "btk", st, {"dict_class": "BatchTopKSAE", "k": 4}))
    post = torch.relu((x - bias) @ enc_w.T + enc_b)
    f = post * (post > 0.7)
    assert btk.cfg.architecture == "batchtopk" and torch.allclose(btk.encode(x), f, atol=1e-5)
    assert torch.allclose(btk.forward(x), f @ dec_w.T + bias, atol=1e-4)
    # AutoEncoderTopK: top-k of post-relu
    tk = load_sae(
        _dl_folder(tmp_path, "tk", {**st, "threshold": torch.tensor(-1.0)}, {"dict_class": "AutoEncoderTopK"})
    )
    v, i = post.topk(4, dim=1)
    assert torch.allclose(tk.encode(x), torch.zeros_like(post).scatter(1, i, v), atol=1e-5)
    # JumpReluAutoEncoder: codes scaled by ||W_dec row|| on encode, divided on decode
    W_enc, W_dec, b_enc, b_dec, thr = (
        rand(D, F, seed=5),
        rand(F, D, seed=6),
        rand(F, seed=7),
        rand(D, seed=8),
        rand(F, seed=9).abs(),
    )
    jr = load_sae(
        _dl_folder(
            tmp_path,
            "jr",
            {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": thr},
            {"dict_class": "JumpReluAutoEncoder"},
        )
    )
    pre = x @ W_enc + b_enc
    n = W_dec.norm(dim=1)
    f = torch.relu(pre * (pre > thr)) * n
    assert torch.allclose(jr.encode(x), f, atol=1e-4)
    assert torch.allclose(jr.forward(x), (f / n) @ W_dec + b_dec, atol=1e-4)
    with pytest.raises(LorascopeError, match="GatedAutoEncoder"):
        load_sae(_dl_folder(tmp_path, "gated", st, {"dict_class": "GatedAutoEncoder"}))


class NotAStateDict:
    def __init__(self):
        self.payload = torch.zeros(3)


def test_pickle_only_file_is_refused_unless_allowed(tmp_path):
    enc_w, dec_w = rand(F, D, seed=1), rand(D, F, seed=2)
    module = torch.nn.Module()
    module.encoder = torch.nn.Linear(D, F)
    module.decoder = torch.nn.Linear(F, D, bias=False)
    module.register_parameter("bias", torch.nn.Parameter(rand(D)))
    with torch.no_grad():
        module.encoder.weight.copy_(enc_w)
        module.decoder.weight.copy_(dec_w)
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(module, folder / "ae.pt")  # a whole pickled module, not a state dict
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    with pytest.raises(LorascopeError, match="allow_pickle=True"):
        load_sae(folder)
    sae = load_sae(folder, allow_pickle=True)
    assert torch.equal(sae.W_enc, enc_w.T) and torch.equal(sae.W_dec, dec_w.T)


def test_corrupt_safetensors_names_the_file(tmp_path):
    save_sae(create_sae("topk", D, F, k=3), tmp_path / "s")
    w = tmp_path / "s" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(LorascopeError, match="sae_weights.safetensors"):
        load_sae(tmp_path / "s")


def test_detect_format_and_unknown_folder(tmp_path):
    save_sae(create_sae("relu", D, F), tmp_path / "s")
    assert detect_format(tmp_path / "s") == "saelens"
    assert detect_format(tmp_path / "s" / "sae_weights.safetensors") == "saelens"
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorascopeError, match="no SAE"):
        load_sae(tmp_path / "empty")
    with pytest.raises(LorascopeError, match="does not exist"):
        load_sae(tmp_path / "nope")


def test_shape_mismatch_between_config_and_weights(tmp_path):
    write_saelens_folder(
        tmp_path / "bad",
        {"architecture": "standard", "d_in": D, "d_sae": F + 1, "metadata": {"sae_lens_version": "6.0.0"}},
        {"W_enc": rand(D, F), "W_dec": rand(F, D), "b_enc": rand(F), "b_dec": rand(D)},
    )
    with pytest.raises(LorascopeError, match="W_enc has shape"):
        load_sae(tmp_path / "bad")
