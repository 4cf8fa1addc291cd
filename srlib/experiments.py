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

    def first(self, n: int) -> "SplitStates":
        """The first `n` pairs with their states (splits are already seeded and grouped)."""
        return SplitStates(self.pairs[:n], self.chosen[:n], self.rejected[:n])


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



# --------------------------------------------------------------------------- inspecting latents (chapters 1-2)


def pair_text(pair: PreferencePair, side: str = "chosen", chars: int = 200) -> str:
    """"question → answer" of one side of a pair on one line, cut to `chars` characters."""
    return _cut(f"{pair.prompt} → {pair.chosen if side == 'chosen' else pair.rejected}", chars)


def top_latents(latents: Tensor, n: int = 5) -> list[list[tuple[int, float]]]:
    """Per row of [rows, M] latents, the `n` strongest active latents as (index, activation),
    strongest first (fewer when fewer fire)."""
    values, indices = latents.topk(min(n, latents.shape[1]), dim=1)
    return [[(int(j), float(v)) for j, v in zip(row_i, row_v) if v > 0] for row_i, row_v in zip(indices, values)]


def pair_latent_table(pairs: Sequence[PreferencePair], latents_w: Tensor, latents_l: Tensor, *,
                      n: int = 5, chars: int = 80):
    """One row per answer of each pair: the answer, its `n` strongest latents ("j (activation)"),
    the `n` strongest of those it fires that the other answer of the pair does not, and how
    many latents fire on it."""
    import pandas as pd

    rows = []
    for i, pair in enumerate(pairs):
        for side, own, other in (("chosen", latents_w[i], latents_l[i]), ("rejected", latents_l[i], latents_w[i])):
            exclusive = torch.where(other > 0, torch.zeros(()), own)
            rows.append({"pair": i + 1, "answer": side,
                         "text": _cut(pair.chosen if side == "chosen" else pair.rejected, chars),
                         "strongest latents (activation)": _latent_list(own, n),
                         "strongest of those the other answer lacks": _latent_list(exclusive, n) or "–",
                         "active latents": int((own > 0).sum())})
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
    return [(int(r), float(v)) for r, v in zip(rows, values) if v > 0]


def separated_pairs(latents_w: Tensor, latents_l: Tensor, latent: int, side: str = "w") -> Tensor:
    """Indices of the pairs a latent separates: it fires on the chosen answer and not on the
    rejected one (`side="w"`), or the reverse (`side="l"`)."""
    on_w, on_l = latents_w[:, latent] > 0, latents_l[:, latent] > 0
    if side not in ("w", "l"):
        raise ConfigError(f"side must be 'w' or 'l', got {side!r}")
    return torch.nonzero(on_w & ~on_l if side == "w" else on_l & ~on_w).flatten()


def neuronpedia_url(sae_source: str, latent: int) -> str | None:
    """The public Neuronpedia dashboard of a Gemma Scope residual-stream latent, or None.

    `sae_source` is a profile's "sae-lens:gemma-scope-<2b|9b>-pt-res[-canonical]/layer_<L>/width_<W>/..."
    string; the page is https://www.neuronpedia.org/gemma-2-<2b|9b>/<L>-gemmascope-res-<W>/<latent>.
    SAEs trained here (and other releases) have no public dashboard: None.
    """
    import re

    match = re.fullmatch(r"sae-lens:gemma-scope-(2b|9b)-pt-res(?:-canonical)?/layer_(\d+)/width_(\w+?)/.*",
                         sae_source)
    if match is None:
        return None
    size, layer, width = match.groups()
    return f"https://www.neuronpedia.org/gemma-2-{size}/{layer}-gemmascope-res-{width}/{int(latent)}"


def latent_cards(directions: Directions, latents_w: Tensor, latents_l: Tensor, pairs: Sequence[PreferencePair],
                 *, n_latents: int = 5, n_texts: int = 3, chars: int = 200, sae_source: str = ""):
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
    for side, indices, scores in (("w", directions.indices_w, directions.scores_w),
                                  ("l", directions.indices_l, directions.scores_l)):
        for rank, (latent, score) in enumerate(zip(indices[:n_latents].tolist(), scores[:n_latents].tolist()), 1):
            top = max_activating(both, latent, n_texts)
            separated = separated_pairs(latents_w, latents_l, latent, side)
            example = ""
            if separated.numel():  # the separated pair where the latent fires most strongly
                firing = (latents_w if side == "w" else latents_l)[separated, latent]
                pair = pairs[int(separated[firing.argmax()])]
                example = (f"{_cut(pair.prompt, chars // 2)} | chosen: {_cut(pair.chosen, chars // 3)}"
                           f" | rejected: {_cut(pair.rejected, chars // 3)}")
            rows.append({
                "side": "chosen (∇)" if side == "w" else "rejected (Δ)",
                "rank": rank,
                "latent": latent,
                "score": score,
                "μ_w": float(directions.mu_w[latent]),
                "μ_l": float(directions.mu_l[latent]),
                "max-activating answers": [f"[{'chosen' if r < len(pairs) else 'rejected'}, {v:.2f}] {answers[r]}"
                                           for r, v in top],
                "pairs separated": int(separated.numel()),
                "example pair": example,
                "dashboard": neuronpedia_url(sae_source, latent),
            })
    return pd.DataFrame(rows)


def jaccard(a: Tensor | Sequence[int], b: Tensor | Sequence[int]) -> float:
    """|A ∩ B| / |A ∪ B| of two index sets (1.0 for two empty sets)."""
    a, b = set(torch.as_tensor(a).tolist()), set(torch.as_tensor(b).tolist())
    return len(a & b) / len(a | b) if a | b else 1.0


def selection_stability(sae_or_W_dec, latents_w: Tensor, latents_l: Tensor, groups: Sequence[str],
                        ks: Sequence[int], *, seed: int = 0):
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
        rows.append({"K": k, "Jaccard I_w": jaccard(a.indices_w, b.indices_w),
                     "Jaccard I_l": jaccard(a.indices_l, b.indices_l), "chance": k / (2 * m - k),
                     "pairs per half": f"{int(mask.sum())} / {int((~mask).sum())}"})
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
        active = encode(sae, activations[start:start + chunk]) > 0
        per_row.append(active.sum(dim=1))
        fired += active.sum(dim=0)
    return LatentStatistics(torch.cat(per_row), fired / len(activations))


# --------------------------------------------------------------------------- layer × K sweep (chapter 3, Figure 4)


def profile_at_layer(profile: Profile, layer: int, *, sae_tokens: int | None = None,
                     sae_corpus_tokens: int | None = None) -> Profile:
    """The profile moved to another layer, with an SAE for that layer.

    A trained SAE (`sae_source="train"`) is trained at the new layer; `sae_tokens` replaces
    its training-token budget and `sae_corpus_tokens` caps its corpus
    (`profile.sae_corpus_tokens`, read by `srlib.sae.sae_for_profile`); both only
    make a sweep cheaper. A Gemma Scope source ".../layer_<L>/..." is pointed at the new
    layer. Any other pretrained source cannot follow the layer: ConfigError.
    """
    import dataclasses
    import re

    changes: dict = {"layer": layer}
    if profile.sae_source == "train":
        if profile.sae_training is None:
            raise ConfigError(f"profile {profile.name!r} trains its SAE but has no sae_training")
        if sae_tokens is not None:
            changes["sae_training"] = dataclasses.replace(profile.sae_training, training_tokens=sae_tokens)
        if sae_corpus_tokens is not None:
            changes["sae_corpus_tokens"] = sae_corpus_tokens
    elif layer != profile.layer:
        source, count = re.subn(r"/layer_\d+/", f"/layer_{layer}/", profile.sae_source)
        if count != 1:
            raise ConfigError(f"cannot move the SAE {profile.sae_source!r} to layer {layer}: "
                              "no '/layer_<L>/' part to change")
        changes["sae_source"] = source
    return profile.replace(**changes)


def layer_k_sweep(backbone, profile: Profile, *, layers: Sequence[int], ks: Sequence[int], dataset: str,
                  seeds: Sequence[int], sae_tokens: int | None = None, sae_corpus_tokens: int | None = None,
                  progress: bool = True, **fit_kwargs):
    """Figure 4: SparseRM test accuracy for every (layer, K, seed) on one data set.

    Every layer gets its own SAE (`profile_at_layer`, then `srlib.sae.sae_for_profile`), all
    trained with the same budgets (`sae_tokens`, `sae_corpus_tokens`), so the layers are
    compared on equal terms; SAEs and hidden states are cached, so a second run trains and
    extracts nothing. Directions are selected
    on the training split, heads stop early on validation, accuracy is on test. Returns the
    rows of `run_trials` with two more columns, `layer` and `k`.
    """
    import pandas as pd

    from srlib.sae import sae_for_profile

    frames = []
    for layer in layers:
        at_layer = profile_at_layer(profile, layer, sae_tokens=sae_tokens, sae_corpus_tokens=sae_corpus_tokens)
        sae = sae_for_profile(at_layer, backbone, progress=progress)
        states = dataset_states(backbone, dataset, profile, layer=layer, progress=progress)
        variants = {f"K={k}": dict(features="projection", directions=select_for(states, sae, k), **fit_kwargs)
                    for k in ks}
        trials = run_trials(states, variants, seeds, progress=progress)
        trials["layer"] = layer
        trials["k"] = [int(v.split("=")[1]) for v in trials["variant"]]
        frames.append(trials)
    return pd.concat(frames, ignore_index=True)


def best_setting(summary, by: Sequence[str] = ("layer", "k")) -> dict:
    """The row of a `summarize(trials, by=by)` table with the highest mean accuracy, as a dict
    of its `by` values, mean, std and label (ties: the first row, i.e. the earliest listed)."""
    row = summary.loc[summary["mean"].idxmax()]
    best = {key: (row[key].item() if hasattr(row[key], "item") else row[key]) for key in by}
    return {**best, "mean": float(row["mean"]), "std": float(row["std"]), "label": str(row["label"])}


def shuffled_separation(latents_w: Tensor, latents_l: Tensor, *, seed: int = 0) -> Tensor:
    """Eq. 9's nabla after swapping chosen and rejected in a random half of the pairs: the
    separation scores that arise by chance when the labels carry no preference."""
    swap = torch.rand(len(latents_w), generator=torch.Generator().manual_seed(seed)) < 0.5
    fired_w, fired_l = latents_w > 0, latents_l > 0
    first = torch.where(swap[:, None], fired_l, fired_w).float().mean(dim=0)
    second = torch.where(swap[:, None], fired_w, fired_l).float().mean(dim=0)
    return first - second


def latent_cards_html(cards, *, quote_texts: bool = True) -> str:
    """`latent_cards` as HTML, one block per latent: a header line (side, latent, score,
    frequencies, pairs separated, dashboard link when there is one), then its max-activating
    answers and an example pair as a list. Texts are HTML-escaped; `quote_texts=False` leaves
    them out (for data sets whose texts should not be quoted)."""
    from html import escape

    blocks = []
    for card in cards.to_dict("records"):
        link = f' · <a href="{escape(card["dashboard"])}">dashboard</a>' if card.get("dashboard") else ""
        header = (f'<b>latent {card["latent"]}</b> ({escape(card["side"])}, rank {card["rank"]}): score '
                  f'{card["score"]:.3f}, μ_w {card["μ_w"]:.3f}, μ_l {card["μ_l"]:.3f}, separates '
                  f'{card["pairs separated"]} pairs{link}')
        items = []
        if quote_texts:
            items = [f"<li>{escape(text)}</li>" for text in card["max-activating answers"]]
            if card["example pair"]:
                items.append(f"<li><i>a pair it separates:</i> {escape(card['example pair'])}</li>")
        body = f"<ul>{''.join(items)}</ul>" if items else ""
        blocks.append(f'<div class="mathjax_ignore" style="margin-bottom:0.8em">{header}{body}</div>')
    return "\n".join(blocks)
