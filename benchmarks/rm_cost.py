"""What each reward model costs on one profile: trainable parameters, fit time, scoring speed.

    SRLIB_DATA_DIR=... python benchmarks/rm_cost.py --profile cpu [--baselines]

Prints four tables for one data set (default TruthfulQA):

1. trainable parameters of every reward head (SparseRM with K latents per side: projection,
   latents, random; DenseRM) and of every baseline (counted on the wrapped model, nothing is
   trained), and their share of the backbone;
2. SparseRM / DenseRM fit time from cached hidden states (direction selection included), on
   all training pairs and on the baselines' `--baseline-train-pairs` (each seed's draw, as
   chapter 8's `ComparisonData.baseline_subset`), mean ± sd over
   `--seeds`, with the growth of resident memory while fitting;
3. scoring pairs per second with the early exit of `srlib.activations` (blocks 0..L) against a
   forward pass through all blocks (`extraction.full_forward_states`), cache off, plus the head;
4. the baselines as chapter 8 runs them (`srlib.baselines.comparison.baseline_rows`, so both hit
   the same cache entries): test accuracy on the first `--baseline-test-pairs` test pairs,
   training time, peak RSS, RSS growth and scoring pairs/s, read from the baselines cache;
   `--baselines` trains and scores what is missing.

Needs the profile's SAE (`srlib.sae.sae_for_profile` trains it if it is not cached). Timings
depend on the threads (`--threads`) and on whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from extraction import full_forward_states  # benchmarks/extraction.py: the full forward, timed the same way

from srlib.activations import last_token_states
from srlib.backbone import backbone_for_profile, format_pair
from srlib.baselines import (
    COMPARISON_METHODS,
    METHOD_LABELS,
    METHODS,
    costed_fit,
    trainable_parameters,
)
from srlib.baselines import comparison as cmp
from srlib.data_efficiency import fit_feature_rm
from srlib.errors import SrlibError
from srlib.evaluate import mean_sd
from srlib.experiments import DATASET_LABELS, dataset_states
from srlib.profiles import DEFAULT_PROFILE, get_profile
from srlib.reward import RewardHead
from srlib.sae import sae_for_profile


def spread(values: list[float], digits: int = 2) -> str:
    """`srlib.evaluate.mean_sd` of the values (sample sd; just the mean for one value)."""
    return mean_sd(statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None, digits=digits)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n## {title}")
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def parameter_rows(backbone, k: int, settings: dict, total: int) -> list[list]:
    """Table 1: every model's trainable parameters and share of the backbone."""
    heads = {
        f"SparseRM K={k} (projection, 2K inputs)": RewardHead(2 * k),
        f"SparseRM K={k} (SAE latents, 2K inputs)": RewardHead(2 * k),
        f"SparseRM K={k} (random directions, 2K inputs)": RewardHead(2 * k),
        f"DenseRM (d = {backbone.hidden_size} inputs)": RewardHead(backbone.hidden_size),
    }
    counts = {name: head.num_trainable_parameters() for name, head in heads.items()}
    counts.update({METHOD_LABELS[m]: trainable_parameters(m, backbone, **settings[m]) for m in METHODS})
    return [[name, f"{n:,}", f"{100 * n / total:.3f}"] for name, n in counts.items()]


def fit_rows(data: cmp.ComparisonData, plan: cmp.ComparisonPlan, sae) -> tuple[list[list], dict[str, float]]:
    """Table 2: fit times from cached states (early stopping on the validation split only with
    the plan's `use_val`, as chapter 8's `VALIDATION`), on all training pairs and on each seed's
    baselines' pairs, each fit timed by `srlib.baselines.costed_fit` as chapter 8 times it;
    returns the rows and the mean seconds per model."""
    (dataset,) = plan.datasets
    rows, means = [], {}
    for which in ("all", "subset"):
        for features in ("projection", "dense"):
            seconds, growth, accuracy = [], [], []
            for seed in plan.seeds:
                part = data.states[dataset] if which == "all" else data.baseline_subset(dataset, seed)
                trial = costed_fit(part, features, sae=sae, k=plan.k, seed=seed, validation=plan.use_val)
                seconds.append(trial["fit_seconds"])
                growth.append(trial["rss_increase_mb"])
                accuracy.append(100 * trial["full_test_accuracy"])
            name = f"{'SparseRM' if features == 'projection' else 'DenseRM'} ({which})"
            means[name] = statistics.mean(seconds)
            rows.append([name, len(part.train), spread(seconds), spread(growth, 0), spread(accuracy, 1)])
    return rows, means


def scoring_rows(backbone, profile, states, sae, k: int, n_pairs: int) -> list[list]:
    """Table 3: pairs/s of SparseRM scoring with early exit vs a full forward (cache off)."""
    pairs = states.test.pairs[:n_pairs]
    texts = [t for pair in pairs for t in format_pair(backbone.tokenizer, pair)]
    model = fit_feature_rm(states, "projection", sae=sae, k=k, seed=0)
    layer, max_length, batch = profile.layer, profile.max_length, profile.batch_size
    runs = {
        f"early exit (blocks 0..{layer})": lambda: last_token_states(
            backbone, texts, layer, max_length=max_length, batch_size=batch, cache=False, progress=False
        ),
        f"full forward (all {backbone.num_layers} blocks)": lambda: full_forward_states(
            backbone, texts, layer, max_length, batch, False
        ),
    }
    last_token_states(backbone, texts[:batch], layer, cache=False, progress=False)  # warm-up
    seconds, states_by_run = {}, {}
    for name, run in runs.items():
        start = time.perf_counter()
        states_by_run[name] = run()
        model.score_states(states_by_run[name])
        seconds[name] = time.perf_counter() - start
    early_exit = next(iter(seconds.values()))
    rows = [
        [name, len(pairs), f"{s:.2f}", f"{len(pairs) / s:.2f}", f"{s / early_exit:.2f}×"] for name, s in seconds.items()
    ]
    first, second = states_by_run.values()
    rows.append(["max |difference| of the states", "", "", "", f"{(first - second).abs().max().item():.1e}"])
    return rows


def baseline_rows(
    backbone, data: cmp.ComparisonData, plan: cmp.ComparisonPlan, args, total: int, sparse_seconds: float
) -> list[list]:
    """Table 4: the baselines from the cache (or trained now with --baselines)."""
    trials = cmp.baseline_rows(backbone, data, plan, [], only_cached=not args.baselines, progress=args.baselines)
    rows = []
    for method in args.methods:
        part = trials[trials["method"] == method]
        if part.empty:
            rows.append([METHOD_LABELS[method], "0", "not cached", "", "", "", "", "", ""])
            continue
        seconds = part["fit_seconds"].tolist()
        trained = part["n_train_pairs"].iloc[0] > 0
        rows.append(
            [
                METHOD_LABELS[method],
                len(part),
                spread((100 * part["test_accuracy"]).tolist(), 1),
                f"{int(part['trainable_parameters'].iloc[0]):,}",
                f"{100 * part['trainable_parameters'].iloc[0] / total:.3f}",
                spread(seconds, 0) if trained else "–",
                f"{statistics.mean(seconds) / sparse_seconds:,.0f}×" if trained else "–",
                f"{part['peak_rss_mb'].mean():.0f} / +{part['rss_increase_mb'].mean():.0f}",
                f"{part['pairs_per_second'].mean():.2f}",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=DEFAULT_PROFILE)
    parser.add_argument("--dataset", default="truthfulqa", choices=tuple(DATASET_LABELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the profile's")
    parser.add_argument("--n-score", type=int, default=64, help="test pairs timed for the scoring speed")
    parser.add_argument("--baselines", action="store_true", help="train and score the baselines that are not cached")
    parser.add_argument("--methods", nargs="+", default=list(COMPARISON_METHODS), choices=METHODS)
    parser.add_argument("--baseline-train-pairs", type=int, default=None, help="default: the profile's")
    parser.add_argument("--baseline-test-pairs", type=int, default=None, help="default: the profile's")
    parser.add_argument("--baseline-epochs", type=float, default=1.0)
    parser.add_argument(
        "--validation",
        choices=("none", "all"),
        default="none",
        help="the validation labels every model reads, as chapter 8's VALIDATION (default: none)",
    )
    parser.add_argument("--baseline-lr", type=float, default=2e-4)
    parser.add_argument("--baseline-batch-size", type=int, default=1)
    parser.add_argument(
        "--sae-corpus-tokens",
        type=int,
        default=None,
        help="token budget of the SAE's corpus (default: the profile's), as in sae_quality.py",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        profile = get_profile(args.profile)
        if args.sae_corpus_tokens is not None:
            profile = profile.replace(sae_corpus_tokens=args.sae_corpus_tokens)
        args.seeds = args.seeds or list(profile.seeds)
        args.baseline_train_pairs = args.baseline_train_pairs or profile.baseline_train_pairs
        args.baseline_test_pairs = args.baseline_test_pairs or profile.baseline_test_pairs
        backbone = backbone_for_profile(profile, progress=False)
        total = sum(p.numel() for p in backbone.model.parameters())
        plan = cmp.comparison_plan(
            profile,
            k=profile.k,
            datasets=(args.dataset,),
            seeds=args.seeds,
            baselines=args.methods,
            baseline_datasets=(args.dataset,),
            train_pairs=args.baseline_train_pairs,
            test_pairs=args.baseline_test_pairs,
            validation=args.validation,
            epochs=args.baseline_epochs,
            learning_rate=args.baseline_lr,
            batch_size=args.baseline_batch_size,
        )
        print(
            f"{backbone.model_id}: {total:,} parameters, layer {profile.layer}, K = {profile.k}; "
            f"{DATASET_LABELS[args.dataset]}; {torch.get_num_threads()} torch thread(s); seeds {args.seeds}"
        )
        print_table(
            "Trainable parameters",
            ["model", "trainable", "% of backbone"],
            parameter_rows(backbone, profile.k, plan.settings, total),
        )
        sae = sae_for_profile(profile, backbone, progress=False)
        states = dataset_states(backbone, args.dataset, profile, progress=False)
        data = cmp.comparison_data({args.dataset: states}, plan)
        rows, means = fit_rows(data, plan, sae)
        print_table(
            "Fit time from cached hidden states (selection + head; mean ± sd over seeds)",
            ["model (training pairs)", "pairs", "seconds", "RSS growth (MB)", "accuracy, whole test split (%)"],
            rows,
        )
        print_table(
            f"Scoring speed, cache off ({args.n_score} test pairs; SparseRM head included)",
            ["forward pass", "pairs", "seconds", "pairs/s", "time vs early exit"],
            scoring_rows(backbone, profile, states, sae, profile.k, args.n_score),
        )
        print_table(
            f"Baselines ({args.baseline_train_pairs} training pairs, {args.baseline_test_pairs} test pairs; "
            "cost measured when each was trained and scored)",
            [
                "baseline",
                "seeds",
                "accuracy, these test pairs (%)",
                "trainable",
                "% of backbone",
                "train seconds",
                "vs SparseRM (subset)",
                "peak RSS / growth (MB)",
                "scoring pairs/s",
            ],
            baseline_rows(backbone, data, plan, args, total, means["SparseRM (subset)"]),
        )
        if not args.baselines:
            print("(baselines read from the cache only; --baselines trains and scores those not cached)")
    except SrlibError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
