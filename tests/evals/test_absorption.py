"""Absorption (evals/absorption.py) on constructed dictionaries where the answer is known exactly, SAEBench
definitions: cos ≥ 0.1 and ≥ 40% of the probe projection (top 3 absorbers) for the absorption fraction; main
latents silent, top latent cos ≥ 0.025 and ≥ 40% of the projection for full absorption."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lorascope.evals.absorption import (
    AbsorptionThresholds,
    ProbeData,
    evaluate_absorption,
    word_absorption,
)
from lorascope.evals.first_letter import LETTERS, per_letter_f1, train_letter_probe
from lorascope.evals.splitting import decoder_rows, normalised_codes

D = 16


def _unit(i: int) -> torch.Tensor:
    return torch.eye(D, dtype=torch.float64)[i]


def _case(absorber_cos: float, absorber_share: float = 1.0, partial: bool = False):
    """10 true positives of letter "a" (probe p = e0). Latent 0 = main (row e0); latent 1 = absorber with
    cos(p, row) = absorber_cos; latents 2..5 = e2..e5 (orthogonal to p). Words 0-6: main fires (P = 2); words 7-9:
    main silent, the absorber carries absorber_share of P = 2. ``partial``: word 6 has main 1 + absorber 1."""
    rows = torch.stack(
        [
            _unit(0),
            absorber_cos * _unit(0) + math.sqrt(1 - absorber_cos**2) * _unit(1),
            _unit(2),
            _unit(3),
            _unit(4),
            _unit(5),
        ]
    )
    codes = torch.zeros(10, 6, dtype=torch.float64)
    codes[:7, 0] = 2.0
    codes[:, 2] = 3.0  # an unrelated latent active everywhere (orthogonal to the probe)
    codes[7:, 1] = 2.0 * absorber_share / absorber_cos
    if partial:
        codes[6, 0] = 1.0
        codes[6, 1] = 1.0 / absorber_cos
    x = codes @ rows
    x[7:, 0] = 2.0  # the residual's probe projection is 2 whatever the absorber explains
    return x, codes, rows, _unit(0)


def test_three_of_ten_absorbed_gives_exactly_point_three():
    x, codes, rows, p = _case(0.5)
    wa = word_absorption(x, codes, rows, p, [0])
    assert wa.fractions.tolist() == [0.0] * 7 + [1.0] * 3
    assert wa.full.tolist() == [False] * 7 + [True] * 3
    assert float(wa.fractions.sum()) / 10 == pytest.approx(0.3, abs=1e-12)


def test_partial_absorption_fraction_formula():
    x, codes, rows, p = _case(0.5, partial=True)
    wa = word_absorption(x, codes, rows, p, [0])
    # word 6: P = 2, P_main = 1, absorbers A = 1 (50% >= 40%) -> min(A, P - P_main) / (that + P_main) = 0.5
    assert float(wa.fractions[6]) == pytest.approx(0.5, abs=1e-12)
    assert not bool(wa.full[6])  # the main latent fired
    assert float(wa.fractions.sum()) / 10 == pytest.approx(0.35, abs=1e-12)
    assert float(wa.full.double().mean()) == pytest.approx(0.3, abs=1e-12)


def test_negative_controls():
    # cosine below 0.1: no absorption fraction; SAEBench's full-absorption gate is only cos >= 0.025
    x, codes, rows, p = _case(0.05)
    wa = word_absorption(x, codes, rows, p, [0])
    assert float(wa.fractions.sum()) == 0.0
    assert wa.full.tolist() == [False] * 7 + [True] * 3
    # cosine below 0.025: neither
    wa = word_absorption(*_case(0.02)[:3], p, [0])
    assert float(wa.fractions.sum()) == 0.0 and not bool(wa.full.any())
    # cosine fine but the absorber carries only 35% (< 40%) of the probe projection
    wa = word_absorption(*_case(0.5, absorber_share=0.35)[:3], p, [0])
    assert float(wa.fractions.sum()) == 0.0 and not bool(wa.full.any())
    # carrying exactly at the threshold counts (>= 40%)
    wa = word_absorption(*_case(0.5, absorber_share=0.5)[:3], p, [0])
    assert wa.fractions.tolist()[7:] == [1.0] * 3


def test_absorber_inside_main_set_is_not_absorption():
    x, codes, rows, p = _case(0.5)
    wa = word_absorption(x, codes, rows, p, [0, 1])  # the "absorber" is a main latent (split, not absorbed)
    assert float(wa.fractions.sum()) == 0.0 and not bool(wa.full.any())


def test_top_three_absorbers_only():
    # four absorbers each carrying 12% of P: top 3 = 36% < 40% -> no absorption; top-4 rule would say 48%
    rows = torch.stack([_unit(0)] + [0.5 * _unit(0) + math.sqrt(0.75) * _unit(i) for i in range(1, 5)])
    codes = torch.zeros(1, 5, dtype=torch.float64)
    codes[0, 1:] = 0.12 * 2.0 / 0.5
    x = 2.0 * _unit(0)[None]
    assert float(word_absorption(x, codes, rows, _unit(0), [0]).fractions[0]) == 0.0
    th = AbsorptionThresholds(max_absorbing_latents=4)
    assert float(word_absorption(x, codes, rows, _unit(0), [0], th).fractions[0]) == 1.0


class _Dict:
    """A loaded dictionary: W_dec rows and an arbitrary encode (codes given by a rule)."""

    def __init__(self, w_dec, encode, metadata=None):
        self.W_dec = w_dec
        self._encode = encode
        self.cfg = SimpleNamespace(metadata=metadata or {})

    def encode(self, x):
        return self._encode(x)


def test_decoder_row_scaling_changes_nothing():
    x, codes, rows, p = _case(0.5, partial=True)
    scale = torch.tensor([3.0, 0.25, 2.0, 1.0, 7.0, 0.5], dtype=torch.float64)
    table = {tuple(r.tolist()): c for r, c in zip(x, codes, strict=True)}

    def enc(s):
        return lambda xx: torch.stack([table[tuple(r.tolist())] for r in xx]) / s

    plain, scaled = _Dict(rows, enc(torch.ones(6, dtype=torch.float64))), _Dict(rows * scale[:, None], enc(scale))
    res = []
    for d in (plain, scaled):
        unit, _ = decoder_rows(d)
        res.append(word_absorption(x, normalised_codes(d, x), unit, p, [0]))
    torch.testing.assert_close(res[0].fractions, res[1].fractions, rtol=0, atol=1e-6)
    assert res[0].full.tolist() == res[1].full.tolist()
    # with the raw codes of the rescaled dictionary the answer would change: the normalisation matters
    raw = word_absorption(x, scaled.encode(x), decoder_rows(scaled)[0], p, [0])
    assert raw.fractions.tolist() != res[0].fractions.tolist()


# ---- end to end on synthetic residuals ------------------------------------------------------------------------
N_TRAIN, N_TEST, N_A_TEST, N_ABS = 30, 10, 100, 3
DIM = 26 + N_ABS + 3


def _letter_data(n_per_letter: int, n_a: int, n_marked: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n_a if c == 0 else n_per_letter,), c) for c in range(26)])
    x = 0.05 * torch.randn(len(labels), DIM, generator=g)
    x[torch.arange(len(labels)), labels] += 3.0
    marked = torch.zeros(len(labels), dtype=torch.long) - 1
    for j in range(n_marked):  # word j of letter "a" carries marker j (a token-specific absorbing latent)
        x[j, 26 + j] += 3.0
        marked[j] = j
    return x, labels


def _absorbing_dictionary(scale: torch.Tensor | None = None, metadata=None) -> _Dict:
    """26 letter latents (row 1.5 e_c) + one absorber per marker (row 1.5 (e0 + m_j)); the "a" latent is
    inhibited by any marker. Codes = relu(x @ E - 1) / scale."""
    f = 26 + N_ABS
    enc = torch.zeros(DIM, f)
    dec = torch.zeros(f, DIM)
    for c in range(26):
        enc[c, c] = 1.0
        dec[c, c] = 1.5
    for j in range(N_ABS):
        enc[26 + j, 0] = -2.0
        enc[26 + j, 26 + j] = 1.0
        dec[26 + j, 0] = dec[26 + j, 26 + j] = 1.5
    s = torch.ones(f) if scale is None else scale
    return _Dict(dec * s[:, None], lambda x: torch.relu(x @ enc - 1.0) / s, metadata)


@pytest.fixture(scope="module")
def probe_data() -> ProbeData:
    xtr, ytr = _letter_data(N_TRAIN, N_TRAIN, N_ABS, seed=0)
    xte, yte = _letter_data(N_TEST, N_A_TEST, N_ABS, seed=1)
    probe = train_letter_probe(xtr, ytr)
    return ProbeData(5, xtr, ytr, xte, yte, [f"w{i}" for i in range(len(yte))], probe, per_letter_f1(probe, xte, yte))


def test_end_to_end_known_absorption(probe_data):
    assert all(v == 1.0 for v in probe_data.probe_f1.values())
    rep = evaluate_absorption(probe_data, _absorbing_dictionary(), "toy")
    assert rep.status == "ok" and rep.letters_passing == 26 and len(rep.letters) == 26
    by = {r.letter: r for r in rep.letters}
    a = by["a"]
    assert a.n_true_positives == N_A_TEST and a.main_latents == [0] and a.splitting_k == 1
    assert a.absorption_fraction == pytest.approx(N_ABS / N_A_TEST, abs=1e-12)
    assert a.full_absorption_rate == pytest.approx(N_ABS / N_A_TEST, abs=1e-12)
    for c in LETTERS[1:]:
        assert by[c].main_latents == [LETTERS.index(c)] and by[c].absorption_fraction == 0.0
    assert rep.splitting_k == 1.0
    assert rep.absorption_fraction == pytest.approx(N_ABS / N_A_TEST / 26, abs=1e-12)
    rows = {r.metric: r for r in rep.to_rows()}
    assert set(rows) == {"absorption_fraction", "full_absorption_rate", "splitting_k", "probe_letters_passing"}
    assert all(r.family == "absorption" and r.adapter == "toy" and r.layer == 5 for r in rows.values())
    assert rows["probe_letters_passing"].value == 26.0
    # rescaled decoder rows (codes rescaled inversely): identical report
    g = torch.Generator().manual_seed(3)
    rep2 = evaluate_absorption(probe_data, _absorbing_dictionary(0.2 + 3 * torch.rand(26 + N_ABS, generator=g)))
    assert rep2.absorption_fraction == pytest.approx(rep.absorption_fraction, abs=1e-9)
    assert [r.main_latents for r in rep2.letters] == [r.main_latents for r in rep.letters]


def test_delta_trained_sae_is_not_applicable(probe_data):
    rep = evaluate_absorption(probe_data, _absorbing_dictionary(metadata={"trained_on": "delta"}), "delta_sae")
    assert rep.status == "not_applicable" and "delta" in rep.reason and rep.letters == []
    rows = rep.to_rows()
    assert all(math.isnan(r.value) for r in rows if r.metric != "probe_letters_passing")
    assert all("not applicable" in r.note for r in rows)


def test_weak_probe_reports_and_stops_unless_forced(probe_data):
    weak = ProbeData(
        **{**probe_data.__dict__, "probe_f1": {c: (0.9 if i < 19 else 0.3) for i, c in enumerate(LETTERS)}}
    )
    rep = evaluate_absorption(weak, _absorbing_dictionary())
    assert rep.status == "probe_too_weak" and rep.letters_passing == 19 and rep.letters == []
    assert "probe too weak" in rep.reason and rep.probe_f1["t"] == 0.3
    assert math.isnan(rep.absorption_fraction)
    forced = evaluate_absorption(weak, _absorbing_dictionary(), force=True)
    assert forced.status == "ok" and forced.forced and len(forced.letters) == 19
    assert forced.absorption_fraction == pytest.approx(N_ABS / N_A_TEST / 19, abs=1e-12)


def test_cli_reports_weak_probe_and_delta_sae(tmp_path, tiny_llama_dir):
    """`lorascope absorption` on the tiny random model: its residuals carry no first-letter signal for unseen
    words, so the probe is too weak and the rows say so; a delta-trained SAE is not applicable."""
    import pandas as pd

    from lorascope.cli import main
    from lorascope.saes import create_sae, save_sae

    for name, on in (("base_sae", "base"), ("delta_sae", "delta")):
        save_sae(create_sae("topk", 32, 64, k=4, metadata={"layer": 1, "trained_on": on}), tmp_path / name)
    main(
        [
            "absorption",
            "--model",
            str(tiny_llama_dir),
            "--sae",
            str(tmp_path / "base_sae"),
            "--sae",
            str(tmp_path / "delta_sae"),
            "--out",
            str(tmp_path / "out"),
            "--max-words",
            "300",
        ]
    )
    df = pd.read_csv(tmp_path / "out" / "absorption.csv")
    assert set(df["family"]) == {"absorption"} and set(df["layer"]) == {1}
    assert set(df["metric"]) == {"absorption_fraction", "full_absorption_rate", "splitting_k", "probe_letters_passing"}
    base_rows = df[df["adapter"] == "base_sae"]
    assert base_rows["note"].str.contains("probe too weak").all()
    assert base_rows[base_rows["metric"] != "probe_letters_passing"]["value"].isna().all()
    assert float(base_rows[base_rows["metric"] == "probe_letters_passing"]["value"].iloc[0]) < 20
    assert df[df["adapter"] == "delta_sae"]["note"].str.contains("not applicable").all()
