"""Tests for srlib.shift: similarity aggregation, agreement of filters, t-SNE, cached generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from srlib import shift
from srlib.alignment import AlignmentConfig
from srlib.directions import Directions
from srlib.errors import ConfigError


def _brute_force(samples, training, aggregate, center):
    if center:
        mean = training.mean(0, keepdim=True)
        samples, training = samples - mean, training - mean
    cos = torch.nn.functional.cosine_similarity(samples[:, None, :], training[None, :, :], dim=2)
    return cos.mean(1) if aggregate == "mean" else cos.max(1).values


@pytest.mark.parametrize("aggregate", shift.AGGREGATES)
@pytest.mark.parametrize("center", [False, True])
def test_similarity_matches_brute_force(aggregate, center):
    g = torch.Generator().manual_seed(0)
    samples, training = torch.randn(7, 5, generator=g) + 2, torch.randn(11, 5, generator=g) + 2
    got = shift.similarity_to_training(samples, training, aggregate=aggregate, center=center, chunk=3)
    assert got.shape == (7,)
    assert torch.allclose(got, _brute_force(samples, training, aggregate, center), atol=1e-5)


def test_similarity_of_a_training_sample_to_itself_is_one_when_nearest():
    training = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    got = shift.similarity_to_training(training[:2], training, aggregate="nearest")
    assert torch.allclose(got, torch.ones(2), atol=1e-5)


def test_centering_removes_a_shared_offset():
    g = torch.Generator().manual_seed(2)
    offset = torch.full((1, 8), 50.0)
    training, samples = torch.randn(200, 8, generator=g) + offset, torch.randn(50, 8, generator=g) + offset
    raw = shift.similarity_to_training(samples, training).mean()
    centered = shift.similarity_to_training(samples, training, center=True).mean()
    assert raw > 0.95 and abs(float(centered)) < 0.1


def test_similarity_rejects_bad_input():
    with pytest.raises(ConfigError, match="same width"):
        shift.similarity_to_training(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="aggregate"):
        shift.similarity_to_training(torch.ones(2, 3), torch.ones(2, 3), aggregate="median")
    with pytest.raises(ConfigError, match="empty"):
        shift.similarity_to_training(torch.ones(2, 3), torch.zeros(0, 3))


def test_projection_space_and_similarity_frame():
    g = torch.Generator().manual_seed(3)
    vectors = torch.randn(4, 6, generator=g)
    directions = Directions(
        torch.tensor([0, 1]),
        torch.tensor([2, 3]),
        torch.zeros(2),
        torch.zeros(2),
        torch.zeros(8),
        torch.zeros(8),
        vectors,
    )
    Z = torch.randn(5, 6, generator=g)
    assert torch.allclose(shift.projection_space(Z, directions), Z @ vectors.T)
    spaces = {
        "dense": {"training": Z, "generated": Z[:3]},
        "projection": {
            "training": shift.projection_space(Z, directions),
            "generated": shift.projection_space(Z[:3], directions),
        },
    }
    frame = shift.similarity_frame(spaces, center=True)
    assert len(frame) == 2 * 2 * 3
    assert set(frame["aggregate"]) == set(shift.AGGREGATES) and frame["centered"].all()
    summary = shift.similarity_summary(frame)
    assert len(summary) == 4 and (summary["count"] == 3).all()
    nearest = summary[(summary["aggregate"] == "nearest")]["mean"]
    assert np.allclose(nearest, 1.0, atol=1e-5)  # generated rows are training rows here
    with pytest.raises(ConfigError, match="no 'training' group"):
        shift.similarity_frame({"dense": {"generated": Z}})


def test_agreement_counts_and_pairwise_agreement():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, True, False])
    counts = shift.agreement_counts(a, b)
    assert counts["both keep"] == counts["only A keeps"] == counts["only B keeps"] == counts["both drop"] == 1
    assert counts["agreement"] == 0.5 and counts["keep A"] == 0.5
    assert shift.keep_decisions(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])).tolist() == [True, False]
    decisions = {("Dense", 0): a, ("Dense", 1): a, ("Sparse", 0): b, ("Sparse", 1): a}
    table = shift.pairwise_agreement(decisions)
    # Dense 0-1, Dense0-Sparse0, Sparse 0-1, Dense1-Sparse1 (cross-method pairs need equal seeds)
    assert len(table) == 4
    rates = dict(
        zip(
            zip(table["method_a"], table["seed_a"], table["method_b"], table["seed_b"], strict=True),
            table["agreement"],
            strict=True,
        )
    )
    assert rates[("Dense", 0, "Dense", 1)] == 1.0 and rates[("Dense", 0, "Sparse", 0)] == 0.5
    assert rates[("Dense", 1, "Sparse", 1)] == 1.0
    with pytest.raises(ConfigError):
        shift.agreement_counts(a, b[:2])


def test_tsne_embedding_is_deterministic_and_handles_small_sets():
    g = torch.Generator().manual_seed(4)
    X = torch.cat([torch.randn(15, 60, generator=g) + 3, torch.randn(15, 60, generator=g) - 3])
    first, second = shift.tsne_embedding(X, seed=0), shift.tsne_embedding(X, seed=0)
    assert first.shape == (30, 2) and np.allclose(first, second)
    assert shift.tsne_embedding(X[:6], seed=0).shape == (6, 2)
    with pytest.raises(ConfigError):
        shift.tsne_embedding(X[:3])


def test_policy_pairs_are_generated_once_then_read_from_the_cache(tiny_backbone, isolated_cache, monkeypatch):
    import srlib.alignment

    config = AlignmentConfig.for_profile("smoke", track="red-teaming")
    first = shift.policy_pairs(tiny_backbone, config, 3, progress=False)
    assert len(first) == 3 and all(p.source == "generated:round1" for p in first)
    assert list((isolated_cache / "generated").glob("*.json"))

    def fail(*args, **kwargs):
        raise AssertionError("generation ran although the answers were cached")

    monkeypatch.setattr(srlib.alignment, "generate_tuples", fail)
    assert shift.policy_pairs(tiny_backbone, config, 3, progress=False) == first
    with pytest.raises(ConfigError):
        shift.policy_pairs(tiny_backbone, config, 0)


def test_score_relation_detects_a_rescaling():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(40, generator=g)
    same = shift.score_relation(3.0 * a + 1.0, a)
    assert same["pearson"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    assert same["scale"] == pytest.approx(3.0)
    flipped = shift.score_relation(-a, a)
    assert flipped["spearman"] == pytest.approx(-1.0)
    monotone = shift.score_relation(a.exp(), a)
    assert monotone["spearman"] == pytest.approx(1.0) and monotone["pearson"] < 1.0
    with pytest.raises(ConfigError):
        shift.score_relation(a[:1], a[:1])


def test_beside_paper_puts_the_papers_number_next_to_ours():
    import pandas as pd

    from srlib.experiments import summarize
    from srlib.present import beside_paper

    trials = pd.DataFrame(
        {
            "dataset": ["truthfulqa"] * 4 + ["hh-harmless"] * 4,
            "variant": ["A", "A", "B", "B"] * 2,
            "test_accuracy": [0.8, 0.82, 0.7, 0.72, 0.6, 0.6, 0.5, 0.52],
        }
    )
    table = beside_paper(summarize(trials, value="test_accuracy"), {"A": {"truthfulqa": 93.6, "hh-harmless": 90.2}})
    assert list(table.index) == ["A", "B"]
    assert list(table.columns) == [
        "TruthfulQA (ours)",
        "TruthfulQA · paper (Gemma-2-9B-it)",
        "Red-Teaming (HH harmless) (ours)",
        "Red-Teaming (HH harmless) · paper (Gemma-2-9B-it)",
    ]
    assert table.loc["A", "TruthfulQA (ours)"] == "81.0 ± 1.4"
    assert table.loc["A", "TruthfulQA · paper (Gemma-2-9B-it)"] == "93.6"
    assert table.loc["B", "TruthfulQA · paper (Gemma-2-9B-it)"] == ""


def test_figure_helpers_of_chapters_5_and_6_draw_labelled_panels():
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    from srlib import plots

    g = torch.Generator().manual_seed(6)
    Z = torch.randn(30, 8, generator=g)
    spaces = {
        "dense": {"training": Z[:20], "generated": Z[20:]},
        "projection": {"training": Z[:20, :4], "generated": Z[20:, :4]},
    }
    fig = plots.similarity_histograms(shift.similarity_frame(spaces), title="t")
    assert [ax.get_title() for ax in fig.axes] == ["dense space", "projection space"]
    points = shift.tsne_embedding(Z, seed=0)
    fig = plots.tsne_panels(
        {"dense": points, "projection": points},
        labels=["chosen", "rejected"] * 15,
        sources=["training"] * 20 + ["generated"] * 10,
        title="t",
    )
    assert len(fig.axes) == 2 and fig.axes[0].get_xlabel().startswith("t-SNE 1")
    sweep = pd.DataFrame(
        [dict(gamma=gm, seed=s, test_accuracy=0.6, scale_vs_gamma1=gm) for gm in (0.1, 1.0, 10.0) for s in range(2)]
    )
    fig = plots.gamma_sweep(sweep, title="t")
    assert fig.axes[1].get_yscale() == "log" and fig.axes[0].get_xscale() == "log"
    matplotlib.pyplot.close("all")


def test_shift_size_is_in_units_of_the_reference_spread():
    g = torch.Generator().manual_seed(7)
    reference = torch.randn(4000, generator=g) * 0.5 + 2.0
    shifted = torch.randn(4000, generator=g) * 0.5 + 1.5
    size = shift.shift_size(reference, shifted)
    assert size["drop"] == pytest.approx(0.5, abs=0.05)
    assert size["standardised"] == pytest.approx(1.0, abs=0.1)
    assert size["se"] == pytest.approx((2 / 4000) ** 0.5, rel=0.1)
    rescaled = shift.shift_size(10 * reference, 10 * shifted)
    assert rescaled["standardised"] == pytest.approx(size["standardised"])
    with pytest.raises(ConfigError):
        shift.shift_size(reference[:1], shifted)


def test_legend_below_moves_the_legend_under_the_axes():
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    from srlib import plots

    trials = pd.DataFrame(
        {"dataset": ["truthfulqa"] * 4, "variant": ["A", "A", "B", "B"], "test_accuracy": [0.8, 0.82, 0.7, 0.72]}
    )
    fig = plots.legend_below(plots.accuracy_bars(trials, title="t"))
    legend = fig.axes[0].get_legend()
    assert legend is not None and legend.get_bbox_to_anchor().y0 < fig.axes[0].get_window_extent().y0
    matplotlib.pyplot.close("all")


def test_neighbour_share_is_chance_for_one_distribution_and_high_for_a_separate_cluster():
    g = torch.Generator().manual_seed(8)
    reference = torch.randn(300, 16, generator=g)
    mixed = shift.neighbour_share(reference, torch.randn(100, 16, generator=g), k=10)
    assert mixed["chance"] == pytest.approx(99 / 399)
    assert abs(mixed["share"] - mixed["chance"]) < 0.08
    apart = torch.randn(100, 16, generator=g) + 4.0
    assert shift.neighbour_share(reference, apart, k=10)["share"] > 0.95
    # the point itself is never counted: two identical shifted rows see each other, not themselves
    twins = shift.neighbour_share(reference, torch.full((2, 16), 9.0), k=1)
    assert twins["share"] == 1.0
    with pytest.raises(ConfigError):
        shift.neighbour_share(reference, apart, k=0)
