"""Figure 3 as a table: the baselines and SparseRM/DenseRM side by side, accuracy and cost."""

from __future__ import annotations

from srlib.data import DATASET_LABELS
from srlib.evaluate import mean_sd


def comparison_table(trials, backbone_parameters: int):
    """Figure 3 as a table: one row per (dataset, variant) of `trials`, in their order.

    `trials`: rows of `baseline_trials` and of SparseRM/DenseRM fits with the same columns
    (dataset, variant, seed, test_accuracy, trainable_parameters, fit_seconds, peak_rss_mb,
    rss_increase_mb, pairs_per_second, n_train_pairs); optional columns
    `full_test_accuracy` (accuracy on the whole test split) and `fit_seconds_with_extraction`
    (training time counting the hidden states' extraction; where it is missing or NaN the
    method read the texts itself, so its `fit_seconds` already counts everything).
    Accuracies are "mean ± sd" in % over seeds and count a tie as wrong (`pair_accuracy`);
    where trials carry per-pair `outcomes` (1, 0, ½ for a tie) and any pair is tied, a
    "ties (%)" column gives the tied share beside them. Times, memory and speed are means.
    """
    import numpy as np
    import pandas as pd

    data = trials.copy()
    if "fit_seconds_with_extraction" not in data:
        data["fit_seconds_with_extraction"] = float("nan")
    data["fit_seconds_with_extraction"] = data["fit_seconds_with_extraction"].fillna(data["fit_seconds"])

    def label(values) -> str:
        values = values.dropna() * 100
        return mean_sd(values.mean(), values.std())

    rows = []
    for (dataset, variant), group in data.groupby(["dataset", "variant"], sort=False):
        params = int(group["trainable_parameters"].iloc[0])
        row = {
            "data set": DATASET_LABELS.get(dataset, dataset),
            "method": variant,
            "test accuracy (%)": label(group["test_accuracy"]),
        }
        if "full_test_accuracy" in group:
            row["full test split (%)"] = label(group["full_test_accuracy"])
        if "outcomes" in group:
            outcomes = [np.asarray(o) for o in group["outcomes"] if o is not None and not np.isscalar(o)]
            row["ties (%)"] = 100 * float(np.mean([np.mean(o == 0.5) for o in outcomes])) if outcomes else 0.0
        row.update(
            {
                "seeds": int(group["seed"].nunique()),
                "train pairs": int(group["n_train_pairs"].iloc[0]),
                "trainable parameters": params,
                "% of backbone": 100 * params / backbone_parameters,
                "train time (s)": group["fit_seconds"].mean(),
                "train time with extraction (s)": group["fit_seconds_with_extraction"].mean(),
                "RSS increase (MB)": group["rss_increase_mb"].mean(),
                "peak RSS (MB)": group["peak_rss_mb"].mean(),
                "scoring pairs/s": group["pairs_per_second"].mean(),
            }
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    if "ties (%)" in table and not (table["ties (%)"] > 0).any():
        table = table.drop(columns="ties (%)")
    return table
