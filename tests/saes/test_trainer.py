"""Trainer: batch sources, input-scale folding, resume to identical weights, bad inputs, evaluation."""

from __future__ import annotations

import copy

import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry.metrics import fvu
from lorascope.saes import TrainerConfig, create_sae, evaluate_sae, train_sae
from lorascope.saes._batches import BatchSource, rebatch
from lorascope.saes.trainer import CHECKPOINT_NAME, geometric_median


def data(n: int = 1200, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(n, d, generator=g) + 5.0  # off-centre, not unit scale


def chunks(x: torch.Tensor, sizes=(70, 130, 45)):
    out, i, j = [], 0, 0
    while i < x.shape[0]:
        s = sizes[j % len(sizes)]
        out.append(x[i : i + s])
        i, j = i + s, j + 1
    return out


CFG = dict(batch_size=100, lr=1e-2, warmup_steps=3, log_every=2, dead_window_tokens=300, init_tokens=200)


def test_rebatch_cuts_the_stream_at_fixed_rows():
    x = data(0 + 355)
    batches = list(rebatch(iter(chunks(x)), 100))
    assert [b.shape[0] for b in batches] == [100, 100, 100, 55]
    assert torch.equal(torch.cat(batches), x)
    limited = list(rebatch(iter(chunks(x)), 100, limit_rows=250))
    assert [b.shape[0] for b in limited] == [100, 100, 50]
    assert torch.equal(torch.cat(list(BatchSource(chunks(x)).open(123))), x[123:])


@pytest.mark.parametrize("kind", ["tensor", "list", "factory", "iter_from", "generator"])
def test_every_batch_source_gives_the_same_training(kind):
    x = data()

    class Store:
        def iter_from(self, row):
            return iter(chunks(x[row:]))

    sources = {
        "tensor": x,
        "list": chunks(x),
        "factory": lambda: iter(chunks(x)),
        "iter_from": Store(),
        "generator": (c for c in chunks(x)),
    }
    ref = train_sae(create_sae("topk", 16, 32, k=3, seed=0), x, TrainerConfig(**CFG), progress=False)
    got = train_sae(
        create_sae("topk", 16, 32, k=3, seed=0),
        sources[kind],
        TrainerConfig(total_tokens=1200, **CFG),
        progress=False,
    )
    for name, p in ref.sae.state_for_save().items():
        assert torch.equal(p, got.sae.state_for_save()[name]), name
    assert ref.log == got.log


def test_input_scale_folding_gives_identical_outputs_on_raw_inputs():
    x = data()
    res = train_sae(create_sae("topk", 16, 32, k=3, seed=0), x, TrainerConfig(**CFG), progress=False)
    s = res.input_scale
    assert s == pytest.approx(16**0.5 / float(x[:200].double().norm(dim=1).mean()))
    folded64 = copy.deepcopy(res.sae).double()
    unfolded64 = copy.deepcopy(res.sae).double()
    unfolded64.fold_input_scale(1 / s)  # undo the fold (float64): the weights as trained on x * s
    xs = x.double() * s
    assert torch.allclose(folded64.encode(x.double()), unfolded64.encode(xs), atol=1e-9)
    assert torch.allclose(folded64.forward(x.double()), unfolded64.forward(xs) / s, atol=1e-9)
    # the reported FVU is the FVU of the folded SAE on raw activations
    ev = evaluate_sae(res.sae, x[-100:])
    assert ev["fvu"] == pytest.approx(fvu(x[-100:], res.sae.forward(x[-100:]).detach()), rel=1e-9)


class Killed(Exception):
    pass


@pytest.mark.parametrize("arch,kw", [("topk", {"k": 3}), ("batchtopk", {"k": 3}), ("jumprelu", {}), ("relu", {})])
def test_resume_after_kill_gives_identical_weights(tmp_path, arch, kw):
    x = data()

    def killing_source():
        def gen():
            for i, c in enumerate(chunks(x)):
                if i == 6:  # ~ row 490: after the checkpoint at step 4 (row 400)
                    raise Killed
                yield c

        return gen()

    cfg = TrainerConfig(checkpoint_every=2, **CFG)
    full = train_sae(
        create_sae(arch, 16, 32, seed=0, **kw),
        lambda: iter(chunks(x)),
        TrainerConfig(total_tokens=1200, **CFG),
        progress=False,
    )
    with pytest.raises(Killed):
        train_sae(
            create_sae(arch, 16, 32, seed=0, **kw),
            killing_source,
            TrainerConfig(total_tokens=1200, **{**CFG, "checkpoint_every": 2}),
            checkpoint_dir=tmp_path,
            progress=False,
        )
    assert (tmp_path / CHECKPOINT_NAME).exists()
    resumed = train_sae(
        create_sae(arch, 16, 32, seed=7, **kw),
        lambda: iter(chunks(x)),
        TrainerConfig(total_tokens=1200, resume=True, **{**CFG, "checkpoint_every": 2}),
        checkpoint_dir=tmp_path,
        progress=False,
    )
    assert resumed.config["resumed"] and cfg.checkpoint_every == 2
    for name, p in full.sae.state_dict().items():
        assert torch.equal(p, resumed.sae.state_dict()[name]), name
    assert full.log == resumed.log
    assert full.input_scale == resumed.input_scale
    assert full.final["fvu"] == resumed.final["fvu"]


def test_checkpoint_clock_writes_at_multiples_of_every_at_most_once_per_min_seconds(monkeypatch):
    import lorascope.saes.trainer as T

    now = [100.0]
    monkeypatch.setattr(T.time, "monotonic", lambda: now[0])
    clock = T.CheckpointClock(TrainerConfig(checkpoint_every=2, checkpoint_min_seconds=10.0), total_steps=12)
    written = []
    for step in range(1, 13):
        now[0] += 3.0  # three seconds a step
        if clock.due(step):
            written.append(step)
    # step 2 is 6 s in (too soon), 4 at 12 s writes, 6 is 6 s after it, 8 writes (12 s after), 10 is 6 s after,
    # and 12 is the last step (the trained SAE itself is saved then)
    assert written == [4, 8]
    plain = T.CheckpointClock(TrainerConfig(checkpoint_every=2), total_steps=12)
    assert [s for s in range(1, 13) if plain.due(s)] == [2, 4, 6, 8, 10]


def test_checkpoints_skipped_by_the_clock_change_no_weight(tmp_path):
    x = data()
    runs = {}
    for name, extra in {
        "none": {},
        "every": {"checkpoint_every": 1},
        "clock": {"checkpoint_every": 1, "checkpoint_min_seconds": 1e9},
    }.items():
        folder = tmp_path / name
        runs[name] = train_sae(
            create_sae("topk", 16, 32, seed=0, k=3),
            lambda: iter(chunks(x)),
            TrainerConfig(total_tokens=1200, **CFG, **extra),
            checkpoint_dir=folder if extra else None,
            progress=False,
        )
        assert (folder / CHECKPOINT_NAME).exists() == (name == "every"), name
    for name in ("every", "clock"):
        for key, p in runs["none"].sae.state_dict().items():
            assert torch.equal(p, runs[name].sae.state_dict()[key]), (name, key)


def test_deterministic_for_a_fixed_seed():
    x = data()
    a = train_sae(create_sae("batchtopk", 16, 32, k=3, seed=5), x, TrainerConfig(**CFG), progress=False)
    b = train_sae(create_sae("batchtopk", 16, 32, k=3, seed=5), x, TrainerConfig(**CFG), progress=False)
    assert all(torch.equal(p, b.sae.state_dict()[n]) for n, p in a.sae.state_dict().items())


def test_log_has_learning_curve_fields_and_dead_tracking():
    x = data()
    res = train_sae(create_sae("topk", 16, 64, k=2, seed=0), x, TrainerConfig(**CFG), progress=False)
    assert [e["step"] for e in res.log] == [2, 4, 6, 8, 10, 12]
    for key in ("tokens", "lr", "loss", "mse", "fvu", "l0", "dead_frac"):
        assert key in res.log[0]
    assert res.log[-1]["lr"] == pytest.approx(1e-2 * (12 - 11) / 2)  # linear decay over the last 20% (2 steps)
    assert 0 <= res.final["dead_frac"] <= 1 and res.final["l0"] == 2


def test_geometric_median_is_robust_to_outliers():
    x = torch.cat([torch.zeros(50, 3), torch.full((5, 3), 1000.0)])
    assert geometric_median(x).abs().max() < 1e-3 < float(x.mean(0).abs().max())


def test_geometric_median_equals_the_textbook_weiszfeld_bit_for_bit():
    def weiszfeld(x, iters=8, eps=1e-8):  # the plain form (fresh temporaries), as the trainer computed it before
        x = x.double()
        m = x.mean(0)
        for _ in range(iters):
            w = 1.0 / (x - m).norm(dim=1).clamp_min(eps)
            m = (w[:, None] * x).sum(0) / w.sum()
        return m

    for n, d in ((4096, 64), (3001, 17)):
        x = 3.0 * torch.randn(n, d, generator=torch.Generator().manual_seed(n)) + 1.0
        assert torch.equal(geometric_median(x), weiszfeld(x))


def test_d_in_mismatch_names_both_widths():
    with pytest.raises(LorascopeError, match=r"\[N, 16\].*d_in = 16") as exc:
        train_sae(create_sae("topk", 16, 32, k=3), torch.randn(300, 12), TrainerConfig(**CFG), progress=False)
    assert "12" in str(exc.value)


def test_nan_loss_names_the_step():
    x = data()
    x[450] = float("nan")  # batch 4 (rows 400-499)
    with pytest.raises(LorascopeError, match="at step 4") as exc:
        train_sae(create_sae("topk", 16, 32, k=3), x, TrainerConfig(**CFG), progress=False)
    assert "lower the learning rate" in str(exc.value)


def test_one_shot_iterator_cannot_resume(tmp_path):
    x = data()
    train_sae(
        create_sae("topk", 16, 32, k=3),
        x,
        TrainerConfig(**{**CFG, "checkpoint_every": 2}),
        checkpoint_dir=tmp_path,
        progress=False,
    )
    with pytest.raises(LorascopeError, match="one-shot iterator"):
        train_sae(
            create_sae("topk", 16, 32, k=3),
            iter(chunks(x)),
            TrainerConfig(total_tokens=1200, resume=True, **{**CFG, "checkpoint_every": 2}),
            checkpoint_dir=tmp_path,
            progress=False,
        )


def test_evaluate_reports_window_stats():
    x = data(400)
    sae = create_sae("topk", 16, 64, k=2, seed=0)
    ev = evaluate_sae(sae, chunks(x), batch_size=64)
    codes = sae.encode(x)
    assert ev["n_tokens"] == 400 and ev["l0"] == 2
    assert ev["fvu"] == pytest.approx(fvu(x, sae.decode(codes).detach()), rel=1e-9)
    assert ev["dead"] == int(((codes != 0).sum(0) == 0).sum())
    assert torch.allclose(ev["density"], (codes != 0).double().mean(0))
