"""The book's figures (seaborn / matplotlib): one function per kind of figure, each returning
the matplotlib Figure with a title, labelled axes and units.

Comparisons always show the spread over seeds (error bars = one standard deviation), so a
reader can tell a real difference from noise.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import seaborn as sns

sns.set_theme(context="notebook", style="whitegrid")

#: The figure width that reads well in the book's column.
WIDTH = 8.0


def accuracy_bars(trials, *, title: str, x: str = "dataset", hue: str = "variant",
                  value: str = "test_accuracy", paper: Mapping[str, Mapping[str, float]] | None = None,
                  x_labels: Mapping[str, str] | None = None, ylim: tuple[float, float] | None = None):
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
                ax.plot([center - width / 2.5, center + width / 2.5], [reported] * 2, color="black", lw=2,
                        label="paper (Gemma-2-9B-it)" if first else None)
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
    ax.scatter(mu_w[list(indices_w)], mu_l[list(indices_w)], s=14, color="tab:green",
               label="top-K by ∇ (fires more on chosen)")
    ax.scatter(mu_w[list(indices_l)], mu_l[list(indices_l)], s=14, color="tab:red",
               label="top-K by Δ (fires more on rejected)")
    top = float(max(mu_w.max(), mu_l.max(), 1e-3)) * 1.05
    ax.plot([0, top], [0, top], color="black", lw=0.8, ls="--")
    ax.set(title=title, xlabel="μ_w: share of chosen answers where the latent fires",
           ylabel="μ_l: share of rejected answers where the latent fires", xlim=(0, top), ylim=(0, top))
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig


def histogram(values, *, title: str, xlabel: str, bins: int = 50, log: bool = False, hue=None,
              stat: str = "count"):
    """A labelled histogram (optionally several groups via `hue`, a list of group names)."""
    import pandas as pd

    data = pd.DataFrame({"value": list(values)})
    if hue is not None:
        data["group"] = list(hue)
    fig, ax = plt.subplots(figsize=(WIDTH, 3.8))
    sns.histplot(data=data, x="value", hue="group" if hue is not None else None, bins=bins,
                 stat=stat, common_norm=False, element="step", ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel=stat)
    if log:
        ax.set_yscale("log")
    fig.tight_layout()
    return fig


def sweep_lines(trials, *, x: str, hue: str, title: str, xlabel: str, value: str = "test_accuracy",
                log_x: bool = False):
    """Mean accuracy (%) against a swept setting, one line per `hue`, a band of ± one sd over seeds."""
    data = trials.assign(**{value: trials[value] * 100})
    fig, ax = plt.subplots(figsize=(WIDTH, 4.2))
    sns.lineplot(data=data, x=x, y=value, hue=hue, errorbar="sd", marker="o", ax=ax,
                 palette="viridis" if data[hue].dtype.kind in "if" else None)
    if log_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(data[x].unique()), [str(v) for v in sorted(data[x].unique())])
    ax.set(title=title, xlabel=xlabel, ylabel="test pair accuracy (%)")
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
    counts = pd.concat([pd.DataFrame({"L0": np.asarray(v, dtype=float), "states": g})
                        for g, v in active_per_row.items()], ignore_index=True)
    sns.histplot(data=counts, x="L0", hue="states", discrete=True, stat="percent", common_norm=False,
                 element="step", ax=left)
    left.set(title="active latents per state", xlabel="latents that fire (> 0) on a state (L0)",
             ylabel="share of states (%)", xlim=(0, counts["L0"].max() * 1.15 + 1))
    rows = []
    for group, values in frequency.items():
        values = np.asarray(values, dtype=float)
        alive = values[values > 0]
        label = f"{group} ({int((values == 0).sum()):,} of {values.size:,} never fire)"
        rows.append(pd.DataFrame({"log10 frequency": np.log10(alive), "states": label}))
    sns.histplot(data=pd.concat(rows, ignore_index=True), x="log10 frequency", hue="states", bins=40,
                 element="step", ax=right)
    right.set(title="how often each latent fires", xlabel="log10 of the share of states where it fires",
              ylabel="latents")
    for ax in (left, right):
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", fontsize="small", title=None)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
