"""The book's figures: each function returns a titled Figure with labelled axes, on tiny data."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from srlib import plots  # noqa: E402
from srlib.reward import FitHistory  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _trials() -> pd.DataFrame:
    rows = [
        dict(dataset=d, variant=v, seed=s, test_accuracy=0.6 + 0.1 * i + 0.01 * s)
        for i, d in enumerate(["truthfulqa", "hh-harmless"])
        for v in ["SparseRM", "DenseRM"]
        for s in range(3)
    ]
    return pd.DataFrame(rows)


def _labels(fig) -> list[tuple[str, str, str]]:
    return [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]


def test_accuracy_bars_draws_seed_spread_and_the_papers_ticks():
    paper = {"SparseRM": {"truthfulqa": 93.6}}
    fig = plots.accuracy_bars(
        _trials(), title="accuracy", paper=paper, x_labels={"truthfulqa": "TruthfulQA", "hh-harmless": "HH"}
    )
    ax = fig.axes[0]
    assert ax.get_title() == "accuracy" and "%" in ax.get_ylabel()
    assert "paper (Gemma-2-9B-it)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["TruthfulQA", "HH"]


def test_frequency_scatter_highlights_both_sides():
    g = torch.Generator().manual_seed(0)
    mu_w, mu_l = torch.rand(50, generator=g), torch.rand(50, generator=g)
    fig = plots.frequency_scatter(mu_w, mu_l, [0, 1], [2, 3], title="frequencies")
    ax = fig.axes[0]
    assert ax.get_title() == "frequencies" and "μ_w" in ax.get_xlabel() and "μ_l" in ax.get_ylabel()
    assert len(ax.collections) == 3


def test_histogram_with_groups_and_log_scale():
    fig = plots.histogram(
        [1, 2, 2, 3, 5, 8], title="h", xlabel="value (units)", log=True, hue=["a", "a", "b", "b", "b", "a"], bins=5
    )
    ax = fig.axes[0]
    assert (ax.get_title(), ax.get_xlabel()) == ("h", "value (units)")
    assert ax.get_yscale() == "log"


def test_sweep_lines_log2_axis_ticks_at_the_swept_values():
    rows = [
        dict(layer=layer, k=k, seed=s, test_accuracy=0.7 + 0.01 * s)
        for layer in (1, 2)
        for k in (8, 16, 32)
        for s in range(3)
    ]
    fig = plots.sweep_lines(pd.DataFrame(rows), x="k", hue="layer", title="sweep", xlabel="K", log_x=True)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert [float(t) for t in ax.get_xticks()] == [8.0, 16.0, 32.0]
    assert ax.get_title() == "sweep" and ax.get_xlabel() == "K"


def test_training_curves_mark_the_kept_epoch():
    history = FitHistory(settings={}, train_loss=[1.0, 0.5, 0.4], val_accuracy=[0.6, 0.7, 0.65], best_epoch=2)
    fig = plots.training_curves(history, title="one run")
    titles = [t for t, _, _ in _labels(fig)]
    assert titles == ["training loss", "validation pair accuracy"]
    assert fig.axes[1].lines[1].get_xdata()[0] == 2


def test_sparsity_panels_count_dead_latents_in_the_legend():
    active = {"every token": torch.tensor([8, 8, 7]), "last token": torch.tensor([8, 6])}
    frequency = {"every token": torch.tensor([0.5, 0.01, 0.0]), "last token": torch.tensor([0.2, 0.0, 0.0])}
    fig = plots.sparsity_panels(active, frequency, title="sparsity")
    left, right = fig.axes
    assert "L0" in left.get_xlabel() and "log10" in right.get_xlabel()
    legend = [t.get_text() for t in right.get_legend().get_texts()]
    assert legend == ["every token (1 of 3 never fire)", "last token (2 of 3 never fire)"]
