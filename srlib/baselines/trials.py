"""Baselines × seeds through the cache: one row per fit, with its test accuracy, cost and
per-pair outcomes (what chapter 8's table and comparisons read)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from srlib.baselines.cache import baseline_key, cached_fit_baseline, cached_score_pairs, scores_path
from srlib.baselines.registry import METHOD_LABELS, REGISTRY, get_method
from srlib.errors import ConfigError
from srlib.evaluate import pair_outcomes
from srlib.paths import cache_dir
from srlib.reward import CONFIG_NAME

#: The columns of `baseline_trials`' table.
TRIAL_COLUMNS = (
    "dataset",
    "variant",
    "method",
    "seed",
    "test_accuracy",
    "trainable_parameters",
    "fit_seconds",
    "peak_rss_mb",
    "rss_increase_mb",
    "pairs_per_second",
    "n_train_pairs",
    "n_test_pairs",
    "from_cache",
    "best_epoch",
    "outcomes",
)


def baseline_settings(
    max_length: int, *, epochs: float = 1.0, learning_rate: float = 2e-4, batch_size: int = 1
) -> dict[str, dict[str, Any]]:
    """The settings keywords of every method as the book runs them (chapter 8 and
    `benchmarks/rm_cost.py` share them, so both hit the same cache entries): the LoRA methods
    with the given epochs, learning rate and batch size, texts cut to `max_length` tokens and
    the judges' two-answer prompts to twice that."""
    training = dict(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size)
    return {
        name: {**(training if m.trained else {}), "max_length": (2 if m.two_answers else 1) * max_length}
        for name, m in REGISTRY.items()
    }


def baseline_trials(
    backbone,
    dataset: str,
    train_pairs: Sequence,
    val_pairs: Sequence | None,
    test_pairs: Sequence,
    methods: Sequence[str],
    seeds: Sequence[int],
    *,
    settings: Mapping[str, dict] | None = None,
    only_cached: bool = False,
    progress: bool = False,
):
    """Fit (or load) every baseline in `methods` with every seed and score `test_pairs`, all
    through the cache; a DataFrame with one row per fit.

    Columns: dataset, variant (`METHOD_LABELS`), method, seed, test_accuracy (fraction),
    trainable_parameters, fit_seconds, peak_rss_mb, rss_increase_mb, pairs_per_second (test
    scoring), n_train_pairs, n_test_pairs, from_cache, best_epoch (the epoch a LoRA model kept
    on the validation split; None without one), outcomes (per test pair, 1 / 0 / ½ for a tie,
    `srlib.evaluate.pair_outcomes`, for `compare_paired`). `settings` maps a method to its settings
    keywords. The untrained methods (zero-shot judge, log-prob floor) do not depend on the
    seed or the pairs: they run once, with the first seed. With `only_cached`, nothing is
    trained or scored: fits whose model and test scores are not both cached are left out.
    """
    import pandas as pd

    if not seeds:
        raise ConfigError("baseline_trials needs at least one seed")
    specs = [get_method(method) for method in methods]
    rows = []
    for method, spec in zip(methods, specs, strict=True):
        trained = spec.trained
        for seed in seeds if trained else seeds[:1]:
            fit = dict(
                method=method,
                backbone=backbone,
                train_pairs=train_pairs if trained else None,
                val_pairs=val_pairs if trained else None,
                seed=seed,
                **dict((settings or {}).get(method, {})),
            )
            if only_cached:
                directory = cache_dir("baselines") / baseline_key(**fit)
                if not scores_path(directory, test_pairs).is_file() or not (directory / CONFIG_NAME).is_file():
                    continue
            rm = cached_fit_baseline(progress=progress, **fit)
            scores = cached_score_pairs(rm, test_pairs, progress=progress)
            cost = rm.cost
            assert cost is not None  # fitted by cached_fit_baseline, which saves the cost with the model
            rows.append(
                {
                    "dataset": dataset,
                    "variant": METHOD_LABELS[method],
                    "method": method,
                    "seed": seed,
                    "test_accuracy": scores.accuracy,
                    "trainable_parameters": rm.num_trainable_parameters(),
                    "fit_seconds": cost.seconds,
                    "peak_rss_mb": cost.peak_rss_mb,
                    "rss_increase_mb": cost.rss_increase_mb,
                    "pairs_per_second": scores.pairs_per_second,
                    "n_train_pairs": cost.n_train_pairs,
                    "n_test_pairs": len(test_pairs),
                    "from_cache": rm.from_cache,
                    "best_epoch": getattr(rm, "best_epoch", None),
                    "outcomes": pair_outcomes(scores.chosen, scores.rejected),
                }
            )
    return pd.DataFrame(rows, columns=list(TRIAL_COLUMNS))
