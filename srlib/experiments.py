"""Running the book's comparisons: hidden states per split, reward-model variants over seeds, spreads.

The chapters compare many reward models on the same data (Tables 2-4, Figure 4). Extracting
hidden states is the expensive part, so it happens once per data set and layer
(`dataset_states`, cached on disk by `srlib.activations`); every variant is then fitted on
those states (`fit_variant`), once per seed (`run_trials`), and `summarize` gives the mean
and spread a reader needs to tell a real difference from noise.

Seeds change the head's initialisation and minibatch order and, for the random-directions
ablation, the directions themselves. With `run_trials(..., resample=True)` a seed also
selects the directions on its own bootstrap resample of the training questions, so the spread
includes how much the selection depends on which training pairs were drawn (`seed_sources`
names what a table's spread covers). Directions are selected on the training split only.

Every trial keeps its per-pair test outcomes (1 right, 0 wrong, 1/2 tie) and its tie share:
`compare_variants` turns two variants' outcomes into the book's one paired verdict
(`srlib.evaluate.compare_paired`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from srlib.data import DATASET_LABELS, PreferencePair, load_pairs, prompt_text
from srlib.directions import Directions, select_directions
from srlib.errors import ConfigError
from srlib.evaluate import PairedComparison, compare_paired, mean_sd, pair_outcomes
from srlib.profiles import Profile
from srlib.progress import progress_bar
from srlib.reward import DenseRM, FeatureRM, SparseRM, pair_accuracy
from srlib.reward_config import HeadConfig


@dataclass
class SplitStates:
    """The pairs of one split and the layer-L states of their chosen and rejected texts."""

    pairs: list[PreferencePair]
    chosen: Tensor
    rejected: Tensor

    def __len__(self) -> int:
        return len(self.pairs)

    def first(self, n: int) -> SplitStates:
        """The first `n` pairs with their states (splits are already seeded and grouped)."""
        return SplitStates(self.pairs[:n], self.chosen[:n], self.rejected[:n])


@dataclass
class DatasetStates:
    """Train / val / test states of one data set at one layer, with how a head reads them.

    `position` (the token the states were read at), `max_length` (the tokens a text was cut at)
    and `head` (the `HeadConfig` a head fitted on them is trained with) come from the profile the
    states were built with (`dataset_states`); a model made for them (`make_model`) reads texts
    the same way, and `fit_on_states` trains its head with `head`.
    """

    name: str
    layer: int
    train: SplitStates
    val: SplitStates
    test: SplitStates
    position: str = "last"
    head: HeadConfig = HeadConfig()
    max_length: int = 512

    @property
    def label(self) -> str:
        return DATASET_LABELS.get(self.name, self.name)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def dataset_states(
    backbone,
    dataset: str,
    profile: Profile,
    *,
    layer: int | None = None,
    max_pairs: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> DatasetStates:
    """Load the three splits of a built-in data set and extract their states at `layer`, read at
    the profile's token position.

    `max_pairs` caps each split (default: the profile's cap); `layer` defaults to the
    profile's. States come from the activation cache when they were extracted before.
    """
    return states_at_positions(
        backbone, dataset, profile, (profile.position,), layer=layer, max_pairs=max_pairs, seed=seed, progress=progress
    )[profile.position]


def split_pairs(
    dataset: str, profile: Profile, *, max_pairs: int | None = None, seed: int = 0
) -> dict[str, list[PreferencePair]]:
    """{split: pairs} of a built-in data set's train, val and test splits, each capped at
    `max_pairs` (default: the profile's cap): the pairs `dataset_states` reads."""
    cap = profile.max_pairs if max_pairs is None else max_pairs
    return {split: load_pairs(f"{dataset}:{split}", seed=seed, max_pairs=cap) for split in ("train", "val", "test")}


def states_at_positions(
    backbone,
    dataset: str,
    profile: Profile,
    positions: Sequence[str],
    *,
    layer: int | None = None,
    max_pairs: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, DatasetStates]:
    """`dataset_states` read at several token positions (`srlib.activations.POSITIONS`), from
    one forward pass per text: {position: DatasetStates}."""
    from srlib.activations import pair_token_states

    layer = profile.layer if layer is None else layer
    splits: dict[str, dict[str, SplitStates]] = {position: {} for position in positions}
    for split, pairs in split_pairs(dataset, profile, max_pairs=max_pairs, seed=seed).items():
        read = pair_token_states(
            backbone,
            pairs,
            layer,
            positions=positions,
            max_length=profile.max_length,
            batch_size=profile.batch_size,
            progress=progress,
        )
        for position, (chosen, rejected) in read.items():
            splits[position][split] = SplitStates(pairs, chosen, rejected)
    return {
        position: DatasetStates(
            dataset, layer, **splits[position], position=position, head=profile.head, max_length=profile.max_length
        )
        for position in positions
    }


def warm_states(
    backbone,
    dataset: str,
    profile: Profile,
    layers: Sequence[int],
    *,
    positions: Sequence[str] | None = None,
    max_pairs: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> None:
    """Put the states of every pair of `dataset` (all splits) at every layer of `layers` into the
    activation cache, one forward pass per text to the deepest layer
    (`srlib.activations.states_at_layers`): a layer sweep's per-layer `dataset_states` then
    reads them instead of running the backbone once per layer."""
    from srlib.activations import states_at_layers
    from srlib.backbone import format_pair

    texts = [
        text
        for pairs in split_pairs(dataset, profile, max_pairs=max_pairs, seed=seed).values()
        for pair in pairs
        for text in format_pair(backbone.tokenizer, pair)
    ]
    states_at_layers(
        backbone,
        texts,
        layers,
        positions=positions or (profile.position,),
        max_length=profile.max_length,
        batch_size=profile.batch_size,
        progress=progress,
    )


def select_for(states: DatasetStates, sae, k: int, *, resample_seed: int | None = None, **options) -> Directions:
    """Top-K directions per side from the training split's SAE latents (eq. 6-9).

    `resample_seed` selects on a bootstrap resample of the training split instead: its
    questions (`group_id`) are drawn with replacement, each with all its pairs, so the
    directions vary as they would with another training set of the same size.
    """
    return select_for_ks(states, sae, (k,), resample_seed=resample_seed, **options)[k]


def select_for_ks(
    states: DatasetStates, sae, ks: Sequence[int], *, resample_seed: int | None = None, **options
) -> dict[int, Directions]:
    """{K: `select_for(states, sae, K)`} for every K of `ks`, the training split encoded by the
    SAE once for all of them (the encoding, not the ranking, is what a selection costs)."""
    from srlib.sae import encode

    rows = (
        torch.arange(len(states.train))
        if resample_seed is None
        else bootstrap_rows([p.group_id for p in states.train.pairs], resample_seed)
    )
    latents_w, latents_l = encode(sae, states.train.chosen[rows]), encode(sae, states.train.rejected[rows])
    return {k: select_directions(sae, latents_w, latents_l, k, **options) for k in ks}


def bootstrap_rows(groups: Sequence[str], seed: int) -> Tensor:
    """Row indices of a cluster bootstrap: the distinct groups drawn with replacement (as many
    as there are), each bringing all its rows, so pairs of one question stay together."""
    import numpy as np

    members: dict[str, list[int]] = {}
    for row, group in enumerate(groups):
        members.setdefault(group, []).append(row)
    keys = list(members)
    drawn = np.random.default_rng(seed).integers(0, len(keys), size=len(keys))
    return torch.tensor([row for g in drawn for row in members[keys[g]]], dtype=torch.long)


@dataclass
class Trial:
    """One fitted variant with one seed, measured on the validation and test splits."""

    dataset: str
    variant: str
    seed: int
    test_accuracy: float | None  # None where the test split was not scored (a selection run); a tie counts as wrong
    val_accuracy: float | None
    trainable_parameters: int
    fit_seconds: float
    best_epoch: int | None
    test_ties: float | None = None  # share of test pairs scored as a tie (s_w == s_l)
    test_accuracy_half_ties: float | None = None  # test accuracy with a tie counted as 1/2
    test_outcomes: list[float] | None = None  # per test pair: 1 right, 0 wrong, 0.5 tie (compare_variants)
    resample_seed: int | None = None  # the bootstrap resample its directions were selected on, if any
    features: str = ""  # the head's input: dense, projection, latents or random


def make_model(
    features: str,
    states: DatasetStates,
    *,
    directions: Directions | None = None,
    sae=None,
    seed: int = 0,
) -> FeatureRM:
    """An unfitted reward model of one kind for `states`: `dense` (DenseRM) or a SparseRM feature
    map (`projection`, `latents`, `random`) on the given directions. It reads texts as the states
    were read (their layer, token position and length limit), so a model fitted on them scores
    new texts the way it was trained."""
    layer, position, max_length = states.layer, states.position, states.max_length
    if features == "dense":
        return DenseRM(layer=layer, position=position, max_length=max_length)
    if directions is None:
        raise ConfigError(f"features={features!r} needs directions (srlib.experiments.select_for)")
    return SparseRM(
        directions,
        kind=features,
        sae=sae if features == "latents" else None,
        feature_seed=seed,
        layer=layer,
        position=position,
        max_length=max_length,
    )


def fit_on_states(
    model: FeatureRM, states: DatasetStates, *, head: HeadConfig | None = None, validation: bool = True
) -> FeatureRM:
    """Fit `model`'s head on the training states; with `validation`, stop early on the validation
    states and keep the best epoch. The one place the profile's head settings (`states.head`)
    reach `srlib.reward.fit_head`; `head` replaces them (a study varying one field passes
    `dataclasses.replace(states.head, ...)`)."""
    val = (states.val.chosen, states.val.rejected) if validation else ()
    return model.fit_states(states.train.chosen, states.train.rejected, *val, head=head or states.head)


def seeded_head(states: DatasetStates, head: HeadConfig | None, seed: int) -> HeadConfig:
    """`head` (default: the states' `HeadConfig`, the profile's) with its seed set to `seed`: a
    trial's seed drives its head as well as its directions."""
    return dataclasses.replace(head or states.head, seed=seed)


def fit_variant(
    states: DatasetStates,
    *,
    features: str = "projection",
    directions: Directions | None = None,
    sae=None,
    seed: int = 0,
    variant: str | None = None,
    score_test: bool = True,
    select: Mapping | None = None,
    resample_seed: int | None = None,
    head: HeadConfig | None = None,
) -> tuple[FeatureRM, Trial]:
    """Fit one reward model on the training states (early stopping on val) and test it
    (`score_test=False`: a selection run, which never looks at the test split).

    `select` (e.g. `dict(sae=sae, k=128)`) selects the directions here instead of taking
    `directions`, on the bootstrap resample `resample_seed` of the training split if given.
    `head` (default: `states.head`, the profile's) trains the head, with its seed set to `seed`.
    """
    if select is not None:
        directions = select_for(states, resample_seed=resample_seed, **select)
    model = make_model(features, states, directions=directions, sae=sae, seed=seed)
    started = time.perf_counter()
    fit_on_states(model, states, head=seeded_head(states, head, seed))
    seconds = time.perf_counter() - started
    history = model.history
    assert history is not None  # fit_on_states has just fitted the head
    trial = Trial(
        dataset=states.name,
        variant=variant or features,
        seed=seed,
        test_accuracy=None,
        val_accuracy=history.best_val_accuracy,
        trainable_parameters=model.num_trainable_parameters(),
        fit_seconds=seconds,
        best_epoch=history.best_epoch,
        resample_seed=resample_seed if select is not None else None,
        features=features,
    )
    if score_test:
        s_w, s_l = model.score_states(states.test.chosen), model.score_states(states.test.rejected)
        outcomes = pair_outcomes(s_w, s_l)
        trial.test_accuracy = pair_accuracy(s_w, s_l)
        trial.test_ties = float((outcomes == 0.5).mean())
        trial.test_accuracy_half_ties = float(outcomes.mean())
        trial.test_outcomes = outcomes.tolist()
    return model, trial


def run_trials(
    states: DatasetStates,
    variants: Mapping[str, dict],
    seeds: Sequence[int],
    *,
    resample: bool = False,
    progress: bool = True,
):
    """Fit every variant with every seed; a DataFrame with one row per (variant, seed).

    `variants` maps a display name to `fit_variant` keyword arguments, e.g.
    `{"Top-K directions": dict(features="projection", directions=d)}` or, to select the
    directions per seed, `dict(features="projection", select=dict(sae=sae, k=128))`.
    `resample=True`: each seed selects those directions on its own bootstrap resample of the
    training split (`select_for`), so the seed spread includes the selection's variation.
    """
    import pandas as pd

    if not seeds:
        raise ConfigError("run_trials needs at least one seed")
    rows = []
    jobs = [(name, kwargs, seed) for name, kwargs in variants.items() for seed in seeds]
    for name, kwargs, seed in progress_bar(jobs, desc=f"{states.name}: fitting", unit="fit", disable=not progress):
        resample_seed = seed if resample and "select" in kwargs else None
        _, trial = fit_variant(states, seed=seed, variant=name, resample_seed=resample_seed, **kwargs)
        rows.append(asdict(trial))
    return pd.DataFrame(rows)


def seed_sources(trials) -> str:
    """What the seed spread of these trials covers, in words, for a table's caption."""
    sources = ["the head's initialisation", "its minibatch order"]
    if "features" in trials and (trials["features"] == "random").any():
        sources.append("the random directions")
    if "resample_seed" in trials and trials["resample_seed"].notna().any():
        sources.append("the top-K selection, made on a bootstrap resample of the training questions")
    return "seeds vary " + ", ".join(sources[:-1]) + " and " + sources[-1]


def compare_variants(
    trials, name_a: str, name_b: str, *, column: str = "variant", labels: tuple[str, str] | None = None, **where
) -> PairedComparison:
    """`compare_paired` between two rows of a trials table on the same test pairs.

    Rows are those with `column == name_a` (and `name_b`) and every `where` column equal to its
    value (e.g. `dataset="truthfulqa"`, `K=8`); each side's per-pair outcomes are stacked
    over its seeds. `labels` replaces the names in the verdict.
    """
    import numpy as np

    mask = np.ones(len(trials), dtype=bool)
    for key, value in where.items():
        mask &= (trials[key] == value).to_numpy()
    sides = []
    for name in (name_a, name_b):
        rows = trials[mask & (trials[column] == name).to_numpy()].sort_values("seed")
        if rows.empty or rows["test_outcomes"].isna().any():
            raise ConfigError(f"no scored trials of {column}={name!r} where {where}: fit them with score_test=True")
        sides.append(np.stack([np.asarray(o, dtype=float) for o in rows["test_outcomes"]]))
    label_a, label_b = labels or (name_a, name_b)
    return compare_paired(sides[0], sides[1], name_a=label_a, name_b=label_b)


def summarize(trials, by: Sequence[str] = ("dataset", "variant"), *, value: str, scale: float = 100.0):
    """Mean, standard deviation, count and standard error of the column `value` per group, and
    a "mean ± sd" label; for a test column, also the mean tie share `ties` (%), which the label
    shows where it is non-zero ("71.0 ± 1.2 (ties 3.1%)").

    `value` has no default: a table of `test_accuracy` reports results, a table of
    `val_accuracy` is what a setting may be chosen on (`best_setting`). The standard deviation
    is over seeds (ddof=1), so it measures how much a result moves when only the seed changes;
    with n=1 it is reported as NaN rather than 0.
    """
    grouped = trials.groupby(list(by), sort=False)[value]
    table = grouped.agg(["mean", "std", "count"]).reset_index()
    table["mean"] *= scale
    table["std"] *= scale
    table["se"] = table["std"] / table["count"] ** 0.5
    table["label"] = [mean_sd(m, s) for m, s in zip(table["mean"], table["std"], strict=True)]
    if value.startswith("test_") and "test_ties" in trials and trials["test_ties"].notna().any():
        table["ties"] = 100 * trials.groupby(list(by), sort=False)["test_ties"].mean().to_numpy()
        table["label"] = [
            f"{label} (ties {t:.1f}%)" if t > 0 else label
            for label, t in zip(table["label"], table["ties"], strict=True)
        ]
    return table


# --------------------------------------------------------------------------- inspecting latents (chapters 1-2)


def pair_text(pair: PreferencePair, side: str = "chosen", chars: int = 200) -> str:
    """ "question → answer" of one side of a pair on one line, cut to `chars` characters."""
    return _cut(f"{prompt_text(pair.prompt)} → {pair.chosen if side == 'chosen' else pair.rejected}", chars)


def top_latents(latents: Tensor, n: int = 5) -> list[list[tuple[int, float]]]:
    """Per row of [rows, M] latents, the `n` strongest active latents as (index, activation),
    strongest first (fewer when fewer fire)."""
    values, indices = latents.topk(min(n, latents.shape[1]), dim=1)
    return [
        [(int(j), float(v)) for j, v in zip(row_i, row_v, strict=True) if v > 0]
        for row_i, row_v in zip(indices, values, strict=True)
    ]


def pair_latent_table(
    pairs: Sequence[PreferencePair], latents_w: Tensor, latents_l: Tensor, *, n: int = 5, chars: int = 80
):
    """One row per answer of each pair: the answer, its `n` strongest latents ("j (activation)"),
    the `n` strongest of those it fires that the other answer of the pair does not, and how
    many latents fire on it."""
    import pandas as pd

    rows = []
    for i, pair in enumerate(pairs):
        for side, own, other in (("chosen", latents_w[i], latents_l[i]), ("rejected", latents_l[i], latents_w[i])):
            exclusive = torch.where(other > 0, torch.zeros(()), own)
            rows.append(
                {
                    "pair": i + 1,
                    "answer": side,
                    "text": _cut(pair.chosen if side == "chosen" else pair.rejected, chars),
                    "strongest latents (activation)": _latent_list(own, n),
                    "strongest of those the other answer lacks": _latent_list(exclusive, n) or "–",
                    "active latents": int((own > 0).sum()),
                }
            )
    return pd.DataFrame(rows)


def _latent_list(latents: Tensor, n: int) -> str:
    """The `n` strongest active entries of one latent vector as "j (activation), ..."."""
    return ", ".join(f"{j} ({v:.2f})" for j, v in top_latents(latents[None], n)[0])


def _cut(text: str, chars: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= chars else text[: chars - 1] + "…"


def max_activating(latents: Tensor, latent: int, n: int = 3) -> list[tuple[int, float]]:
    """The rows of [rows, M] latents where `latent` is strongest, as (row, activation), best
    first; only rows where it fires (> 0)."""
    column = latents[:, latent]
    values, rows = column.topk(min(n, column.numel()))
    return [(int(r), float(v)) for r, v in zip(rows, values, strict=True) if v > 0]


def separated_pairs(latents_w: Tensor, latents_l: Tensor, latent: int, side: str = "w") -> Tensor:
    """Indices of the pairs a latent separates: it fires on the chosen answer and not on the
    rejected one (`side="w"`), or the reverse (`side="l"`)."""
    on_w, on_l = latents_w[:, latent] > 0, latents_l[:, latent] > 0
    if side not in ("w", "l"):
        raise ConfigError(f"side must be 'w' or 'l', got {side!r}")
    return torch.nonzero(on_w & ~on_l if side == "w" else on_l & ~on_w).flatten()


def neuronpedia_url(sae_or_source, latent: int) -> str | None:
    """The public Neuronpedia dashboard of an SAE latent, from the SAE's own sae-lens metadata.

    `sae_or_source` is a loaded sae-lens SAE (its `cfg.metadata.neuronpedia_id`, which
    `SAE.from_pretrained` fills in) or a profile's "sae-lens:<release>/<sae_id>" string (the
    `neuronpedia_id` that sae-lens's registry of pretrained SAEs lists for it, read offline).
    The page is https://www.neuronpedia.org/<neuronpedia_id>/<latent>. An SAE without one (every
    SAE trained here, a release Neuronpedia does not host) has no public dashboard: None.
    """
    if isinstance(sae_or_source, str):
        from srlib.sae import parse_sae_source

        try:
            source = parse_sae_source(sae_or_source)
        except ConfigError:
            return None
        neuronpedia_id = _registry_neuronpedia_id(source) if source.kind == "sae-lens" else None
    else:
        neuronpedia_id = getattr(sae_or_source.cfg.metadata, "neuronpedia_id", None)
    return f"https://www.neuronpedia.org/{neuronpedia_id}/{int(latent)}" if neuronpedia_id else None


def _registry_neuronpedia_id(source) -> str | None:
    """The `neuronpedia_id` sae-lens's bundled registry lists for a release / sae_id (no download)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release = get_pretrained_saes_directory().get(source.release)
    return (release.neuronpedia_id or {}).get(source.sae_id) if release is not None else None


def latent_cards(
    directions: Directions,
    latents_w: Tensor,
    latents_l: Tensor,
    pairs: Sequence[PreferencePair],
    *,
    n_latents: int = 5,
    n_texts: int = 3,
    chars: int = 200,
    sae_source: str = "",
):
    """For the strongest `n_latents` latents of each side: its scores, its max-activating
    training answers (among chosen and rejected, "question → answer" cut to `chars`), how many
    pairs it separates and the one where it fires most strongly, and its public dashboard
    when there is one.

    The max-activating texts are read from the same last-token latents the selection used, so
    a reader sees what the reward model sees.
    """
    import pandas as pd

    answers = [pair_text(p, "chosen", chars) for p in pairs] + [pair_text(p, "rejected", chars) for p in pairs]
    both = torch.cat([latents_w, latents_l])
    rows = []
    for side, indices, scores in (
        ("w", directions.indices_w, directions.scores_w),
        ("l", directions.indices_l, directions.scores_l),
    ):
        for rank, (latent, score) in enumerate(
            zip(indices[:n_latents].tolist(), scores[:n_latents].tolist(), strict=True), 1
        ):
            top = max_activating(both, latent, n_texts)
            separated = separated_pairs(latents_w, latents_l, latent, side)
            example = ""
            if separated.numel():  # the separated pair where the latent fires most strongly
                firing = (latents_w if side == "w" else latents_l)[separated, latent]
                pair = pairs[int(separated[firing.argmax()])]
                example = (
                    f"{_cut(prompt_text(pair.prompt), chars // 2)} | chosen: {_cut(pair.chosen, chars // 3)}"
                    f" | rejected: {_cut(pair.rejected, chars // 3)}"
                )
            rows.append(
                {
                    "side": "chosen (∇)" if side == "w" else "rejected (Δ)",
                    "rank": rank,
                    "latent": latent,
                    "score": score,
                    "μ_w": float(directions.mu_w[latent]),
                    "μ_l": float(directions.mu_l[latent]),
                    "max-activating answers": [
                        f"[{'chosen' if r < len(pairs) else 'rejected'}, {v:.2f}] {answers[r]}" for r, v in top
                    ],
                    "pairs separated": int(separated.numel()),
                    "example pair": example,
                    "dashboard": neuronpedia_url(sae_source, latent),
                }
            )
    return pd.DataFrame(rows)


def jaccard(a: Tensor | Sequence[int], b: Tensor | Sequence[int]) -> float:
    """|A ∩ B| / |A ∪ B| of two index sets (1.0 for two empty sets)."""
    set_a, set_b = set(torch.as_tensor(a).tolist()), set(torch.as_tensor(b).tolist())
    return len(set_a & set_b) / len(set_a | set_b) if set_a | set_b else 1.0


def selection_stability(
    sae_or_W_dec, latents_w: Tensor, latents_l: Tensor, groups: Sequence[str], ks: Sequence[int], *, seed: int = 0
):
    """How stable top-K selection is: split the pairs in two halves by group (question), select
    on each half and report the Jaccard overlap of I_w and of I_l for every K.

    `chance` is the expected overlap of two random K-subsets of the M latents, K / (2M − K).
    """
    import random

    import pandas as pd

    unique = sorted(set(groups))
    if len(unique) < 2:
        from srlib.errors import DataError

        raise DataError("selection_stability needs pairs from at least two groups")
    random.Random(seed).shuffle(unique)
    first = set(unique[: len(unique) // 2])
    mask = torch.tensor([g in first for g in groups])
    m = int(latents_w.shape[1])
    rows = []
    for k in ks:
        a = select_directions(sae_or_W_dec, latents_w[mask], latents_l[mask], k)
        b = select_directions(sae_or_W_dec, latents_w[~mask], latents_l[~mask], k)
        rows.append(
            {
                "K": k,
                "Jaccard I_w": jaccard(a.indices_w, b.indices_w),
                "Jaccard I_l": jaccard(a.indices_l, b.indices_l),
                "chance": k / (2 * m - k),
                "pairs per half": f"{int(mask.sum())} / {int((~mask).sum())}",
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- SAE statistics (chapter 1)


@dataclass
class LatentStatistics:
    """Per-row and per-latent firing counts of an SAE on a set of activations.

    `active_per_row` [n]: how many latents fire (> 0) on each row (its L0);
    `frequency` [M]: the share of rows on which each latent fires (0 = dead on these rows).
    """

    active_per_row: Tensor
    frequency: Tensor


def latent_statistics(sae, activations: Tensor, *, chunk: int = 4096) -> LatentStatistics:
    """Encode `activations` [n, d] in chunks (the [n, M] latents of many tokens do not fit in
    memory at once) and count which latents fire on each row."""
    from srlib.errors import DataError
    from srlib.sae import encode

    if len(activations) == 0:
        raise DataError("latent_statistics needs at least one activation row")
    per_row, fired = [], torch.zeros(int(sae.cfg.d_sae))
    for start in range(0, len(activations), chunk):
        active = encode(sae, activations[start : start + chunk]) > 0
        per_row.append(active.sum(dim=1))
        fired += active.sum(dim=0)
    return LatentStatistics(torch.cat(per_row), fired / len(activations))


# --------------------------------------------------------------------------- layer × K sweep (chapter 3, Figure 4)


def profile_at_layer(
    profile: Profile, layer: int, *, sae_tokens: int | None = None, sae_corpus_tokens: int | None = None
) -> Profile:
    """The profile moved to another layer, with an SAE for that layer.

    A trained SAE (`sae_source="train"`) is trained at the new layer; `sae_tokens` replaces
    its training-token budget and `sae_corpus_tokens` caps its corpus
    (`profile.sae_corpus_tokens`, read by `srlib.sae.sae_for_profile`); both only
    make a sweep cheaper. A Gemma Scope source ".../layer_<L>/..." is pointed at the new
    layer. Any other pretrained source cannot follow the layer: ConfigError.
    """
    import dataclasses

    moved = profile.at_layer(layer)
    changes: dict = {}
    if profile.sae_source == "train":
        if profile.sae_training is None:
            raise ConfigError(f"profile {profile.name!r} trains its SAE but has no sae_training")
        if sae_tokens is not None:
            changes["sae_training"] = dataclasses.replace(profile.sae_training, training_tokens=sae_tokens)
        if sae_corpus_tokens is not None:
            changes["sae_corpus_tokens"] = sae_corpus_tokens
    return moved.replace(**changes) if changes else moved


def sweep_profiles(profile: Profile) -> list[Profile]:
    """The profile at each layer of its sweep (`Profile.sweep_config`) with the sweep's SAE
    budgets: the profiles of the SAEs chapter 3's layer sweep trains when its budgets are left
    at the profile's."""
    sweep = profile.sweep_config
    return [
        profile_at_layer(profile, layer, sae_tokens=sweep.sae_tokens, sae_corpus_tokens=sweep.sae_corpus_tokens)
        for layer in sweep.layers
    ]


def layer_k_sweep(
    backbone,
    profile: Profile,
    *,
    layers: Sequence[int],
    ks: Sequence[int],
    dataset: str,
    seeds: Sequence[int],
    sae_tokens: int | None = None,
    sae_corpus_tokens: int | None = None,
    progress: bool = True,
    head: HeadConfig | None = None,
    score_test: bool = True,
):
    """Figure 4: SparseRM accuracy for every (layer, K, seed) on one data set, read at the
    profile's token position.

    Every layer gets its own SAE (`profile_at_layer`, then `srlib.sae.sae_for_profile`), all
    trained with the same budgets (`sae_tokens`, `sae_corpus_tokens`), so the layers are
    compared on equal terms; SAEs and hidden states are cached, so a second run trains and
    extracts nothing. Directions are selected on the training split, heads stop early on
    validation (`head`: the `HeadConfig`, default the profile's); with `score_test=False` the
    test split is never scored (a selection run: `validation_study`). Returns the rows of `run_trials` with two more
    columns, `layer` and `k`.
    """
    import pandas as pd

    from srlib.sae import extract_sae_corpora, sae_for_profile

    at_layers = {
        layer: profile_at_layer(profile, layer, sae_tokens=sae_tokens, sae_corpus_tokens=sae_corpus_tokens)
        for layer in layers
    }
    # Every layer from one pass: first the SAE corpora (whose pass also caches the states of
    # any of the data set's pairs they hold), then the data set's remaining states.
    extract_sae_corpora(backbone, list(at_layers.values()), progress=progress)
    warm_states(backbone, dataset, profile, layers, progress=progress)
    frames = []
    for layer, at_layer in at_layers.items():
        sae = sae_for_profile(at_layer, backbone, progress=progress)
        states = dataset_states(backbone, dataset, profile, layer=layer, progress=progress)
        fit = dict(features="projection", head=head or profile.head, score_test=score_test)
        variants = {f"K={k}": dict(fit, directions=d) for k, d in select_for_ks(states, sae, ks).items()}
        trials = run_trials(states, variants, seeds, progress=progress)
        trials["layer"] = layer
        trials["k"] = [int(v.split("=")[1]) for v in trials["variant"]]
        frames.append(trials)
    return pd.concat(frames, ignore_index=True)


#: How `best_setting` chooses, in words the book prints beside the choice.
SELECTION_RULE = (
    "the best mean validation accuracy over seeds; every setting whose mean lies within one "
    "standard error of the best counts as tied with it, and a tie goes to the simpler setting"
)


def _paired_item_se(trials, by: Sequence[str], outcomes: str, cells: Sequence[str], best: dict) -> dict[tuple, float]:
    """{setting: SE (points) of the best setting's mean minus this setting's}, from per-item
    outcomes scored on the same items. In each cell (e.g. a data set, whose pairs every trial
    there scored) a setting's outcomes are averaged per item over its trials (seeds, K), the
    difference from the best's is taken item by item, and its mean's SE is std / sqrt(n); the
    cells' SEs combine as the SE of the mean over cells (each cell weighs the same)."""
    import numpy as np

    per_setting: dict[tuple, list[np.ndarray]] = {}
    best_key = tuple(best[key] for key in by)
    for _, cell in trials.groupby(list(cells), sort=False):
        means = {
            key if isinstance(key, tuple) else (key,): np.stack(
                [np.asarray(o, dtype=float) for o in rows[outcomes]]
            ).mean(0)
            for key, rows in cell.groupby(list(by), sort=False)
        }
        if best_key not in means or len({len(m) for m in means.values()}) != 1:
            raise ConfigError(
                f"best_setting(outcomes={outcomes!r}) needs every setting scored on the same items in each "
                f"cell of {tuple(cells)}"
            )
        for key, mean in means.items():
            per_setting.setdefault(key, []).append(means[best_key] - mean)
    se = {}
    for key, differences in per_setting.items():
        cell_se = [d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0 for d in differences]
        se[key] = 100 * float(np.sqrt(np.sum(np.square(cell_se)))) / len(differences)
    return se


def best_setting(
    trials,
    by: Sequence[str],
    *,
    select_on: str,
    simpler: Callable[[dict], Any] | None = None,
    outcomes: str | None = None,
    cells: Sequence[str] = ("dataset",),
) -> dict:
    """The setting (one value of each `by` column) chosen on the column `select_on` by `SELECTION_RULE`.

    `select_on` has no default and may not be a test column (ConfigError): settings are chosen
    on validation data. "Simpler" is the smallest `simpler(setting)` (a dict of `by` values);
    without it, the setting listed first in `trials`. Returns the chosen `by` values with the
    mean, std, se (points), count and label of `select_on`, and `tied`: the other settings
    within one standard error.

    The standard error is the best setting's, over its trials (seeds). When every setting was
    scored on the same validation items, `outcomes` (the column of per-item outcomes behind
    `select_on`, e.g. "test_outcomes" of a scored validation view) compares them paired item by
    item instead (`cells`: what holds one set of items, e.g. a data set): a setting is tied with
    the best when their difference is within one standard error of that paired difference. Which
    items happen to be in the validation split is then part of the uncertainty, as it is in
    `srlib.evaluate.compare_paired`, and a hard data set, which lowers every setting alike, is not.
    """
    if "test" in select_on:
        raise ConfigError(
            f"best_setting was asked to choose on {select_on!r}, a test column; choose on "
            "validation data (select_on='val_accuracy')"
        )
    if trials.empty:
        raise ConfigError("best_setting needs at least one trial")
    summary = summarize(trials, by, value=select_on)
    top = summary.loc[summary["mean"].idxmax()]
    if outcomes is None:
        margin = float(top["se"]) if top["se"] == top["se"] else 0.0  # one seed: no se, no tie margin
        rows = summary[summary["mean"] >= top["mean"] - margin].to_dict("records")
    else:
        se = _paired_item_se(trials, by, outcomes, cells, {key: top[key] for key in by})
        rows = [
            row for row in summary.to_dict("records") if top["mean"] - row["mean"] <= se[tuple(row[key] for key in by)]
        ]
    settings = [{key: (row[key].item() if hasattr(row[key], "item") else row[key]) for key in by} for row in rows]
    index = min(range(len(rows)), key=lambda i: (simpler(settings[i]) if simpler else 0, i))
    chosen = rows[index]
    return {
        **settings[index],
        "mean": float(chosen["mean"]),
        "std": float(chosen["std"]),
        "se": float(chosen["se"]),
        "count": int(chosen["count"]),
        "label": str(chosen["label"]),
        "tied": [setting for i, setting in enumerate(settings) if i != index],
    }


@dataclass
class ValidationStudy:
    """Chapter 3's study: the settings compared on validation, the selection, the one test score.

    `reading`: trials of read position × head-input standardisation at the profile's layer and K;
    `grid`: trials of layer × K (Figure 4) at the reading chosen first; neither scored the test
    split. `selected`: the chosen position, standardize, layer and k; `choices`: the
    `best_setting` result of each stage; `test`: the selected setting refitted with every seed,
    the only trials that scored the test split.
    """

    dataset: str
    reading: Any
    grid: Any
    choices: dict[str, dict]
    selected: dict[str, Any]
    test: Any

    def defaults_match(self, profile: Profile) -> dict[str, bool]:
        """For each studied setting, whether `profile`'s default equals the study's selection."""
        return {
            key: getattr(profile.head if key == "standardize" else profile, key) == value
            for key, value in self.selected.items()
        }

    def both_columns(self):
        """One row for the selected setting: validation and test accuracy (%), mean ± sd over seeds."""
        import pandas as pd

        row = {**self.selected}
        for column, name in (("val_accuracy", "validation accuracy (%)"), ("test_accuracy", "test accuracy (%)")):
            row[name] = summarize(self.test.assign(setting="selected"), ("setting",), value=column)["label"][0]
        return pd.DataFrame([row])


def validation_study(
    backbone,
    profile: Profile,
    sae,
    *,
    dataset: str,
    layers: Sequence[int],
    ks: Sequence[int],
    seeds: Sequence[int],
    positions: Sequence[str] | None = None,
    standardize: Sequence[bool] = (True, False),
    sae_tokens: int | None = None,
    sae_corpus_tokens: int | None = None,
    progress: bool = True,
    head: HeadConfig | None = None,
) -> ValidationStudy:
    """Choose the read position, the head's input standardisation, the layer and K on the
    validation split of `dataset`, then score the test split once, for the choice.

    Stage 1 fits every position × standardisation at the profile's layer and K (directions
    from `sae`, the profile's SAE); stage 2 runs the layer × K grid (`layer_k_sweep`, each
    layer with its own SAE) at the reading stage 1 chose. Each stage chooses by
    `SELECTION_RULE` on `val_accuracy` (the best epoch's validation accuracy); simpler means
    the profile's own position and standardisation, then the smaller K, then the shallower
    layer. Stage 3 refits the chosen setting with every seed and scores the test split.
    `head` (default: the profile's `HeadConfig`) trains every head, its `standardize` varied.
    """
    import pandas as pd

    from srlib.activations import POSITIONS
    from srlib.sae import sae_for_profile

    if len(seeds) < 1:
        raise ConfigError("validation_study needs at least one seed")
    positions = [profile.position] + [p for p in (positions or POSITIONS) if p != profile.position]
    head = head or profile.head
    standardize = sorted(set(standardize), key=lambda s: s != head.standardize)
    read = states_at_positions(backbone, dataset, profile, positions, progress=progress)
    variants = {}
    for position in positions:
        directions = select_for(read[position], sae, profile.k)
        for scaled in standardize:
            variants[(position, scaled)] = dict(
                features="projection",
                directions=directions,
                head=dataclasses.replace(head, standardize=scaled),
                score_test=False,
            )
    frames = []
    for (position, scaled), kwargs in variants.items():
        trials = run_trials(
            read[position], {f"{position}, {'standardised' if scaled else 'raw'}": kwargs}, seeds, progress=progress
        )
        frames.append(trials.assign(position=position, standardize=scaled))
    reading = pd.concat(frames, ignore_index=True)
    first = best_setting(
        reading,
        ("position", "standardize"),
        select_on="val_accuracy",
        simpler=lambda s: (s["position"] != profile.position, s["standardize"] != head.standardize),
    )
    at_reading = profile.replace(position=first["position"])
    grid = layer_k_sweep(
        backbone,
        at_reading,
        layers=layers,
        ks=ks,
        dataset=dataset,
        seeds=seeds,
        sae_tokens=sae_tokens,
        sae_corpus_tokens=sae_corpus_tokens,
        progress=progress,
        head=dataclasses.replace(head, standardize=first["standardize"]),
        score_test=False,
    )
    second = best_setting(grid, ("layer", "k"), select_on="val_accuracy", simpler=lambda s: (s["k"], s["layer"]))
    selected = {
        "position": first["position"],
        "standardize": first["standardize"],
        "layer": second["layer"],
        "k": second["k"],
    }
    at_layer = profile_at_layer(
        at_reading, selected["layer"], sae_tokens=sae_tokens, sae_corpus_tokens=sae_corpus_tokens
    )
    layer_sae = sae_for_profile(at_layer, backbone, progress=progress)
    states = dataset_states(backbone, dataset, at_reading, layer=selected["layer"], progress=progress)
    test = run_trials(
        states,
        {
            "selected": dict(
                features="projection",
                directions=select_for(states, layer_sae, selected["k"]),
                head=dataclasses.replace(head, standardize=selected["standardize"]),
            )
        },
        seeds,
        progress=progress,
    )
    return ValidationStudy(dataset, reading, grid, {"reading": first, "grid": second}, selected, test)


def shuffled_separation(latents_w: Tensor, latents_l: Tensor, *, seed: int = 0) -> Tensor:
    """Eq. 9's nabla after swapping chosen and rejected in a random half of the pairs: the
    separation scores that arise by chance when the labels carry no preference."""
    swap = torch.rand(len(latents_w), generator=torch.Generator().manual_seed(seed)) < 0.5
    fired_w, fired_l = latents_w > 0, latents_l > 0
    first = torch.where(swap[:, None], fired_l, fired_w).float().mean(dim=0)
    second = torch.where(swap[:, None], fired_w, fired_l).float().mean(dim=0)
    return first - second


def paired_table(
    trials, comparisons: Sequence[tuple[str, str]], *, by: str = "dataset", labels: Mapping[str, str] | None = None
):
    """`compare_variants` for every (A, B) in `comparisons` within every value of `by`: one row
    each (`PairedComparison.as_row`, the `by` value, the verdict line). `labels` renames the
    `by` values (e.g. `DATASET_LABELS`)."""
    import pandas as pd

    rows = []
    for group in dict.fromkeys(trials[by]):
        for a, b in comparisons:
            c = compare_variants(trials, a, b, **{by: group})
            rows.append({by: (labels or {}).get(group, group), **c.as_row(), "verdict": c.verdict()})
    return pd.DataFrame(rows)
