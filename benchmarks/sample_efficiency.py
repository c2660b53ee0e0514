"""Fair token-budget experiment: at which budget does SASA reach each comparator's final quality?

Claim under test (SASA, arXiv 2606.06333): SASA matches standard SAEs at about half the token budget.

Protocol (each point is its own training run with its own full LR schedule: warm-up over the first 5% of
steps, linear decay to 0 over the last 20% — never a checkpoint of a longer run):
- budgets T/8, T/4, T/2, T; seeds 0, 1, 2 (init and data order);
- SASA = the published recipe (saes/sasa.py ``recipe="published"``: per-token LayerNorm, encoder renorm,
  λ·mean_g‖D_g‖_* against raw SSE, AuxK over dead latents), only LR, warm-up and λ adapted to these short runs;
- comparators TopK (k = SASA's active dims s·r), BatchTopK (same k) and ReLU-L1 (lorascope's decoder-norm-weighted
  L1 on trainer-scaled inputs), each at SASA's width and at 2× width;
- LR ∈ {3e-3, 1e-2, 3e-2} (and SASA's λ ∈ {0, 0.01, 0.1, 1, 100}, ReLU's L1 coefficient ∈ {1, 5}) picked per
  architecture and width by held-out FVU in a sweep of 80-step runs (20,480 tokens) on a separate seed (100) on the
  planted data, cached per model in benchmarks/out/sample_efficiency_settings.json (a model whose grid changes is
  swept again), then used for every budget, seed and dataset
  (inputs are normalised in all of them: LayerNorm for SASA, the trainer's global scale for the others);
- (a) planted data (evals/synthetic.py): d = 64, 24 features of intrinsic dims 1, 2, 4, 8, 16, 2 active, one pool
  of 81,920 samples (each run streams its own shuffle); T = 160 steps × 256 = 40,960 tokens;
  SASA 32 groups × rank 16 (r ≥ every d_i), s = 2 -> width 512, 32 active dims;
  (b) SmolLM2-135M base residual after block 15 (of 30) on 128 demo documents (embedded model; cached under
  benchmarks/out/), 16 held-out documents for evaluation; T = 48 steps × 128 = 6,144 tokens;
  SASA 144 groups × rank 4, s = 8 -> width 576 (1× d), 32 active dims;
- the two parts run in parallel processes (``--jobs 2``), one thread each; ``--models a,b`` runs some models
  only (own CSV; ``--report`` merges the CSVs and prints the tables);
- metrics: held-out FVU (Σ‖x − x̂‖² / Σ‖x − μ‖²); for (b) also, at budget T for seed 0, SAEBench CE-loss and KL
  scores of the SAE spliced into the model (lorascope.evals.core) on 3 held-out documents.
- "budget to reach": per SASA seed, the smallest budget at which SASA's held-out FVU ≤ the comparator's mean final
  FVU (budget T), linearly interpolated in log budget; "< T/8" / "> T" when outside the range.

    python benchmarks/sample_efficiency.py            # both parts (sized for ~15 min on 2 busy cores)
    python benchmarks/sample_efficiency.py --quick    # a smoke run: 1 seed, short budgets
    python benchmarks/sample_efficiency.py --part planted
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch

import lorascope.saes  # noqa: F401  (registers the architectures)
from lorascope.evals.synthetic import PlantedConfig, PlantedFeatures
from lorascope.saes.base import create_sae
from lorascope.saes.trainer import TrainerConfig, evaluate_sae, train_sae

OUT = Path(__file__).resolve().parent / "out"
FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1.0)
LRS = (3e-3, 1e-2, 3e-2)
SASA_LAMBDAS = (0.0, 0.01, 0.1, 1.0, 100.0)
RELU_L1 = (1.0, 5.0)


def model_specs(d: int, groups: int, rank: int, s: int) -> dict[str, tuple[str, int, dict]]:
    """name -> (architecture, d_sae, arch kwargs)."""
    width, k = groups * rank, s * rank
    # nuclear_form="gram": the nuclear norm from the r×r Gram's eigenvalues, as the authors compute it (and much
    # faster than a batched SVD of the [r, d] blocks on a CPU)
    specs = {"sasa": ("sasa", width, {"groups": groups, "rank": rank, "s": s, "nuclear_form": "gram"})}
    for mult, tag in ((1, ""), (2, "_2x")):
        specs[f"topk{tag}"] = ("topk", mult * width, {"k": k})
        specs[f"batchtopk{tag}"] = ("batchtopk", mult * width, {"k": k})
        specs[f"relu_l1{tag}"] = ("relu", mult * width, {"l1_coefficient": 5.0})
    return specs


def train_one(
    spec: tuple[str, int, dict], d: int, stream, tokens: int, batch: int, lr: float, seed: int, lam: float | None = None
):
    """One run with its own schedule; ``lam`` = SASA's nuclear coefficient or ReLU's L1 coefficient."""
    arch, d_sae, kw = spec
    kw = dict(kw)
    if lam is not None:
        kw["nuclear_coefficient" if arch == "sasa" else "l1_coefficient"] = lam
    torch.manual_seed(seed)
    sae = create_sae(arch, d, d_sae, seed=seed, **kw)
    steps = max(1, tokens // batch)
    tc = TrainerConfig(
        total_tokens=steps * batch,
        batch_size=batch,
        lr=lr,
        warmup_steps=max(1, steps // 20),
        decay_fraction=0.2,
        init_tokens=min(4096, 8 * batch),
        seed=seed,
        log_every=10**9,
    )
    return train_sae(sae, stream(seed), tc, progress=False).sae


def held_out_fvu(sae, x: torch.Tensor) -> tuple[float, float]:
    ev = evaluate_sae(sae, x)
    return float(ev["fvu"]), float(ev["l0"])


def pick_settings(specs, d, stream, x_eval, tokens, batch) -> dict[str, tuple[float, float | None]]:
    """Best (lr, λ) per model by held-out FVU at ``tokens`` on seed 100 (λ: SASA nuclear / ReLU L1 coefficient)."""
    best = {}
    for name, spec in specs.items():
        extra = {"sasa": SASA_LAMBDAS, "relu": RELU_L1}.get(spec[0], (None,))
        grid = [(lr, lam) for lr in LRS for lam in extra]
        scored = [
            (held_out_fvu(train_one(spec, d, stream, tokens, batch, lr, 100, lam), x_eval)[0], lr, lam)
            for lr, lam in grid
        ]
        f, lr, lam = min(scored, key=lambda t: t[0] if math.isfinite(t[0]) else math.inf)
        best[name] = (lr, lam)
        print(
            f"  sweep {name:12s} best lr={lr:g}" + (f" λ={lam:g}" if lam is not None else "") + f" (FVU {f:.4f})",
            flush=True,
        )
    return best


def budget_to_reach(budgets: list[int], fvus: list[float], target: float) -> float:
    """Smallest budget with FVU ≤ target, interpolated in log budget (0 if already at the first, inf if never)."""
    if fvus[0] <= target:
        return 0.0
    for i in range(1, len(budgets)):
        b0, f0, b1, f1 = budgets[i - 1], fvus[i - 1], budgets[i], fvus[i]
        if f1 <= target:
            t = (f0 - target) / (f0 - f1)
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    return math.inf


def run_part(part: str, specs, d, stream, x_eval, total, batch, seeds, settings, splice=None, save=None) -> list[dict]:
    """Every (model, seed, budget) run; ``splice(sae)`` adds spliced scores at budget T for the seeds in
    ``splice.seeds``; ``save(rows)`` is called after each (model, seed)."""
    rows = []
    budgets = [max(batch, int(total * f) // batch * batch) for f in FRACTIONS]
    for name, spec in specs.items():
        lr, lam = settings[name]
        for seed in seeds:
            for b in budgets:
                t0 = time.perf_counter()
                sae = train_one(spec, d, stream, b, batch, lr, seed, lam)
                fvu, l0 = held_out_fvu(sae, x_eval)
                row = {
                    "part": part,
                    "model": name,
                    "d_sae": spec[1],
                    "seed": seed,
                    "tokens": b,
                    "lr": lr,
                    "coefficient": lam if lam is not None else "",
                    "fvu": fvu,
                    "l0": l0,
                    "seconds": time.perf_counter() - t0,
                }
                if splice is not None and b == budgets[-1] and seed in splice.seeds:  # the model is slow here
                    row.update(splice(sae))
                rows.append(row)
            print(f"  {part} {name:12s} seed {seed}: FVU " + " ".join(f"{r['fvu']:.4f}" for r in rows[-4:]), flush=True)
            if save is not None:
                save(rows)
    return rows


def reach_table(rows: list[dict], seeds) -> list[dict]:
    if not any(r["model"] == "sasa" for r in rows):  # a --models run without SASA: nothing to compare here
        return []
    budgets = sorted({r["tokens"] for r in rows})
    total = budgets[-1]

    def fv(model, seed):
        return [
            next(r["fvu"] for r in rows if r["model"] == model and r["seed"] == seed and r["tokens"] == b)
            for b in budgets
        ]

    out = []
    for comp in sorted({r["model"] for r in rows} - {"sasa"}):
        target = sum(fv(comp, s)[-1] for s in seeds) / len(seeds)
        fr = sorted(budget_to_reach(budgets, fv("sasa", s), target) / total for s in seeds)
        sasa_final = sum(fv("sasa", s)[-1] for s in seeds) / len(seeds)
        # the reverse question: where does the comparator reach SASA's final FVU?
        back = sorted(budget_to_reach(budgets, fv(comp, s), sasa_final) / total for s in seeds)
        out.append(
            {
                "part": rows[0]["part"],
                "comparator": comp,
                "comparator_final_fvu": target,
                "sasa_final_fvu": sasa_final,
                "budget_fraction_median": fr[len(fr) // 2],
                "budget_fraction_min": fr[0],
                "budget_fraction_max": fr[-1],
                "comparator_reaches_sasa_final_median": back[len(back) // 2],
            }
        )
    return out


def _mean_of(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows if isinstance(r.get(key), float)]
    return f"{sum(vals) / len(vals):.4f}" if vals else "—"


def _fmt_frac(f: float) -> str:
    if f == 0.0:
        return "≤ T/8"
    return "> T" if math.isinf(f) else f"{f:.2f}·T"


def print_tables(rows: list[dict], reach: list[dict]) -> None:
    budgets = sorted({r["tokens"] for r in rows})
    part = rows[0]["part"]
    extra = [k for k in ("ce_score", "kl_score") if any(isinstance(r.get(k), float) for r in rows)]
    print(
        f"\n[{part}] held-out FVU, mean ± sd over seeds (L0 at T)"
        + (", CE-loss / KL score at T (spliced seeds)" if extra else "")
    )
    print(
        "| model | d_sae | " + " | ".join(f"{b:,} tok" for b in budgets) + " | L0 |" + "".join(f" {k} |" for k in extra)
    )
    print("|---" * (3 + len(budgets) + len(extra)) + "|")
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for b in budgets:
            v = torch.tensor([r["fvu"] for r in rows if r["model"] == model and r["tokens"] == b], dtype=torch.float64)
            cells.append(f"{float(v.mean()):.4f} ± {float(v.std()) if len(v) > 1 else 0.0:.4f}")
        at_t = [r for r in rows if r["model"] == model and r["tokens"] == budgets[-1]]
        l0 = sum(r["l0"] for r in at_t) / len(at_t)
        ex = "".join(f" {_mean_of(at_t, k)} |" for k in extra)
        print(f"| {model} | {at_t[0]['d_sae']} | " + " | ".join(cells) + f" | {l0:.1f} |" + ex)
    print(f"\n[{part}] budget at which SASA reaches the comparator's final (budget T) FVU: median [min–max] over seeds")
    print(
        "| comparator | comparator FVU at T | SASA FVU at T | SASA budget to reach | token efficiency "
        "| comparator reaches SASA's FVU at T at |"
    )
    print("|---|---|---|---|---|---|")
    for r in reach:
        med = r["budget_fraction_median"]
        eff = "—" if med in (0.0, math.inf) else f"{1 / med:.2f}×"
        print(
            f"| {r['comparator']} | {r['comparator_final_fvu']:.4f} | {r['sasa_final_fvu']:.4f} | "
            f"{_fmt_frac(med)} [{_fmt_frac(r['budget_fraction_min'])}–{_fmt_frac(r['budget_fraction_max'])}] | "
            f"{eff} | {_fmt_frac(r['comparator_reaches_sasa_final_median'])} |"
        )


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def planted_setup(args, n_pool: int):
    gen = PlantedFeatures(PlantedConfig(d=64, n_features=24, dims=(1, 2, 4, 8, 16), active=2, seed=0))
    x_eval = gen.sample(4096, seed=987_654).x
    specs = model_specs(64, groups=32, rank=16, s=2)
    pool = gen.sample(n_pool, seed=1).x  # one pool of fresh samples; each run streams its own shuffle of it

    def stream(seed):
        g = torch.Generator().manual_seed(seed + 1)
        while True:
            perm = torch.randperm(pool.shape[0], generator=g)
            for i in range(0, pool.shape[0] - args.batch + 1, args.batch):
                yield pool[perm[i : i + args.batch]]

    return specs, stream, x_eval


def _grid_key(args, spec) -> dict:
    extra = {"sasa": SASA_LAMBDAS, "relu": RELU_L1}.get(spec[0], ())
    key = {
        "lrs": LRS,
        "coefficients": extra,
        "steps": args.sweep_steps,
        "batch": args.batch,
        "seed": 100,
        "planted": "d64_f24_dims1-16_a2",
        "pool": args.pool,
    }
    return json.loads(json.dumps(key))


def get_settings(args) -> dict[str, tuple[float, float | None]]:
    """The sweep's (lr, λ) per model, cached per model in benchmarks/out (keyed by that model's sweep grid): a
    model whose grid changed is swept again, the others are reused."""
    path = OUT / ("sample_efficiency_settings" + ("_quick" if args.quick else "") + ".json")
    blob = json.loads(path.read_text()) if path.exists() else {}
    specs, stream, x_eval = planted_setup(args, args.pool)
    settings, todo = {}, {}
    for name, spec in specs.items():
        entry = blob.get(name)
        if isinstance(entry, dict) and entry.get("key") == _grid_key(args, spec):
            settings[name] = tuple(entry["best"])
        else:
            todo[name] = spec
    if todo:
        print(
            f"sweep {', '.join(todo)} on planted data at {args.sweep_steps * args.batch:,} tokens, seed 100", flush=True
        )
        for name, best in pick_settings(todo, 64, stream, x_eval, args.sweep_steps * args.batch, args.batch).items():
            settings[name] = best
            blob[name] = {"key": _grid_key(args, todo[name]), "best": best}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(blob, indent=1) + "\n")
    print("settings (lr, coefficient): " + ", ".join(f"{k} {v}" for k, v in settings.items()), flush=True)
    return settings


def only(specs: dict, args) -> dict:
    return {k: v for k, v in specs.items() if not args.models or k in args.models.split(",")}


def planted_part(args, seeds, settings) -> list[dict]:
    total = args.planted_steps * args.batch
    specs, stream, x_eval = planted_setup(args, args.pool)
    specs = only(specs, args)
    print(f"(a) planted: d=64, 24 features of dims 1/2/4/8/16, 2 active; T = {total:,} tokens", flush=True)
    return run_part(
        "planted", specs, 64, stream, x_eval, total, args.batch, seeds, settings, save=part_saver("planted", args)
    )


def real_activations(args, base) -> dict:
    """Base residual after block ``args.layer`` of the embedded SmolLM2 on the demo data (cached)."""
    path = OUT / f"smollm2_block{args.layer}_demo{args.docs}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    from lorascope.data import make_demo_dataset, tokenize_example
    from lorascope.models.lora import collate
    from lorascope.models.residual import ResidualCapture

    docs = [tokenize_example(base.tokenizer, ex) for ex in make_demo_dataset(args.docs, seed=0)]
    cap = ResidualCapture(base.model, [args.layer])
    rows = []
    for i in range(0, len(docs), 16):
        batch = collate(docs[i : i + 16], base.tokenizer.pad_token_id or 0)
        h = cap(batch["input_ids"], batch["attention_mask"])[args.layer].float()
        for j, doc in enumerate(docs[i : i + 16]):
            rows.append(h[j, 1 : len(doc)])  # skip position 0 (attention sink), drop padding
    n_eval = args.eval_docs
    blob = {
        "train": torch.cat(rows[n_eval:]),
        "eval": torch.cat(rows[:n_eval]),
        "eval_ids": [d.input_ids for d in docs[:n_eval]],
        "layer": args.layer,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)
    return blob


def real_part(args, seeds, settings_planted) -> list[dict]:
    from lorascope.evals.core import CoreOptions, core_metrics
    from lorascope.models import load_base

    t0 = time.perf_counter()
    base = load_base("embedded")
    blob = real_activations(args, base)
    train_x, x_eval = blob["train"], blob["eval"]
    print(
        f"(b) SmolLM2 block {args.layer}: {train_x.shape[0]:,} train rows, {x_eval.shape[0]:,} held-out rows "
        f"({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    specs = only(model_specs(train_x.shape[1], groups=144, rank=4, s=8), args)
    settings = {name: settings_planted[name] for name in specs}

    def stream(seed):
        g = torch.Generator().manual_seed(seed + 1)
        while True:
            yield train_x[torch.randint(0, train_x.shape[0], (args.real_batch,), generator=g)]

    cache: dict = {}
    splice_ids = blob["eval_ids"][: args.splice_docs]

    def splice(sae):
        m = core_metrics(
            base.model,
            base.tokenizer,
            sae,
            args.layer,
            splice_ids,
            options=CoreOptions(batch_size=args.splice_docs),
            cache=cache,
        )
        return {k: m[k] for k in ("ce_score", "kl_score", "frac_alive", "mean_max_decoder_cos")}

    splice.seeds = set(seeds[: args.splice_seeds])

    total = args.real_steps * args.real_batch
    print(f"  T = {total:,} tokens; CE/KL on {len(splice_ids)} held-out documents", flush=True)
    return run_part(
        "smollm2",
        specs,
        train_x.shape[1],
        stream,
        x_eval,
        total,
        args.real_batch,
        seeds,
        settings,
        splice,
        part_saver("real", args),
    )


def part_path(name: str, args) -> Path:
    """Per-part CSV; a run restricted with --models writes its own file (parts may run as several processes)."""
    tag = "__" + args.models.replace(",", "+") if args.models else ""
    return OUT / f"sample_efficiency_{name}{tag}{'_quick' if args.quick else ''}.csv"


def part_saver(name: str, args):
    return lambda rows: write_csv(part_path(name, args), rows)


def _run_part(job):
    """One part in this process; its rows are also written at once (a failure in the other part loses nothing)."""
    name, args, seeds, settings = job
    torch.set_num_threads(1)
    try:
        rows = planted_part(args, seeds, settings) if name == "planted" else real_part(args, seeds, settings)
    except Exception:  # report and go on with the other part
        import traceback

        traceback.print_exc()
        return []
    write_csv(part_path(name, args), rows)
    return rows


def read_rows(path: Path) -> list[dict]:
    """Rows of a per-part CSV with numbers parsed back."""

    def parse(v: str):
        if v == "":
            return v
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    with path.open(newline="") as f:
        return [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _by_model(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["model"], []).append(r)
    return out


def report(args) -> None:
    """Tables and the combined CSVs from the per-part CSVs already written (e.g. parts run separately)."""
    all_rows, reach = [], []
    for name in ("planted", "real"):
        # the full-part file, overridden model by model by files of --models runs
        by_model: dict[str, list[dict]] = {}
        files = sorted(OUT.glob(f"sample_efficiency_{name}*.csv"), key=lambda f: ("__" in f.name, f.name))
        for f in files:
            if f.name.endswith("_quick.csv") != bool(args.quick):
                continue
            for model, group in _by_model(read_rows(f)).items():
                by_model[model] = group
        rows = [r for group in by_model.values() for r in group]
        if not rows:
            print(f"(no sample_efficiency_{name}*.csv)")
            continue
        seeds = sorted({r["seed"] for r in rows})
        all_rows += rows
        reach += reach_table(rows, seeds)
        print_tables(rows, reach_table(rows, seeds))
    suffix = "_quick" if args.quick else ""
    write_csv(OUT / f"sample_efficiency_runs{suffix}.csv", all_rows)
    write_csv(OUT / f"sample_efficiency_reach{suffix}.csv", reach)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("planted", "real", "both"), default="both")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, short budgets")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--planted-steps", type=int, default=160, help="steps at budget T (planted)")
    ap.add_argument("--sweep-steps", type=int, default=80, help="steps of the LR/λ sweep runs (planted)")
    ap.add_argument("--pool", type=int, default=81_920, help="planted samples drawn once; runs stream shuffles")
    ap.add_argument("--real-steps", type=int, default=48, help="steps at budget T (SmolLM2)")
    ap.add_argument("--real-batch", type=int, default=128)
    ap.add_argument("--jobs", type=int, default=2, help="run the two parts in parallel processes")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--docs", type=int, default=128)
    ap.add_argument("--eval-docs", type=int, default=16)
    ap.add_argument("--splice-docs", type=int, default=3)
    ap.add_argument("--splice-seeds", type=int, default=1, help="seeds whose budget-T SAE is spliced (CE/KL)")
    ap.add_argument("--report", action="store_true", help="only print tables from the per-part CSVs")
    ap.add_argument("--models", default="", help="comma list: run only these models (rows merged into the CSV)")
    args = ap.parse_args()
    if args.report:
        report(args)
        return
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    if args.quick:
        args.planted_steps, args.sweep_steps, args.real_steps, args.docs, args.splice_docs = 32, 16, 16, 64, 2
        args.pool = 8192
    t0 = time.perf_counter()
    settings = get_settings(args)
    parts = [p for p in ("planted", "real") if args.part in (p, "both")]
    jobs = [(p, args, seeds, settings) for p in parts]
    if args.jobs > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(min(args.jobs, len(jobs))) as pool:
            results = pool.map(_run_part, jobs)
    else:
        results = [_run_part(j) for j in jobs]
    all_rows, reach = [], []
    for rows in (r for r in results if r):
        all_rows += rows
        reach += reach_table(rows, seeds)
        print_tables(rows, reach_table(rows, seeds))
    suffix = "_quick" if args.quick else ""
    write_csv(OUT / f"sample_efficiency_runs{suffix}.csv", all_rows)
    write_csv(OUT / f"sample_efficiency_reach{suffix}.csv", reach)
    print(f"\nwall time {time.perf_counter() - t0:.0f}s; CSV under {OUT}")


if __name__ == "__main__":
    main()
