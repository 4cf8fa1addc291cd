"""Figure 3's comparison as chapter 8 runs it: SparseRM and DenseRM costed like the baselines,
every model on the same labelled pairs and the same common test pairs, and the paired verdicts.

`comparison_plan` resolves the chapter's parameters (None: the profile's) into one frozen
`ComparisonPlan`; `comparison_data` cuts the splits every model shares; `feature_trials`,
`with_extraction`, `baseline_rows` and `all_trials` give one row per fit; `comparison_verdicts`
and `efficiency_verdicts` compare them with `srlib.evaluate.compare_paired`. The sentences and
tables that show the results are in `srlib.present`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from srlib.baselines.cost import costed_fit, extraction_cost
from srlib.baselines.registry import COMPARISON_METHODS, METHOD_LABELS, TRAINED_METHODS, get_method
from srlib.baselines.trials import baseline_settings, baseline_trials
from srlib.data_efficiency import training_subset
from srlib.errors import ConfigError

if TYPE_CHECKING:
    from srlib.evaluate import PairedComparison

#: The variants of SparseRM and DenseRM in the comparison: (model, features, on the baselines' pairs only).
FEATURE_VARIANTS = (
    ("SparseRM · all train pairs", "projection", False),
    ("DenseRM · all train pairs", "dense", False),
    ("SparseRM · baselines' pairs", "projection", True),
    ("DenseRM · baselines' pairs", "dense", True),
)
SPARSE_ALL, SPARSE_SUBSET = "SparseRM · all train pairs", "SparseRM · baselines' pairs"
#: How the fair rows read each VALIDATION choice.
VALIDATION_CHOICES = {"none": "no model reads validation labels", "all": "every model reads the validation split"}


@dataclass(frozen=True)
class ComparisonPlan:
    """What chapter 8 compares, every size resolved: the data sets and seeds of SparseRM/DenseRM,
    the baselines with their pairs, epochs and seeds, the validation rule, and the curve."""

    k: int
    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    baselines: tuple[str, ...]
    baseline_datasets: tuple[str, ...]
    train_pairs: int
    test_pairs: int
    validation: str
    epochs: float
    baseline_seeds: tuple[int, ...]
    learning_rate: float
    batch_size: int
    extraction_sample: int
    efficiency_dataset: str
    efficiency_sizes: tuple[int, ...]
    efficiency_lora_sizes: tuple[int, ...]
    settings: dict[str, dict[str, Any]] = field(compare=False)

    @property
    def use_val(self) -> bool:
        """Whether every model reads the validation split (VALIDATION "all")."""
        return self.validation == "all"

    @property
    def fair(self) -> str:
        """The validation rule in words."""
        return VALIDATION_CHOICES[self.validation]

    def metrics(self) -> dict[str, Any]:
        """The settings the results JSON records beside the tables."""
        return {
            "validation": self.validation,
            "efficiency_sizes": list(self.efficiency_sizes),
            "efficiency_lora_sizes": list(self.efficiency_lora_sizes),
            "baseline_seeds": list(self.baseline_seeds),
            "baselines": list(self.baselines),
            "baseline_datasets": list(self.baseline_datasets),
            "baseline_train_pairs": self.train_pairs,
            "baseline_test_pairs": self.test_pairs,
            "baseline_epochs": self.epochs,
            "baseline_lr": self.learning_rate,
            "baseline_batch_size": self.batch_size,
        }


def comparison_plan(
    profile,
    *,
    k: int,
    datasets: Sequence[str],
    seeds: Sequence[int],
    baselines: Sequence[str] | None = None,
    baseline_datasets: Sequence[str] | None = None,
    train_pairs: int | None = None,
    test_pairs: int | None = None,
    validation: str = "none",
    epochs: float | None = None,
    baseline_seeds: Sequence[int] | None = None,
    learning_rate: float = 2e-4,
    batch_size: int = 1,
    extraction_sample: int | None = None,
    efficiency_dataset: str | None = None,
    efficiency_sizes: Sequence[int] | None = None,
    efficiency_lora_sizes: Sequence[int] | None = None,
) -> ComparisonPlan:
    """The plan of chapter 8's parameters: each left at None falls back to the profile (the
    baselines to `COMPARISON_METHODS`, their seeds to `seeds`, their epochs to 1, or 3 to choose
    from when every model reads validation). A bad `validation` or too few epochs to choose
    from is one `ConfigError` line."""
    if validation not in VALIDATION_CHOICES:
        raise ConfigError(f"VALIDATION must be 'none' or 'all', got {validation!r}")
    use_val = validation == "all"
    epochs = epochs or (3 if use_val else 1)
    if use_val and epochs < 2:
        raise ConfigError("VALIDATION='all' needs BASELINE_EPOCHS >= 2: the baselines choose their epoch on validation")
    datasets, baselines = tuple(datasets), tuple(baselines or COMPARISON_METHODS)
    on = tuple(d for d in (baseline_datasets or profile.baseline_datasets or datasets) if d in datasets)
    lora_sizes = profile.efficiency_lora_sizes if efficiency_lora_sizes is None else efficiency_lora_sizes
    return ComparisonPlan(
        k=k,
        datasets=datasets,
        seeds=tuple(seeds),
        baselines=baselines,
        baseline_datasets=on,
        train_pairs=train_pairs or profile.baseline_train_pairs,
        test_pairs=test_pairs or profile.baseline_test_pairs,
        validation=validation,
        epochs=epochs,
        baseline_seeds=tuple(seeds if baseline_seeds is None else baseline_seeds),
        learning_rate=learning_rate,
        batch_size=batch_size,
        extraction_sample=extraction_sample or profile.extraction_sample,
        efficiency_dataset=efficiency_dataset or (on or datasets)[0],
        efficiency_sizes=tuple(profile.efficiency_sizes if efficiency_sizes is None else efficiency_sizes),
        efficiency_lora_sizes=tuple(lora_sizes) if "standard" in baselines else (),
        settings=baseline_settings(
            profile.max_length, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size
        ),
    )


@dataclass(frozen=True)
class ComparisonData:
    """The splits every model shares: each data set's states, how many training pairs the
    baselines learn from (`baseline_subset` draws them per seed), and the common test pairs
    every model is scored on."""

    states: dict[str, Any]
    train_pairs: int
    common_test: dict[str, Any]

    def baseline_subset(self, name: str, seed: int):
        """Data set `name`'s states with the training split cut to the baselines' pairs for `seed`:
        `srlib.data_efficiency.training_subset`, the draw the data-efficiency curve makes at that
        size and seed. So a seed's interval covers which pairs were labelled, SparseRM and the
        baselines of one seed learn from the same pairs, and the curve's StandardRM at this size
        is the comparison's fit (read from the cache, not trained twice)."""
        states = self.states[name]
        return dataclasses.replace(states, train=training_subset(states.train, self.train_pairs, seed))

    def baseline_train_size(self, name: str) -> int:
        """How many training pairs the baselines of data set `name` learn from (all of a smaller split)."""
        return min(self.train_pairs, len(self.states[name].train))


def comparison_data(states: dict[str, Any], plan: ComparisonPlan) -> ComparisonData:
    """Each data set's states, the baselines' number of training pairs and the common test pairs
    (the first `plan.test_pairs` of each test split)."""
    return ComparisonData(
        states=states,
        train_pairs=plan.train_pairs,
        common_test={name: s.test.first(plan.test_pairs) for name, s in states.items()},
    )


def feature_trials(data: ComparisonData, plan: ComparisonPlan, sae):
    """SparseRM and DenseRM fitted per data set and seed, on all training pairs and (where the
    baselines run) on the baselines' pairs of that seed, each under the baselines' meter (`costed_fit`) and
    scored on the common test pairs: one row per fit."""
    import pandas as pd

    rows = []
    for name in plan.datasets:
        for seed in plan.seeds:
            for variant, features, subset in FEATURE_VARIANTS:
                if subset and name not in plan.baseline_datasets:
                    continue
                fitted = data.baseline_subset(name, seed) if subset else data.states[name]
                row = costed_fit(
                    fitted, features, sae=sae, k=plan.k, seed=seed, validation=plan.use_val, test=data.common_test[name]
                )
                rows.append({"dataset": name, "variant": variant, **row})
    return pd.DataFrame(rows)


def extraction_costs(backbone, profile, data: ComparisonData, plan: ComparisonPlan) -> dict[str, dict[str, float]]:
    """{data set: `extraction_cost` of its first `extraction_sample` training pairs}."""
    return {
        name: extraction_cost(
            backbone,
            data.states[name].train.pairs[: plan.extraction_sample],
            layer=profile.layer,
            max_length=profile.max_length,
            batch_size=profile.batch_size,
        )
        for name in plan.datasets
    }


def with_extraction(trials, extraction: dict[str, dict[str, float]]):
    """`trials` with the extraction of the states each fit reads (training pairs, and validation
    pairs when read) at the timed rate: extraction_seconds, fit_seconds_with_extraction, and
    pairs_per_second (scoring a pair is two extractions)."""
    trials = trials.copy()
    rate = trials["dataset"].map(lambda name: extraction[name]["texts_per_second"])
    trials["extraction_seconds"] = 2 * (trials["n_train_pairs"] + trials["n_val_pairs"]) / rate
    trials["fit_seconds_with_extraction"] = trials["fit_seconds"] + trials["extraction_seconds"]
    trials["pairs_per_second"] = rate / 2
    return trials


def baseline_rows(
    backbone,
    data: ComparisonData,
    plan: ComparisonPlan,
    columns: Sequence[str],
    *,
    only_cached: bool = False,
    progress: bool = False,
):
    """Every baseline of the plan fitted (or loaded from the cache) per seed on that seed's
    baselines' pairs and scored on the common test pairs (`baseline_trials`, whose
    `only_cached` and `progress` these are); the untrained ones (judge, log-prob floor) read no
    training pair and run once. An empty frame with `columns` when no data set runs them."""
    import pandas as pd

    frames = [
        baseline_trials(
            backbone,
            name,
            data.baseline_subset(name, seed).train.pairs,
            data.states[name].val.pairs if plan.use_val else None,
            data.common_test[name].pairs,
            [m for m in plan.baselines if i == 0 or get_method(m).trained],
            [seed],
            settings=plan.settings,
            only_cached=only_cached,
            progress=progress,
        )
        for name in plan.baseline_datasets
        for i, seed in enumerate(plan.baseline_seeds)
    ]
    return pd.concat(frames or [pd.DataFrame(columns=list(columns))], ignore_index=True)


def all_trials(ours, theirs, plan: ComparisonPlan):
    """Both tables as one, ordered by data set and then SparseRM, DenseRM, the baselines."""
    import pandas as pd

    order = [
        SPARSE_ALL,
        SPARSE_SUBSET,
        "DenseRM · all train pairs",
        "DenseRM · baselines' pairs",
        *[METHOD_LABELS[m] for m in plan.baselines],
    ]
    ranks = {**{d: i for i, d in enumerate(plan.datasets)}, **{v: i for i, v in enumerate(order)}}
    trials = pd.concat([ours, theirs], ignore_index=True)
    return trials.sort_values(["dataset", "variant"], key=lambda col: col.map(ranks), kind="stable")


def mean_of(trials, dataset: str, variant: str, column: str = "test_accuracy") -> float:
    """The mean of `column` over the rows of one data set and variant (NaN when there are none)."""
    values = trials.loc[(trials["dataset"] == dataset) & (trials["variant"] == variant), column]
    return float(values.mean()) if len(values) else float("nan")


@dataclass
class DatasetVerdicts:
    """One data set's comparisons: SparseRM on the baselines' pairs and on all pairs against each
    baseline, SparseRM with and without early stopping, and the training times."""

    dataset: str
    against: list[tuple[PairedComparison, ...]]  # per baseline: (same pairs, all pairs)
    early_stopping: PairedComparison
    seconds: dict[str, float]  # StandardRM, SparseRM from cached states, SparseRM with extraction


def comparison_verdicts(trials, data: ComparisonData, plan: ComparisonPlan, sae) -> list[DatasetVerdicts]:
    """Per data set the baselines ran on: SparseRM against every baseline on the common test
    pairs (`compare_paired`), on the same pairs and on all training pairs; and what early
    stopping on the validation split adds to SparseRM on the baselines' pairs (a second fit
    per seed with the other validation rule)."""
    import numpy as np

    from srlib.data_efficiency import fit_feature_rm, outcome_matrix
    from srlib.evaluate import compare_paired, pair_outcomes

    found = []
    for name in plan.baseline_datasets:
        n_sub, n_all = data.baseline_train_size(name), len(data.states[name].train)
        against = []
        for variant in [METHOD_LABELS[m] for m in plan.baselines]:
            against.append(
                tuple(
                    compare_paired(
                        outcome_matrix(trials, dataset=name, variant=sparse),
                        outcome_matrix(trials, dataset=name, variant=variant),
                        name_a=alias,
                        name_b=variant,
                    )
                    for sparse, alias in (
                        (SPARSE_SUBSET, f"SparseRM (the same {n_sub} pairs)"),
                        (SPARSE_ALL, f"SparseRM (all {n_all:,} train pairs)"),
                    )
                )
            )
        test = data.common_test[name]
        other_rule = not plan.use_val
        models = [
            fit_feature_rm(
                data.baseline_subset(name, seed), "projection", sae=sae, k=plan.k, seed=seed, validation=other_rule
            )
            for seed in plan.seeds
        ]
        other = np.stack([pair_outcomes(m.score_states(test.chosen), m.score_states(test.rejected)) for m in models])
        fair = outcome_matrix(trials, dataset=name, variant=SPARSE_SUBSET)
        with_val, without_val = (fair, other) if plan.use_val else (other, fair)
        early = compare_paired(
            with_val,
            without_val,
            name_b="SparseRM without them",
            name_a=f"SparseRM stopped early on {len(data.states[name].val)} validation pairs",
        )
        seconds = {}
        if "standard" in plan.baselines:
            seconds = {
                "standard": mean_of(trials, name, METHOD_LABELS["standard"], "fit_seconds"),
                "sparse": mean_of(trials, name, SPARSE_SUBSET, "fit_seconds"),
                "sparse_with_extraction": mean_of(trials, name, SPARSE_SUBSET, "fit_seconds_with_extraction"),
            }
        found.append(DatasetVerdicts(name, against, early, seconds))
    return found


def verdict_table(found: Sequence[DatasetVerdicts]):
    """The verdicts of SparseRM against each baseline as a table (one row per comparison; "fair"
    when SparseRM saw the same labelled pairs)."""
    import pandas as pd

    from srlib.data import DATASET_LABELS

    return pd.DataFrame(
        [
            {"data set": DATASET_LABELS.get(v.dataset, v.dataset), "fair": fair, **c.as_row(), "verdict": c.verdict()}
            for v in found
            for pair in v.against
            for fair, c in zip((True, False), pair, strict=True)
        ]
    )


def parameter_shares(trials, backbone_parameters: int) -> dict[str, float] | None:
    """SparseRM's head and the largest LoRA baseline: trainable numbers and % of the backbone
    (None when no trained baseline ran)."""
    head = int(trials.loc[trials["variant"] == SPARSE_ALL, "trainable_parameters"].iloc[0])
    lora = trials[trials["method"].isin(TRAINED_METHODS)] if "method" in trials else trials.iloc[:0]
    if not len(lora):
        return None
    lora_params = int(lora["trainable_parameters"].max())
    return {
        "head": head,
        "head_share": 100 * head / backbone_parameters,
        "lora": lora_params,
        "lora_share": 100 * lora_params / backbone_parameters,
    }


def efficiency_curve(backbone, sae, data: ComparisonData, plan: ComparisonPlan):
    """The data-efficiency curve on the plan's data set (`srlib.data_efficiency.data_efficiency`):
    SparseRM, DenseRM and (at `efficiency_lora_sizes`) StandardRM learn from the same random
    subsets per seed, under the plan's validation rule, scored on the common test pairs."""
    from srlib.data_efficiency import data_efficiency

    name = plan.efficiency_dataset
    return data_efficiency(
        data.states[name],
        sae,
        plan.k,
        sizes=plan.efficiency_sizes,
        lora_sizes=plan.efficiency_lora_sizes,
        seeds=plan.seeds,
        backbone=backbone,
        lora_settings=plan.settings["standard"],
        test=data.common_test[name],
        validation=plan.use_val,
    )


def efficiency_verdicts(curve) -> list:
    """At each size where StandardRM joins the data-efficiency curve, SparseRM and DenseRM
    against it on the same subsets (`compare_paired`)."""
    from srlib.data_efficiency import outcome_matrix
    from srlib.evaluate import compare_paired

    standard = METHOD_LABELS["standard"]
    return [
        compare_paired(
            outcome_matrix(curve, method=method, n_train_pairs=n),
            outcome_matrix(curve, method=standard, n_train_pairs=n),
            name_a=f"{method} ({n:,} pairs)",
            name_b=f"{standard} ({n:,} pairs)",
        )
        for n in sorted(curve.loc[curve["method"] == standard, "n_train_pairs"].unique())
        for method in ("SparseRM", "DenseRM")
    ]
