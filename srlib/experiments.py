"""Running the book's comparisons: hidden states per split, reward-model variants over seeds, spreads.

The chapters compare many reward models on the same data (Tables 2-4, Figure 4). Extracting
hidden states is the expensive part, so it happens once per data set and layer
(`dataset_states`, cached on disk by `srlib.activations`); every variant is then fitted on
those states (`fit_variant`), once per seed (`run_trials`), and `summarize` gives the mean
and spread a reader needs to tell a real difference from noise.

Seeds change the head's initialisation and minibatch order and, for the random-directions
ablation, the directions themselves. Directions are selected on the training split only.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from srlib.data import PreferencePair, load_pairs
from srlib.directions import Directions, select_directions
from srlib.errors import ConfigError
from srlib.profiles import Profile
from srlib.reward import DenseRM, FeatureRM, SparseRM, pair_accuracy

#: How the book names the data sets (the paper's names, with what the data here really is).
DATASET_LABELS = {
    "truthfulqa": "TruthfulQA",
    "pku-saferlhf": "SafeRLHF",
    "hh-harmless": "Red-Teaming (HH harmless)",
}


@dataclass
class SplitStates:
    """The pairs of one split and the layer-L states of their chosen and rejected texts."""

    pairs: list[PreferencePair]
    chosen: Tensor
    rejected: Tensor

    def __len__(self) -> int:
        return len(self.pairs)


@dataclass
class DatasetStates:
    """Train / val / test states of one data set at one layer."""

    name: str
    layer: int
    train: SplitStates
    val: SplitStates
    test: SplitStates

    @property
    def label(self) -> str:
        return DATASET_LABELS.get(self.name, self.name)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def dataset_states(backbone, dataset: str, profile: Profile, *, layer: int | None = None,
                   max_pairs: int | None = None, seed: int = 0, progress: bool = True) -> DatasetStates:
    """Load the three splits of a built-in data set and extract their states at `layer`.

    `max_pairs` caps each split (default: the profile's cap); `layer` defaults to the
    profile's. States come from the activation cache when they were extracted before.
    """
    from srlib.activations import pair_states

    layer = profile.layer if layer is None else layer
    cap = profile.max_pairs if max_pairs is None else max_pairs
    splits = {}
    for split in ("train", "val", "test"):
        pairs = load_pairs(f"{dataset}:{split}", seed=seed, max_pairs=cap)
        chosen, rejected = pair_states(backbone, pairs, layer, max_length=profile.max_length,
                                       batch_size=profile.batch_size, progress=progress)
        splits[split] = SplitStates(pairs, chosen, rejected)
    return DatasetStates(dataset, layer, **splits)


def select_for(states: DatasetStates, sae, k: int, **options) -> Directions:
    """Top-K directions per side from the training split's SAE latents (eq. 6-9)."""
    from srlib.sae import encode

    return select_directions(sae, encode(sae, states.train.chosen), encode(sae, states.train.rejected),
                             k, **options)


@dataclass
class Trial:
    """One fitted variant with one seed, measured on the validation and test splits."""

    dataset: str
    variant: str
    seed: int
    test_accuracy: float
    val_accuracy: float | None
    trainable_parameters: int
    fit_seconds: float
    best_epoch: int | None


def make_model(features: str, *, directions: Directions | None = None, sae=None, seed: int = 0,
               layer: int | None = None) -> FeatureRM:
    """An unfitted reward model of one kind: `dense` (DenseRM) or a SparseRM feature map
    (`projection`, `latents`, `random`) on the given directions."""
    if features == "dense":
        return DenseRM(layer=layer)
    if directions is None:
        raise ConfigError(f"features={features!r} needs directions (srlib.experiments.select_for)")
    return SparseRM(directions, kind=features, sae=sae if features == "latents" else None,
                    feature_seed=seed, layer=layer)


def fit_variant(states: DatasetStates, *, features: str = "projection", directions: Directions | None = None,
                sae=None, seed: int = 0, variant: str | None = None, **fit_kwargs) -> tuple[FeatureRM, Trial]:
    """Fit one reward model on the training states (early stopping on val) and test it."""
    model = make_model(features, directions=directions, sae=sae, seed=seed, layer=states.layer)
    started = time.perf_counter()
    model.fit_states(states.train.chosen, states.train.rejected, states.val.chosen, states.val.rejected,
                     seed=seed, **fit_kwargs)
    seconds = time.perf_counter() - started
    test = pair_accuracy(model.score_states(states.test.chosen), model.score_states(states.test.rejected))
    trial = Trial(dataset=states.name, variant=variant or features, seed=seed, test_accuracy=test,
                  val_accuracy=model.history.best_val_accuracy,
                  trainable_parameters=model.num_trainable_parameters(), fit_seconds=seconds,
                  best_epoch=model.history.best_epoch)
    return model, trial


def run_trials(states: DatasetStates, variants: Mapping[str, dict], seeds: Sequence[int], *,
               progress: bool = True):
    """Fit every variant with every seed; a DataFrame with one row per (variant, seed).

    `variants` maps a display name to `fit_variant` keyword arguments, e.g.
    `{"Top-K directions": dict(features="projection", directions=d)}`.
    """
    import pandas as pd

    if not seeds:
        raise ConfigError("run_trials needs at least one seed")
    rows = []
    jobs = [(name, kwargs, seed) for name, kwargs in variants.items() for seed in seeds]
    for name, kwargs, seed in tqdm(jobs, desc=f"{states.name}: fitting", disable=not progress):
        _, trial = fit_variant(states, seed=seed, variant=name, **kwargs)
        rows.append(asdict(trial))
    return pd.DataFrame(rows)


def summarize(trials, by: Sequence[str] = ("dataset", "variant"), value: str = "test_accuracy",
              scale: float = 100.0):
    """Mean, standard deviation and count of `value` per group, and a "mean ± sd" label.

    The standard deviation is over seeds (ddof=1), so it measures how much a result moves
    when only the seed changes; with n=1 it is reported as NaN rather than 0.
    """
    grouped = trials.groupby(list(by), sort=False)[value]
    table = grouped.agg(["mean", "std", "count"]).reset_index()
    table["mean"] *= scale
    table["std"] *= scale
    table["label"] = [f"{m:.1f} ± {s:.1f}" if s == s else f"{m:.1f}" for m, s in zip(table["mean"], table["std"])]
    return table


def pivot_labels(summary, index: str = "variant", columns: str = "dataset"):
    """The "mean ± sd" labels as a table: one row per variant, one column per data set."""
    table = summary.pivot(index=index, columns=columns, values="label")
    order = [c for c in DATASET_LABELS if c in table.columns] + [c for c in table.columns if c not in DATASET_LABELS]
    table = table[order].rename(columns=DATASET_LABELS)
    table.columns.name = None
    return table.loc[list(dict.fromkeys(summary[index]))]

