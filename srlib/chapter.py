"""One call that sets a chapter up: the profile with the chapter's overrides, the backbone, its
SAE, and the sizes the chapter runs at.

Every chapter of the book starts the same way (read the profile, move it to the chosen layer,
load the backbone and the SAE, print what was loaded, warn when the numbers mean nothing); this
module is the one place that does it, so a chapter's first code cell is one line:

    ch = setup(PROFILE, layer=LAYER, k=K, seeds=SEEDS, datasets=DATASETS)

A parameter left at `None` falls back to the profile (`srlib.profiles`). Below the setup are
the small measurements the early chapters take on the loaded SAE and states (held-out
reconstruction, which latents answers share); the tables and sentences that show them are in
`srlib.present`.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm import TqdmWarning

# tqdm.auto (srlib's progress bars, and the libraries below) warns once, when first imported, that
# Jupyter widgets are missing; the book does not use them, so the warning says nothing to a reader.
# A chapter imports this module first, so the filter is in place before that import.
warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)

from srlib.backbone import Backbone, backbone_for_profile  # noqa: E402
from srlib.data import PreferencePair  # noqa: E402
from srlib.errors import ConfigError  # noqa: E402
from srlib.experiments import DATASET_LABELS, DatasetStates, dataset_states, top_latents  # noqa: E402
from srlib.profiles import Profile, get_profile  # noqa: E402
from srlib.sae import sae_for_profile  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd

#: The most torch threads a chapter may use. The book build sets it for chapters it runs side by
#: side (the cores divided by the chapters running at once), so that two chapters never ask for
#: more threads than the machine has cores; unset, a chapter uses what it asks for.
THREADS_ENV = "SRLIB_THREADS"
#: torch's own thread count when srlib.chapter was imported (every core), before a chapter set one.
DEFAULT_THREADS = torch.get_num_threads()


def torch_threads(requested: int | None = None) -> int:
    """The torch threads for work that gains from several (extraction, generation, training):
    `requested` (None: torch's default, every core) capped by `SRLIB_THREADS` when it is set.
    On two cores, two chapters with two threads each are slower than with one each
    (`benchmarks/threads.py --side-by-side 2` measures it)."""
    wanted = requested or DEFAULT_THREADS
    budget = os.environ.get(THREADS_ENV, "").strip()
    if not budget:
        return wanted
    if not budget.isdigit() or int(budget) < 1:
        raise ConfigError(f"{THREADS_ENV}={budget!r} is not a positive whole number of threads; unset it or fix it")
    return min(wanted, int(budget))


#: What the smoke profile's banner says, above every chapter run under it.
SMOKE_BANNER = (
    "> **Smoke profile:** a tiny random model and a tiny SAE: the code runs end to end, "
    "but every number in this chapter is meaningless."
)


@dataclass(frozen=True)
class Chapter:
    """What a chapter works with: the profile (at the chapter's layer and K), the frozen backbone
    and SAE, and the seeds and data sets of its tables."""

    profile: Profile
    backbone: Backbone
    sae: Any
    seeds: tuple[int, ...]
    datasets: tuple[str, ...]
    started: float = field(default_factory=time.perf_counter)

    @property
    def k(self) -> int:
        """Latents selected per side (the head reads 2K numbers)."""
        return self.profile.k

    @property
    def d_sae(self) -> int:
        """The SAE's number of latents M."""
        return int(self.sae.cfg.d_sae)

    def states(self, names: Sequence[str], *, max_pairs: int | None = None) -> dict[str, DatasetStates]:
        """{data set: train/val/test states at the profile's layer and read position}, each data
        set once (extracted once, then read from the activation cache)."""
        return {
            name: dataset_states(self.backbone, name, self.profile, max_pairs=max_pairs, progress=False)
            for name in dict.fromkeys(names)
        }

    def elapsed(self) -> float:
        """Seconds since the chapter started (before the backbone and the SAE were loaded)."""
        return time.perf_counter() - self.started

    def header(self) -> str:
        """One line saying what was loaded: model, layer, width, read position, SAE, K and seeds."""
        p, b = self.profile, self.backbone
        return (
            f"profile {p.name}: {b.model_id}, layer {p.layer} of {b.num_layers} blocks, "
            f"d = {b.hidden_size}, read at the {p.position!r} token; SAE with {self.d_sae:,} latents "
            f"({p.sae_source}); K = {self.k} (2K = {2 * self.k} head inputs); seeds {self.seeds}"
        )


def setup(
    profile: str | Profile,
    *,
    layer: int | None = None,
    k: int | None = None,
    seeds: Sequence[int] | None = None,
    datasets: Sequence[str] | None = None,
    single_thread: bool = True,
    threads: int | None = None,
    show: bool = True,
    quiet: bool = False,
) -> Chapter:
    """Load what a chapter needs under `profile`, with its overrides (None: the profile's).

    `single_thread` sets torch to one thread first, for a chapter of many small head fits that
    may share the CPU with other work: a second thread pays alone and costs much beside another
    busy process (`benchmarks/threads.py`, alone and `--side-by-side 2`, measures both). A
    chapter that extracts many hidden states or trains an SAE passes False.
    Without `single_thread`, `threads` (None: the profile's `threads`, if any; else every core)
    sets torch's thread count for the whole chapter, at most `SRLIB_THREADS` (`torch_threads`).
    `show` prints the header line and, under the smoke profile, the banner saying the numbers
    mean nothing. `quiet` silences what transformers and TRL print that a chapter training with
    them does not need (`quiet_libraries`).
    """
    if quiet:
        quiet_libraries()
    if single_thread:
        torch.set_num_threads(1)
    started = time.perf_counter()
    base = get_profile(profile) if isinstance(profile, str) else profile
    base = base.at_layer(layer)
    if k is not None:
        base = base.replace(k=k)
    if not single_thread:
        torch.set_num_threads(torch_threads(threads or base.threads))
    backbone = backbone_for_profile(base, progress=False)
    with_the_sweep(base, backbone)
    sae = sae_for_profile(base, backbone, progress=False)
    chapter = Chapter(
        profile=base,
        backbone=backbone,
        sae=sae,
        seeds=tuple(base.seeds if seeds is None else seeds),
        datasets=tuple(base.datasets if datasets is None else datasets),
        started=started,
    )
    if show:
        print(chapter.header())
        if base.name == "smoke":
            from IPython.display import Markdown, display

            display(Markdown(SMOKE_BANNER))
    return chapter


def with_the_sweep(profile: Profile, backbone: Backbone) -> list[int]:
    """On a cold cache (the profile's own SAE still to be trained), let the forward passes a
    chapter runs anyway serve chapter 3's validation study too, at the layers of its sweep at or
    below the profile's (every one of them is passed through on the way to the profile's
    layer, so keeping it costs memory and disk, not blocks run):

    * the corpus pass of the profile's SAE keeps the corpora of the sweep SAEs that are trained
      on the same texts (`srlib.experiments.sweep_profiles`), so chapter 3 runs no corpus pass;
    * the sweep data set's pairs are read at those layers and at every read position
      (`srlib.activations.POSITIONS`) in one pass, which the profile's own states need anyway.

    Returns those layers: none on a warm cache or with a pretrained SAE, so a chapter never pays
    for layers it does not read.
    """
    from srlib.activations import POSITIONS
    from srlib.experiments import sweep_profiles, warm_states
    from srlib.sae import extract_sae_corpora, sae_to_train

    if not sae_to_train(profile, backbone):
        return []
    along = [p for p in sweep_profiles(profile) if p.layer <= profile.layer]
    same_corpus = [p for p in along if p.sae_corpus_tokens == profile.sae_corpus_tokens]
    extract_sae_corpora(backbone, [profile, *same_corpus], progress=False)
    layers = sorted({profile.layer, *(p.layer for p in along)})
    warm_states(backbone, profile.sweep_config.dataset, profile, layers, positions=POSITIONS, progress=False)
    return layers


def quiet_libraries() -> None:
    """Silence the library chatter of a chapter that trains with transformers and TRL: their
    deprecation and user warnings, info messages and the weight-loading bars (each model load)."""
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------- what chapter 1 measures on the SAE


@dataclass
class HeldoutStates:
    """Validation text the SAE never saw: every token of some texts, and the last-token state of
    every validation answer per data set (the states a reward model reads)."""

    texts: list[str]
    tokens: Tensor
    last: dict[str, Tensor]

    @property
    def all_last(self) -> Tensor:
        """The last-token states of every data set, stacked."""
        return torch.cat(list(self.last.values()))


def heldout_states(backbone, profile: Profile, n_texts: int) -> HeldoutStates:
    """The validation answers' last-token states of each profile data set, and every token of
    `n_texts` validation texts per data set (chosen and rejected answers of its first pairs)."""
    from srlib.activations import iter_token_activations
    from srlib.backbone import format_pair

    texts, last = [], {}
    for name in profile.datasets:
        val = dataset_states(backbone, name, profile, progress=False).val
        last[name] = torch.cat([val.chosen, val.rejected])
        texts += [text for pair in val.pairs[: max(n_texts // 2, 1)] for text in format_pair(backbone.tokenizer, pair)]
    tokens = torch.cat(
        list(
            iter_token_activations(
                backbone,
                texts,
                profile.layer,
                max_length=profile.max_length,
                batch_size=profile.batch_size,
                progress=False,
            )
        )
    )
    return HeldoutStates(texts, tokens, last)


def heldout_reports(sae, heldout: HeldoutStates) -> dict:
    """{where: `srlib.sae.SAEReport`}: the SAE over every held-out token, at the last token of all
    data sets and of each, and (for an SAE trained here) on the slice of its corpus it held out."""
    from srlib.sae import SAEReport, sae_info, sae_report

    reports = {
        "every token, validation texts": sae_report(sae, heldout.tokens),
        "last token, validation answers (all data sets)": sae_report(sae, heldout.all_last),
    }
    for name, states in heldout.last.items():
        reports[f"last token, {DATASET_LABELS.get(name, name)} validation answers"] = sae_report(sae, states)
    info = sae_info(sae)
    if info is not None:
        reports["every token, the SAE's held-out corpus slice"] = SAEReport(**info["heldout"]["all_tokens"])
        reports["last token, the SAE's held-out corpus slice"] = SAEReport(**info["heldout"]["last_tokens"])
    return reports


def one_pair_per_question(pairs: Sequence[PreferencePair]) -> list[int]:
    """The index of the first pair of each question, in order of first appearance."""
    first: dict[str, int] = {}
    for i, pair in enumerate(pairs):
        first.setdefault(pair.group_id, i)
    return list(first.values())


def recurring_latents(latents_w: Tensor, latents_l: Tensor, rows: Sequence[int], n: int) -> list[int]:
    """Latents among the `n` strongest that a chosen answer fires and its rejected answer does
    not, which recur in more than one of `rows`, most frequent first."""
    from collections import Counter

    counts = Counter(
        j for i in rows for j, _ in top_latents(torch.where(latents_l[i] > 0, 0.0, latents_w[i])[None], n)[0]
    )
    return [j for j, count in counts.most_common() if count > 1]


def shared_latents(latents_w: Tensor, latents_l: Tensor, groups: Sequence[str]) -> dict[str, float]:
    """How many latents a chosen answer fires (`fired`), and shares with the rejected answer to
    the same question (`same_question`) and, on average, to another question (`other_question`)."""
    on_w, on_l = (latents_w > 0).float(), (latents_l > 0).float()
    shared = on_w @ on_l.T  # [i, j]: latents that chosen answer i and rejected answer j both fire
    other = torch.tensor([[a != b for b in groups] for a in groups])
    return {
        "fired": on_w.sum(1).float().mean().item(),
        "same_question": shared.diagonal().mean().item(),
        "other_question": shared[other].mean().item(),
    }


# --------------------------------------------------------------------------- what chapter 2 measures on a selection


def selection_against_chance(directions, null: Tensor) -> dict[str, Any]:
    """How a top-K selection's separation scores compare with chance.

    `null`: the scores after swapping chosen and rejected in a random half of the pairs
    (`srlib.experiments.shuffled_separation`). Among the latents that fire on some answer: how
    many there are (`firing`), the correlation of their two frequencies, the largest |score|
    under the shuffle (`chance`), how many real |∇| exceed it (`beyond`), how many selected
    latents per side score no higher (`below_w`, `below_l`) and how many score zero or less
    (`flat`, picked by the tie-break); with the strongest and the K-th selected score per side.
    """
    mu_w, mu_l = directions.mu_w, directions.mu_l
    fires = (mu_w > 0) | (mu_l > 0)
    chance = null[fires].abs().max().item()
    return {
        "firing": int(fires.sum()),
        "correlation": torch.corrcoef(torch.stack([mu_w[fires], mu_l[fires]]))[0, 1].item(),
        "chance": chance,
        "beyond": int(((mu_w - mu_l).abs() > chance).sum()),
        "below_w": int((directions.scores_w <= chance).sum()),
        "below_l": int((directions.scores_l <= chance).sum()),
        "flat": int((directions.scores_w <= 0).sum() + (directions.scores_l <= 0).sum()),
        "top_w": directions.scores_w[0].item(),
        "top_l": directions.scores_l[0].item(),
        "kth_w": directions.scores_w[-1].item(),
        "kth_l": directions.scores_l[-1].item(),
    }


def both_fire_share(latents_w: Tensor, latents_l: Tensor, latents: Tensor) -> float:
    """The mean share of pairs on which both answers fire each of `latents`."""
    return ((latents_w > 0) & (latents_l > 0)).float().mean(0)[latents].mean().item()


def stability_runs(
    sae, latents_w: Tensor, latents_l: Tensor, groups: Sequence[str], ks: Sequence[int], seeds: Sequence[int]
):
    """`srlib.experiments.selection_stability` once per seed of the half split, one table with a
    `seed` column (one row per K and seed)."""
    import pandas as pd

    from srlib.experiments import selection_stability

    return pd.concat([selection_stability(sae, latents_w, latents_l, groups, ks, seed=s).assign(seed=s) for s in seeds])


# --------------------------------------------------------------------------- what chapter 4 compares: the head's input


def head_inputs(sae, directions, *, k: int | None = None) -> dict[str, dict]:
    """Table 2's three inputs for one head, as `srlib.experiments.run_trials` variants: the SAE's
    activations of the selected latents, projections on as many random unit directions, and
    projections on the selected decoder directions.

    With `k`, the latents and the top-K directions are selected per seed (on its bootstrap
    resample when `run_trials(resample=True)`); without, they are `directions`. The random
    variant only takes the number of directions from `directions`.
    """
    chosen = dict(select=dict(sae=sae, k=k)) if k is not None else dict(directions=directions)
    return {
        "SAE latents": dict(features="latents", sae=sae, **chosen),
        "Random directions": dict(features="random", directions=directions),
        "Top-K directions": dict(features="projection", **chosen),
    }


def selected_latent_activity(sae, directions, split) -> dict[str, float]:
    """How much a latent-input head has to go on, on one split's answers: the mean number of
    selected latents active per answer (`active`), the share of answers (`empty`) and of pairs
    (`both_empty`) with none active, and the mean number of non-zero projections per answer."""
    from srlib.sae import encode

    lat_w = encode(sae, split.chosen)[:, directions.indices]
    lat_l = encode(sae, split.rejected)[:, directions.indices]
    active = torch.cat([lat_w, lat_l]) > 0
    empty_w, empty_l = ~(lat_w > 0).any(1), ~(lat_l > 0).any(1)
    return {
        "active": active.sum(1).float().mean().item(),
        "empty": float(active.any(1).logical_not().float().mean()),
        "both_empty": float((empty_w & empty_l).float().mean()),
        "nonzero_projections": (split.chosen @ directions.vectors.T != 0).sum(1).float().mean().item(),
    }


# --------------------------------------------------------------------------- what chapter 5 measures: the margin γ


def gamma_sweep(states, directions, gammas: Sequence[float], seeds: Sequence[int]):
    """Fit a margin-loss head per γ and seed on the same projections; (sweep, seed_reference).

    `sweep`: one row per (γ, seed), the trial's fields plus, against the γ = 1 head of the same
    seed on the test answers, the scale of the scores (`scale_vs_gamma1`), their Spearman ρ, the
    share of test pairs with the same keep/drop decision, and the sd of the scores.
    `seed_reference`: the same Spearman ρ and agreement between two γ = 1 heads that differ only
    in their seed, the yardstick for the "vs γ = 1" columns. γ = 1 (`fit_head`'s default) must
    be among `gammas`.
    """
    import pandas as pd

    from srlib.errors import ConfigError
    from srlib.experiments import fit_variant
    from srlib.shift import agreement_counts, keep_decisions, score_relation

    if 1.0 not in gammas:
        raise ConfigError("the γ sweep must include 1.0, the reference the other values are compared with")
    test_w, test_l = states.test.chosen, states.test.rejected
    rows, scores = [], {}
    for gamma in gammas:
        for seed in seeds:
            head = replace(states.head, loss="margin", gamma=gamma)
            model, trial = fit_variant(
                states, features="projection", directions=directions, head=head, seed=seed, variant=f"γ = {gamma:g}"
            )
            scores[gamma, seed] = (model.score_states(test_w), model.score_states(test_l))
            rows.append(dict(vars(trial), gamma=gamma))
    for row in rows:
        (s_w, s_l), (r_w, r_l) = scores[row["gamma"], row["seed"]], scores[1.0, row["seed"]]
        relation = score_relation(torch.cat([s_w, s_l]), torch.cat([r_w, r_l]))
        row.update(
            scale_vs_gamma1=relation["scale"],
            spearman_vs_gamma1=relation["spearman"],
            same_decisions_vs_gamma1=agreement_counts(keep_decisions(s_w, s_l), keep_decisions(r_w, r_l))["agreement"],
            score_sd=float(torch.cat([s_w, s_l]).std()),
        )
    seed_pairs = [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1 :]]
    seed_reference = pd.DataFrame(
        [
            dict(
                spearman_vs_gamma1=score_relation(torch.cat(scores[1.0, a]), torch.cat(scores[1.0, b]))["spearman"],
                same_decisions_vs_gamma1=agreement_counts(
                    keep_decisions(*scores[1.0, a]), keep_decisions(*scores[1.0, b])
                )["agreement"],
            )
            for a, b in seed_pairs
        ]
    )
    return pd.DataFrame(rows), seed_reference


# --------------------------------------------------------------------------- what chapter 3 measures: SparseRM itself


def untrained_scores(states, directions) -> tuple[Tensor, Tensor]:
    """A score with no trained parameter for the test pairs: the mean standardised projection on
    F_w minus that on F_l (statistics from the training answers); (chosen, rejected)."""
    train_v = torch.cat([states.train.chosen, states.train.rejected]) @ directions.vectors.T
    mean, std = train_v.mean(0), train_v.std(0).clamp_min(1e-6)

    def score(Z: Tensor) -> Tensor:
        v = (Z @ directions.vectors.T - mean) / std  # standardised v_p, [n, 2K]
        return v[:, : directions.k].mean(1) - v[:, directions.k :].mean(1)

    return score(states.test.chosen), score(states.test.rejected)


def parameter_counts(backbone, sae, directions, model) -> dict[str, int]:
    """Numbers in each part of a SparseRM: the frozen backbone, SAE and directions, and the head."""
    return {
        "backbone": sum(p.numel() for p in backbone.model.parameters()),
        "sae": sum(p.numel() for p in sae.parameters()),
        "directions": directions.vectors.numel(),
        "head": model.num_trainable_parameters(),
    }


@dataclass(frozen=True)
class SweepGrid:
    """Chapter 3's validation study grid after its parameters fell back to the profile's."""

    layers: tuple[int, ...]
    ks: tuple[int, ...]
    seeds: tuple[int, ...]
    sae_tokens: int | None
    sae_corpus_tokens: int | None


def sweep_grid(ch: Chapter, *, layers=None, ks=None, seeds=None, sae_tokens=None, sae_corpus_tokens=None) -> SweepGrid:
    """The layers, K values (those above the SAE width dropped), seeds and sweep-SAE budgets of
    the validation study: each argument left at None is the profile's sweep setting (seeds: the
    chapter's)."""
    sweep = ch.profile.sweep_config
    return SweepGrid(
        layers=tuple(layers or sweep.layers),
        ks=tuple(k for k in (ks or sweep.ks) if k <= ch.d_sae),
        seeds=tuple(ch.seeds if seeds is None else seeds),
        sae_tokens=sweep.sae_tokens if sae_tokens is None else sae_tokens,
        sae_corpus_tokens=sweep.sae_corpus_tokens if sae_corpus_tokens is None else sae_corpus_tokens,
    )


# --------------------------------------------------------------------------- chapters 6-10: reward models at work


def attached_rm(ch: Chapter, states: DatasetStates, *, seed: int, **options):
    """A reward model fitted on `states` (`srlib.experiments.fit_variant` with `options`) that
    reads texts through the chapter's backbone as the training pairs were read: what scores
    generated answers (chapters 7 and 10). Returns (model, trial)."""
    from srlib.experiments import fit_variant

    model, trial = fit_variant(states, seed=seed, **options)
    return model.attach_backbone(ch.backbone), trial


@dataclass(frozen=True)
class ReadingModels:
    """Chapter 9's reward models, one SparseRM per data set, and what reads them: the latent
    cards of each one's directions, their short labels, and whether its answers may be quoted."""

    models: dict[str, Any]
    cards: dict[str, Any]
    labels: dict[str, dict[int, str]]
    quote: dict[str, bool]


def reading_models(
    ch: Chapter, states: dict[str, DatasetStates], *, seed: int, n_texts: int, chars: int, quote_safety: bool
) -> ReadingModels:
    """Per data set: a SparseRM on the profile's K directions (seed `seed`; the test split is not
    scored), the cards of its 2K latents (the training answers that switch each on most, cut to
    `chars`) and, where answers may be quoted, the cards' labels. TruthfulQA's answers are always
    quoted; the safety data sets' only with `quote_safety` (they hold harmful requests)."""
    from srlib import explain
    from srlib.experiments import fit_variant, latent_cards, select_for
    from srlib.sae import encode

    quote = {name: quote_safety or name == "truthfulqa" for name in states}
    models, cards, labels = {}, {}, {}
    for name, s in states.items():
        directions = select_for(s, ch.sae, ch.k)
        models[name], _ = fit_variant(s, features="projection", directions=directions, seed=seed, score_test=False)
        cards[name] = latent_cards(
            directions,
            encode(ch.sae, s.train.chosen),
            encode(ch.sae, s.train.rejected),
            s.train.pairs,
            n_latents=ch.k,
            n_texts=n_texts,
            chars=chars,
            sae_source=ch.profile.sae_source,
        )
        labels[name] = explain.card_labels(cards[name]) if quote[name] else {}
    return ReadingModels(models=models, cards=cards, labels=labels, quote=quote)


def attributions(models: dict[str, Any], states: dict[str, DatasetStates]) -> dict[str, tuple]:
    """{data set: (attribution of the chosen, of the rejected test answers)} (`srlib.explain.attribute`)."""
    from srlib import explain

    return {
        name: (explain.attribute(models[name], s.test.chosen), explain.attribute(models[name], s.test.rejected))
        for name, s in states.items()
    }


def attribution_completeness(
    models: dict[str, Any], states: dict[str, DatasetStates], attributed: dict[str, tuple]
) -> pd.DataFrame:
    """Per data set: the test answers, the baseline score f(0) and the largest distance between
    baseline + Σ contributions and the model's score (completeness: it should be round-off)."""
    import pandas as pd

    from srlib.present import label

    rows = []
    for name, s in states.items():
        scores = torch.cat(
            [models[name].score_states(s.test.chosen), models[name].score_states(s.test.rejected)]
        ).double()
        totals = torch.cat([a.baseline + a.contributions.sum(1) for a in attributed[name]])
        rows.append(
            {
                "data set": label(name),
                "test answers": len(scores),
                "baseline score f(0)": attributed[name][0].baseline,
                "largest |baseline + Σ contributions − score|": float((totals - scores).abs().max()),
            }
        )
    return pd.DataFrame(rows)


def verdict_m(ms: Sequence[int], m_verdict: int) -> int:
    """The deletion count whose paired verdict is given: the largest m of the curve at or below
    `m_verdict`, else the curve's first."""
    return max(m for m in ms if m <= m_verdict) if min(ms) <= m_verdict else ms[0]


def deletion_gaps(curves: dict[str, Any], ms: Sequence[int]) -> pd.DataFrame:
    """Per data set and m (`srlib.explain.deletion_curve`): the margin drop after deleting the
    top-m attributed directions minus after m random ones, its 95% interval, and the accuracy
    after each deletion."""
    import pandas as pd

    from srlib.present import label

    rows = []
    for name, curve in curves.items():
        frame = curve.frame().set_index(["m", "deleted"])
        for m in ms:
            gap, low, high = curve.gap(m)
            rows.append(
                {
                    "data set": label(name),
                    "m": m,
                    "top − random drop": gap,
                    "CI low": low,
                    "CI high": high,
                    "accuracy after top-m (%)": frame.loc[(m, "top-m attributed"), "accuracy after (%)"],
                    "accuracy after random m (%)": frame.loc[(m, "random m"), "accuracy after (%)"],
                }
            )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class LengthSteering:
    """Chapter 9's steering run: the latents whose input follows answer length, the model with
    them masked, the paired effect on the test pairs, and the score-length rank correlation
    before and after."""

    tracking: Any
    steered: Any
    effect: Any
    rho: dict[str, float]


def length_steering(model, states: DatasetStates, n: int) -> LengthSteering:
    """Mask the `n` directions whose input follows answer length (in characters) most closely on
    the training answers, and measure what it does on the test pairs."""
    from scipy import stats

    from srlib import explain

    answers = [p.chosen for p in states.train.pairs] + [p.rejected for p in states.train.pairs]
    tracking = explain.latents_tracking(
        model, torch.cat([states.train.chosen, states.train.rejected]), [len(text) for text in answers], n=n
    )
    steered = explain.steer(model, {int(latent): 0.0 for latent in tracking["latent"]})
    effect = explain.steering_effect(model, steered, states.test.pairs, states.test.chosen, states.test.rejected)
    lengths = [len(p.chosen) for p in states.test.pairs] + [len(p.rejected) for p in states.test.pairs]
    rho = {
        name: stats.spearmanr(
            torch.cat([m.score_states(states.test.chosen), m.score_states(states.test.rejected)]).numpy(), lengths
        ).statistic
        for name, m in (("before", model), ("after", steered))
    }
    return LengthSteering(tracking=tracking, steered=steered, effect=effect, rho=rho)


# --------------------------------------------------------------------------- what chapter 7 runs: iterative DPO


def alignment_config(profile: str, *, track: str, seed: int, **overrides: Any):
    """The profile's `srlib.alignment.AlignmentConfig` for `track` and `seed`, with each override
    that is not None applied (a notebook parameter left at None falls back to the profile)."""
    from srlib.alignment import AlignmentConfig

    return AlignmentConfig.for_profile(
        profile, track=track, seed=seed, **{key: value for key, value in overrides.items() if value is not None}
    )


def alignment_rms(
    ch: Chapter, states: DatasetStates, *, seed: int, with_standard_rm: bool = False, standard_rm_pairs: int = 64
):
    """The reward models chapter 7 aligns with, fitted on one data set and reading texts through
    the base backbone: SparseRM (the profile's K directions) and DenseRM, and with
    `with_standard_rm` StandardRM (chapter 8's LoRA reward model on `standard_rm_pairs` training
    pairs drawn by `seed` as chapter 8 draws them, cached). Returns ({name: model}, one row per
    model: its validation and test accuracy (%) and trainable parameters)."""
    import pandas as pd

    from srlib.data_efficiency import training_subset
    from srlib.experiments import select_for

    rms, rows = {}, []
    variants: dict[str, dict[str, Any]] = {
        "SparseRM": dict(features="projection", directions=select_for(states, ch.sae, ch.k)),
        "DenseRM": dict(features="dense"),
    }
    for name, options in variants.items():
        rms[name], trial = attached_rm(ch, states, seed=seed, variant=name, **options)
        rows.append(
            {
                "reward model": name,
                "val accuracy (%)": 100 * trial.val_accuracy,
                "test accuracy (%)": 100 * trial.test_accuracy,
                "trainable parameters": trial.trainable_parameters,
            }
        )
    if with_standard_rm:
        from srlib.baselines import cached_fit_baseline

        rms["StandardRM"] = cached_fit_baseline(
            "standard",
            ch.backbone,
            training_subset(states.train, standard_rm_pairs, seed).pairs,
            None,
            seed=seed,
            progress=False,
            epochs=1,
            learning_rate=2e-4,
            batch_size=4,
            max_length=ch.profile.max_length,
        )
        rows.append(
            {
                "reward model": "StandardRM",
                "val accuracy (%)": None,
                "test accuracy (%)": None,
                "trainable parameters": rms["StandardRM"].num_trainable_parameters(),
            }
        )
    return rms, pd.DataFrame(rows).set_index("reward model")


def aligned(ch: Chapter, config, reward_models: dict[str, Any], *, out_dir=None):
    """`srlib.alignment.run_alignment` in the run folder `out_dir` (None: the default one,
    `srlib.alignment.default_run_dir`, which a rerun with the same inputs resumes or reads), with
    a line saying which folder, whether it ran or read a finished run, and how long it took.
    Returns (result, run folder, seconds)."""
    from pathlib import Path

    from srlib.alignment import default_run_dir, run_alignment

    out_dir = (
        default_run_dir(config, reward_models, profile=ch.profile, sae=ch.sae) if out_dir is None else Path(out_dir)
    )
    reused, started = (out_dir / "result.json").exists(), time.perf_counter()
    result = run_alignment(config, reward_models, out_dir=out_dir, progress=False)
    seconds = time.perf_counter() - started
    print(f"run folder {out_dir.name}: {'read a finished run' if reused else 'ran'} in {seconds:.0f} s")
    return result, out_dir, seconds


def alignment_metrics(result, sparse_vs_wo: dict[str, Any], *, alignment_seconds: float, seconds: float) -> dict:
    """Chapter 7's numbers for the book's results page: the configuration, Table 1's rows, the
    round-1 filter, SparseRM − WO RM per metric and whether it won on all, the departures from
    the paper, and the times."""
    return {
        "config": result.config.to_dict(),
        "table1": result.table(),
        "round1_filter": result.round1_filter,
        "sparserm_minus_wo_rm": {m: c.as_row() for m, c in sparse_vs_wo.items()},
        "deviations": result.config.paper_deviations(),
        "sparserm_beat_wo_rm": clear_win(sparse_vs_wo),
        "alignment_seconds": round(alignment_seconds, 1),
        "seconds": round(seconds, 1),
    }


def clear_win(comparisons: Mapping[str, Any]) -> bool:
    """Whether A beats B on every metric: each `compare_paired` interval lies above zero."""
    return all(c.low > 0 for c in comparisons.values())


@dataclass(frozen=True)
class RoundOne:
    """Round 1 of an alignment run, read back from its folder: the shared tuples, each reward
    model's verdict on them (scores from the cache), and one row per tuple with the verdicts,
    the score differences and whether the tuple has a clear refusal contrast."""

    tuples: list
    verdicts: dict[str, Any]
    frame: Any


def round_one(result, out_dir, reward_models: dict[str, Any]) -> RoundOne:
    """Read round 1's tuples from the run folder `out_dir` and refilter them with every reward
    model (the counts must equal the run's); a tuple has a clear contrast when y_w has refusal
    or warning words (`srlib.alignment.REFUSAL`) and y_l has none."""
    from pathlib import Path

    import pandas as pd

    from srlib.alignment import REFUSAL, filter_tuples, read_tuples

    config = result.config
    tuples = [
        PreferencePair(r["prompt"], r["chosen"], r["rejected"], pair_id=r["pair_id"], group_id=r["group_id"])
        for r in read_tuples(Path(out_dir) / "round1_tuples.jsonl")
    ]
    verdicts = {name: filter_tuples(tuples, rm, keep_ties=config.keep_ties) for name, rm in reward_models.items()}
    assert all(sum(v.keep) == result.round1_filter["kept"][name] for name, v in verdicts.items())
    frame = pd.DataFrame(
        {"prompt": [t.prompt for t in tuples], "y_w": [t.chosen for t in tuples], "y_l": [t.rejected for t in tuples]}
    )
    frame["contrast"] = [
        bool(REFUSAL.search(good)) and not REFUSAL.search(bad) for good, bad in zip(frame.y_w, frame.y_l, strict=True)
    ]
    for name, verdict in verdicts.items():
        frame[f"{name} keeps"] = verdict.keep
        if verdict.s_w is not None and verdict.s_l is not None:
            frame[f"{name} s_w - s_l"] = [good - bad for good, bad in zip(verdict.s_w, verdict.s_l, strict=True)]
    return RoundOne(tuples=tuples, verdicts=verdicts, frame=frame)


# --------------------------------------------------------------------------- what chapter 6 measures: the shift


def dense_vs_sparse_trials(ch: Chapter, states: dict[str, DatasetStates], *, resample: bool):
    """Table 4's accuracy half: DenseRM and SparseRM (its K directions selected per seed, on the
    seed's bootstrap resample of the training questions when `resample`) on each of the
    chapter's data sets, one row per data set, model and seed (`srlib.experiments.run_trials`)."""
    import pandas as pd

    from srlib.experiments import run_trials

    variants: dict[str, dict[str, Any]] = {
        "DenseRM": dict(features="dense"),
        "SparseRM": dict(features="projection", select=dict(sae=ch.sae, k=ch.k)),
    }
    return pd.concat(
        [run_trials(states[name], variants, ch.seeds, resample=resample, progress=False) for name in ch.datasets],
        ignore_index=True,
    )


@dataclass(frozen=True)
class PolicyPairs:
    """Pairs the policy generated (GRATH-style, round 1 of chapter 7's loop) with the hidden
    states of their two answers, the loop's settings and the seconds generation took."""

    pairs: list
    chosen: Tensor
    rejected: Tensor
    config: Any
    seconds: float


def policy_generation(ch: Chapter, dataset: str, n: int, *, threads: int) -> PolicyPairs:
    """The backbone answers `n` generation prompts of `dataset` (at most all of them; a line says
    so when fewer exist) twice, asked for a safe and for an unsafe answer, with the settings of
    the data set's Table 1 track; then the states of both answers. Runs on `threads` torch
    threads (generation and extraction use every core) and sets one thread after."""
    from srlib.activations import pair_states
    from srlib.alignment import TRACKS, AlignmentConfig
    from srlib.data import generation_prompts
    from srlib.shift import policy_pairs

    track = next(name for name, t in TRACKS.items() if t.dataset == dataset)  # the Table 1 track of the data set
    config = AlignmentConfig.for_profile(ch.profile.name, track=track)
    available = len(generation_prompts(dataset, seed=config.split_seed))
    if n > available:
        print(f"{dataset} has {available} generation prompts: the policy answers all of them, not {n}")
        n = available
    torch.set_num_threads(torch_threads(threads))
    started = time.perf_counter()
    pairs = policy_pairs(ch.backbone, config, n, progress=False)
    seconds = time.perf_counter() - started
    chosen, rejected = pair_states(
        ch.backbone,
        pairs,
        ch.profile.layer,
        max_length=ch.profile.max_length,
        batch_size=ch.profile.batch_size,
        progress=False,
    )
    torch.set_num_threads(1)
    return PolicyPairs(pairs=pairs, chosen=chosen, rejected=rejected, config=config, seconds=seconds)


#: The three groups of answers Figure 5 compares, the training answers first.
SHIFT_GROUPS = ("training", "held-out (test split)", "generated (policy)")


def shift_spaces(states: DatasetStates, generated: PolicyPairs, directions) -> dict[str, dict[str, Tensor]]:
    """Figure 5's two spaces, each {group: one row per answer}: the hidden states (dense) and
    their raw projections on the selected directions; groups: the training answers, the
    held-out (test) answers and the generated ones."""
    from srlib.shift import projection_space

    groups = dict(
        zip(
            SHIFT_GROUPS,
            (
                torch.cat([states.train.chosen, states.train.rejected]),
                torch.cat([states.test.chosen, states.test.rejected]),
                torch.cat([generated.chosen, generated.rejected]),
            ),
            strict=True,
        )
    )
    return {"dense": groups, "projection": {g: projection_space(X, directions) for g, X in groups.items()}}


def shift_similarity(spaces: dict[str, dict[str, Tensor]]):
    """Each answer's cosine similarity to the training answers in each space: mean and nearest,
    uncentered and centered (`srlib.shift.similarity_frame`), one frame."""
    import pandas as pd

    from srlib.shift import similarity_frame

    return pd.concat([similarity_frame(spaces), similarity_frame(spaces, center=True)], ignore_index=True)


def figure5_numbers(similarity) -> dict[str, dict[str, float]]:
    """Per space: the primary measure (nearest training answer, centered) and the paper-style
    one (mean over all training answers, uncentered) of the generated and held-out answers, and
    how far the generated fall below the held-out in units of the held-out spread, with its
    standard error (`srlib.shift.shift_size`)."""
    from srlib.shift import shift_size

    def per_sample(space: str, group: str, aggregate: str, centered: bool) -> Tensor:
        keep = (
            (similarity["space"] == space)
            & (similarity["group"] == group)
            & (similarity["aggregate"] == aggregate)
            & (similarity["centered"] == centered)
        )
        return torch.tensor(similarity.loc[keep, "similarity"].to_numpy())

    held, gen = SHIFT_GROUPS[1], SHIFT_GROUPS[2]
    numbers = {}
    for space in dict.fromkeys(similarity["space"]):
        primary = shift_size(per_sample(space, held, "nearest", True), per_sample(space, gen, "nearest", True))
        paper_style = shift_size(per_sample(space, held, "mean", False), per_sample(space, gen, "mean", False))
        numbers[space] = {
            "nearest_centered_generated": float(per_sample(space, gen, "nearest", True).mean()),
            "nearest_centered_held_out": float(per_sample(space, held, "nearest", True).mean()),
            "mean_generated": float(per_sample(space, gen, "mean", False).mean()),
            "mean_held_out": float(per_sample(space, held, "mean", False).mean()),
            "shift_primary_sd": primary["standardised"],
            "shift_primary_se": primary["se"],
            "shift_paper_style_sd": paper_style["standardised"],
            "shift_paper_style_se": paper_style["se"],
        }
    return numbers


@dataclass(frozen=True)
class ShiftTSNE:
    """The t-SNE of both spaces: one embedding per space, and per point its answer (chosen or
    rejected) and its source (training or generated)."""

    embeddings: dict[str, Any]
    labels: list[str]
    sources: list[str]
    n_train: int


def shift_tsne(
    states: DatasetStates, generated: PolicyPairs, directions, *, n_train: int, perplexity: float
) -> ShiftTSNE:
    """t-SNE (`srlib.shift.tsne_embedding`) of the first `n_train` training pairs and all
    generated pairs, in the dense and in the projection space."""
    from srlib.shift import projection_space, tsne_embedding

    n_train = min(n_train, len(states.train))
    n_gen = len(generated.chosen)
    points = torch.cat(
        [states.train.chosen[:n_train], states.train.rejected[:n_train], generated.chosen, generated.rejected]
    )
    labels = (
        ["chosen (y_w)"] * n_train
        + ["rejected (y_l)"] * n_train
        + ["chosen (y_w)"] * n_gen
        + ["rejected (y_l)"] * n_gen
    )
    embeddings = {
        "dense": tsne_embedding(points, perplexity=perplexity),
        "projection": tsne_embedding(projection_space(points, directions), perplexity=perplexity),
    }
    return ShiftTSNE(
        embeddings=embeddings,
        labels=labels,
        sources=["training"] * (2 * n_train) + ["generated"] * (2 * n_gen),
        n_train=n_train,
    )


def neighbour_mixing(spaces: dict[str, dict[str, Tensor]], k: int = 10) -> dict[str, dict[str, float]]:
    """Per space, the share of a generated answer's nearest neighbours (centered cosine, among
    all training and generated answers) that are generated too, and its chance level
    (`srlib.shift.neighbour_share`); `k` is capped by the number of answers."""
    from srlib.shift import neighbour_share

    train, gen = spaces["dense"][SHIFT_GROUPS[0]], spaces["dense"][SHIFT_GROUPS[2]]
    k = min(k, len(train) + len(gen) - 1)
    return {
        space: {**neighbour_share(groups[SHIFT_GROUPS[0]], groups[SHIFT_GROUPS[2]], k=k), "k": k}
        for space, groups in spaces.items()
    }


def filter_decisions(states: DatasetStates, generated: PolicyPairs, directions, seeds: Sequence[int]):
    """DenseRM and SparseRM fitted with every seed; each one's keep/drop decision on the held-out
    and on the generated pairs. Returns (agreement of every two filters per data, one row per
    comparison and seed pair (`srlib.shift.pairwise_agreement`); share kept, one row per model,
    seed and data; {data: {(model, seed): decisions}})."""
    import pandas as pd

    from srlib.experiments import fit_variant
    from srlib.shift import keep_decisions, pairwise_agreement

    decisions: dict[str, dict[tuple[str, int], Tensor]] = {"held-out pairs": {}, "generated pairs": {}}
    variants: dict[str, dict[str, Any]] = {
        "DenseRM": dict(features="dense"),
        "SparseRM": dict(features="projection", directions=directions),
    }
    for method, options in variants.items():
        for seed in seeds:
            model, _ = fit_variant(states, seed=seed, **options)
            for where, (Z_w, Z_l) in {
                "held-out pairs": (states.test.chosen, states.test.rejected),
                "generated pairs": (generated.chosen, generated.rejected),
            }.items():
                decisions[where][method, seed] = keep_decisions(model.score_states(Z_w), model.score_states(Z_l))
    agreement = pd.concat([pairwise_agreement(d).assign(data=where) for where, d in decisions.items()])
    keep = pd.DataFrame(
        [
            {"method": m, "data": where, "keep": float(k.float().mean())}
            for where, d in decisions.items()
            for (m, _), k in d.items()
        ]
    )
    return agreement, keep, decisions
