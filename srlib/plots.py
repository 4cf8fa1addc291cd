"""The book's figures (seaborn / matplotlib): one function per kind of figure, each returning
the matplotlib Figure with a title, labelled axes and units.

Comparisons always show the spread over seeds (error bars = one standard deviation), so a
reader can tell a real difference from noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import seaborn as sns

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

sns.set_theme(context="notebook", style="whitegrid")

#: The figure width that reads well in the book's column.
WIDTH = 8.0


def accuracy_bars(
    trials,
    *,
    title: str,
    x: str = "dataset",
    hue: str = "variant",
    value: str = "test_accuracy",
    paper: Mapping[str, Mapping[str, float]] | None = None,
    x_labels: Mapping[str, str] | None = None,
    ylim: tuple[float, float] | None = None,
):
    """Grouped bars of mean test accuracy (%) with one-standard-deviation error bars over seeds.

    `trials`: one row per (x, hue, seed) as returned by `srlib.experiments.run_trials`.
    `paper`: optional {hue: {x: accuracy %}} drawn as black ticks labelled as the paper's.
    """
    data = trials.assign(**{value: trials[value] * 100})
    if x_labels:
        data[x] = data[x].map(lambda v: x_labels.get(v, v))
    fig, ax = plt.subplots(figsize=(WIDTH, 4.2))
    sns.barplot(data=data, x=x, y=value, hue=hue, errorbar="sd", capsize=0.1, ax=ax)
    if paper:
        hues = list(dict.fromkeys(data[hue]))
        xs = list(dict.fromkeys(data[x]))
        width = 0.8 / max(len(hues), 1)
        first = True
        for i, h in enumerate(hues):
            for j, key in enumerate(xs):
                raw = next((k for k, v in (x_labels or {}).items() if v == key), key)
                reported = paper.get(h, {}).get(raw)
                if reported is None:
                    continue
                center = j - 0.4 + width * (i + 0.5)
                ax.plot(
                    [center - width / 2.5, center + width / 2.5],
                    [reported] * 2,
                    color="black",
                    lw=2,
                    label="paper (Gemma-2-9B-it)" if first else None,
                )
                first = False
    ax.set(title=title, xlabel="", ylabel="test pair accuracy (%)")
    if ylim:
        ax.set_ylim(*ylim)
    ax.axhline(50, color="grey", ls=":", lw=1)
    ax.legend(loc="lower right", fontsize="small", frameon=True)
    fig.tight_layout()
    return fig


def frequency_scatter(mu_w, mu_l, indices_w: Sequence[int], indices_l: Sequence[int], *, title: str):
    """Eq. 7-8: each latent's activation frequency on chosen (x) vs rejected (y) answers, with
    the selected top-K latents of each side highlighted."""
    mu_w, mu_l = [v.detach().cpu().numpy() for v in (mu_w, mu_l)]
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.scatter(mu_w, mu_l, s=6, color="lightgrey", label="all latents")
    ax.scatter(
        mu_w[list(indices_w)], mu_l[list(indices_w)], s=14, color="tab:green", label="top-K by ∇ (fires more on chosen)"
    )
    ax.scatter(
        mu_w[list(indices_l)], mu_l[list(indices_l)], s=14, color="tab:red", label="top-K by Δ (fires more on rejected)"
    )
    top = float(max(mu_w.max(), mu_l.max(), 1e-3)) * 1.05
    ax.plot([0, top], [0, top], color="black", lw=0.8, ls="--")
    ax.set(
        title=title,
        xlabel="μ_w: share of chosen answers where the latent fires",
        ylabel="μ_l: share of rejected answers where the latent fires",
        xlim=(0, top),
        ylim=(0, top),
    )
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig


def histogram(values, *, title: str, xlabel: str, bins: int = 50, log: bool = False, hue=None, stat: str = "count"):
    """A labelled histogram (optionally several groups via `hue`, a list of group names)."""
    import pandas as pd

    data = pd.DataFrame({"value": list(values)})
    if hue is not None:
        data["group"] = list(hue)
    fig, ax = plt.subplots(figsize=(WIDTH, 3.8))
    sns.histplot(
        data=data,
        x="value",
        hue="group" if hue is not None else None,
        bins=bins,
        stat=stat,
        common_norm=False,
        element="step",
        ax=ax,
    )
    ax.set(title=title, xlabel=xlabel, ylabel=stat)
    if log:
        ax.set_yscale("log")
    fig.tight_layout()
    return fig


def sweep_lines(
    trials, *, x: str, hue: str, title: str, xlabel: str, value: str = "test_accuracy", log_x: bool = False
):
    """Mean accuracy (%) against a swept setting, one line per `hue`, a band of ± one sd over seeds."""
    data = trials.assign(**{value: trials[value] * 100})
    fig, ax = plt.subplots(figsize=(WIDTH, 4.2))
    sns.lineplot(
        data=data,
        x=x,
        y=value,
        hue=hue,
        errorbar="sd",
        marker="o",
        ax=ax,
        palette="viridis" if data[hue].dtype.kind in "if" else None,
    )
    if log_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(data[x].unique()), [str(v) for v in sorted(data[x].unique())])
    split = "validation" if value.startswith("val") else "test"
    ax.set(title=title, xlabel=xlabel, ylabel=f"{split} pair accuracy (%)")
    fig.tight_layout()
    return fig


def training_curves(history, *, title: str):
    """Training loss and validation pair accuracy per epoch of one `fit_head` run."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(WIDTH, 3.4))
    epochs = range(1, len(history.train_loss) + 1)
    left.plot(epochs, history.train_loss, marker=".")
    left.set(title="training loss", xlabel="epoch", ylabel="loss")
    if history.val_accuracy:
        right.plot(epochs, [a * 100 for a in history.val_accuracy], marker=".", color="tab:orange")
        right.axvline(history.best_epoch, color="grey", ls="--", lw=1, label="kept (best) epoch")
        right.legend(fontsize="small")
    right.set(title="validation pair accuracy", xlabel="epoch", ylabel="accuracy (%)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def similarity_histograms(frame, *, title: str, aggregate: str = "mean", centered: bool = False, bins: int = 40):
    """Figure 5 as distributions: one panel per space, one histogram per group of samples, of
    each sample's cosine similarity to the training data (`srlib.shift.similarity_frame`),
    with each group's mean as a dashed line."""
    data = frame[(frame["aggregate"] == aggregate) & (frame["centered"] == centered)]
    spaces = list(dict.fromkeys(data["space"]))
    groups = list(dict.fromkeys(data["group"]))
    palette = dict(zip(groups, sns.color_palette(n_colors=len(groups)), strict=True))
    fig, axes = plt.subplots(1, len(spaces), figsize=(WIDTH, 4.1), squeeze=False)
    how = "mean over training samples" if aggregate == "mean" else "nearest training sample"
    for ax, space in zip(axes[0], spaces, strict=True):
        part = data[data["space"] == space]
        sns.histplot(
            data=part,
            x="similarity",
            hue="group",
            hue_order=groups,
            palette=palette,
            bins=bins,
            stat="density",
            common_norm=False,
            element="step",
            ax=ax,
            legend=ax is axes[0][-1],
        )
        for group in groups:
            ax.axvline(part.loc[part["group"] == group, "similarity"].mean(), color=palette[group], ls="--", lw=1.2)
        ax.set(
            title=f"{space} space",
            xlabel=f"cosine similarity to training data\n({how}{', centered' if centered else ''})",
            ylabel="density",
        )
    fig.suptitle(title)
    legend = axes[0][-1].get_legend()
    if legend is not None:  # one legend for both panels, below them
        handles, names = legend.legend_handles, [t.get_text() for t in legend.get_texts()]
        legend.remove()
        fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def tsne_panels(
    embeddings: Mapping[str, np.ndarray],
    *,
    labels: Sequence[str],
    sources: Sequence[str],
    title: str,
    highlight: str = "generated",
):
    """One t-SNE panel per space (`srlib.shift.tsne_embedding` output, [n, 2] each), points
    coloured by `labels` (e.g. chosen / rejected) and shaped by `sources` (training / generated);
    the points of the source `highlight` are drawn larger."""
    import pandas as pd

    fig, axes = plt.subplots(1, len(embeddings), figsize=(WIDTH * 1.25, 4.8), squeeze=False)
    for ax, (space, points) in zip(axes[0], embeddings.items(), strict=True):
        data = pd.DataFrame(
            {"t-SNE 1": points[:, 0], "t-SNE 2": points[:, 1], "answer": list(labels), "data": list(sources)}
        )
        sns.scatterplot(
            data=data,
            x="t-SNE 1",
            y="t-SNE 2",
            hue="answer",
            style="data",
            size="data",
            sizes={source: 36 if source == highlight else 10 for source in set(sources)},
            alpha=0.7,
            ax=ax,
            legend=ax is axes[0][-1],
        )
        ax.set(title=f"{space} space", xlabel="t-SNE 1 (no unit)", ylabel="t-SNE 2 (no unit)")
    if axes[0][-1].get_legend() is not None:
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def gamma_sweep(sweep, *, title: str):
    """The margin-γ sweep: test accuracy (%) against γ (left) and the scale of the scores
    relative to the γ = 1 head of the same seed (right, log-log, with the line y = γ that a pure
    rescaling would follow). `sweep`: one row per (gamma, seed) with columns gamma,
    test_accuracy, scale_vs_gamma1. Error bars: ±1 sd over seeds."""
    data = sweep.assign(test_accuracy=sweep["test_accuracy"] * 100)
    fig, (left, right) = plt.subplots(1, 2, figsize=(WIDTH, 3.6))
    sns.lineplot(data=data, x="gamma", y="test_accuracy", errorbar="sd", marker="o", err_style="bars", ax=left)
    left.set(title="test pair accuracy", xlabel="margin γ (log scale)", ylabel="accuracy (%)")
    sns.lineplot(
        data=data,
        x="gamma",
        y="scale_vs_gamma1",
        errorbar="sd",
        marker="o",
        err_style="bars",
        ax=right,
        label="measured: sd(scores) / sd at γ = 1",
    )
    gammas = sorted(data["gamma"].unique())
    right.plot(gammas, gammas, color="grey", ls="--", lw=1, label="pure rescaling: y = γ")
    right.set_yscale("log")
    right.set(title="score scale vs the γ = 1 head", xlabel="margin γ (log scale)", ylabel="scale ratio (log scale)")
    right.legend(loc="upper left", fontsize="x-small")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(gammas, [f"{g:g}" for g in gammas])
        ax.minorticks_off()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def sparsity_panels(active_per_row: Mapping[str, object], frequency: Mapping[str, object], *, title: str):
    """Chapter 1's two views of an SAE code, one colour per group of hidden states: how many
    latents fire per state (L0, left) and on what share of states each latent fires (right,
    log10 axis; latents that never fire cannot be drawn there and are counted in the legend).

    `active_per_row`: {group: [n] counts}; `frequency`: {group: [M] shares}, e.g. the fields
    of `srlib.experiments.latent_statistics` for every token and for the last tokens.
    """
    import numpy as np
    import pandas as pd

    fig, (left, right) = plt.subplots(1, 2, figsize=(WIDTH * 1.2, 3.8))
    counts = pd.concat(
        [pd.DataFrame({"L0": np.asarray(v, dtype=float), "states": g}) for g, v in active_per_row.items()],
        ignore_index=True,
    )
    sns.histplot(
        data=counts, x="L0", hue="states", discrete=True, stat="percent", common_norm=False, element="step", ax=left
    )
    left.set(
        title="active latents per state",
        xlabel="latents that fire (> 0) on a state (L0)",
        ylabel="share of states (%)",
        xlim=(0, counts["L0"].max() * 1.15 + 1),
    )
    rows = []
    for group, values in frequency.items():
        values = np.asarray(values, dtype=float)
        alive = values[values > 0]
        label = f"{group} ({int((values == 0).sum()):,} of {values.size:,} never fire)"
        rows.append(pd.DataFrame({"log10 frequency": np.log10(alive), "states": label}))
    sns.histplot(
        data=pd.concat(rows, ignore_index=True), x="log10 frequency", hue="states", bins=40, element="step", ax=right
    )
    right.set(
        title="how often each latent fires", xlabel="log10 of the share of states where it fires", ylabel="latents"
    )
    for ax in (left, right):
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", fontsize="small", title=None)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def accuracy_vs_parameters(
    trials,
    *,
    title: str,
    backbone_parameters: int | None = None,
    value: str = "test_accuracy",
    dataset_labels: Mapping[str, str] | None = None,
):
    """Figure 3: mean test accuracy (%) against trainable parameters (log x axis), one panel per
    data set, error bars ± one sd over seeds (none for a single run).

    `trials`: one row per (dataset, variant, seed) with `value` (a fraction) and
    `trainable_parameters`. Models with the same parameter count are spread slightly sideways
    so that none hides another. Methods with no trainable parameter (a zero-shot judge, the
    log-prob floor) cannot sit on a log axis: they are dashed horizontal lines. With
    `backbone_parameters`, a dotted vertical line marks 1% of the backbone (the paper's bound)
    and the top axis reads the share of the backbone (%).
    """
    import math

    from matplotlib.ticker import FuncFormatter, NullFormatter

    from srlib.experiments import DATASET_LABELS

    names = DATASET_LABELS if dataset_labels is None else dataset_labels
    data = trials.assign(accuracy=trials[value] * 100)
    datasets = list(dict.fromkeys(data["dataset"]))
    variants = list(dict.fromkeys(data["variant"]))
    palette = dict(zip(variants, sns.color_palette("tab10", n_colors=max(len(variants), 3)), strict=False))
    markers = dict(zip(variants, "osD^vP*Xph" * 3, strict=False))
    trained = data.loc[data["trainable_parameters"] > 0, "trainable_parameters"]
    bound = backbone_parameters / 100 if backbone_parameters else None
    known = [*trained.tolist(), *([bound] if bound else [])] or [1e3, 1e6]
    low, high = min(known) / 3, max(known) * 3
    fig, axes = plt.subplots(
        1, len(datasets), figsize=(max(WIDTH, 3.6 * len(datasets)), 4.6), squeeze=False, sharey=True
    )
    handles: dict[str, object] = {}
    for ax, dataset in zip(axes[0], datasets, strict=True):
        stats = (
            data[data["dataset"] == dataset]
            .groupby("variant", sort=False)
            .agg(mean=("accuracy", "mean"), sd=("accuracy", "std"), params=("trainable_parameters", "first"))
        )
        seen: dict[int, int] = {}
        for variant, row in stats.iterrows():
            if row["params"] > 0:
                shift = seen.get(row["params"], 0)
                seen[row["params"]] = shift + 1
                sd = 0.0 if math.isnan(row["sd"]) else row["sd"]
                handle = ax.errorbar(
                    row["params"] * 1.12**shift,
                    row["mean"],
                    yerr=sd,
                    fmt=markers[variant],
                    ms=8,
                    capsize=4,
                    color=palette[variant],
                    linestyle="none",
                )
                handles.setdefault(variant, handle)
            else:
                handle = ax.axhline(row["mean"], color=palette[variant], ls="--", lw=1.5)
                handles.setdefault(f"{variant} (0 trainable)", handle)
        ax.axhline(50, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlim(low, high)
        if bound:
            handles.setdefault(
                "1% of the backbone (the paper's bound)", ax.axvline(bound, color="black", ls=":", lw=1.2)
            )
            top = ax.secondary_xaxis(
                "top", functions=(lambda x: 100 * x / backbone_parameters, lambda s: s * backbone_parameters / 100)
            )
            top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
            top.xaxis.set_minor_formatter(NullFormatter())
            top.set_xlabel("share of the backbone", fontsize="small")
        ax.set(title=names.get(dataset, dataset), xlabel="trainable parameters (log scale)")
    axes[0][0].set_ylabel("test pair accuracy (%)")
    fig.suptitle(title)
    rows = math.ceil(len(handles) / 3)
    fig.tight_layout(rect=(0, 0.04 + 0.055 * rows, 1, 1))
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize="small", frameon=True)
    return fig


def legend_below(fig, *, ncol: int = 4):
    """Move the legend of a one-panel figure below the axes, in one row, so it covers no bars."""
    ax = fig.axes[0]
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper center", bbox_to_anchor=(0.5, -0.1), ncol=ncol, fontsize="small", frameon=False)
    fig.tight_layout()
    return fig


def data_efficiency(summary, *, title: str, dataset_labels: Mapping[str, str] | None = None):
    """Test accuracy (%) against the number of training pairs (log x axis), one line per
    method and one panel per data set, the band the interval over seeds.

    `summary`: `srlib.data_efficiency.efficiency_summary` rows (dataset, method,
    n_train_pairs, mean, low, high); a point with no interval (one seed) is drawn without a band.
    """
    from srlib.experiments import DATASET_LABELS

    names = DATASET_LABELS if dataset_labels is None else dataset_labels
    datasets = list(dict.fromkeys(summary["dataset"]))
    methods = list(dict.fromkeys(summary["method"]))
    palette = dict(zip(methods, sns.color_palette("tab10", n_colors=max(len(methods), 3)), strict=False))
    fig, axes = plt.subplots(
        1, len(datasets), figsize=(max(WIDTH, 4.5 * len(datasets)), 4.2), squeeze=False, sharey=True
    )
    for ax, dataset in zip(axes[0], datasets, strict=True):
        part = summary[summary["dataset"] == dataset]
        for method, rows in part.groupby("method", sort=False):
            rows = rows.sort_values("n_train_pairs")
            ax.plot(rows["n_train_pairs"], rows["mean"], "o-", color=palette[method], label=method)
            ax.fill_between(
                rows["n_train_pairs"], rows["low"], rows["high"], color=palette[method], alpha=0.2, linewidth=0
            )
        sizes = sorted(part["n_train_pairs"].unique())
        ax.axhline(50, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
        ax.minorticks_off()
        ax.set(title=names.get(dataset, dataset), xlabel="training pairs (log scale)")
    axes[0][0].set_ylabel("test pair accuracy (%)")
    axes[0][0].legend(loc="best", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def contribution_bars(parts: Mapping[str, pd.DataFrame], *, title: str):
    """Chapter 9's reading of one pair: a panel per answer (e.g. chosen, rejected), a horizontal
    bar per input with its contribution to the score (`srlib.explain.contribution_frame`: the
    largest first, then the sum of all others), labelled with the latent, its side and what it
    fires on; blue bars come from the chosen-side list, orange from the rejected-side list."""
    colours = {"chosen": sns.color_palette()[0], "rejected": sns.color_palette()[1], "": "grey"}
    rows = max(len(frame) for frame in parts.values())
    fig, axes = plt.subplots(1, len(parts), figsize=(WIDTH * 1.5, 0.35 * rows + 1.6), squeeze=False)
    for ax, (name, frame) in zip(axes[0], parts.items(), strict=True):
        labels = [
            (f"{label[:40]} · " if label else "latent ") + f"{latent} ({side[0]})" if latent >= 0 else label
            for latent, side, label in zip(frame["latent"], frame["side"], frame["label"], strict=True)
        ]
        positions = list(range(len(frame)))[::-1]
        ax.barh(positions, frame["contribution"], color=[colours[s] for s in frame["side"]])
        ax.set_yticks(positions, labels, fontsize="x-small")
        ax.axvline(0, color="black", lw=0.8)
        ax.set(title=name, xlabel="contribution to the score (baseline: the training mean)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def deletion_curves(frames: Mapping[str, pd.DataFrame], *, title: str):
    """Chapter 9's faithfulness test, one panel per data set: the mean drop of the margin
    s_chosen − s_rejected after deleting each pair's top-m attributed directions and m random
    ones (`srlib.explain.DeletionCurve.frame`), against m (log x), the band its 95% interval over pairs."""
    fig, axes = plt.subplots(1, len(frames), figsize=(max(WIDTH, 4.2 * len(frames)), 3.8), squeeze=False)
    for ax, (name, frame) in zip(axes[0], frames.items(), strict=True):
        for deleted, rows in frame.groupby("deleted", sort=False):
            (line,) = ax.plot(rows["m"], rows["margin drop"], "o-", label=deleted)
            ax.fill_between(rows["m"], rows["low"], rows["high"], color=line.get_color(), alpha=0.2, linewidth=0)
        ms = sorted(frame["m"].unique())
        ax.set_xscale("log")
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.minorticks_off()
        ax.axhline(0, color="grey", ls=":", lw=1)
        ax.set(title=name, xlabel="directions deleted, m (log scale)", ylabel="margin drop (score units)")
    axes[0][0].legend(loc="best", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def separation_histogram(nabla, null, fires, *, title: str):
    """Eq. 9's scores ∇ of the latents that fire (`fires`, a boolean mask) beside the scores they
    get with chosen and rejected swapped in half the pairs (`null`), on a log count axis that
    still shows single latents."""
    import torch

    n = int(fires.sum())
    fig = histogram(
        torch.cat([nabla[fires], null[fires]]).tolist(),
        bins=60,
        log=True,
        title=title,
        hue=["real labels"] * n + ["chosen/rejected swapped in half the pairs"] * n,
        xlabel="∇ = μ_w − μ_l (share of answers)",
    )
    fig.axes[0].set_ylim(bottom=0.5)
    return fig


def k_probe(
    probe, *, dense_mean: float, ratio_k: float, hidden_size: int, title: str, value: str = "test_accuracy_half_ties"
):
    """Accuracy against K per head input (`sweep_lines`), with DenseRM's mean accuracy (%) as a
    dashed ceiling and a dotted line at the K whose 2K/d equals the paper's (`ratio_k`)."""
    fig = sweep_lines(
        probe, x="K", hue="variant", log_x=True, value=value, title=title, xlabel="K (latents per side; 2K head inputs)"
    )
    ax = fig.axes[0]
    ax.axhline(dense_mean, color="black", ls="--", lw=1, label=f"DenseRM (all {hidden_size} dims)")
    ax.axvline(ratio_k, color="grey", ls=":", lw=1, label="2K/d as in the paper (7%)")
    ax.legend(fontsize="small")
    return fig


def layer_k_grid(grid, reading, *, dataset_label: str, n_seeds: int):
    """Figure 4 (ours): validation accuracy against K, one line per layer, at the reading (read
    position and input scaling) that stage 1 of the validation study chose."""
    return sweep_lines(
        grid,
        x="k",
        hue="layer",
        value="val_accuracy",
        log_x=True,
        xlabel="K, latents selected per side (log scale)",
        title=f"{dataset_label}: SparseRM validation accuracy by layer and K "
        f"({reading['position']!r} token, {'standardised' if reading['standardize'] else 'raw'} "
        f"inputs; mean ± sd over {n_seeds} seeds)",
    )


def gap_vs_quality(gaps, quality, *, title: str, x: str = "FVE read", dataset_labels: Mapping[str, str] | None = None):
    """Chapter 11: top-K minus random directions (points, paired 95% interval as error bars)
    against each SAE's quality `x` on the same data set, one panel per data set, one line per K.

    `gaps`: `srlib.sae_study.gap_table` (variant, dataset, K, "A − B (points)", CI low/high);
    `quality`: `srlib.sae_study.quality_table` (variant, dataset, `x`).
    """
    data = gaps.merge(quality[["variant", "dataset", x]], on=["variant", "dataset"])
    datasets = list(dict.fromkeys(data["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(WIDTH, 3.6), sharey=True, squeeze=False)
    colours = sns.color_palette("viridis", n_colors=data["K"].nunique())
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for colour, (k, rows) in zip(colours, data[data["dataset"] == dataset].groupby("K"), strict=False):
            rows = rows.sort_values(x)
            gap = rows["A − B (points)"]
            ax.errorbar(
                rows[x],
                gap,
                yerr=[gap - rows["CI low"], rows["CI high"] - gap],
                color=colour,
                marker="o",
                capsize=3,
                label=f"K = {k}",
            )
        ax.axhline(0, color="grey", ls=":", lw=1)
        ax.set(title=(dataset_labels or {}).get(dataset, dataset), xlabel=f"SAE quality: {x}")
    axes[0][0].set_ylabel("top-K − random (points)")
    axes[0][-1].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def agreement_heatmap(round1_filter: Mapping, *, title: str):
    """Chapter 7: the share (%) of round-1 tuples on which two filters make the same keep/drop
    decision, one cell per pair of reward models (`round1_filter["agreement"]`, shares 0-1)."""
    import pandas as pd

    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    sns.heatmap(
        pd.DataFrame(round1_filter["agreement"]) * 100,
        annot=True,
        fmt=".0f",
        vmin=0,
        vmax=100,
        cmap="viridis",
        square=True,
        cbar_kws={"label": "same decision (%)"},
        ax=ax,
    )
    ax.set(title=title, xlabel="reward model", ylabel="reward model")
    fig.tight_layout()
    return fig


def score_differences(frame, *, safety: bool, a: str = "SparseRM", b: str = "DenseRM"):
    """Chapter 7: each round-1 tuple's score difference s_w − s_l under reward models `a` (x) and
    `b` (y), from `srlib.chapter.round_one`'s frame, with the zero lines that split kept from
    dropped: the off-diagonal quadrants are the tuples the two filters disagree on. On a safety
    track the tuples whose y_w refuses and y_l does not are coloured apart."""
    hue = frame.contrast.map({True: "y_w refuses, y_l does not", False: "other"}) if safety else "generated tuple"
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    sns.scatterplot(data=frame.assign(tuple=hue), x=f"{a} s_w - s_l", y=f"{b} s_w - s_l", hue="tuple", ax=ax)
    ax.axhline(0, color="grey", lw=1)
    ax.axvline(0, color="grey", lw=1)
    ax.set(
        title="Round 1: score differences of the two reward models",
        xlabel=f"{a}  s_w − s_l (score units)",
        ylabel=f"{b}  s_w − s_l (score units)",
    )
    fig.tight_layout()
    return fig


def validation_rounds(result, *, metric_labels: Mapping[str, str], se_key, title: str):
    """Chapter 7: each reward model's policy after every round on the validation items (round 0
    is the base policy), ± one standard error, one panel per metric of the track; each model's
    best round (the one that goes to the test set) circled. `se_key(metric)` names a metric's
    standard error in the evaluation's results."""
    from srlib.alignment import TRACKS

    metrics = TRACKS[result.config.track].metrics
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics) + 1.5, 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for offset, (name, run) in enumerate(result.runs.items()):
            xs = [0] + [rec.round for rec in run.rounds]
            vals = [result.base_val] + [rec.val for rec in run.rounds]
            shift = 0.06 * (offset - (len(result.runs) - 1) / 2)
            line = ax.errorbar(
                [x + shift for x in xs],
                [100 * v[metric] for v in vals],
                yerr=[100 * v[se_key(metric)] for v in vals],
                marker="o",
                capsize=3,
                label=name,
            )
            best = run.rounds[run.best_round - 1].val[metric]
            ax.plot(run.best_round + shift, 100 * best, "o", ms=14, mfc="none", color=line[0].get_color())
        ax.set(
            title=f"validation {metric_labels[metric]}",
            xlabel="round (0 = base policy)",
            ylabel=f"{metric_labels[metric]} (%)",
            xticks=range(result.config.rounds + 1),
        )
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1), title="reward model")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
