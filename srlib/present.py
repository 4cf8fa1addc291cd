"""The book's tables and result sentences: the end of the data flow.

Every function here takes values a chapter has already computed (reports, trial tables,
summaries, verdicts) and formats them: a pandas table styled for the book, or a Markdown
sentence that states an outcome from the numbers. Nothing here fits, samples or measures, so a
chapter's figures and conclusions stay tied to its run, and changing how a result reads is a
change in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from IPython.display import Markdown

from srlib.evaluate import mean_sd
from srlib.experiments import DATASET_LABELS


def label(dataset: str) -> str:
    """How the book names a data set."""
    return DATASET_LABELS.get(dataset, dataset)


def show(frame: pd.DataFrame, formats: Mapping[str, str] | None = None, *, links: bool = False):
    """`frame` styled as the book's tables: columns formatted by `formats`, no index column,
    links clickable when `links`."""
    style = frame.style.format(dict(formats or {}), hyperlinks="html" if links else None)
    return style.hide(axis="index").set_table_attributes('class="dataframe"')


def pivot_labels(summary: pd.DataFrame, index: str = "variant", columns: str = "dataset") -> pd.DataFrame:
    """The "mean ± sd" labels of `srlib.experiments.summarize` as a table: one row per variant,
    one column per data set (named as the book names them)."""
    table = summary.pivot(index=index, columns=columns, values="label")
    order = [c for c in DATASET_LABELS if c in table.columns] + [c for c in table.columns if c not in DATASET_LABELS]
    table = table[order].rename(columns=DATASET_LABELS)
    table.columns.name = None
    return table.loc[list(dict.fromkeys(summary[index]))]


def latent_cards_html(cards: pd.DataFrame, *, quote_texts: bool = True) -> str:
    """`srlib.experiments.latent_cards` as HTML, one block per latent: a header line (side, latent,
    score, frequencies, pairs separated, dashboard link when there is one), then its
    max-activating answers and an example pair as a list. Texts are HTML-escaped;
    `quote_texts=False` leaves them out (for data sets whose texts should not be quoted)."""
    from html import escape

    blocks = []
    for card in cards.to_dict("records"):
        link = f' · <a href="{escape(card["dashboard"])}">dashboard</a>' if card.get("dashboard") else ""
        header = (
            f"<b>latent {card['latent']}</b> ({escape(card['side'])}, rank {card['rank']}): score "
            f"{card['score']:.3f}, μ_w {card['μ_w']:.3f}, μ_l {card['μ_l']:.3f}, separates "
            f"{card['pairs separated']} pairs{link}"
        )
        items = []
        if quote_texts:
            items = [f"<li>{escape(text)}</li>" for text in card["max-activating answers"]]
            if card["example pair"]:
                items.append(f"<li><i>a pair it separates:</i> {escape(card['example pair'])}</li>")
        body = f"<ul>{''.join(items)}</ul>" if items else ""
        blocks.append(f'<div class="mathjax_ignore" style="margin-bottom:0.8em">{header}{body}</div>')
    return "\n".join(blocks)


# --------------------------------------------------------------------------- chapter 1: the SAE


def sae_summary(sae, profile) -> str:
    """How the profile's SAE was trained and on what corpus (for an SAE trained here), and its size."""
    from srlib.sae import sae_info

    lines = []
    training = profile.sae_training
    if training is not None:
        lines.append(
            f"TopK SAE: k = {training.k} latents per token, {training.d_sae} latents, "
            f"{training.training_tokens:,} training tokens, batch {training.batch_size}, "
            f"lr {training.lr} → {training.lr_end}; share of last-token samples {training.last_token_share}"
        )
    info = sae_info(sae)
    if info is not None:
        corpus, run = info["corpus"], info["training"]
        lines.append(f"corpus: {corpus['description']}")
        lines.append(
            f"{corpus['n_train_texts']:,} training texts ({corpus['n_heldout_texts']:,} more held out): "
            f"{run['token_rows']:,} token rows and {run['last_token_rows']:,} last-token rows; "
            f"{run['samples_seen']:,} samples seen"
        )
    lines.append(f"numbers in the SAE: {sum(p.numel() for p in sae.parameters()):,}")
    return "\n".join(lines)


def sae_quality(reports: Mapping[str, Any]) -> pd.DataFrame:
    """One row per set of hidden states: rows, L0, FVE and the share of dead latents (%)."""
    return pd.DataFrame(
        [
            {"hidden states": where, "rows": r.n, "L0": r.l0, "FVE": r.fve, "dead latents (%)": 100 * r.dead_fraction}
            for where, r in reports.items()
        ]
    )


SAE_QUALITY_FORMATS = {"L0": "{:.1f}", "FVE": "{:.3f}", "dead latents (%)": "{:.1f}", "rows": "{:,}"}


def sae_quality_text(reports: Mapping[str, Any], n_texts: int, d_sae: int) -> Markdown:
    """The quality table in one sentence: FVE and L0 over every token and at the last token."""
    every, last = reports["every token, validation texts"], reports["last token, validation answers (all data sets)"]
    return Markdown(
        f"Over every token of {n_texts:,} validation texts ({every.n:,} tokens) the SAE explains "
        f"**{every.fve:.1%}** of the variance with **{every.l0:.1f}** active latents per token; at the "
        f"{last.n:,} last-token positions the reward model reads it explains **{last.fve:.1%}**. "
        f"{every.dead_fraction:.1%} of the {d_sae:,} latents never fire on these tokens."
    )


def sparsity_text(stats: Mapping[str, Any], d_sae: int) -> Markdown:
    """Chapter 1's sparsity panels in one sentence: latents per token and the most frequent latent."""
    l0 = stats["every token"].active_per_row.float()
    return Markdown(
        (
            f"Every token has exactly {l0.max():.0f} active latents. "
            if l0.min() == l0.max()
            else f"Per token, between {l0.min():.0f} and {l0.max():.0f} latents fire (mean {l0.mean():.1f}). "
        )
        + f"The most frequent latent fires on {stats['every token'].frequency.max():.1%} of tokens and on "
        f"{stats['last token'].frequency.max():.1%} of last-token states; "
        f"{int((stats['last token'].frequency > 0).sum()):,} of the {d_sae:,} latents fire at least once "
        "at the last token."
    )


def sharing_text(recurring: Sequence[int], shared: Mapping[str, float], n_pairs: int, dataset: str) -> Markdown:
    """What chosen and rejected answers share (`srlib.experiments.shared_latents`), and which of
    the chosen answers' own latents recur across questions."""
    text = ""
    if recurring:
        text = (
            f"Among the chosen answers' own latents, {', '.join(map(str, recurring))} recur across "
            "different questions: candidates for a preference signal, which chapter 2 tests on every "
            "training pair.\n\n"
        )
    return Markdown(
        text
        + (
            f"Over the {n_pairs:,} training pairs of {label(dataset)}, "
            f"a chosen answer fires {shared['fired']:.1f} latents and shares **{shared['same_question']:.1f}** of them "
            f"with the rejected answer to the same question, against {shared['other_question']:.1f} with a rejected "
            "answer to another question. Part of an answer's code is about its question; the preference, if it is "
            "there, lies in latents that differ between the two answers, which chapter 2 counts."
        )
    )


# --------------------------------------------------------------------------- chapter 2: the selection


def frequency_text(chance: Mapping[str, Any], d_sae: int) -> Markdown:
    """How many latents fire and how correlated their two frequencies are
    (`srlib.chapter.selection_against_chance`)."""
    return Markdown(
        f"{chance['firing']:,} of the {d_sae:,} latents fire on at least one training answer. Their "
        f"frequencies on the two sides have a correlation of {chance['correlation']:.3f} (1 would mean that chosen "
        "and rejected answers switch every latent on equally often)."
    )


def chance_text(chance: Mapping[str, Any], k: int) -> Markdown:
    """The selected scores against the label-shuffle's chance level, in words."""
    below, flat = chance["below_w"] + chance["below_l"], chance["flat"]
    return Markdown(
        f"The strongest latents reach ∇ = {chance['top_w']:.3f} and Δ = {chance['top_l']:.3f}; "
        f"the {k}-th selected score is {chance['kth_w']:.3f} (∇) and {chance['kth_l']:.3f} (Δ). With the labels "
        f"swapped at random no latent exceeds |∇| = {chance['chance']:.3f}; {chance['beyond']:,} latents do with the "
        f"real labels. Of the {k} selected latents per side, {chance['below_w']} (I_w) and {chance['below_l']} (I_l) "
        "score no higher than that chance level"
        + (
            f", and {flat} score zero or less: they fire no more often on their side than on the other and are "
            "picked only by the tie-break"
            if flat
            else ""
        )
        + (
            ". Their directions carry no more preference signal than the sample's noise; chapter 4 compares "
            "top-K directions with random ones."
            if below
            else "."
        )
    )


def top_latents(directions, n: int, sae_source: str) -> pd.DataFrame:
    """The `n` strongest selected latents per side: rank, score, both frequencies and, where the
    SAE has one, the link to its public dashboard."""
    from srlib.experiments import neuronpedia_url

    rows = []
    for side, indices, scores in (
        ("chosen (∇)", directions.indices_w, directions.scores_w),
        ("rejected (Δ)", directions.indices_l, directions.scores_l),
    ):
        for rank, (j, s) in enumerate(zip(indices[:n].tolist(), scores[:n].tolist(), strict=True), 1):
            rows.append(
                {
                    "side": side,
                    "rank": rank,
                    "latent": j,
                    "score": s,
                    "μ_w": directions.mu_w[j].item(),
                    "μ_l": directions.mu_l[j].item(),
                    "dashboard": neuronpedia_url(sae_source, j) or "–",
                }
            )
    return pd.DataFrame(rows)


TOP_LATENT_FORMATS = {"score": "{:.3f}", "μ_w": "{:.3f}", "μ_l": "{:.3f}"}


def latent_cards(cards, *, quote: bool, dataset: str):
    """The latent cards as HTML; for a data set whose texts are not quoted, a note and the
    numbers only."""
    from IPython.display import HTML

    note = (
        ""
        if quote
        else (
            f"<blockquote><p>{label(dataset)} holds harmful requests: only numbers are shown (set "
            "<code>QUOTE_SAFETY_TEXTS = True</code> to read the answers).</p></blockquote>\n"
        )
    )
    return HTML(note + latent_cards_html(cards, quote_texts=quote))


def cards_text(cards, *, n: int, n_pairs: int, both_fire: float, k: int, sae_source: str) -> Markdown:
    """What the strongest latents separate, and (for an SAE without public dashboards) where the
    only evidence of their meaning is."""
    from srlib.experiments import neuronpedia_url

    text = ""
    if neuronpedia_url(sae_source, 0) is None:
        text = (
            f"No public dashboard exists for this SAE (`{sae_source}`): it was trained "
            "here, so the answers above are the only evidence for what its latents mean. Under "
            '`PROFILE="paper"` every latent links to its Neuronpedia page.\n\n'
        )
    return Markdown(
        text
        + (
            f"The {n} strongest chosen-side latents separate on average "
            f"{cards['pairs separated'][:n].mean():.0f} of the {n_pairs:,} training pairs each, and fire on "
            f"both answers of {both_fire:.1%} of pairs; the reward head combines all {2 * k} selected directions."
        )
    )


def stability_table(stability: pd.DataFrame) -> pd.DataFrame:
    """Per K: the Jaccard overlap of the two halves' I_w and I_l (mean ± sd over the half
    splits), beside the overlap of random subsets and the pairs per half."""
    return (
        stability.groupby("K", sort=True)
        .agg(
            **{
                "I_w overlap": ("Jaccard I_w", lambda v: mean_sd(v.mean(), v.std(), digits=2)),
                "I_l overlap": ("Jaccard I_l", lambda v: mean_sd(v.mean(), v.std(), digits=2)),
                "random subsets": ("chance", "first"),
                "pairs per half": ("pairs per half", "first"),
            }
        )
        .reset_index()
    )


def stability_text(stability: pd.DataFrame, ks: Sequence[int], k: int) -> Markdown:
    """The stability table at the K nearest the chapter's, in words."""
    at_k = stability[stability["K"] == min(ks, key=lambda x: abs(x - k))]
    overlap = (at_k["Jaccard I_w"].mean() + at_k["Jaccard I_l"].mean()) / 2
    ratio = overlap / at_k["chance"].iloc[0]
    above = int(((at_k["Jaccard I_w"] > at_k["chance"]) & (at_k["Jaccard I_l"] > at_k["chance"])).sum())
    return Markdown(
        f"At K = {at_k['K'].iloc[0]}, two halves of the training questions agree on "
        f"{at_k['Jaccard I_w'].mean():.0%} (I_w) and {at_k['Jaccard I_l'].mean():.0%} (I_l) of their union, "
        f"{ratio:.1f} times the {at_k['chance'].iloc[0]:.1%} of random subsets; the overlap of both sides exceeds "
        f"that level in {above} of the {len(at_k)} half-splits. How much of the selection reflects the data set "
        "rather than the sample? Compare each K's overlap with its random-subset level in the table."
    )


# --------------------------------------------------------------------------- chapters 3-5: accuracy tables and verdicts


def split_sizes(states: Mapping[str, Any]) -> pd.DataFrame:
    """Pairs per split (rows) of each data set (columns)."""
    return pd.DataFrame({label(n): s.sizes() for n, s in states.items()}).rename_axis("pairs per split")


def beside_paper(
    summary: pd.DataFrame, paper: Mapping[str, Mapping[str, float]], *, paper_label: str = "paper (Gemma-2-9B-it)"
) -> pd.DataFrame:
    """Our "mean ± sd" next to the paper's number, per data set and variant (rows).

    `summary`: `srlib.experiments.summarize` output (columns dataset, variant, label).
    `paper`: {variant: {dataset: accuracy %}} (e.g. `srlib.paper.TABLE2_INPUTS`); variants
    the paper lacks get an empty cell. Columns: "<data set> (ours)", "<data set> · <paper_label>".
    """
    variants = list(dict.fromkeys(summary["variant"]))
    datasets = list(dict.fromkeys(summary["dataset"]))
    datasets = [d for d in DATASET_LABELS if d in datasets] + [d for d in datasets if d not in DATASET_LABELS]
    labels = summary.set_index(["variant", "dataset"])["label"]
    columns = {}
    for dataset in datasets:
        name = label(dataset)
        columns[f"{name} (ours)"] = [labels.get((v, dataset), "") for v in variants]
        columns[f"{name} · {paper_label}"] = [
            "" if paper.get(v, {}).get(dataset) is None else f"{paper[v][dataset]:.1f}" for v in variants
        ]
    return pd.DataFrame(columns, index=pd.Index(variants, name="variant"))


def with_paper_gap(comparisons: pd.DataFrame, paper: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """`srlib.experiments.paired_table` rows with the paper's A − B beside ours (points), read
    from a paper table {variant: {data set: accuracy %}}."""
    names = {label(n): n for n in {d for scores in paper.values() for d in scores}}
    return comparisons.assign(
        **{
            "paper's A − B": [
                paper[a][names.get(d, d)] - paper[b][names.get(d, d)]
                for a, b, d in zip(comparisons.A, comparisons.B, comparisons.dataset, strict=True)
            ]
        }
    )


def verdict_lines(comparisons: pd.DataFrame, by: str = "dataset") -> Markdown:
    """One bullet per paired comparison: its group in bold, then `compare_paired`'s verdict."""
    return Markdown("\n".join(f"- **{getattr(row, by)}**: {row.verdict}." for row in comparisons.itertuples()))


def selected_activity_table(activity: Mapping[str, Mapping[str, float]], k: int) -> pd.DataFrame:
    """Per data set (`srlib.chapter.selected_latent_activity`): what the latent-input head and the
    projection head see of the 2K selected latents."""
    rows = [
        {
            "data set": label(name),
            "active selected latents per answer (of 2K)": f"{a['active']:.1f} of {2 * k}",
            "answers with no selected latent active (%)": round(100 * a["empty"], 1),
            "test pairs where both answers have none (%)": round(100 * a["both_empty"], 1),
            "non-zero projections per answer (of 2K)": f"{a['nonzero_projections']:.0f} of {2 * k}",
        }
        for name, a in activity.items()
    ]
    return pd.DataFrame(rows).set_index("data set")


def selected_activity_text(table: pd.DataFrame, k: int) -> Markdown:
    """The activity table in words: how sparse the latent head's inputs are, and the pairs it cannot rank."""
    empty = table["answers with no selected latent active (%)"]
    tied = table["test pairs where both answers have none (%)"]
    active = table["active selected latents per answer (of 2K)"].str.split().str[0].astype(float)
    text = (
        f"A test answer switches on {active.min():.1f} to {active.max():.1f} of the {2 * k} selected latents on "
        f"average (per data set), so the latent-input head sees at most {100 * active.max() / (2 * k):.0f}% non-zero "
        f"inputs, while the projection head sees all {2 * k} numbers for every answer. "
    )
    if tied.max() > 0:
        text += (
            f"Up to {empty.max():.1f}% of the test answers switch on none of them, and {tied.max():.1f}% of the "
            f"test pairs ({tied.idxmax()}) have none active in either answer: the latent head cannot rank those pairs."
        )
    else:
        text += "Every test answer switches on at least one of them, so no pair is left without any input."
    return Markdown(text)


def k_probe_table(summary: pd.DataFrame, gap: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per K and input ("mean ± sd"), with top-K minus random and its paired interval."""
    table = summary.pivot(index="K", columns="variant", values="label")
    table["top-K − random (points)"] = gap.set_index("K")["A − B (points)"].round(1)
    table["95% CI (paired)"] = [f"{lo:.1f} to {hi:.1f}" for lo, hi in zip(gap["CI low"], gap["CI high"], strict=True)]
    return table


def k_probe_text(
    summary: pd.DataFrame, gap: pd.DataFrame, dense: Mapping[str, float], ks: Sequence[int], ratio_k: float
) -> Markdown:
    """The K probe in words: DenseRM's level, the range of top-K minus random, where its paired
    interval excludes 0, the largest K's accuracies, and one verdict per K."""
    wide = summary.pivot(index="K", columns="variant", values="mean")
    clear = [int(k) for k, low, high in zip(gap.K, gap["CI low"], gap["CI high"], strict=True) if low > 0 or high < 0]
    text = (
        f"DenseRM reaches {mean_sd(dense['mean'], dense['std'])}% (ties ½ in every column). "
        f"Top-K minus random directions ranges from {gap['A − B (points)'].min():+.1f} to "
        f"{gap['A − B (points)'].max():+.1f} points over K = {', '.join(map(str, ks))}; "
    )
    text += (
        f"its paired 95% interval excludes 0 at K = {', '.join(map(str, clear))}. "
        if clear
        else "its paired 95% interval includes 0 at every K. "
    )
    return Markdown(
        text + f"At K = {ks[-1]}, top-K directions give {wide['Top-K directions'].iloc[-1]:.1f}%, random "
        f"{wide['Random directions'].iloc[-1]:.1f}%, SAE latents {wide['SAE latents'].iloc[-1]:.1f}%. "
        f"The paper's ratio 2K/d ≈ 7% corresponds to K ≈ {ratio_k:.0f} here.\n\n"
        + "\n".join(f"- K = {row.K}: {row.verdict}." for row in gap.itertuples())
    )


def gamma_table(sweep: pd.DataFrame, seed_reference: pd.DataFrame) -> pd.DataFrame:
    """Per γ (`srlib.chapter.gamma_sweep`): accuracies, score scale and agreement with γ = 1 as
    mean ± sd over seeds, and a last row with two γ = 1 heads of different seeds as the yardstick."""

    def ms(values, scale=1.0, digits=2):
        return mean_sd(scale * values.mean(), scale * values.std(), digits=digits)

    by_gamma = sweep.groupby("gamma")
    table = pd.DataFrame(
        {
            "validation accuracy (%)": by_gamma.val_accuracy.apply(ms, scale=100, digits=1),
            "test accuracy (%)": by_gamma.test_accuracy.apply(ms, scale=100, digits=1),
            "score sd on test answers": by_gamma.score_sd.apply(ms),
            "scale vs γ = 1": by_gamma.scale_vs_gamma1.apply(ms),
            "Spearman ρ vs γ = 1": by_gamma.spearman_vs_gamma1.apply(ms, digits=3),
            "same keep/drop as γ = 1 (%)": by_gamma.same_decisions_vs_gamma1.apply(ms, scale=100, digits=1),
            "best epoch": by_gamma.best_epoch.apply(ms, digits=1),
        }
    )
    table.index = pd.Index([f"{g:g}" for g in table.index], name="γ")
    table.loc["1 vs 1, other seed (reference)"] = [
        "",
        "",
        "",
        "",
        ms(seed_reference.spearman_vs_gamma1, digits=3),
        ms(seed_reference.same_decisions_vs_gamma1, scale=100, digits=1),
        "",
    ]
    if sweep.test_ties.max() > 0:  # tied test pairs count as wrong in the accuracy column
        table.insert(2, "tied test pairs (%)", [f"{100 * t:.1f}" for t in by_gamma.test_ties.mean()] + [""])
    return table


def gamma_text(
    sweep: pd.DataFrame,
    seed_reference: pd.DataFrame,
    paired: pd.DataFrame,
    choice: Mapping[str, Any],
    *,
    gamma: float,
    rule: str,
) -> Markdown:
    """The γ sweep in words: score scale against pure rescaling, agreement with γ = 1 against the
    seed yardstick, a paired verdict per γ, and the γ a validation choice (`choice`, by `rule`)
    would take beside the `gamma` the chapter's table uses."""
    gammas = sorted(sweep.gamma.unique())
    scale = sweep.groupby("gamma").scale_vs_gamma1.mean()
    others = sweep[sweep.gamma != 1.0]
    tied = ", ".join(f"{s['gamma']:g}" for s in choice["tied"])
    return Markdown(
        f"Over γ from {min(gammas):g} to {max(gammas):g} (a factor of {max(gammas) / min(gammas):g}), "
        f"the score scale relative to γ = 1 goes from {scale.iloc[0]:.2f} to {scale.iloc[-1]:.2f} "
        f"(pure rescaling would "
        f"give {min(gammas):g} to {max(gammas):g}). Against the γ = 1 head "
        f"of the same seed, the other heads keep the same ranking of test answers with a Spearman ρ of "
        f"{others.spearman_vs_gamma1.min():.3f}-{others.spearman_vs_gamma1.max():.3f} and make the same keep/drop "
        f"decision on {100 * others.same_decisions_vs_gamma1.min():.1f}-"
        f"{100 * others.same_decisions_vs_gamma1.max():.1f}% "
        f"of the test pairs. For scale: two γ = 1 heads that differ only in their seed reach a Spearman ρ of "
        f"{seed_reference.spearman_vs_gamma1.mean():.3f} and agree on "
        f"{100 * seed_reference.same_decisions_vs_gamma1.mean():.1f}% "
        f"of the pairs.\n\nTest accuracy, each γ against γ = 1 on the same test pairs:\n\n"
        + "\n".join(f"- {verdict}." for verdict in paired.verdict)
        + f"\n\nThe chapter does not choose γ from this sweep: Table 3 uses γ = {gamma:g}. Chosen on the validation "
        f"split ({rule}), it would be γ = **{choice['gamma']:g}** ({choice['label']}% on validation"
        + (f"; tied with γ = {tied}" if tied else "")
        + f"), {'the value Table 3 uses' if choice['gamma'] == gamma else 'not the value Table 3 uses'}."
    )


# --------------------------------------------------------------------------- chapter 3: SparseRM and its settings


def untrained_text(accuracy: float, dataset: str) -> Markdown:
    """How often the untrained projection score (`srlib.chapter.untrained_scores`) ranks a test pair right."""
    return Markdown(
        f"This untrained score prefers the chosen answer in **{accuracy:.1%}** of "
        f"{label(dataset)} test pairs (50% is chance): the directions carry "
        "preference information before the head has seen a label beyond the selection."
    )


def training_text(history, trial, n_val: int) -> Markdown:
    """One fit's training run in words: epochs, early stopping, the kept epoch, its test accuracy,
    and how much one validation pair and the epoch-to-epoch swing weigh."""
    import torch

    swing = torch.tensor(history.val_accuracy).diff().abs().mean().item() if len(history.val_accuracy) > 1 else 0.0
    return Markdown(
        f"Training ran {history.epochs_run} epochs{' and stopped early' if history.stopped_early else ''}; the "
        f"state of epoch {history.best_epoch} (validation accuracy {history.best_val_accuracy:.1%}) is kept, "
        f"with test accuracy **{trial.test_accuracy:.1%}**, in {trial.fit_seconds:.1f} s. One of the "
        f"{n_val:,} validation pairs is worth {1 / n_val:.2%}, and the "
        f"curve moves by {swing:.1%} per epoch on average: the best epoch is partly chosen by noise, one "
        "reason to report several seeds."
    )


def parameters_table(counts: Mapping[str, int], k: int) -> pd.DataFrame:
    """Numbers per part of a SparseRM (`srlib.chapter.parameter_counts`), trained or frozen, and
    each as a share of the backbone (%)."""
    table = pd.DataFrame(
        [
            {"part": "backbone (frozen)", "parameters": counts["backbone"], "trained": False},
            {"part": "SAE (frozen; used to select the directions)", "parameters": counts["sae"], "trained": False},
            {"part": "directions [F_w; F_l] (frozen, 2K × d)", "parameters": counts["directions"], "trained": False},
            {"part": f"reward head (2K = {2 * k} inputs, 512 hidden)", "parameters": counts["head"], "trained": True},
        ]
    )
    table["share of the backbone (%)"] = 100 * table["parameters"] / counts["backbone"]
    return table


PARAMETER_FORMATS = {"parameters": "{:,}", "share of the backbone (%)": "{:.3f}"}


def parameters_text(counts: Mapping[str, int]) -> Markdown:
    """The trained share of a SparseRM in words, beside the paper's claim."""
    head, backbone = counts["head"], counts["backbone"]
    return Markdown(
        f"SparseRM trains **{head:,}** numbers, **{head / backbone:.3%}** of the "
        f"{backbone / 1e6:,.1f}M-parameter backbone. The paper reports under 1% "
        "(its backbones are 2–9B parameters, so its share is far smaller still)."
    )


def model_name(model_id: str) -> str:
    """A hub id without its organisation: "SmolLM2-135M-Instruct"."""
    return model_id.split("/")[-1]


def accuracy_beside_paper(
    summary: pd.DataFrame, paper: Mapping[str, Mapping[str, float]], *, model_id: str, layer: int
) -> pd.DataFrame:
    """Our SparseRM's "mean ± sd" per data set (model and layer named) above the paper's Gemma-2-9B-it row."""
    table = pivot_labels(summary).rename(index={"SparseRM": f"SparseRM, ours ({model_name(model_id)}, layer {layer})"})
    names = {label(n): n for n in summary["dataset"]}
    table.loc["SparseRM, paper (Gemma-2-9B-it)"] = [
        f"{paper['SparseRM'][names[c]]:.1f}" if names[c] in paper["SparseRM"] else "–" for c in table.columns
    ]
    return table


def accuracy_text(summary: pd.DataFrame, paper: Mapping[str, Mapping[str, float]], profile, model_id: str) -> Markdown:
    """Our accuracy per data set beside the paper's, the profile's note on why they may differ, and
    the data sets where the reward model is barely above chance."""
    layer, caveat = profile.layer, profile.paper_gap_note
    lines = [
        f"{label(r.dataset)}: **{r.label}%** (paper, Gemma-2-9B-it: "
        f"{paper['SparseRM'].get(r.dataset, float('nan')):.1f}%)"
        for r in summary.itertuples()
    ]
    near_chance = [label(r.dataset) for r in summary.itertuples() if r.mean < 55]
    if near_chance:
        caveat += (
            f" On {', '.join(near_chance)} the reward model is barely above chance: this backbone's layer-"
            f"{layer} state hardly separates those pairs (see the split sizes above; the paper trains "
            "on 1,000 pairs per set)."
        )
    return Markdown(f"Ours ({model_name(model_id)}, layer {layer}): " + "; ".join(lines) + ". " + caveat)


def reading_table(reading: pd.DataFrame) -> pd.DataFrame:
    """Stage 1 of the validation study: validation accuracy per read position (rows) and input
    scaling (columns), "mean ± sd" over seeds."""
    from srlib.experiments import summarize

    table = (
        summarize(reading, by=("position", "standardize"), value="val_accuracy")
        .assign(inputs=lambda t: t["standardize"].map({True: "standardised", False: "raw"}))
        .pivot(index="position", columns="inputs", values="label")
    )
    table.columns.name = None
    return table


def sweep_table(grid: pd.DataFrame) -> pd.DataFrame:
    """Stage 2 (Figure 4): validation accuracy per layer (rows) and K (columns), "mean ± sd"."""
    from srlib.experiments import summarize

    table = summarize(grid, by=("layer", "k"), value="val_accuracy").pivot(index="layer", columns="k", values="label")
    table.columns = [f"K={k}" for k in table.columns]
    return table


def selected_table(study) -> pd.DataFrame:
    """The setting the validation study selected, with its validation and (scored once) test accuracy."""
    return study.both_columns().rename(columns={"position": "read position", "standardize": "standardised inputs"})


def _reading(s: Mapping[str, Any]) -> str:
    return f"{s['position']!r}, {'standardised' if s['standardize'] else 'raw'}"


def _ties(choice: Mapping[str, Any], describe) -> str:
    others = [describe(s) for s in choice["tied"]]
    return f" (tied within one standard error: {'; '.join(others)})" if others else ""


def _profile_default(profile, name: str) -> Any:
    """The profile's default for a setting the validation study compares (the head's settings,
    such as `standardize`, live in its head config where it has one)."""
    head = getattr(profile, "head", None)
    return getattr(head, name) if head is not None and hasattr(head, name) else getattr(profile, name)


def selection_text(study, profile, *, rule: str) -> Markdown:
    """What each stage of the validation study selected (with its ties), the one test score, and
    whether the profile's defaults equal the selection."""
    selected, reading, grid = study.selected, study.choices["reading"], study.choices["grid"]
    differ = [
        f"{name}: {_profile_default(profile, name)!r} → {selected[name]!r}"
        for name, same in study.defaults_match(profile).items()
        if not same
    ]
    return Markdown(
        f"Rule: {rule}. Stage 1 selected the **{selected['position']!r}** token with "
        f"**{'standardised' if selected['standardize'] else 'raw'}** inputs ({reading['label']}% on validation)"
        + _ties(reading, _reading)
        + f"; stage 2 selected **layer {selected['layer']}, K = {selected['k']}** ({grid['label']}%)"
        + _ties(grid, lambda s: f"layer {s['layer']}, K = {s['k']}")
        + f". Scored once, on the test split, the selected setting reaches "
        f"**{selected_table(study)['test accuracy (%)'][0]}%**. "
        + (
            f"The `{profile.name}` profile's defaults equal this selection."
            if not differ
            else f"The `{profile.name}` profile's defaults (`srlib.profiles`) differ from this selection in "
            f"{'; '.join(differ)}: they should follow it."
        )
    )


def choices_beside_paper(selected: Mapping[str, Any], backbone) -> pd.DataFrame:
    """Our selected layer and K beside the paper's Figure 4 choices, with each layer's depth."""
    from srlib.paper import FIGURE4_CHOICE

    blocks = {"Gemma-2-2B-it": 26, "Gemma-2-9B-it": 42}
    table = pd.DataFrame(
        [
            {
                "": f"ours: {model_name(backbone.model_id)} (selected on validation)",
                "layer": selected["layer"],
                "of blocks": backbone.num_layers,
                "K": selected["k"],
            },
            *[
                {"": f"paper: {name}", "layer": c["layer"], "of blocks": blocks[name], "K": c["k"]}
                for name, c in FIGURE4_CHOICE.items()
            ],
        ]
    )
    table["depth"] = ((table["layer"] + 1) / table["of blocks"]).map("{:.0%}".format)
    return table


def stage_caption(stage: int, *, dataset: str = "", layer: int = 0, k: int = 0, n_seeds: int = 0) -> Markdown:
    """The line above each table of the validation study (stage 1 names its data set, layer, K and seeds)."""
    if stage == 1:
        return Markdown(
            f"**Stage 1**, {label(dataset)} at layer {layer}, "
            f"K = {k}: validation pair accuracy (%), mean ± sd over {n_seeds} seeds."
        )
    return Markdown("**Stage 2** (Figure 4): validation pair accuracy (%) by layer and K, mean ± sd.")


def selection_report(study, profile, backbone, *, rule: str) -> list:
    """What the book shows for the validation study's outcome, in order: the selected setting's
    table, the selection in words, our choice beside the paper's Figure 4 and its note."""
    return [
        show(selected_table(study)),
        selection_text(study, profile, rule=rule),
        show(choices_beside_paper(study.selected, backbone)),
        Markdown(
            "The paper's choices are beside ours as the paper's, for other models (depth: the share of "
            "the blocks at or below the layer)."
        ),
    ]


def sparserm_results(
    *,
    accuracy: pd.DataFrame,
    parameters: pd.DataFrame,
    reading: pd.DataFrame,
    sweep: pd.DataFrame,
    selected: pd.DataFrame,
    k: int,
    n_seeds: int,
    n_sweep_seeds: int,
    dataset: str,
    layer: int,
) -> dict[str, dict]:
    """Chapter 3's tables for the book's results page, each with its caption."""
    from srlib.results import frame_table

    return {
        "accuracy": frame_table(
            accuracy,
            f"SparseRM test pair accuracy (%), K = {k}, mean ± sd over "
            f"{n_seeds} seeds, beside the paper's (Gemma-2-9B-it)",
            index=True,
        ),
        "parameters": frame_table(
            parameters, "Trainable parameters of SparseRM against the frozen backbone", float_format=".3f"
        ),
        "reading": frame_table(
            reading,
            f"Validation study, stage 1: SparseRM validation accuracy (%) on "
            f"{label(dataset)} by read position and input scaling, "
            f"layer {layer}, K = {k}, mean ± sd over {n_sweep_seeds} seeds",
            index=True,
        ),
        "sweep": frame_table(
            sweep,
            f"Figure 4 (ours), validation study stage 2: SparseRM validation accuracy (%) "
            f"on {label(dataset)} by layer and K, mean ± sd over "
            f"{n_sweep_seeds} seeds; each layer with its own SAE",
            index=True,
        ),
        "selected": frame_table(
            selected,
            "The setting selected on validation, with its validation and (scored "
            "once) test accuracy (%), mean ± sd over seeds",
        ),
    }


def parameters_report(counts: Mapping[str, int], k: int) -> list:
    """The parameters table, styled, and the trained share in words."""
    return [show(parameters_table(counts, k), PARAMETER_FORMATS), parameters_text(counts)]


# --------------------------------------------------------------------------- chapter 9: reading and steering


def reading_line(states: Mapping[str, Any], seed: int) -> str:
    """The line under chapter 9's setup: one SparseRM per data set, its seed and split sizes."""
    return f"one SparseRM per data set (seed {seed}): " + ", ".join(
        f"{label(n)} {s.sizes()}" for n, s in states.items()
    )


COMPLETENESS_FORMATS = {"baseline score f(0)": "{:.3f}", "largest |baseline + Σ contributions − score|": "{:.1e}"}


def attribution_pair(
    pair, attributed: tuple, row: int, *, top: int, labels: Mapping[int, str], quote: bool, chars: int, dataset: str
) -> list[int]:
    """Show the attribution of one test pair (its texts when `quote`, then a panel per answer with
    a bar per direction, the `top` largest and the rest summed); return the latents it shows."""
    import matplotlib.pyplot as plt
    from IPython.display import display

    from srlib import explain, plots
    from srlib.experiments import pair_text

    parts = {
        f"{side} answer: score {attr.scores[row]:.2f} (baseline {attr.baseline:.2f})": explain.contribution_frame(
            attr, row, top=top, labels=labels
        )
        for side, attr in zip(("chosen", "rejected"), attributed, strict=True)
    }
    if quote:
        display(
            Markdown(
                f"**{pair_text(pair, 'chosen', chars)}**  \n*rejected:* "
                f"{pair_text(pair, 'rejected', chars).split(' → ', 1)[-1]}"
            )
        )
    fig = plots.contribution_bars(parts, title=f"{label(dataset)}, test pair {pair.pair_id}")
    display(fig)
    plt.close(fig)
    return [int(latent) for frame in parts.values() for latent in frame["latent"] if latent >= 0]


def shown_cards(cards: pd.DataFrame, latents: Sequence[int], *, quote: bool, sae_source: str, n: int = 4) -> list:
    """The cards of the first `n` distinct latents among `latents` (as HTML), and, when the SAE has
    no public dashboard, a note saying the cards are the only evidence of what a latent means."""
    from IPython.display import HTML

    from srlib.experiments import neuronpedia_url

    shown = [
        HTML(
            latent_cards_html(cards[cards["latent"].isin(latents)].drop_duplicates("latent").head(n), quote_texts=quote)
        )
    ]
    if neuronpedia_url(sae_source, 0) is None:
        shown.append(
            Markdown(
                f"No public dashboard exists for this SAE (`{sae_source}`): it was trained here, so the "
                "training answers above are the only evidence for what a latent means. Under "
                '`PROFILE="paper"` every card links to the latent\'s Neuronpedia page.'
            )
        )
    return shown


def labelled_verdicts(verdicts: Mapping[str, str], *, m: int) -> Markdown:
    """One bullet per data set: its name and m in bold, then `compare_paired`'s verdict."""
    return Markdown("\n".join(f"- **{label(n)}**, m = {m}: {v}." for n, v in verdicts.items()))


def steering_text(run, *, dataset: str, n_pairs: int, n: int) -> Markdown:
    """The length-steering run (`srlib.chapter.length_steering`) in words: the accuracy before and
    after with the paired verdict, the flipped pairs, and the score-length rank correlation."""
    effect = run.effect
    return Markdown(
        f"On {label(dataset)}'s {n_pairs} test pairs, masking the {n} length-tracking "
        f"directions moves the pair accuracy from {100 * effect.accuracy_before:.1f}% to "
        f"{100 * effect.accuracy_after:.1f}% (ties ½): {effect.comparison.verdict()}. "
        f"{len(effect.flipped_to_wrong)} pairs flip from right to wrong and {len(effect.flipped_to_right)} from wrong "
        f"to right. The rank correlation between a test answer's score and its length goes from "
        f"{run.rho['before']:+.2f} to {run.rho['after']:+.2f}."
    )


def flipped_pairs(run, pairs: Sequence, *, quote: bool, chars: int, n: int = 8) -> pd.DataFrame:
    """The first `n` test pairs whose verdict the steering flipped, which way, the two answers'
    lengths and (when `quote`) the question and chosen answer."""
    from srlib.experiments import pair_text

    effect = run.effect
    flipped = [
        (p, "right → wrong" if p.pair_id in effect.flipped_to_wrong else "wrong → right")
        for p in pairs
        if p.pair_id in effect.flipped_to_wrong + effect.flipped_to_right
    ]
    return pd.DataFrame(
        [
            {
                "pair": p.pair_id,
                "flip": how,
                "chosen length": len(p.chosen),
                "rejected length": len(p.rejected),
                **({"question → chosen": pair_text(p, "chosen", chars)} if quote else {}),
            }
            for p, how in flipped[:n]
        ]
    )


# --------------------------------------------------------------------------- chapter 7: iterative DPO

#: How the book names the policy metrics of `srlib.evaluate` that Table 1's tracks report.
METRIC_LABELS = {"mc1": "TruthfulQA MC1", "mc2": "TruthfulQA MC2", "accuracy": "pairwise accuracy"}


def se_key(metric: str) -> str:
    """The name of a policy metric's standard error in `srlib.evaluate`'s results."""
    return "se" if metric == "accuracy" else f"{metric}_se"


def _pm(metrics: Mapping[str, Any], metric: str) -> str:
    """A policy metric and its standard error, in percent: "41.0 ± 3.1"."""
    return mean_sd(100 * metrics[metric], 100 * metrics[se_key(metric)])


def batch_text(micro_batch: int, accumulation: int) -> str:
    """A training batch as a reader counts it: "8", or "8 (micro-batches of 1, accumulated)"."""
    if accumulation == 1:
        return str(micro_batch)
    return f"{micro_batch * accumulation} (micro-batches of {micro_batch}, accumulated)"


def alignment_line(config, threads: int) -> str:
    """The loop's settings in one line, under chapter 7's setup."""
    return (
        f"{threads} torch thread(s); track {config.track}, data set {config.data_name}: {config.n_prompts or 'all'} "
        f"prompts a round, {config.rounds} rounds, {config.n_shots} shots, {config.max_new_tokens} new tokens, DPO "
        f"beta {config.beta} against the {config.reference} model, {config.epochs} epochs, "
        f"lr {config.learning_rate:g}, batch {batch_text(config.batch_size, config.gradient_accumulation_steps)}, "
        f"LoRA r={config.lora_r}; best round on {config.max_val or 'all'} validation items "
        f"by {config.metric}, test on {config.max_test or 'all'} items; seed {config.seed}"
    )


def deviations(config) -> pd.DataFrame:
    """Every setting of the paper's alignment setup beside this run's (`paper_deviations`), the
    ones that differ marked."""
    table = pd.DataFrame(config.paper_deviations()).set_index("setting")
    table["differs"] = ["" if here == paper else "yes" for here, paper in zip(table.here, table.paper, strict=True)]
    return table


def track_text(validation_track: str, track: str) -> Markdown:
    """Which track the filter accuracy chose, and whether this run follows it."""
    return Markdown(
        f"By the book's selection rule on held-out pairs (`choose_track`: the most accurate filter, or "
        f"within one standard error of it the one measured on the most pairs), the filter of the "
        f"**{validation_track}** track is chosen, "
        + (
            "and this run follows that choice."
            if track == validation_track
            else f'but this run was asked for `TRACK = "{track}"`.'
        )
    )


def one_line(text: str, chars: int) -> str:
    """`text` on one line of at most `chars` characters."""
    text = " ".join(text.split())
    return text if len(text) <= chars else text[: chars - 1] + "…"


def generation_turns(config) -> list:
    """The two generation prompts of the track (asking for y_w, then for y_l), with the place
    of the prompt x marked, one table of turns each; the bad side's compliant answers of the
    safety tracks are not reproduced."""
    from srlib.alignment import generation_messages, select_shots
    from srlib.data import load_pairs

    shots = select_shots(
        load_pairs(f"{config.data_name}:train", seed=config.split_seed),
        config.n_shots,
        seed=config.seed,
        max_chars=config.shot_max_chars,
        kind=config.kind,
    )

    def shown(message: Mapping[str, str], side: str) -> str:
        if config.kind == "safety" and side == "bad" and message["role"] == "assistant":
            return (
                f"[the rejected (compliant) answer of a training pair, {len(message['content'])} characters: not shown]"
            )
        return one_line(message["content"], 110)

    out = []
    for side, target in (("good", "y_w"), ("bad", "y_l")):
        messages = generation_messages("⟨x: the prompt, as the user asked it⟩", shots, config.kind, side)
        out += [
            Markdown(f"**Asking for {target} ({side} answer)**"),
            pd.DataFrame([{"turn": m["role"], "content": shown(m, side)} for m in messages]).style.hide(axis="index"),
        ]
    return out


def rms_beside_paper(rm_table: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """The reward models' accuracies (`srlib.chapter.alignment_rms`) with the paper's (Table 4,
    Gemma-2-9B-it) beside them, rounded to 0.1."""
    from srlib.paper import TABLE4_DENSE_VS_SPARSE

    paper = [TABLE4_DENSE_VS_SPARSE.get(n, {}).get("accuracy", {}).get(dataset) for n in rm_table.index]
    return rm_table.assign(**{"accuracy · paper (Gemma-2-9B-it)": paper}).round(1)


def rounds_table(result) -> pd.DataFrame:
    """One row per reward model and round: tuples generated and kept, TRL's DPO statistics of the
    round's last epoch, the validation metrics and the seconds of each stage."""
    metrics = _track_metrics(result)

    def last_epoch(rec) -> dict:
        return rec.train["epochs"][-1] if rec.train and rec.train["epochs"] else {}

    return pd.DataFrame(
        [
            {
                "reward model": name,
                "round": rec.round,
                "generated": rec.n_generated,
                "kept": rec.n_kept,
                "DPO steps": rec.train["steps"] if rec.train else 0,
                "DPO loss (last epoch)": last_epoch(rec).get("loss"),
                "DPO reward accuracy (last epoch, %)": 100 * last_epoch(rec).get("rewards/accuracies", float("nan")),
                **{f"val {METRIC_LABELS[m]} (%)": 100 * rec.val[m] for m in metrics},
                **{f"{stage} (s)": seconds for stage, seconds in rec.seconds.items()},
            }
            for name, run in result.runs.items()
            for rec in run.rounds
        ]
    )


def _track_metrics(result) -> tuple[str, ...]:
    from srlib.alignment import TRACKS

    return tuple(TRACKS[result.config.track].metrics)


def rounds_report(result, rounds: pd.DataFrame) -> list:
    """The rounds table, styled, and what its times and DPO columns mean."""
    seconds = rounds.loc[rounds["round"] == 1, "generate (s)"].iloc[0]
    return [
        rounds.round(2).style.hide(axis="index").format(precision=1),
        Markdown(
            f"Round 1's {result.round1_filter['n_generated']} tuples were generated once in {seconds:.0f} s "
            "and filtered by every reward model (its `generate` time is repeated in each row). Times are those "
            "of the run that produced the folder. The DPO columns are TRL's statistics on the round's own kept "
            "tuples: a reward accuracy near 100% means the adapter learned to prefer y_w over y_l on those tuples."
        ),
    ]


def round_one_filter(result, round_one) -> pd.DataFrame:
    """Round 1 per reward model: tuples kept, and on the safety tracks the share with a clear
    refusal contrast among the kept and among the dropped ones."""
    frame, names = round_one.frame, list(round_one.verdicts)
    table = pd.DataFrame(
        {
            "kept": result.round1_filter["kept"],
            "kept (%)": {n: 100 * f for n, f in result.round1_filter["kept_fraction"].items()},
            **(
                {
                    "clear contrast among kept (%)": {
                        n: 100 * frame.loc[frame[f"{n} keeps"], "contrast"].mean() for n in names
                    },
                    "clear contrast among dropped (%)": {
                        n: 100 * frame.loc[~frame[f"{n} keeps"], "contrast"].mean() for n in names
                    },
                }
                if result.config.kind == "safety"
                else {}
            ),
        }
    )
    table.index.name = "reward model"
    return table


def round_one_report(result, round_one) -> list:
    """The round-1 filter table and, on the safety tracks, how many tuples have refusal words."""
    frame = round_one.frame
    out = [round_one_filter(result, round_one).round(1)]
    if result.config.kind == "safety":
        from srlib.alignment import REFUSAL

        out.append(
            Markdown(
                f"{frame.contrast.sum()} of {len(frame)} round-1 tuples have a refusing y_w and a "
                f"non-refusing y_l; {(frame.y_w.map(REFUSAL.search).notna()).sum()} y_w and "
                f"{(frame.y_l.map(REFUSAL.search).notna()).sum()} y_l contain refusal words."
            )
        )
    return out


def filter_examples(round_one, names: Sequence[str], *, kind: str, n: int):
    """Up to `n` round-1 tuples per reward model and verdict (kept / dropped), each text cut to
    one short line; on the safety tracks only tuples whose y_w refuses, the shortest first, with
    y_l cut shorter (the prompts are harmful requests)."""
    from srlib.alignment import REFUSAL

    frame, rows = round_one.frame, []
    for name in names:
        for kept in (True, False):
            part = frame[frame[f"{name} keeps"] == kept]
            if kind == "safety":
                part = part[part.y_w.map(REFUSAL.search).notna()]
                part = part.assign(length=part.prompt.str.len() + part.y_l.str.len()).sort_values("length")
            for _, row in part.head(n).iterrows():
                rows.append(
                    {
                        "reward model": name,
                        "verdict": "kept" if kept else "dropped",
                        "s_w − s_l": row[f"{name} s_w - s_l"],
                        "x (prompt)": one_line(row.prompt, 70),
                        "y_w (asked: good)": one_line(row.y_w, 90),
                        "y_l (asked: bad)": one_line(row.y_l, 50 if kind == "safety" else 90),
                    }
                )
    return pd.DataFrame(rows).round(2).style.hide(axis="index").format(precision=2)


def table1(result) -> pd.DataFrame:
    """Table 1 for this run: each policy at its best round on the track's test items, each metric
    ± SE and its paired change from the base policy with the 95% interval, the paper's Gemma-2
    numbers beside (DenseRM's from its Table 4)."""
    from srlib.alignment import TRACKS
    from srlib.paper import TABLE1_ALIGNMENT, TABLE1_COLUMNS, TABLE4_DENSE_VS_SPARSE

    track = TRACKS[result.config.track]
    rows = []
    for row in result.table():
        out = {
            "track": row["track"],
            "policy": row["method"],
            "best round": row["best_round"],
            "kept tuples per round": "–" if row["kept"] is None else ", ".join(map(str, row["kept"])),
        }
        for metric in track.metrics:
            out[f"{METRIC_LABELS[metric]} (%)"] = _pm(row, metric)
            out[f"{METRIC_LABELS[metric]}: change from base (points, 95% CI)"] = (
                "–"
                if row["kept"] is None
                else f"{row[f'{metric}_delta']:+.1f} "
                f"({row[f'{metric}_delta_low']:+.1f} to {row[f'{metric}_delta_high']:+.1f})"
            )
        for backbone_name, methods in TABLE1_ALIGNMENT.items():
            for column in track.paper_columns:
                value = methods.get(row["method"], [None] * 4)[TABLE1_COLUMNS.index(column)]
                if (
                    value is None
                    and row["method"] == "DenseRM"
                    and backbone_name == "Gemma-2-9B-it"
                    and column != "TQA MC2"
                ):
                    value = TABLE4_DENSE_VS_SPARSE["DenseRM"]["alignment"][result.config.data_name]
                out[f"{column} · paper ({backbone_name})"] = "" if value is None else f"{value:.1f}"
        rows.append(out)
    return pd.DataFrame(rows).set_index(["track", "policy"])


#: The policy comparisons chapter 7 gives a verdict for, those whose two policies the run has.
ALIGNMENT_COMPARISONS = (
    ("SparseRM", "WO RM"),
    ("SparseRM", "DenseRM"),
    ("DenseRM", "WO RM"),
    ("StandardRM", "WO RM"),
    ("SparseRM", "StandardRM"),
    ("WO RM", "base policy"),
    ("SparseRM", "base policy"),
)


def alignment_verdicts(result) -> Markdown:
    """`compare_paired`'s verdict for each policy comparison of the run, per metric."""
    from srlib.alignment import BASE

    pairs = [(a, b) for a, b in ALIGNMENT_COMPARISONS if a in result.runs and (b in result.runs or b == BASE)]
    lines = [
        f"- {METRIC_LABELS[m]}: {result.compare(a, b, m).verdict()}" for m in _track_metrics(result) for a, b in pairs
    ]
    return Markdown(
        f"Paired comparisons on the {result.base_test['n']} test items of the {result.config.track} track "
        "(`AlignmentResult.compare`, i.e. `srlib.evaluate.compare_paired`):\n\n" + "\n".join(lines)
    )


def sparse_vs_wo_text(result, comparisons: Mapping[str, Any]) -> Markdown:
    """Did SparseRM filtering beat WO RM: the answer from the paired intervals of every metric,
    the verdicts, the paper's gains on this track's columns, and whether the run could detect them."""
    from srlib.alignment import TRACKS
    from srlib.chapter import clear_win
    from srlib.paper import TABLE1_ALIGNMENT, TABLE1_COLUMNS

    columns = TRACKS[result.config.track].paper_columns
    paper_gains = [
        methods["SparseRM"][TABLE1_COLUMNS.index(c)] - methods["WO RM"][TABLE1_COLUMNS.index(c)]
        for methods in TABLE1_ALIGNMENT.values()
        for c in columns
    ]
    widest = max(c.high - c.low for c in comparisons.values())
    detectable = max(c.detectable for c in comparisons.values())
    beat, worse = clear_win(comparisons), any(c.high < 0 for c in comparisons.values())
    return Markdown(
        "**Did SparseRM filtering beat WO RM here?** "
        + (
            "Yes: the 95% interval excludes zero on every metric."
            if beat
            else "No: WO RM did better (an interval lies below zero)."
            if worse
            else "No clear difference: every interval contains zero."
        )
        + " "
        + "; ".join(f"{METRIC_LABELS[m]}: {c.verdict()}" for m, c in comparisons.items())
        + f". The paper's gains of SparseRM over WO RM on this track's columns are {min(paper_gains):+.1f} to "
        f"{max(paper_gains):+.1f} points (2,000 prompts, 5 rounds); the intervals here are up to {widest:.1f} points "
        f"wide, and a true difference of {detectable:.1f} points would be found with 80% power: this run is "
        + ("large enough" if detectable <= max(paper_gains) else "too small")
        + " to detect the paper's largest gain on this track."
    )


def table4_alignment(result, rm_table: pd.DataFrame) -> pd.DataFrame:
    """Table 4's alignment half: DenseRM and SparseRM's test accuracy as reward models and the
    test metric of the policy each produced, ours beside the paper's (Gemma-2-9B-it)."""
    from srlib.paper import TABLE4_DENSE_VS_SPARSE

    metric, dataset = _track_metrics(result)[0], result.config.data_name
    table = pd.DataFrame(
        {
            name: {
                "RM accuracy (ours, %)": f"{rm_table.loc[name, 'test accuracy (%)']:.1f}",
                f"alignment: {METRIC_LABELS[metric]} (ours, %)": _pm(result.runs[name].test, metric),
                "RM accuracy · paper (Gemma-2-9B-it)": TABLE4_DENSE_VS_SPARSE[name]["accuracy"][dataset],
                "alignment · paper (Gemma-2-9B-it)": TABLE4_DENSE_VS_SPARSE[name]["alignment"][dataset],
            }
            for name in ("DenseRM", "SparseRM")
        }
    ).T
    table.index.name = "reward model"
    return table


def table4_alignment_text(result, rm_table: pd.DataFrame) -> Markdown:
    """SparseRM − DenseRM in RM accuracy and in alignment (the paired verdict), beside the paper's."""
    from srlib.paper import TABLE4_DENSE_VS_SPARSE

    metric, dataset, paper = _track_metrics(result)[0], result.config.data_name, TABLE4_DENSE_VS_SPARSE
    acc_gap = rm_table.loc["SparseRM", "test accuracy (%)"] - rm_table.loc["DenseRM", "test accuracy (%)"]
    return Markdown(
        f"Ours: SparseRM − DenseRM is {acc_gap:+.1f} points of RM accuracy (one seed; chapter 6 compares "
        f"them over seeds) and, in alignment ({METRIC_LABELS[metric]}): "
        f"{result.compare('SparseRM', 'DenseRM', metric).verdict()}. The paper: "
        f"{paper['SparseRM']['accuracy'][dataset] - paper['DenseRM']['accuracy'][dataset]:+.1f} "
        f"and {paper['SparseRM']['alignment'][dataset] - paper['DenseRM']['alignment'][dataset]:+.1f}."
    )


def alignment_results(
    result, *, table1: pd.DataFrame, table4: pd.DataFrame, round_one: pd.DataFrame, rounds: pd.DataFrame
) -> dict[str, dict]:
    """Chapter 7's tables for the book's results page, each with its caption."""
    from srlib.results import frame_table

    metrics = _track_metrics(result)
    return {
        "table1": frame_table(
            table1,
            f"Table 1 (ours): policy after iterative DPO on {label(result.config.data_name)} "
            "test items, best round on validation; metric ± SE, paired change from the base "
            "policy with its 95% CI; the paper's Gemma-2 numbers beside",
            index=True,
        ),
        "table4_alignment": frame_table(
            table4,
            "Table 4 (alignment half): DenseRM vs SparseRM, RM test accuracy and "
            "the aligned policy's test metric, ours beside the paper's (Gemma-2-9B-it)",
            index=True,
            float_format=".1f",
        ),
        "round1_filter": frame_table(
            round_one,
            "Round-1 filtering: tuples kept by each reward model from one shared set of policy-generated tuples",
            index=True,
            float_format=".1f",
        ),
        "rounds": frame_table(
            rounds[["reward model", "round", "generated", "kept"] + [f"val {METRIC_LABELS[m]} (%)" for m in metrics]],
            "Iterative DPO: tuples generated and kept, validation metric per round and reward model",
            float_format=".1f",
        ),
    }


# --------------------------------------------------------------------------- chapter 6: DenseRM and the shift


def table4_accuracy(
    summary: pd.DataFrame, trials: pd.DataFrame, paper: Mapping[str, Mapping[str, float]]
) -> pd.DataFrame:
    """Table 4's accuracy half: ours beside the paper's per data set (`beside_paper`), with each
    model's trainable parameters."""
    table = beside_paper(summary, paper)
    table["trainable parameters"] = trials.groupby("variant", sort=False).trainable_parameters.first()
    return table


def generation_text(generated) -> Markdown:
    """The generated pairs (`srlib.chapter.policy_generation`) in words: how many, the settings,
    the seconds, the median answer lengths and the pairs with an empty answer."""
    config, pairs = generated.config, generated.pairs
    words = pd.DataFrame(
        {"y_w": [len(p.chosen.split()) for p in pairs], "y_l": [len(p.rejected.split()) for p in pairs]}
    )
    return Markdown(
        f"{len(pairs)} generated pairs ({2 * len(pairs)} answers, at most {config.max_new_tokens} "
        f"new tokens each, temperature {config.temperature}, {config.n_shots} few-shot examples): "
        f"{generated.seconds:.0f} s (about 0 when a rerun reads the cached answers). Median answer length: "
        f"{words.median().iloc[0]:.0f} words (y_w), {words.median().iloc[1]:.0f} words (y_l); "
        f"{int((words == 0).any(axis=1).sum())} pairs have an empty answer."
    )


def similarity_table(similarity: pd.DataFrame) -> pd.DataFrame:
    """Figure 5 as a table: per space and group, "mean ± sd" over the answers of the primary
    measure (nearest training answer, centered), the paper-style mean and the uncentered nearest
    (the centered mean, about 0 for every answer, is left out)."""
    from srlib.shift import similarity_summary

    sim = similarity_summary(similarity)
    sim["measure"] = sim["aggregate"] + sim["centered"].map({False: "", True: ", centered"})
    sim = sim[sim["measure"] != "mean, centered"]
    sim["label"] = [mean_sd(m, s, digits=3) for m, s in zip(sim["mean"], sim["std"], strict=True)]
    table = sim.pivot(index=["space", "group"], columns="measure", values="label")
    table = table[["nearest, centered", "mean", "nearest"]]
    table.columns = ["nearest, centered (primary)", "mean (paper-style)", "nearest"]
    return table


def _drops(figure5: Mapping[str, Mapping[str, float]], measure: str) -> str:
    dense, proj = figure5["dense"], figure5["projection"]
    return (
        f"{mean_sd(dense[f'shift_{measure}_sd'], dense[f'shift_{measure}_se'], digits=2)} sd in the dense space "
        f"and {mean_sd(proj[f'shift_{measure}_sd'], proj[f'shift_{measure}_se'], digits=2)} sd in the projection "
        "space (± one standard error)"
    )


def figure5_text(figure5: Mapping[str, Mapping[str, float]]) -> Markdown:
    """Figure 5 in words (`srlib.chapter.figure5_numbers`): the drop of the generated answers
    below the held-out ones in both spaces, primary and paper-style, and whether the paper's
    absolute reading (the dense space lower) holds."""
    dense, proj = figure5["dense"], figure5["projection"]
    return Markdown(
        f"**Primary measure** (nearest training answer, centered): below the held-out answers, generated answers "
        f"fall {_drops(figure5, 'primary')}.\n\n"
        f"**Paper-style** (mean over all training answers, uncentered): generated answers score "
        f"{dense['mean_generated']:.3f} in the dense space and {proj['mean_generated']:.3f} "
        f"in the projection space (held-out: {dense['mean_held_out']:.3f} and {proj['mean_held_out']:.3f}). "
        + (
            "Read in absolute terms, as the paper reads its Figure 5, the dense space shows the lower similarity; "
            if dense["mean_generated"] < proj["mean_generated"]
            else "Read in absolute terms, as the paper reads its Figure 5, "
            "the dense space does NOT show the lower similarity; "
        )
        + f"measured against the held-out answers they fall {_drops(figure5, 'paper_style')}. Which space shifts more? "
        "Compare the two drops with their standard errors."
    )


def mixing_text(mixing: Mapping[str, Mapping[str, float]], *, n_train: int, n_generated: int) -> Markdown:
    """The neighbour share (`srlib.chapter.neighbour_mixing`) in words, beside its chance level."""
    k = mixing["dense"]["k"]
    return Markdown(
        f"Of the {k} nearest neighbours of a generated answer (among {n_train} training and {n_generated} "
        f"generated answers), {100 * mixing['dense']['share']:.0f}% are generated answers in the dense space and "
        f"{100 * mixing['projection']['share']:.0f}% in the projection space; chance (no shift at all) would be "
        f"{100 * mixing['dense']['chance']:.0f}%."
    )


def _mean_sd_percent(frame: pd.DataFrame, by: Sequence[str], value: str) -> pd.DataFrame:
    return (
        frame.groupby(list(by), sort=False)[value].agg(lambda a: mean_sd(100 * a.mean(), 100 * a.std())).unstack("data")
    )


def agreement_table(agreement: pd.DataFrame) -> pd.DataFrame:
    """Agreement (%) of every two filters' keep/drop decisions per data, "mean ± sd" over seed pairs."""
    return _mean_sd_percent(agreement, ("comparison", "data"), "agreement")


def decisions_report(agreement: pd.DataFrame, keep: pd.DataFrame) -> list:
    """The agreement table and the share of pairs each model keeps, each under its heading."""
    return [
        Markdown("**Agreement of keep/drop decisions (%, mean ± sd over seed pairs)**"),
        agreement_table(agreement),
        Markdown("**Share of pairs kept (%; on held-out pairs this is the test accuracy)**"),
        _mean_sd_percent(keep, ("method", "data"), "keep"),
    ]


def decisions_text(agreement: pd.DataFrame, keep: pd.DataFrame) -> Markdown:
    """How often DenseRM and SparseRM decide alike on held-out and generated pairs, how often each
    agrees with itself across seeds, and how many generated pairs each keeps."""
    agree = agreement.groupby(["comparison", "data"]).agreement.mean()
    kept = keep.groupby(["method", "data"]).keep.mean()
    cross = "DenseRM vs SparseRM"
    return Markdown(
        f"DenseRM and SparseRM make the same decision on {100 * agree[cross, 'held-out pairs']:.1f}% of the held-out "
        f"pairs and on {100 * agree[cross, 'generated pairs']:.1f}% of the generated pairs. "
        f"Across seeds, DenseRM agrees "
        f"with itself on {100 * agree['DenseRM vs DenseRM (other seed)', 'generated pairs']:.1f}% "
        f"of the generated pairs "
        f"and SparseRM on {100 * agree['SparseRM vs SparseRM (other seed)', 'generated pairs']:.1f}%. They keep "
        f"{100 * kept['DenseRM', 'generated pairs']:.1f}% (DenseRM) and "
        f"{100 * kept['SparseRM', 'generated pairs']:.1f}% (SparseRM) of the generated pairs."
    )


def denserm_results(
    *,
    table4: pd.DataFrame,
    paired: pd.DataFrame,
    similarity: pd.DataFrame,
    agreement: pd.DataFrame,
    spread: str,
    dataset: str,
) -> dict[str, dict]:
    """Chapter 6's tables for the book's results page, each with its caption."""
    from srlib.results import frame_table

    return {
        "table4_accuracy": frame_table(
            table4,
            "Table 4 (accuracy half): RM test pair accuracy (%), DenseRM vs "
            f"SparseRM, ours (mean ± sd over seeds, {spread}) beside the paper's "
            "(Gemma-2-9B-it)",
            index=True,
        ),
        "table4_paired": frame_table(
            paired.drop(columns="verdict").round(1),
            "Table 4 (accuracy), paired comparison: A − B on the same test pairs with a 95% paired-bootstrap interval",
        ),
        "figure5": frame_table(
            similarity,
            "Figure 5: cosine similarity of held-out and policy-generated answers to the "
            f"training answers ({label(dataset)}), dense vs projection space",
            index=True,
        ),
        "filter_agreement": frame_table(
            agreement_table(agreement),
            "Agreement (%) of keep/drop decisions of DenseRM "
            "and SparseRM on held-out and generated pairs (mean ± sd over seed pairs)",
            index=True,
        ),
    }


# --------------------------------------------------------------------------- chapter 8: SparseRM against the baselines


def comparison_plan_text(plan) -> str:
    """What chapter 8 compares, in three lines: SparseRM/DenseRM's data sets and seeds, the
    baselines' settings, the validation rule and the data-efficiency curve's sizes."""
    return (
        f"SparseRM/DenseRM: {', '.join(plan.datasets)}, seeds {plan.seeds}\n"
        f"baselines {', '.join(plan.baselines)} on {', '.join(plan.baseline_datasets) or 'no data set'}: "
        f"{plan.train_pairs} training pairs, {plan.epochs} epoch(s), lr {plan.learning_rate}, "
        f"batch {plan.batch_size}, seeds {plan.baseline_seeds}; all models compared on {plan.test_pairs} test pairs\n"
        f"validation labels: {plan.validation} ({plan.fair}); data-efficiency curve on {plan.efficiency_dataset}: "
        f"sizes {plan.efficiency_sizes} and the whole split, StandardRM at {plan.efficiency_lora_sizes or 'none'}"
    )


def comparison_sizes(data, plan) -> pd.DataFrame:
    """Pairs per split and data set, with the baselines' training pairs, the validation pairs each
    model reads and the common test pairs."""
    return pd.DataFrame(
        {
            label(n): {
                **s.sizes(),
                "baselines' train": data.baseline_train_size(n),
                "validation read by each model": len(s.val) if plan.use_val else 0,
                "common test": len(data.common_test[n]),
            }
            for n, s in data.states.items()
        }
    ).rename_axis("pairs")


def extraction_table(extraction: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """The timed extraction per data set (texts, seconds, rate, memory growth)."""
    return pd.DataFrame(extraction).T.rename(index=DATASET_LABELS).rename_axis("timed extraction (cache off)").round(2)


#: How chapter 8's comparison table formats its columns.
COMPARISON_FORMATS = {
    "trainable parameters": "{:,}",
    "% of backbone": "{:.3f}",
    "train time (s)": "{:.2f}",
    "train time with extraction (s)": "{:.1f}",
    "RSS increase (MB)": "{:.0f}",
    "peak RSS (MB)": "{:.0f}",
    "scoring pairs/s": "{:.1f}",
    "ties (%)": "{:.1f}",
}


def fewer(ratio: float) -> str:
    """A time ratio in words: "120× less", "3.2× less" or "1.5× more"."""
    return f"{ratio:,.0f}× less" if ratio >= 10 else f"{ratio:.1f}× less" if ratio >= 1 else f"{1 / ratio:.1f}× more"


def comparison_text(found: Sequence[Any], plan, shares: Mapping[str, float] | None) -> Markdown:
    """Chapter 8's findings from its run: per data set the fair verdict and the one with more
    pairs (`comparison_verdicts`), what early stopping adds, the training times, the parameter
    shares beside the paper's 1% bound, and the data sets the baselines did not run on."""
    lines = []
    for v in found:
        name = label(v.dataset)
        for fair, more in v.against:
            lines.append(
                f"- {name}: **{fair.verdict()}**; with more labelled pairs than the baselines had: {more.verdict()}."
            )
        lines.append(
            f"- {name}, SparseRM on the baselines' pairs with and without early stopping on the validation "
            f"split (labelled data the fair rows {'give every model' if plan.use_val else 'give no model'}): "
            f"{v.early_stopping.verdict()}."
        )
        if v.seconds:
            s = v.seconds
            lines.append(
                f"- {name}, training time on the same pairs: StandardRM {s['standard']:.0f} s, SparseRM "
                f"{s['sparse']:.2f} s from cached states (**{fewer(s['standard'] / s['sparse'])}**) and "
                f"{s['sparse_with_extraction']:.1f} s counting the extraction of the states it reads "
                f"(**{fewer(s['standard'] / s['sparse_with_extraction'])}**). The baselines were timed when "
                "they were trained, SparseRM now; on a shared machine the load differs between the two, so "
                "read the ratios as orders of magnitude."
            )
    if shares:
        lines.append(
            f"- Parameters: SparseRM's head is {shares['head']:,} numbers ({shares['head_share']:.3f}% of the "
            f"backbone); the largest LoRA baseline trains {shares['lora']:,} ({shares['lora_share']:.3f}%), "
            f"{shares['lora'] / shares['head']:.1f}× as many"
            + (". Both are below the paper's 1% bound." if max(shares["head_share"], shares["lora_share"]) < 1 else ".")
        )
    missing = [label(d) for d in plan.datasets if d not in plan.baseline_datasets]
    if missing:
        lines.append(
            f"- The baselines did not run on {', '.join(missing)} with these parameters (their cost on a CPU); "
            "add them to `BASELINE_DATASETS` to complete the figure."
        )
    return Markdown("\n".join(lines))


def efficiency_text(comparisons: Sequence[Any]) -> Markdown:
    """The data-efficiency curve's verdicts, one bullet each."""
    return Markdown(
        "\n".join(f"- {c.verdict()}" for c in comparisons)
        or "StandardRM is not in `BASELINES`: the curve has SparseRM and DenseRM only."
    )


def comparison_results(
    *, table: pd.DataFrame, verdicts: pd.DataFrame, efficiency: pd.DataFrame, plan, model_id: str
) -> dict[str, dict]:
    """Chapter 8's tables for the book's results page, each with its caption."""
    from srlib.results import frame_table

    rounding = {
        "% of backbone": 3,
        "train time (s)": 2,
        "train time with extraction (s)": 1,
        "RSS increase (MB)": 0,
        "peak RSS (MB)": 0,
        "scoring pairs/s": 2,
    }
    return {
        "figure3": frame_table(
            table.round(rounding),
            f"Figure 3 (ours): reward models on {model_name(model_id)}: test "
            f"pair accuracy (%) on {plan.test_pairs} common test pairs (mean ± sd over seeds), "
            "trainable parameters, training time, memory and scoring speed",
        ),
        "verdicts": frame_table(
            verdicts.round(2),
            "SparseRM against each baseline on the common test pairs (fair: the "
            f"same labelled pairs; {plan.fair}): accuracies (%, ties ½), difference and its 95% "
            "paired-bootstrap interval over the test pairs, seeds averaged per pair",
        ),
        "data_efficiency": frame_table(
            efficiency.round(2),
            "Test accuracy (%, ties ½) against training pairs on "
            f"{label(plan.efficiency_dataset)}: mean and 95% Student-t interval over seeds "
            "(a seed draws the subset and initialises the model)",
        ),
    }
