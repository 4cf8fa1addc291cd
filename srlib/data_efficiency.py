"""Fair comparisons of SparseRM with the baselines (chapter 8): the same labelled pairs for
every model, and test accuracy against the number of training pairs.

A comparison is fair when every model learns from the same labelled data. SparseRM's recipe
stops early on the validation split, which is labelled data too, so a comparison either
gives every model the validation split (SparseRM and DenseRM stop early on it, the LoRA
baselines keep their epoch of lowest validation loss) or gives it to none (`validation`
below). `fit_feature_rm` fits SparseRM or DenseRM either way.

The data-efficiency curve (`data_efficiency`) fits SparseRM, DenseRM and StandardRM on
random subsets of the training split of growing size and scores them on the same test
pairs. For one seed the subsets are nested (the first n pairs of one seeded permutation) and
every method gets the same subset, so a seed varies the pairs drawn as well as each model's
initialisation and batch order; at the whole split only the latter remain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from srlib.errors import ConfigError
from srlib.evaluate import pair_outcomes, seed_interval, tie_share
from srlib.experiments import DatasetStates, SplitStates, fit_on_states, make_model, seeded_head, select_for
from srlib.reward import FeatureRM
from srlib.reward_config import HeadConfig

#: The columns of `data_efficiency`'s table.
EFFICIENCY_COLUMNS = (
    "dataset",
    "method",
    "n_train_pairs",
    "seed",
    "test_accuracy",
    "tie_share",
    "validation",
    "train_digest",
    "outcomes",
)
#: How the curve names the two head-only models (StandardRM keeps `srlib.baselines.METHOD_LABELS`').
FEATURE_METHODS = {"projection": "SparseRM", "dense": "DenseRM"}


def fit_feature_rm(
    states: DatasetStates,
    features: str,
    *,
    sae=None,
    k: int | None = None,
    seed: int = 0,
    validation: bool = True,
    head: HeadConfig | None = None,
) -> FeatureRM:
    """SparseRM (`features="projection"`, top-`k` directions selected on `states.train`) or
    DenseRM (`"dense"`) fitted on the training states.

    With `validation`, training stops early on `states.val` and keeps its best epoch (the
    recipe); without it, no validation label is read: every epoch of `srlib.reward.fit_head`
    runs and the last state is kept. The head is trained with `head` (default: `states.head`,
    the profile's `HeadConfig`), its seed set to `seed` (`srlib.experiments.seeded_head`).
    """
    if features not in FEATURE_METHODS:
        raise ConfigError(f"features must be one of {', '.join(FEATURE_METHODS)}, got {features!r}")
    directions = None
    if features == "projection":
        if sae is None or k is None:
            raise ConfigError("SparseRM needs the SAE and K to select its directions (sae=..., k=...)")
        directions = select_for(states, sae, k)
    model = make_model(features, states, directions=directions, seed=seed)
    return fit_on_states(model, states, validation=validation, head=seeded_head(states, head, seed))


def training_subset(split: SplitStates, n: int, seed: int) -> SplitStates:
    """`n` pairs of `split` drawn by `seed`: the first `n` of one seeded permutation, so for
    one seed a smaller subset lies inside a larger one. `n` ≥ the split's size: all of it
    (in the permuted order)."""
    if n < 1:
        raise ConfigError(f"a training subset needs at least one pair, got n={n}")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    return SplitStates([split.pairs[i] for i in order.tolist()], split.chosen[order], split.rejected[order])


def curve_sizes(sizes: Sequence[int], n_train: int) -> list[int]:
    """The sizes below `n_train`, sorted, plus `n_train` itself (the whole split)."""
    return sorted({int(n) for n in sizes if 0 < n < n_train} | {n_train})


def data_efficiency(
    states: DatasetStates,
    sae,
    k: int,
    *,
    sizes: Sequence[int],
    seeds: Sequence[int],
    lora_sizes: Sequence[int] = (),
    backbone=None,
    lora_settings: Mapping | None = None,
    test: SplitStates | None = None,
    validation: bool = False,
    progress: bool = False,
):
    """Test accuracy against the number of training pairs: one row per (method, size, seed).

    SparseRM and DenseRM are fitted at every size of `curve_sizes(sizes + lora_sizes, len(train))`,
    StandardRM (a LoRA fit through `srlib.baselines.cached_fit_baseline` with
    `lora_settings`; needs `backbone`) at the sizes of `lora_sizes` (one past the split's
    size means the whole split). For
    one (size, seed) every method learns from the same `training_subset`; with `validation`
    each also gets the whole validation split (`fit_feature_rm`, and the baselines keep their
    best epoch on it). All are scored on `test` (default: the test split).

    Columns (`EFFICIENCY_COLUMNS`): test_accuracy counts a tie as half a pair; tie_share;
    train_digest (`srlib.baselines.pairs_digest` of the subset); outcomes (per test pair,
    `srlib.evaluate.pair_outcomes`, for `compare_paired`).
    """
    import pandas as pd

    from srlib.baselines import METHOD_LABELS, cached_fit_baseline, cached_score_pairs, pairs_digest

    if not seeds:
        raise ConfigError("data_efficiency needs at least one seed")
    test = states.test if test is None else test
    grid = curve_sizes([*sizes, *lora_sizes], len(states.train))
    lora = {min(int(n), len(states.train)) for n in lora_sizes}  # a size past the split: all of it
    if lora and backbone is None:
        raise ConfigError("StandardRM's points need the backbone (backbone=...), or pass lora_sizes=()")
    rows = []

    def add(method: str, n: int, seed: int, digest: str | None, s_w, s_l) -> None:
        outcomes = pair_outcomes(s_w, s_l)
        rows.append(
            {
                "dataset": states.name,
                "method": method,
                "n_train_pairs": n,
                "seed": seed,
                "test_accuracy": float(outcomes.mean()),
                "tie_share": tie_share(s_w, s_l),
                "validation": validation,
                "train_digest": digest,
                "outcomes": outcomes,
            }
        )

    for n in grid:
        for seed in seeds:
            subset = dataclasses.replace(states, train=training_subset(states.train, n, seed))
            digest = pairs_digest(subset.train.pairs)
            for features, method in FEATURE_METHODS.items():
                model = fit_feature_rm(subset, features, sae=sae, k=k, seed=seed, validation=validation)
                add(method, n, seed, digest, model.score_states(test.chosen), model.score_states(test.rejected))
            if n in lora:
                rm = cached_fit_baseline(
                    "standard",
                    backbone,
                    subset.train.pairs,
                    states.val.pairs if validation else None,
                    seed=seed,
                    progress=progress,
                    **dict(lora_settings or {}),
                )
                scores = cached_score_pairs(rm, test.pairs, progress=progress)
                add(METHOD_LABELS["standard"], n, seed, digest, scores.chosen, scores.rejected)
    return pd.DataFrame(rows, columns=list(EFFICIENCY_COLUMNS))


def efficiency_summary(curve, confidence: float = 0.95):
    """One row per (dataset, method, size) of a `data_efficiency` table: mean test accuracy
    (%) over seeds, its `confidence` Student-t interval over seeds (low, high), the mean tie
    share (%) and the number of seeds."""
    import pandas as pd

    rows = []
    for (dataset, method, n), group in curve.groupby(["dataset", "method", "n_train_pairs"], sort=False):
        mean, low, high = seed_interval(100 * group["test_accuracy"], confidence)
        rows.append(
            {
                "dataset": dataset,
                "method": method,
                "n_train_pairs": int(n),
                "mean": mean,
                "low": low,
                "high": high,
                "tie share (%)": 100 * group["tie_share"].mean(),
                "seeds": len(group),
            }
        )
    return pd.DataFrame(rows)


def outcome_matrix(trials, **match) -> np.ndarray:
    """The per-pair outcomes of the rows of `trials` whose columns equal `match` (e.g.
    dataset=..., method=...), stacked as [n_seeds, n_pairs] for `compare_paired`."""
    selected = trials
    for column, value in match.items():
        selected = selected[selected[column] == value]
    if selected.empty:
        raise ConfigError(f"no rows with {', '.join(f'{c}={v!r}' for c, v in match.items())}")
    return np.stack(list(selected["outcomes"]))
