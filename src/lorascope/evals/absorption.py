"""Feature absorption on the first-letter task with SAEBench's definitions (Chanin et al., "A is for
Absorption").

For one letter with unit probe direction p, main latents M (from k-sparse probing, ``splitting``) and
unit-norm decoder rows d_i (codes a_i rescaled by the row norms, see ``splitting.normalised_codes``), each
probe true positive word x (a test word of that letter whose probe logit is > 0) gets:

  probe projection      P   = x · p                      (the raw residual, as SAEBench)
  latent projection     π_i = a_i · cos(p, d_i)
  main projection       P_M = Σ_{i∈M} π_i
  absorbers             the (at most ``max_absorbing_latents`` = 3) largest π_i > 0 among latents outside
                        M with cos(p, d_i) ≥ ``absorption_cos_threshold`` (0.1); A = their sum
  absorption fraction   0 if P_M ≥ P or A / P < ``projection_proportion_threshold`` (0.4);
                        else 1 if P_M ≤ 0; else min(A, P − P_M) / (min(A, P − P_M) + P_M), clipped to [0, 1]
  full absorption       every main latent silent (|a_i| < 1e-8), the top-π latent (over all latents) has
                        cos ≥ ``full_absorption_cos_threshold`` (0.025), P ≥ 0, and π_top / P ≥ 0.4.

Per letter: mean absorption fraction = Σ fractions / #true positives; full-absorption rate = #full / #true
positives. The SAE-level scores are means over letters whose probe F1 > ``min_probe_f1`` (0.6) and that have
true positives; with fewer than ``min_letters`` (20) such letters the probe is too weak and nothing is
computed unless forced. SAEs trained on pure delta activations (cfg.metadata["trained_on"] == "delta") never
see the letter signal: the evaluation is marked not applicable.

One deviation from SAEBench, for CPU cost: the true positives' residuals are the test prompts' residuals
already computed for the probe, instead of a second forward pass on freshly sampled few-shot prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lorascope.errors import LorascopeError
from lorascope.evals.first_letter import (
    LETTERS,
    FirstLetterData,
    LetterProbe,
    per_letter_f1,
    train_letter_probe,
)
from lorascope.evals.splitting import (
    F1_JUMP_THRESHOLD,
    MAX_K,
    LetterSplitting,
    decoder_rows,
    k_sparse_splitting,
    normalised_codes,
)
from lorascope.results import ResultRow

EPS = 1e-8


@dataclass(frozen=True)
class AbsorptionThresholds:
    """SAEBench's defaults (``feature_absorption_calculator.py`` and the eval config)."""

    absorption_cos_threshold: float = 0.1
    full_absorption_cos_threshold: float = 0.025
    projection_proportion_threshold: float = 0.4
    max_absorbing_latents: int = 3
    top_latents: int = 10
    min_probe_f1: float = 0.6
    min_letters: int = 20
    max_k: int = MAX_K
    f1_jump_threshold: float = F1_JUMP_THRESHOLD


@dataclass
class WordAbsorption:
    fractions: torch.Tensor  # float64 [N] absorption fraction per word
    full: torch.Tensor  # bool [N] full absorption per word
    probe_projection: torch.Tensor  # float64 [N] x · p


def word_absorption(
    x: torch.Tensor,
    codes: torch.Tensor,
    unit_decoder: torch.Tensor,
    probe_direction: torch.Tensor,
    main_latents: list[int],
    th: AbsorptionThresholds = AbsorptionThresholds(),
) -> WordAbsorption:
    """Absorption of each probe true positive. x [N, d] residuals, codes [N, F] for unit-norm rows
    ``unit_decoder`` [F, d], probe_direction [d] (normalised here), main_latents: indices into F."""
    x, codes = x.double(), codes.double()
    p = probe_direction.double()
    p = p / p.norm().clamp_min(1e-12)
    cos = unit_decoder.double() @ p  # [F]
    proj = codes * cos  # [N, F]
    big_p = x @ p  # [N]
    f = codes.shape[1]
    main = torch.zeros(f, dtype=torch.bool)
    main[list(main_latents)] = True
    p_main = proj[:, main].sum(1)
    candidates = (~main) & (cos >= th.absorption_cos_threshold)
    cand_proj = torch.where(candidates[None, :] & (proj > 0), proj, torch.zeros_like(proj))
    n_abs = min(th.max_absorbing_latents, f)
    a = cand_proj.topk(n_abs, dim=1).values.sum(1)
    fractions = torch.zeros(x.shape[0], dtype=torch.float64)
    full = torch.zeros(x.shape[0], dtype=torch.bool)
    top = proj.topk(min(th.top_latents, f), dim=1)
    for i in range(x.shape[0]):
        pi, pm, ai = float(big_p[i]), float(p_main[i]), float(a[i])
        share = ai / pi if pi != 0 else (math.inf if ai > 0 else 0.0)
        if not (pm >= pi or share < th.projection_proportion_threshold):
            if pm <= 0.0:
                fractions[i] = 1.0
            else:
                absorbed = min(ai, pi - pm)
                fractions[i] = min(max(absorbed / (absorbed + pm), 0.0), 1.0)
        main_silent = bool((codes[i, main].abs() < EPS).all())
        t_idx, t_proj = int(top.indices[i, 0]), float(top.values[i, 0])
        full[i] = (
            main_silent
            and float(cos[t_idx]) >= th.full_absorption_cos_threshold
            and pi >= 0
            and pi != 0
            and t_proj / pi >= th.projection_proportion_threshold
        )
    return WordAbsorption(fractions, full, big_p)


# ---- whole evaluation --------------------------------------------------------------------------------------
@dataclass
class ProbeData:
    """What every SAE at one layer shares: residuals at the word token, labels, the probe and its test F1s."""

    layer: int
    train_x: torch.Tensor
    train_labels: torch.Tensor
    test_x: torch.Tensor
    test_labels: torch.Tensor
    test_words: list[str]
    probe: LetterProbe
    probe_f1: dict[str, float]

    def letters_passing(self, min_f1: float = 0.6) -> list[str]:
        return [k for k, v in self.probe_f1.items() if v == v and v > min_f1]


@dataclass(frozen=True)
class ProbeOptions:
    """How ``prepare_probe`` builds its data and fits the probe.

    ``max_words`` samples a subset of the vocabulary (None: all), ``seed`` drives that sampling and the
    train/test split, ``batch_size`` and ``autocast_dtype`` control the residual reads, ``l2`` is the
    probe's ridge penalty and ``words_per_prefix`` how many words share one few-shot prefix.
    """

    max_words: int | None = None
    seed: int = 0
    batch_size: int = 32
    l2: float = 1e-2
    autocast_dtype: torch.dtype | None = None
    words_per_prefix: int = 64


def prepare_probe(
    model: torch.nn.Module,
    tokenizer,
    layer: int,
    *,
    data: FirstLetterData | None = None,
    options: ProbeOptions = ProbeOptions(),
    collect_train: dict[int, torch.Tensor] | None = None,
) -> ProbeData:
    """Build the first-letter data, read residuals after block ``layer`` at the word token, fit the probe.

    Default data: every alphabetic single token of the tokenizer (``options.max_words`` samples a subset), with
    ``options.words_per_prefix`` words sharing each few-shot prefix so the whole vocabulary runs at CPU cost
    (``evals/shared_prefix.py``; 1 = SAEBench's own prefix per word). ``collect_train`` receives the train
    prompts' residuals at all positions (see ``word_residuals``).
    """
    max_words, seed, batch_size = options.max_words, options.seed, options.batch_size
    l2, autocast_dtype, words_per_prefix = options.l2, options.autocast_dtype, options.words_per_prefix
    from lorascope.evals.first_letter import build_first_letter_data, word_residuals
    from lorascope.evals.shared_prefix import build_shared_prefix_data, shared_prefix_residuals, shares_prefixes

    if data is None:
        data = (
            build_shared_prefix_data(tokenizer, words_per_prefix=words_per_prefix, max_words=max_words, seed=seed)
            if words_per_prefix > 1
            else build_first_letter_data(tokenizer, max_words=max_words, seed=seed)
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    fast = autocast_dtype is None and shares_prefixes(data.train) and shares_prefixes(data.test)
    xtr = (
        shared_prefix_residuals(model, data.train, layer)
        if fast and collect_train is None
        else word_residuals(model, data.train, layer, batch_size, autocast_dtype, pad, collect_train)
    )
    xte = (
        shared_prefix_residuals(model, data.test, layer)
        if fast
        else word_residuals(model, data.test, layer, batch_size, autocast_dtype, pad)
    )
    probe = train_letter_probe(xtr, data.train.labels, l2=l2)
    return ProbeData(
        layer,
        xtr,
        data.train.labels,
        xte,
        data.test.labels,
        list(data.test.words),
        probe,
        per_letter_f1(probe, xte, data.test.labels),
    )


@dataclass
class LetterAbsorption:
    letter: str
    probe_f1: float
    n_true_positives: int
    main_latents: list[int]
    splitting_k: int
    absorption_fraction: float
    full_absorption_rate: float
    n_full_absorption: int
    f1_by_k: list[float]


@dataclass
class AbsorptionReport:
    """status: "ok", "not_applicable" (delta-trained SAE) or "probe_too_weak" (fewer than min_letters letters
    pass the probe F1 bar; nothing else computed unless forced). Means are over the scored letters."""

    sae_label: str
    layer: int
    status: str
    reason: str
    probe_f1: dict[str, float]
    letters_passing: int
    letters: list[LetterAbsorption] = field(default_factory=list)
    absorption_fraction: float = math.nan
    full_absorption_rate: float = math.nan
    splitting_k: float = math.nan
    forced: bool = False

    def to_rows(self) -> list[ResultRow]:
        """Tidy rows, family "absorption", adapter = SAE label (NaN values + the reason when not scored)."""
        note = (
            self.reason
            if self.status != "ok"
            else f"{len(self.letters)} letters scored" + (" (forced: probe below the bar)" if self.forced else "")
        )
        n = sum(x.n_true_positives for x in self.letters)
        vals = {
            "absorption_fraction": self.absorption_fraction,
            "full_absorption_rate": self.full_absorption_rate,
            "splitting_k": self.splitting_k,
        }
        rows = [
            ResultRow("absorption", m, float(v), layer=self.layer, adapter=self.sae_label, n=n, note=note)
            for m, v in vals.items()
        ]
        rows.append(
            ResultRow(
                "absorption",
                "probe_letters_passing",
                float(self.letters_passing),
                layer=self.layer,
                adapter=self.sae_label,
                n=len(self.probe_f1),
                note=self.reason or note,
            )
        )
        return rows


def trained_on_delta(sae) -> bool:
    meta = getattr(getattr(sae, "cfg", None), "metadata", None) or {}
    return str(meta.get("trained_on", "")).lower() == "delta"


def evaluate_absorption(
    probe_data: ProbeData,
    sae,
    sae_label: str = "sae",
    *,
    thresholds: AbsorptionThresholds = AbsorptionThresholds(),
    force: bool = False,
    seed: int = 0,
) -> AbsorptionReport:
    """Splitting and absorption of one SAE (anything with ``encode`` and ``W_dec``) at the probe's layer."""
    th = thresholds
    passing = probe_data.letters_passing(th.min_probe_f1)
    base = dict(
        sae_label=sae_label,
        layer=probe_data.layer,
        probe_f1=dict(probe_data.probe_f1),
        letters_passing=len(passing),
    )
    if trained_on_delta(sae):
        return AbsorptionReport(
            status="not_applicable",
            reason="not applicable: SAE trained on delta activations "
            "(h_adapted - h_base), which do not carry the first-letter signal",
            **base,
        )
    weak = len(passing) < th.min_letters
    if weak and not force:
        return AbsorptionReport(
            status="probe_too_weak",
            reason=f"probe too weak: {len(passing)} letters have probe F1 > {th.min_probe_f1} (need {th.min_letters})",
            **base,
        )
    letters = _letters_absorption(probe_data, sae, [LETTERS.index(c) for c in passing], th, seed)
    rep = AbsorptionReport(status="ok", reason="", letters=letters, forced=weak, **base)
    if letters:
        rep.absorption_fraction = sum(x.absorption_fraction for x in letters) / len(letters)
        rep.full_absorption_rate = sum(x.full_absorption_rate for x in letters) / len(letters)
        rep.splitting_k = sum(x.splitting_k for x in letters) / len(letters)
    return rep


def _letters_absorption(
    probe_data: ProbeData, sae, idx: list[int], th: AbsorptionThresholds, seed: int
) -> list[LetterAbsorption]:
    """Per-letter splitting and absorption for the letters ``idx`` (those whose probe passes)."""
    unit, _ = decoder_rows(sae)
    if unit.shape[1] != probe_data.test_x.shape[1]:
        raise LorascopeError(
            f"SAE d_in = {unit.shape[1]} but the layer's residuals have d = {probe_data.test_x.shape[1]}",
            fix="use an SAE trained on this model",
        )
    train_codes = normalised_codes(sae, probe_data.train_x)
    test_codes = normalised_codes(sae, probe_data.test_x)
    splits: dict[str, LetterSplitting] = k_sparse_splitting(
        train_codes,
        probe_data.train_labels,
        test_codes,
        probe_data.test_labels,
        idx,
        max_k=th.max_k,
        f1_jump_threshold=th.f1_jump_threshold,
        seed=seed,
    )
    logits = probe_data.probe.logits(probe_data.test_x)
    letters: list[LetterAbsorption] = []
    for c in idx:
        tp = (probe_data.test_labels == c) & (logits[:, c] > 0)
        n_tp = int(tp.sum())
        sp = splits[LETTERS[c]]
        if n_tp == 0:  # SAEBench has no rows for such a letter: it drops out of the means
            continue
        wa = word_absorption(
            probe_data.test_x[tp], test_codes[tp], unit, probe_data.probe.direction(c), sp.main_latents, th
        )
        letters.append(
            LetterAbsorption(
                LETTERS[c],
                probe_data.probe_f1[LETTERS[c]],
                n_tp,
                sp.main_latents,
                sp.splitting_k,
                float(wa.fractions.sum()) / n_tp,
                float(wa.full.sum()) / n_tp,
                int(wa.full.sum()),
                sp.f1_by_k,
            )
        )
    return letters


__all__ = [
    "AbsorptionReport",
    "AbsorptionThresholds",
    "LetterAbsorption",
    "ProbeData",
    "ProbeOptions",
    "WordAbsorption",
    "evaluate_absorption",
    "prepare_probe",
    "trained_on_delta",
    "word_absorption",
]
