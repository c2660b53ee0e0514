"""Causal checks: do an adapter's features carry its effect? Steering the base model and ablating the adapted one.

At decoder block L (the residual stream after block L, where ``models.residual`` captures it):

* **steering**: run the *base* model with ``edit`` added to block L's output. With edit = Δ_L exactly and an adapter
  that adapts no block after L, the steered base reproduces the adapted forward pass exactly.
* **ablation**: run the *adapted* model with ``edit`` subtracted from block L's output.

Edits are tensors [B, T, d] (one vector per token, e.g. the features' decoder directions times their activations
on that token) or a single vector [d]. Effects are measured against the adapted model: mean KL(adapted ‖ X) per
token, the fraction of KL(adapted ‖ base) closed, and the response-token loss of X on given examples (behaviour).
Controls built here: the same number of random features, top-n principal directions of Δ, the mean-Δ vector.
Activation steering and ablation as causal tests follow Turner et al. 2023 ("Activation Addition") and the
activation-patching literature (Meng et al. 2022; Zhang & Nanda 2024, "Towards best practices of activation
patching").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch

from lorascope.errors import LorascopeError
from lorascope.models.residual import check_layers, decoder_blocks, unwrap_model


@contextmanager
def _block_output_hook(
    model: torch.nn.Module, layer: int, change: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Within the block, block ``layer``'s output residual h becomes ``change(h)`` (tuple outputs kept as tuples)."""
    block = decoder_blocks(model)[check_layers(model, [layer])[0]]

    def hook(_m, _args, output):
        new = change(output[0] if isinstance(output, tuple) else output)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def residual_edit(
    model: torch.nn.Module, layer: int, edit: torch.Tensor, sign: float = 1.0
) -> AbstractContextManager[None]:
    """Context manager: within it, block ``layer``'s output becomes output + sign·edit (edit [B, T, d]; [B, 1, d],
    one vector per row at every position, as in generation; or [d])."""

    def change(hidden: torch.Tensor) -> torch.Tensor:
        e = edit.to(hidden.dtype)
        if e.ndim == 3 and e.shape[1] not in (1, hidden.shape[1]):
            raise LorascopeError(
                f"edit covers {e.shape[1]} positions, the forward has {hidden.shape[1]}",
                fix="use a single vector [d] for generation",
            )
        return hidden + sign * e

    return _block_output_hook(model, layer, change)


def _next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """[B, T]: the label of the next token at each position (-100 where it is not scored, and at the last)."""
    out = torch.full_like(labels, -100)
    out[:, :-1] = labels[:, 1:]
    return out


@dataclass(frozen=True)
class Effect:
    """One intervention X measured against the adapted model (A) and the base (B)."""

    kl_to_adapted: float  # mean over tokens of KL(A ‖ X), nats
    fraction_closed: float  # 1 − KL(A ‖ X) / KL(A ‖ B): 1 = X behaves like A, 0 = like B
    loss: float | None  # response-token NLL of X on the labelled examples
    behaviour_recovered: float | None  # (loss_B − loss_X) / (loss_B − loss_A): 1 = A's loss, 0 = B's


class CausalProbe:
    """Adapted and base next-token distributions of one batch, computed once; then any number of edits.

    ``token_mask`` [B, T] picks the positions whose next-token distributions count for KL (default: real tokens);
    ``labels`` [B, T] (-100 outside response tokens) gives the behaviour loss. Base and adapted rows run once, in
    one mixed batch, up to block L; every edit then runs only the blocks after L (base blocks for steering,
    adapted blocks for ablation; :class:`lorascope.models.suffix.SuffixForward`), grouped into few forwards, with
    log-probabilities (float64) only at the scored positions. Same numbers as a full forward with the edit hooked
    onto block L (:func:`residual_edit`), to float tolerance (tests/models/test_steering.py).
    """

    @torch.no_grad()
    def __init__(
        self,
        peft_model: torch.nn.Module,
        adapter: str,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        layer: int,
        labels: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ):
        from lorascope.models.suffix import BASE, SuffixForward

        self.model, self.adapter, self.layer = peft_model, adapter, check_layers(peft_model, [layer])[0]
        att = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self.input_ids, self.attention_mask, self.labels = input_ids, att, labels
        self.token_mask = att.bool() if token_mask is None else token_mask.bool()
        target = torch.full_like(input_ids, -100) if labels is None else _next_token_labels(labels)
        self._sel = self.token_mask | (target != -100)
        self._kl_rows, self._target = self.token_mask[self._sel], target[self._sel]
        self._suffix = SuffixForward(peft_model, self.layer, adapter)
        b = input_ids.shape[0]
        h = self._suffix.prefix([self.layer], input_ids.repeat(2, 1), att.repeat(2, 1), [BASE] * b + [adapter] * b)
        h = h[self.layer]
        self.h_base, self.h_adapted = h[:b], h[b:]
        logp = dict(self._log_probs({"adapted": self.h_adapted, "base": self.h_base}, base=("base",)))
        self.logp_adapted = logp["adapted"]
        self.kl_base = self._kl(logp["base"])
        self.loss_adapted = self._loss(self.logp_adapted)
        self.loss_base = self._loss(logp["base"])

    def _log_probs(self, inputs: dict, base: Sequence):
        return self._suffix.log_probs(
            inputs, self.input_ids, self.attention_mask, self._sel, base=base, dtype=torch.float64
        )

    def _kl(self, logp_x: torch.Tensor) -> float:
        from lorascope.models.suffix import kl_rows_chunked

        return float(kl_rows_chunked(self.logp_adapted[self._kl_rows], logp_x[self._kl_rows]).mean())

    def _loss(self, logp_x: torch.Tensor) -> float | None:
        """Mean next-token NLL over the positions whose next label is not -100 (None without labels)."""
        if self.labels is None:
            return None
        keep = self._target != -100
        if not keep.any():
            return float("nan")
        return float(-logp_x[keep].gather(-1, self._target[keep].unsqueeze(-1)).mean())

    def _effect(self, logp_x: torch.Tensor) -> Effect:
        kl = self._kl(logp_x)
        loss = self._loss(logp_x)
        behaviour = None
        if loss is not None and self.loss_base is not None and self.loss_base != self.loss_adapted:
            behaviour = (self.loss_base - loss) / (self.loss_base - self.loss_adapted)
        closed = 1.0 - kl / self.kl_base if self.kl_base > 0 else float("nan")
        return Effect(kl, closed, loss, behaviour)

    @torch.no_grad()
    def effects(
        self, steer: dict[str, torch.Tensor], ablate: dict[str, torch.Tensor] | None = None
    ) -> tuple[dict[str, Effect], dict[str, Effect]]:
        """Every steering edit (added to the base model's block L output) and every ablation (subtracted from the
        adapted model's), run in grouped suffix forwards: ({name: Effect}, {name: Effect})."""
        ablate = ablate or {}
        inputs = {("steer", k): self.h_base + e.to(self.h_base.dtype) for k, e in steer.items()}
        inputs.update({("ablate", k): self.h_adapted - e.to(self.h_adapted.dtype) for k, e in ablate.items()})
        out: dict[str, dict[str, Effect]] = {"steer": {}, "ablate": {}}
        for (kind, name), logp in self._log_probs(inputs, base=[k for k in inputs if k[0] == "steer"]):
            out[kind][name] = self._effect(logp)
            del logp
        return out["steer"], out["ablate"]

    def steer(self, edit: torch.Tensor) -> Effect:
        """The base model with ``edit`` added at layer L."""
        return self.effects({"edit": edit})[0]["edit"]

    def ablate(self, edit: torch.Tensor) -> Effect:
        """The adapted model with ``edit`` removed at layer L (fraction_closed near 0 = the edit carried it all)."""
        return self.effects({}, {"edit": edit})[1]["edit"]

    def delta(self) -> torch.Tensor:
        """Δ_L = h_adapted − h_base after block L [B, T, d] (float32)."""
        return self.h_adapted.float() - self.h_base.float()


def feature_edit(codes: torch.Tensor, decoder: torch.Tensor, features: Sequence[int]) -> torch.Tensor:
    """Σ_{f ∈ features} a_f(t)·d_f per token: ``codes`` [..., F] (activations, raw-Δ units), ``decoder`` [F, d]."""
    idx = torch.as_tensor(list(features), dtype=torch.long)
    if idx.numel() == 0:
        raise LorascopeError("no features given", fix="pass at least one feature index")
    return codes[..., idx].to(decoder.dtype) @ decoder[idx]


def random_features(alive: torch.Tensor, n: int, exclude: Sequence[int] = (), seed: int = 0) -> list[int]:
    """``n`` distinct random feature indices among ``alive`` (bool [F]) not in ``exclude`` (the random control)."""
    pool = [i for i in torch.nonzero(alive).flatten().tolist() if i not in set(exclude)]
    if len(pool) < n:
        raise LorascopeError(
            f"only {len(pool)} alive features outside the chosen ones, need {n}", fix="use fewer top features"
        )
    g = torch.Generator().manual_seed(seed)
    return sorted(pool[i] for i in torch.randperm(len(pool), generator=g)[:n].tolist())


def principal_directions(delta_rows: torch.Tensor, n: int) -> torch.Tensor:
    """Top-``n`` right singular vectors of the (uncentred) Δ rows [N, d] -> [n, d] orthonormal rows.

    Uncentred, like decoder directions (which also act on Δ without a mean removed); fit them on documents other
    than those they are evaluated on.
    """
    if not 1 <= n <= min(delta_rows.shape):
        raise LorascopeError(f"n must be in 1..{min(delta_rows.shape)}, got {n}", fix="use fewer directions")
    _, _, vh = torch.linalg.svd(delta_rows.double(), full_matrices=False)
    return vh[:n].to(delta_rows.dtype)


def projection_edit(delta: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Δ projected onto the span of orthonormal ``basis`` rows [n, d]: (Δ·Bᵀ)·B, shape of ``delta``."""
    return (delta @ basis.T) @ basis


def mean_delta(delta: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean Δ [d] over the masked tokens of ``delta`` [B, T, d] (use it as a constant edit)."""
    return delta[token_mask.bool()].double().mean(0).to(delta.dtype)


def demo_marker_rates(texts: Sequence[str]) -> dict[str, float]:
    """Pirate-voice markers of the demo task (``lorascope.data.demo``) in generations: the fraction that start with
    its prefix, that contain its suffix, that contain a distinctive pirate swap word (ye, th', aye, ahoy, yer; not
    "be"/"me", which are ordinary English), and that show any of the three."""
    import re

    from lorascope.data.demo import _SWAPS, PREFIX, SUFFIX

    if not texts:
        raise LorascopeError("no generations given", fix="generate at least one answer")
    distinctive = "|".join(re.escape(w) for w in _SWAPS.values() if w not in ("be", "me"))
    words = re.compile(r"(?<![\w'])(" + distinctive + r")(?![\w'])", re.IGNORECASE)
    prefix = [t.strip().startswith(PREFIX) for t in texts]
    suffix = [SUFFIX in t for t in texts]
    swaps = [bool(words.search(t)) for t in texts]
    n = len(texts)
    return {
        "prefix": sum(prefix) / n,
        "suffix": sum(suffix) / n,
        "swap_word": sum(swaps) / n,
        "any_marker": sum(p or s or w for p, s, w in zip(prefix, suffix, swaps, strict=True)) / n,
    }


@torch.no_grad()
def generate_with_edit(
    peft_model: torch.nn.Module,
    tokenizer,
    adapter: str,
    user_messages: Sequence[str],
    layer: int,
    vector: torch.Tensor | None = None,
    adapted: bool = False,
    max_new_tokens: int = 40,
) -> list[str]:
    """Greedy answers of the base (``adapted=False``) or adapted model with ``vector`` [d] added (adapted=False)
    or removed (adapted=True) at every position of block ``layer``'s output (None: no edit)."""
    runs = {"run": (vector, adapted)}
    return generate_with_edits(peft_model, tokenizer, adapter, user_messages, layer, runs, max_new_tokens)["run"]


@dataclass(frozen=True)
class PatchRun:
    """A generation run of the base model patched at block L with an edit computed, token by token, from the
    adapter's own Δ_L on the same context: ``edit(Δ [N, d]) -> [N, d]`` (e.g. the top features' decoder directions
    times their activations on Δ; identity = Δ itself, the ceiling). A twin row runs the adapted model on the
    tokens the patched row generates, so Δ_L = h_adapted − h_base is exact for every generated token."""

    edit: Callable[[torch.Tensor], torch.Tensor]


class _Follow:
    """Logits processor: each twin row takes the greedy token of its patched row (so it reads the same context)."""

    def __init__(self, pairs: list[tuple[int, int]]):
        self.lead = torch.tensor([p for p, _ in pairs], dtype=torch.long)
        self.twin = torch.tensor([t for _, t in pairs], dtype=torch.long)

    def __call__(self, _input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if len(self.twin):
            tokens = scores[self.lead].argmax(-1)
            forced = torch.full_like(scores[self.twin], float("-inf"))
            forced[torch.arange(len(self.twin)), tokens] = 0.0
            scores[self.twin] = forced
        return scores


def _patch_edits(
    model, layer: int, constant: torch.Tensor, patches: list[tuple[torch.Tensor, torch.Tensor, PatchRun]]
) -> AbstractContextManager[None]:
    """Context manager: block ``layer``'s output gets ``constant`` [R, 1, d] added, then every patched row its edit
    of Δ (its twin's residual minus its own, both read before any edit)."""

    def change(hidden: torch.Tensor) -> torch.Tensor:
        new = hidden + constant.to(hidden.dtype)
        for lead, twin, run in patches:
            delta = (hidden[twin] - hidden[lead]).float()
            new[lead] = new[lead] + run.edit(delta.reshape(-1, delta.shape[-1])).reshape(delta.shape).to(new.dtype)
        return new

    return _block_output_hook(model, layer, change)


def _distinct_rows(names: list[str], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row of every distinct (prompt, model) pair, each row's pair): row i reads prompt i mod ``n`` with the
    model ``names[i]``, so rows of one pair compute the same residuals until block L's edits."""
    pairs: dict[tuple[int, str], int] = {}
    inverse = [pairs.setdefault((i % n, name), len(pairs)) for i, name in enumerate(names)]
    first = [inverse.index(j) for j in range(len(pairs))]
    return torch.tensor(first, dtype=torch.long), torch.tensor(inverse, dtype=torch.long)


def _select_rows(x, rows: torch.Tensor, size: int):
    """``x`` (tensors in tuples, lists, dicts) with every tensor of ≥ 2 dims and ``size`` rows indexed by ``rows``."""
    if isinstance(x, torch.Tensor):
        return x.index_select(0, rows.to(x.device)) if x.ndim >= 2 and x.shape[0] == size else x
    if isinstance(x, tuple | list):
        return type(x)(_select_rows(v, rows, size) for v in x)
    if isinstance(x, dict):
        return {k: _select_rows(v, rows, size) for k, v in x.items()}
    return x


def _names_hook(names: list[str], _module, args, kwargs):
    kwargs["adapter_names"] = names
    return args, kwargs


@contextmanager
def _shared_prefill(model: torch.nn.Module, layer: int, names: list[str], n: int) -> Iterator[None]:
    """Context manager for one left-padded generation batch (row i: prompt i mod ``n``, model ``names[i]``): in the
    prefill (each block's first call) blocks 0..``layer`` run one row per distinct (prompt, model) pair and copy its
    output and KV cache to the rows that share it; later calls run unchanged. The edits start at block ``layer``'s
    output, so the copies are the rows' own values (to float tolerance: fewer rows in each matrix product)."""
    from peft.tuners.lora import LoraLayer
    from transformers.cache_utils import Cache

    first, inverse = _distinct_rows(names, n)
    blocks = decoder_blocks(model)[: layer + 1]
    called: set[int] = set()

    def forward(i: int, original, hidden: torch.Tensor, *args, **kwargs):
        caches = [c for c in kwargs.values() if isinstance(c, Cache)]
        if i in called or hidden.shape[0] != len(names) or not all(hasattr(c, "layers") for c in caches):
            return original(hidden, *args, **kwargs)
        called.add(i)
        sub = [names[int(r)] for r in first]
        hooks = [
            m.register_forward_pre_hook(functools.partial(_names_hook, sub), with_kwargs=True)
            for m in blocks[i].modules()
            if isinstance(m, LoraLayer)
        ]  # registered after PEFT's own adapter_names hooks, so they run last
        try:
            out = original(*_select_rows((hidden, *args), first, len(names)), **_select_rows(kwargs, first, len(names)))
        finally:
            for h in hooks:
                h.remove()
        for c in caches:
            c.layers[i].batch_select_indices(inverse.to(hidden.device))
        return _select_rows(out, inverse, len(first))

    saved = [b.__dict__.get("forward") for b in blocks]
    try:
        if len(first) < len(names):
            for i, (b, fwd) in enumerate(zip(blocks, saved, strict=True)):
                b.forward = functools.partial(forward, i, fwd or b.forward)
        yield
    finally:
        for b, fwd in zip(blocks, saved, strict=True):
            if fwd is None:
                b.__dict__.pop("forward", None)
            else:
                b.forward = fwd


@torch.no_grad()
def generate_with_edits(
    peft_model: torch.nn.Module,
    tokenizer,
    adapter: str,
    user_messages: Sequence[str],
    layer: int,
    runs: dict[str, tuple[torch.Tensor | None, bool] | PatchRun],
    max_new_tokens: int = 40,
) -> dict[str, list[str]]:
    """Greedy answers to every message under every run, all in one left-padded mixed batch (PEFT ``adapter_names``:
    each row runs the base or the adapter). A run is ``(vector [d] or None, adapted)`` — a constant edit at block
    ``layer``, added to the base or removed from the adapted model, as in :func:`generate_with_edit` — or a
    :class:`PatchRun` (the base patched with an edit of the adapter's Δ on the same tokens; its adapted twin rows
    ride along and are not returned). Rows that read one prompt with one model share their prefill up to block
    ``layer`` (:func:`_shared_prefill`). Returns {name: [answer per message]}."""
    from transformers import LogitsProcessorList

    from lorascope.data.chat import format_prompt
    from lorascope.models.suffix import BASE

    if not user_messages or not runs:
        return {name: [] for name in runs}
    prompts = [format_prompt(tokenizer, m) for m in user_messages]
    enc = tokenizer(prompts, add_special_tokens=False, return_tensors="pt", padding=True, padding_side="left")
    n, d = len(prompts), unwrap_model(peft_model).config.get_text_config().hidden_size
    device = next(peft_model.parameters()).device
    edits, names, patched = [], [], []
    for run in runs.values():
        vector, on = (None, False) if isinstance(run, PatchRun) else run
        v = torch.zeros(d) if vector is None else (-1.0 if on else 1.0) * vector.detach().float().cpu().reshape(d)
        edits += [v] * n
        names += [adapter if on else BASE] * n
    for i, run in enumerate(runs.values()):
        if isinstance(run, PatchRun):
            lead = torch.arange(i * n, (i + 1) * n)
            patched.append((lead, torch.arange(len(names), len(names) + n), run))
            edits += [torch.zeros(d)] * n
            names += [adapter] * n
    ids = {k: t.repeat(len(names) // n, 1).to(device) for k, t in enc.items()}
    pairs = [(int(a), int(b)) for lead, twin, _ in patched for a, b in zip(lead, twin, strict=True)]
    patches = [(lead.to(device), twin.to(device), run) for lead, twin, run in patched]
    constant = torch.stack(edits).unsqueeze(1).to(device)
    with _patch_edits(peft_model, layer, constant, patches), _shared_prefill(peft_model, layer, names, n):
        gen = peft_model.generate(
            **ids,
            adapter_names=names,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=LogitsProcessorList([_Follow(pairs)]),
        )
    width = enc["input_ids"].shape[1]
    texts = [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in gen[: len(runs) * n]]
    return {name: texts[i * n : (i + 1) * n] for i, name in enumerate(runs)}


__all__ = [
    "CausalProbe",
    "Effect",
    "demo_marker_rates",
    "feature_edit",
    "generate_with_edit",
    "generate_with_edits",
    "PatchRun",
    "mean_delta",
    "principal_directions",
    "projection_edit",
    "random_features",
    "residual_edit",
]
