"""Chapter 11: when does the selection matter? SAEs of graded quality, their quality where the
reward model reads, and top-K minus random directions for each.

SparseRM's claim is that the SAE latents that separate chosen from rejected answers give
better directions than arbitrary ones. How much better can only depend on the SAE: an SAE
whose latents mostly never fire at the read position has little to select from. The study
takes the profile's family of SAEs (`Profile.sae_family`, weakest first), and for each:

* its quality at the read position on the validation answers (latents alive, FVE:
  `srlib.sae.sae_report` on the states the reward model reads) beside what its training
  recorded over all tokens of held-out corpus texts;
* top-K minus random directions at each K of the family, paired over the same pairs
  (`srlib.experiments.compare_variants`, i.e. `srlib.evaluate.compare_paired`);
* whether the gap grows with quality: top-K with the best-quality SAE against top-K with the
  weakest, paired on the same pairs. The random control does not depend on the SAE, so
  this difference IS the change in the gap, with its own interval.

Every number above is measured on validation data (`validation_view`: the validation questions
split in two halves, one to stop training early, one to score), so that choosing the SAE
(`best_setting` on the scored half) never looks at the test split. The choice is made twice,
the second time with the halves' roles swapped, and a rule fixed before the run turns the two
into the SAE the study adopts (`adopted_sae`): the one both halves choose, else the profile's own
SAE, so that a change of default never rests on which validation pairs were drawn. The test
split is then scored once, for the adopted SAE: top-K against random at each K.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from srlib.errors import ConfigError
from srlib.experiments import (
    DatasetStates,
    SplitStates,
    best_setting,
    compare_variants,
    paired_table,
    run_trials,
    select_for_ks,
)
from srlib.profiles import Profile, SAEFamily

if TYPE_CHECKING:
    import pandas as pd
    from sae_lens import SAE

RANDOM = "Random directions"
#: What the study's verdict lines are measured on (compare_paired names them "test pairs").
SCORED_ON = "held-out validation pairs"


def family_of(profile: Profile) -> SAEFamily:
    """The profile's SAE family, or a one-line ConfigError when it has none."""
    if profile.sae_family is None:
        raise ConfigError(f"profile {profile.name!r} defines no sae_family (srlib.profiles.SAEFamily)")
    return profile.sae_family


def family_saes(backbone, profile: Profile, *, progress: bool = True) -> dict:
    """{name: SAE} of the profile's family, each trained (or read from the cache) at the
    profile's layer on the profile's SAE corpus; a config of None is the profile's own SAE."""
    from srlib.sae import sae_for_profile

    return {
        name: sae_for_profile(
            profile if config is None else profile.replace(sae_training=config), backbone, progress=progress
        )
        for name, config in family_of(profile).variants
    }


def _rows(split: SplitStates, rows: Sequence[int]) -> SplitStates:
    index = torch.tensor(list(rows), dtype=torch.long)
    return SplitStates([split.pairs[i] for i in rows], split.chosen[index], split.rejected[index])


def validation_view(states: DatasetStates, *, swapped: bool = False) -> DatasetStates:
    """`states` with the test split replaced by validation data: the validation questions in
    their seeded order, split in two halves by question (a question's pairs stay together);
    the first half stops training early (`val`), the second is scored (`test`); `swapped`
    exchanges the two roles. The real test split is not in the result."""
    groups = list(dict.fromkeys(pair.group_id for pair in states.val.pairs))
    if len(groups) < 2:
        raise ConfigError(f"{states.name}: the validation split needs at least two questions to be halved")
    first = set(groups[: len(groups) // 2])
    rows = {
        half: [i for i, pair in enumerate(states.val.pairs) if (pair.group_id in first) == half]
        for half in (True, False)
    }
    early, scored = (rows[False], rows[True]) if swapped else (rows[True], rows[False])
    return dataclasses.replace(states, val=_rows(states.val, early), test=_rows(states.val, scored))


def quality_table(saes: Mapping[str, SAE], states: Mapping[str, DatasetStates]):
    """One row per (SAE, data set): latents alive (%), FVE and L0 at the read position on the
    validation answers, and what training recorded (held-out corpus texts, all tokens: FVE,
    dead %; training seconds), None for an SAE not trained here."""
    import pandas as pd

    from srlib.sae import sae_info, sae_report

    rows = []
    for name, sae in saes.items():
        info = sae_info(sae) or {}
        heldout = info.get("heldout", {}).get("all_tokens", {})
        for dataset, s in states.items():
            read = sae_report(sae, torch.cat([s.val.chosen, s.val.rejected]))
            rows.append(
                {
                    "variant": name,
                    "dataset": dataset,
                    "latents": int(sae.cfg.d_sae),
                    "alive % read": 100 * read.alive_fraction,
                    "FVE read": read.fve,
                    "L0 read": read.l0,
                    "FVE all (held-out corpus)": heldout.get("fve"),
                    "dead % all (held-out corpus)": None
                    if "dead_fraction" not in heldout
                    else 100 * heldout["dead_fraction"],
                    "training s": info.get("training", {}).get("fit_seconds"),
                }
            )
    return pd.DataFrame(rows)


def gap_trials(
    saes: Mapping[str, SAE],
    states: Mapping[str, DatasetStates],
    ks: Sequence[int],
    seeds: Sequence[int],
    *,
    swapped: bool = False,
    progress: bool = True,
):
    """Trials on each data set's `validation_view` (`swapped`: the halves' roles exchanged): top-K
    directions of every SAE and random directions (shared by all SAEs: they do not depend on
    one) at every K, every seed. `test_*` columns hold the scored validation half;
    `heldout_val_accuracy` repeats it (ties 1/2) under a name `best_setting` accepts."""
    import pandas as pd

    frames = []
    for full in states.values():
        view = validation_view(full, swapped=swapped)
        selected = {name: select_for_ks(view, sae, ks) for name, sae in saes.items()}
        for k in ks:
            variants = {name: dict(features="projection", directions=selected[name][k]) for name in saes}
            variants[RANDOM] = dict(features="random", directions=next(iter(variants.values()))["directions"])
            frames.append(run_trials(view, variants, seeds, progress=progress).assign(K=k))
    trials = pd.concat(frames, ignore_index=True)
    return trials.assign(heldout_val_accuracy=trials["test_accuracy_half_ties"])


def _on_validation(verdict: str) -> str:
    return verdict.replace("test pairs", SCORED_ON)


def gap_table(trials, names: Sequence[str]):
    """Top-K minus random directions per (SAE, data set, K), paired over the same pairs: one
    row each (`PairedComparison.as_row` and its verdict line)."""
    import pandas as pd

    rows = []
    for dataset in dict.fromkeys(trials["dataset"]):
        for k in dict.fromkeys(trials["K"]):
            for name in names:
                c = compare_variants(trials, name, RANDOM, dataset=dataset, K=k, labels=(f"top-K ({name})", "random"))
                rows.append(
                    {"variant": name, "dataset": dataset, "K": k, **c.as_row(), "verdict": _on_validation(c.verdict())}
                )
    return pd.DataFrame(rows)


def quality_trend(trials, gaps, quality, *, quality_column: str = "FVE read"):
    """Does the gap grow with SAE quality? Per (data set, K): the Spearman rank correlation of
    the gap with `quality_column` over the family, and top-K with the best-quality SAE against
    top-K with the weakest, paired (random is common to both, so this is the gap's change)."""
    import pandas as pd
    from scipy import stats

    rows = []
    for (dataset, k), group in gaps.groupby(["dataset", "K"], sort=False):
        q = quality[quality["dataset"] == dataset].set_index("variant")[quality_column]
        ordered = q.loc[list(group["variant"])]
        best, weakest = ordered.idxmax(), ordered.idxmin()
        rho = stats.spearmanr(ordered.to_numpy(), group["A − B (points)"].to_numpy()).statistic
        c = compare_variants(
            trials, best, weakest, dataset=dataset, K=k, labels=(f"top-K ({best})", f"top-K ({weakest})")
        )
        rows.append(
            {
                "dataset": dataset,
                "K": k,
                "best": best,
                "weakest": weakest,
                f"Spearman rho (gap, {quality_column})": rho,
                "gap change (points)": c.difference,
                "CI low": c.low,
                "CI high": c.high,
                "verdict": _on_validation(c.verdict()),
            }
        )
    return pd.DataFrame(rows)


def trend_conclusion(trend) -> str:
    """One sentence computed from `quality_trend`: at how many (data set, K) cells the gap of
    the best-quality SAE is clearly larger, clearly smaller, or not clearly different."""
    grew = int((trend["CI low"] > 0).sum())
    shrank = int((trend["CI high"] < 0).sum())
    unclear = len(trend) - grew - shrank
    moved = trend["gap change (points)"]
    return (
        f"Over {len(trend)} (data set, K) cells, top-K with the best-quality SAE beats top-K with the weakest "
        f"(the gap grows with quality) in {grew}, loses (the gap shrinks) in {shrank}, and shows no clear "
        f"difference in {unclear}; the gap moved by {moved.min():+.1f} to {moved.max():+.1f} points "
        f"(paired 95% intervals on {SCORED_ON})."
    )


def adopted_sae(first: str, second: str, default: str) -> str:
    """The SAE the study adopts from its two choices on validation data (`first`: the first
    half stops training early and the second is scored; `second`: the roles swapped): the SAE
    both choose, else the profile's own SAE `default`. A choice that flips when the other half
    of the pairs is scored is not evidence for replacing the SAE every other chapter reads
    through; keeping the default then is the rule, fixed before the run, not a judgement after it.
    """
    return first if first == second else default


def selection_verdict(test_gaps, k: int, labels: Mapping[str, str] | None = None) -> str:
    """One sentence computed from the test run (`family_study`'s `test_gaps`) at `k`: on how many
    data sets top-K directions of the chosen SAE beat random ones (the paired 95% interval above
    zero), lose to them, or show no clear difference, naming each."""
    at_k = test_gaps[test_gaps["K"] == k]
    if at_k.empty:
        raise ConfigError(f"the study did not measure K = {k}; measured: {sorted(set(test_gaps['K']))}")
    names = {
        outcome: [(labels or {}).get(row.dataset, row.dataset) for row in rows.itertuples()]
        for outcome, rows in (
            ("beats", at_k[at_k["CI low"] > 0]),
            ("loses", at_k[at_k["CI high"] < 0]),
            ("unclear", at_k[(at_k["CI low"] <= 0) & (at_k["CI high"] >= 0)]),
        )
    }
    listed = {outcome: f" ({', '.join(found)})" if found else "" for outcome, found in names.items()}
    return (
        f"At K = {k}, top-K directions beat random ones on {len(names['beats'])} of {len(at_k)} data sets"
        f"{listed['beats']}, lose to them on {len(names['loses'])}{listed['loses']} and show no clear "
        f"difference on {len(names['unclear'])}{listed['unclear']} (test split, paired 95% intervals)."
    )


@dataclass
class FamilyStudy:
    """Chapter 11's study: quality per SAE, validation trials and gaps, the trend, the choice
    and its one test run (top-K with the chosen SAE against random, every K and data set)."""

    quality: pd.DataFrame
    trials: pd.DataFrame
    gaps: pd.DataFrame
    trend: pd.DataFrame
    selected: dict
    test: pd.DataFrame
    test_gaps: pd.DataFrame
    replicate: dict  # the same choice with the validation halves' roles swapped
    default: str  # the profile's own SAE
    adopted: str  # `adopted_sae(selected, replicate, default)`: the SAE the test split is scored with

    def adoption_text(self) -> str:
        """Two sentences: the choice on the other half, and which SAE the study adopts, and why."""
        first, other = self.selected["variant"], self.replicate["variant"]
        if other == first:
            replicate = (
                f"With the halves' roles swapped the same SAE is chosen ({other}, {self.replicate['label']}%): "
                "the choice does not rest on which validation pairs were drawn."
            )
        else:
            replicate = (
                f"With the halves' roles swapped another SAE is chosen ({other}, {self.replicate['label']}%): "
                "the choice rests on which validation pairs were drawn, and the validation data do not "
                "separate these SAEs."
            )
        if self.adopted != self.default:
            verdict = f"Both halves choose it, so the study adopts **{self.adopted}**: it suggests a new default."
        elif first == other:
            verdict = f"Both halves choose the profile's own SAE, so the study keeps **{self.default}**."
        else:
            verdict = (
                f"By the rule fixed before the run (adopt an SAE only when both halves choose it) the study keeps "
                f"the profile's own SAE, **{self.default}**."
            )
        return f"{replicate} {verdict}"

    def conclusion(self) -> str:
        return trend_conclusion(self.trend)

    def table(self, labels: Mapping[str, str] | None = None):
        """The closing table, one row per (data set, SAE): training seconds, alive latents and
        FVE at the read position, top-K − random at each K ("+d (low to high)", points, paired
        95% interval) and SparseRM's accuracy (%, ties 1/2) at each K, all on validation data."""
        import pandas as pd

        gaps = self.gaps.assign(
            cell=[
                f"{d:+.1f} ({lo:+.1f} to {hi:+.1f})"
                for d, lo, hi in zip(
                    self.gaps["A − B (points)"], self.gaps["CI low"], self.gaps["CI high"], strict=True
                )
            ]
        )
        wide = gaps.pivot(index=["dataset", "variant"], columns="K", values="cell")
        wide.columns = [f"top-K − random, K = {k}" for k in wide.columns]
        top_k = self.trials[self.trials["variant"] != RANDOM]
        accuracy = (100 * top_k.groupby(["dataset", "variant", "K"])["heldout_val_accuracy"].mean()).unstack("K")
        accuracy.columns = [f"SparseRM accuracy %, K = {k}" for k in accuracy.columns]
        quality = self.quality.set_index(["dataset", "variant"])[["training s", "alive % read", "FVE read"]]
        order = pd.MultiIndex.from_tuples(
            [(d, v) for d in dict.fromkeys(self.quality["dataset"]) for v in dict.fromkeys(self.quality["variant"])]
        )
        table = quality.join(wide).join(accuracy.round(1)).loc[order]
        return table.rename(index=lambda d: (labels or {}).get(d, d), level=0)


def family_study(
    backbone,
    profile: Profile,
    states: Mapping[str, DatasetStates],
    *,
    seeds: Sequence[int],
    ks: Sequence[int] | None = None,
    saes: Mapping[str, object] | None = None,
    progress: bool = True,
) -> FamilyStudy:
    """Run the study on `states` ({data set: `dataset_states`}) with the profile's family.

    The SAE is chosen by `srlib.experiments.SELECTION_RULE` on the scored validation half,
    top-K trials of every data set and K together, compared paired on the same validation pairs
    (`best_setting(outcomes=...)`: which pairs were drawn is part of the uncertainty, a hard data
    set, which lowers every SAE alike, is not). A tie goes to the SAE that reconstructs the read state best (the
    highest FVE at the read position on the validation answers, mean over data sets): when the
    reward models cannot tell the SAEs apart, the one whose directions best describe what the
    head reads. The choice is made again with the halves' roles swapped, and the study adopts
    `adopted_sae` of the two. The test split is scored once: the adopted SAE's top-K against random.
    """
    import pandas as pd

    family = family_of(profile)
    ks = tuple(ks or family.ks)
    saes = dict(saes or family_saes(backbone, profile, progress=progress))
    if family.default not in saes:
        raise ConfigError(
            f"the SAEs of the study must include the profile's own SAE {family.default!r}, which it keeps "
            "unless both validation halves choose another"
        )
    names = list(saes)
    quality = quality_table(saes, states)
    trials = gap_trials(saes, states, ks, seeds, progress=progress)
    gaps = gap_table(trials, names)
    trend = quality_trend(trials, gaps, quality)
    fve_read = quality.groupby("variant")["FVE read"].mean()

    def choose(on_trials) -> dict:
        return best_setting(
            on_trials[on_trials["variant"] != RANDOM],
            ("variant",),
            select_on="heldout_val_accuracy",
            simpler=lambda s: -fve_read[s["variant"]],  # ties: the best reconstruction of the read state
            outcomes="test_outcomes",  # the scored validation half's per-pair outcomes (gap_trials)
            cells=("dataset",),
        )

    selected = choose(trials)
    replicate = choose(gap_trials(saes, states, ks, seeds, swapped=True, progress=progress))
    adopted = adopted_sae(selected["variant"], replicate["variant"], family.default)
    chosen = saes[adopted]
    frames = []
    for s in states.values():
        for k, directions in select_for_ks(s, chosen, ks).items():
            frames.append(
                run_trials(
                    s,
                    {
                        "Top-K directions": dict(features="projection", directions=directions),
                        RANDOM: dict(features="random", directions=directions),
                    },
                    seeds,
                    progress=progress,
                ).assign(K=k)
            )
    test = pd.concat(frames, ignore_index=True)
    test_gaps = pd.concat(
        [
            paired_table(test[test["dataset"] == d], [("Top-K directions", RANDOM)], by="K").assign(dataset=d)
            for d in states
        ],
        ignore_index=True,
    )
    return FamilyStudy(quality, trials, gaps, trend, selected, test, test_gaps, replicate, family.default, adopted)
