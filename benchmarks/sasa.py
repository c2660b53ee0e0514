"""SASA (recipe="lorascope", the numbers in README) vs TopK on planted subspace features — and on real activations.

Claim under test (arXiv 2606.06333): SASA "matches standard SAEs at about half the token budget".
Matched comparison: same width (d_sae = groups·rank) and same active dimensions per token (TopK k = s·rank).
Both train with the same loop (Adam, constant LR, linear decay over the last 20%, unit-norm decoder
rows, dead-latent mask for AuxK, one thread); SASA also resamples groups firing below 2e-4 at 10% and 20% of
training (REFERENCE: "done early, with optimiser state reset"). FVU is measured on a fixed held-out planted
set at checkpoints. Token ratio = tokens at SASA's first checkpoint with FVU ≤ TopK's final FVU, over
TopK's tokens.

    python benchmarks/sasa.py                # d=128, 64 features (dims 1-4), 4 active; groups 1x and 1.5x
    python benchmarks/sasa.py --quick        # fewer tokens
    python benchmarks/sasa.py --d 384
    python benchmarks/sasa.py --activations acts.safetensors   # real [N, d] activations: FVU at equal L0-dim
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import lorascope.saes.sasa  # noqa: F401  (registers "sasa")
import lorascope.saes.topk  # noqa: F401
from lorascope.evals.planted import sae_planted_report
from lorascope.evals.synthetic import PlantedConfig, PlantedFeatures
from lorascope.geometry.metrics import fvu
from lorascope.saes.base import SAE, TrainContext, create_sae


def train(
    sae: SAE, batches, steps: int, lr: float, x_eval: torch.Tensor, n_evals: int, dead_window: int = 100
) -> list[tuple[int, float]]:
    """Train in place; return [(tokens seen, held-out FVU)] at ``n_evals`` evenly spaced checkpoints."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sae.init_b_dec(next(batches))
    last = torch.zeros(sae.d_sae, dtype=torch.long)
    marks = {round(steps * (i + 1) / n_evals) for i in range(n_evals)}
    resample_at = {steps // 10, steps // 5} if sae.architecture == "sasa" else set()
    curve, tokens = [], 0
    for step in range(steps):
        x = next(batches)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (steps - step) / (0.2 * steps))
        ctx = TrainContext(step, steps, min(1.0, (step + 1) / (0.05 * steps)), (step - last) > dead_window)
        out = sae.training_loss(x, ctx)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.post_step()
        ids = out.active.flatten()
        last[ids[ids >= 0].unique()] = step
        tokens += x.shape[0]
        if step in resample_at:
            xs = torch.cat([next(batches) for _ in range(16)])
            sae.resample_groups(xs, sae.group_firing_rate(xs), threshold=2e-4, optimizer=opt)
        if step + 1 in marks:
            with torch.no_grad():
                curve.append((tokens, fvu(x_eval, sae(x_eval))))
    return curve


def token_ratio(sasa_curve, topk_curve) -> float:
    """Tokens at SASA's first checkpoint with FVU ≤ TopK's final FVU, over TopK's tokens (inf if never)."""
    target, total = topk_curve[-1][1], topk_curve[-1][0]
    for tokens, f in sasa_curve:
        if f <= target:
            return tokens / total
    return float("inf")


def planted_run(args: argparse.Namespace) -> None:
    cfg = PlantedConfig(d=args.d, n_features=args.features, dims=tuple(args.dims), active=args.active, seed=args.seed)
    gen = PlantedFeatures(cfg)
    held = gen.sample(args.eval_samples, seed=987_654)
    steps = args.tokens // args.batch_size
    print(
        f"planted: d={cfg.d}, {cfg.n_features} features of dims {cfg.dims}, {cfg.active} active; "
        f"{steps} steps x {args.batch_size} = {steps * args.batch_size} tokens, lr {args.lr}"
    )
    curves, rows = {}, []
    for mult in args.group_multipliers:
        groups = round(mult * cfg.n_features)
        d_sae = groups * args.rank
        k = args.s * args.rank
        for name, kw in (
            (
                "sasa",
                dict(groups=groups, rank=args.rank, s=args.s, recipe="lorascope", nuclear_coefficient=args.nuclear),
            ),
            ("topk", dict(k=k)),
        ):
            torch.manual_seed(args.seed)
            sae = create_sae(name, cfg.d, d_sae, seed=args.seed, **kw)
            t0 = time.perf_counter()
            curve = train(sae, gen.batches(args.batch_size, seed=args.seed + 1), steps, args.lr, held.x, args.evals)
            sec = time.perf_counter() - t0
            rep = sae_planted_report(sae, gen, held).summary()
            curves[(mult, name)] = curve
            rows.append((mult, name, d_sae, curve[-1][1], rep, sec))
        ratio = token_ratio(curves[(mult, "sasa")], curves[(mult, "topk")])
        print(f"groups {mult}x: SASA tokens to reach TopK's final FVU / TopK tokens = {ratio:.2f}")
    _print_curves(curves)
    _print_summary(rows, cfg.dims)
    _plot(curves, Path(args.out) / f"sasa_planted_d{cfg.d}.png", f"planted d={cfg.d}")


def _print_curves(curves) -> None:
    keys = list(curves)
    print("\nheld-out FVU vs tokens")
    print("tokens   " + " ".join(f"{f'{n}@{m}x':>11}" for m, n in keys))
    for i in range(len(curves[keys[0]])):
        print(f"{curves[keys[0]][i][0]:>8} " + " ".join(f"{curves[k][i][1]:>11.4f}" for k in keys))


def _print_summary(rows, dims) -> None:
    print(
        "\nfinal: FVU, splitting (units carrying 90% of a feature), recovery (mean cos², best unit / "
        "cover), merged fraction, leakage, fraction of features whose best unit has rank = d_i"
    )
    head = f"{'model':<10}{'d_sae':>6}{'FVU':>8}" + "".join(f"{f'split{d}':>8}" for d in dims)
    head += f"{'rec_best':>9}{'rec_cov':>8}{'merged':>7}{'leak':>6}{'rank=':>6}{'sec':>6}"
    print(head)
    for mult, name, d_sae, f, rep, sec in rows:
        line = f"{f'{name}@{mult}x':<10}{d_sae:>6}{f:>8.4f}"
        line += "".join(f"{rep[f'split_d{d}']:>8.2f}" for d in dims)
        line += (
            f"{rep['recovery_best']:>9.3f}{rep['recovery_cover']:>8.3f}{rep['merged_fraction']:>7.2f}"
            f"{rep['leakage']:>6.2f}{rep['rank_exact']:>6.2f}{sec:>6.0f}"
        )
        print(line)


def _plot(curves, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorascope.io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    for (mult, name), c in curves.items():
        ax.plot(
            [t for t, _ in c],
            [f for _, f in c],
            marker="o",
            ms=3,
            label=f"{name}, groups {mult}x",
            ls="-" if name == "sasa" else "--",
        )
    ax.set(xlabel="tokens seen", ylabel="held-out FVU", yscale="log", title=title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    print(f"figure: {path}")


def real_run(args: argparse.Namespace) -> None:
    """Both SAEs on real activations [N, d] (first tensor in the file): held-out FVU at equal L0-dimension."""
    from safetensors.torch import load_file

    tensors = load_file(args.activations)
    x = next(iter(tensors.values())).float()
    x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))]
    n_eval = max(x.shape[0] // 10, 1)
    held, train_x = x[:n_eval], x[n_eval:]
    scale = (x.shape[1] ** 0.5) / float(train_x.norm(dim=1).mean())  # mean norm sqrt(d), like the trainer
    held, train_x = held * scale, train_x * scale
    steps = args.tokens // args.batch_size

    def batches():
        g = torch.Generator().manual_seed(args.seed + 1)
        while True:
            yield train_x[torch.randint(0, train_x.shape[0], (args.batch_size,), generator=g)]

    d = x.shape[1]
    groups = args.real_groups
    curves = {}
    sasa_kw = dict(groups=groups, rank=args.rank, s=args.s, recipe="lorascope", nuclear_coefficient=args.nuclear)
    for name, kw in (("sasa", sasa_kw), ("topk", dict(k=args.s * args.rank))):
        torch.manual_seed(args.seed)
        sae = create_sae(name, d, groups * args.rank, seed=args.seed, **kw)
        curves[(1, name)] = train(sae, batches(), steps, args.lr, held, args.evals)
    print(f"real activations {tuple(x.shape)}: d_sae={groups * args.rank}, L0-dim {args.s * args.rank}")
    _print_curves(curves)
    print(f"token ratio = {token_ratio(curves[(1, 'sasa')], curves[(1, 'topk')]):.2f}")
    _plot(curves, Path(args.out) / "sasa_real.png", f"real activations d={d}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--dims", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--active", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--s", type=int, default=4, help="active groups (TopK k = s·rank)")
    p.add_argument("--group-multipliers", type=float, nargs="+", default=[1.0, 1.5])
    p.add_argument("--nuclear", type=float, default=1e-4)
    p.add_argument("--tokens", type=int, default=300_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--evals", type=int, default=12)
    p.add_argument("--eval-samples", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="150k tokens, 6 checkpoints")
    p.add_argument("--activations", type=str, default=None, help=".safetensors with one [N, d] tensor")
    p.add_argument("--real-groups", type=int, default=1152)
    p.add_argument("--out", type=str, default="benchmarks/out")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.evals = 150_000, 6
    torch.set_num_threads(1)
    if args.activations:
        real_run(args)
    else:
        planted_run(args)


if __name__ == "__main__":
    main()
