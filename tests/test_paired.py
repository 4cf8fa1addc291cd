"""srlib.evaluate's paired verdict: per-pair outcomes with ties as 1/2, the paired bootstrap's
interval and coverage, seed averaging per pair, the verdict line, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from srlib.errors import SrlibError
from srlib.evaluate import compare_paired, pair_outcomes, tie_share
from srlib.reward_config import HeadConfig


def _correlated_outcomes(rng: np.random.Generator, n: int, p_a: float, p_b: float) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes of two methods that share pair difficulty: one uniform draw per pair for both."""
    u = rng.random(n)
    return (u < p_a).astype(float), (u < p_b).astype(float)


def test_pair_outcomes_count_ties_as_half_and_tie_share():
    s_w = torch.tensor([2.0, 0.0, 1.0, 1.0])
    s_l = torch.tensor([1.0, 0.0, 3.0, 1.0])
    assert pair_outcomes(s_w, s_l).tolist() == [1.0, 0.5, 0.0, 0.5]
    assert tie_share(s_w, s_l) == 0.5
    assert tie_share([1.0, 2.0], [0.0, 3.0]) == 0.0
    with pytest.raises(SrlibError, match="same shape|one shape"):
        pair_outcomes([1.0, 2.0], [1.0])


def test_ties_count_half_in_the_accuracy():
    tied = pair_outcomes(np.zeros(10), np.zeros(10))  # a constant model: all ties
    right = np.ones(10)
    c = compare_paired(tied, right, name_a="constant", name_b="oracle")
    assert c.accuracy_a == pytest.approx(50.0)
    assert c.difference == pytest.approx(-50.0)


def test_interval_covers_the_true_difference_on_synthetic_data():
    rng = np.random.default_rng(0)
    true_diff, hits, runs = 5.0, 0, 60
    for i in range(runs):
        a, b = _correlated_outcomes(rng, 800, 0.70, 0.65)
        c = compare_paired(a, b, name_a="a", name_b="b", n_boot=1_000, seed=i)
        assert c.low <= c.difference <= c.high
        hits += c.low <= true_diff <= c.high
    assert 0.85 <= hits / runs <= 1.0


def test_pairing_gives_a_narrower_interval_than_independent_errors():
    rng = np.random.default_rng(1)
    a, b = _correlated_outcomes(rng, 1_000, 0.72, 0.68)
    c = compare_paired(a, b, name_a="a", name_b="b")
    unpaired_half_width = 196 * np.sqrt(a.var() / a.size + b.var() / b.size)
    assert (c.high - c.low) / 2 < 0.5 * unpaired_half_width


def test_clear_difference_is_a_beat_and_null_is_no_clear_difference():
    rng = np.random.default_rng(2)
    a, b = _correlated_outcomes(rng, 1_000, 0.80, 0.60)
    beat = compare_paired(a, b, name_a="top-K directions", name_b="random directions")
    assert beat.low > 0
    assert beat.verdict().startswith(f"top-K directions beat random directions by {beat.difference:.1f} points")
    assert "paired over 1,000 test pairs, 1 seed)" in beat.verdict()
    reverse = compare_paired(b, a, name_a="DenseRM", name_b="SparseRM")
    assert reverse.high < 0
    assert reverse.verdict().startswith(f"SparseRM beats DenseRM by {-reverse.difference:.1f} points")

    null_a, null_b = rng.random((2, 1_000)) < 0.7
    null = compare_paired(null_a, null_b, name_a="A", name_b="B")
    assert null.low < 0 < null.high
    assert null.verdict().startswith("no clear difference between A and B: A − B = ")
    assert f"CI {null.low:.1f} to {null.high:.1f}" in null.verdict()


def test_seeds_are_averaged_per_pair_before_the_bootstrap():
    # seed 0 right on the first half, seed 1 on the second: per pair the mean is 0.5 exactly,
    # so against a method at 0.5 on every pair the paired difference is 0 with no spread.
    half = np.r_[np.ones(50), np.zeros(50)]
    a = np.stack([half, 1 - half])
    b = np.full(100, 0.5)
    c = compare_paired(a, b, name_a="two seeds", name_b="coin")
    assert (c.n_seeds, c.n_pairs) == (2, 100)
    assert (c.difference, c.low, c.high) == (0.0, 0.0, 0.0)
    # resampling rows of [n_seeds, n_pairs] as if they were pairs would see a spread
    flat = compare_paired(a.ravel(), np.full(200, 0.5), name_a="flat", name_b="coin")
    assert flat.high - flat.low > 10


def test_seeded_determinism_and_as_row():
    rng = np.random.default_rng(3)
    a, b = _correlated_outcomes(rng, 300, 0.7, 0.66)
    first = compare_paired(a, b, name_a="a", name_b="b", seed=7)
    assert compare_paired(a, b, name_a="a", name_b="b", seed=7) == first
    assert compare_paired(a, b, name_a="a", name_b="b", seed=8) != first
    row = first.as_row()
    assert row["A − B (points)"] == pytest.approx(row["A acc (%)"] - row["B acc (%)"])
    assert (row["CI low"], row["CI high"], row["pairs"]) == (first.low, first.high, 300)


def test_mismatched_pairs_are_a_user_error():
    with pytest.raises(SrlibError, match="same non-empty set of pairs"):
        compare_paired(np.ones(5), np.ones(6), name_a="a", name_b="b")
    with pytest.raises(SrlibError, match="confidence"):
        compare_paired(np.ones(5), np.zeros(5), name_a="a", name_b="b", confidence=95)


# ----------------------------------------------------------------------------- trials tables (srlib.experiments)


def _states(n: int = 40, d: int = 6, seed: int = 0):
    """Synthetic states: the chosen answer is shifted along the first axis; 2 pairs per question."""
    from srlib.data import PreferencePair
    from srlib.experiments import DatasetStates, SplitStates

    gen = torch.Generator().manual_seed(seed)

    def split(tag: str) -> SplitStates:
        pairs = [PreferencePair(f"q{i}", "a", "b", group_id=f"{tag}{i // 2}") for i in range(n)]
        rejected = torch.randn(n, d, generator=gen)
        chosen = rejected + torch.randn(n, d, generator=gen) * 0.3 + torch.eye(d)[0]
        return SplitStates(pairs, chosen, rejected)

    return DatasetStates("truthfulqa", 0, split("train"), split("val"), split("test"))


def _tiny_sae(d_in: int = 6, d_sae: int = 16):
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    return TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=4))


def test_bootstrap_rows_keep_questions_together_and_depend_on_the_seed():
    from srlib.experiments import bootstrap_rows

    groups = ["a", "a", "b", "c", "c", "c"]
    rows = bootstrap_rows(groups, seed=0)
    drawn = [groups[r] for r in rows.tolist()]
    for g in set(drawn):  # a drawn question brings all its pairs, as often as it was drawn
        assert drawn.count(g) % groups.count(g) == 0
    assert bootstrap_rows(groups, seed=0).tolist() == rows.tolist()
    assert any(bootstrap_rows(groups, seed=s).tolist() != rows.tolist() for s in range(1, 5))


def test_selecting_several_ks_at_once_is_selecting_each():
    """`select_for_ks` encodes the training split once; each K's directions are `select_for`'s,
    on the bootstrap resample too, and K orders them (K = 2 is the start of K = 4)."""
    from srlib.directions import select_directions
    from srlib.experiments import bootstrap_rows, select_for, select_for_ks
    from srlib.sae import encode

    states, sae = _states(), _tiny_sae()
    for resample_seed in (None, 3):
        many = select_for_ks(states, sae, (2, 4), resample_seed=resample_seed)
        assert set(many) == {2, 4}
        for k, directions in many.items():
            one = select_for(states, sae, k, resample_seed=resample_seed)
            assert torch.equal(directions.indices, one.indices) and torch.equal(directions.vectors, one.vectors)
        assert torch.equal(many[4].indices_w[:2], many[2].indices_w)
    rows = bootstrap_rows([p.group_id for p in states.train.pairs], 3)
    chosen, rejected = encode(sae, states.train.chosen[rows]), encode(sae, states.train.rejected[rows])
    resampled = select_directions(sae, chosen, rejected, 4)
    assert torch.equal(select_for_ks(states, sae, (4,), resample_seed=3)[4].indices, resampled.indices)


def test_run_trials_records_outcomes_ties_and_resampled_selection():
    from srlib.experiments import compare_variants, run_trials, seed_sources, select_for, summarize

    states, sae = _states(), _tiny_sae()
    fixed = select_for(states, sae, 3)
    assert any(not torch.equal(select_for(states, sae, 3, resample_seed=s).indices, fixed.indices) for s in range(5))
    fast = dict(head=HeadConfig(epochs=3, batch_size=8))
    variants = {
        "Top-K directions": dict(features="projection", select=dict(sae=sae, k=3), **fast),
        "Dense": dict(features="dense", **fast),
    }
    trials = run_trials(states, variants, seeds=(0, 1), resample=True, progress=False)
    topk = trials[trials.variant == "Top-K directions"]
    assert topk.resample_seed.tolist() == [0, 1]
    assert trials[trials.variant == "Dense"].resample_seed.isna().all()
    assert "bootstrap resample" in seed_sources(trials)
    assert "bootstrap resample" not in seed_sources(trials.assign(resample_seed=None))
    assert "random directions" not in seed_sources(trials)
    assert "random directions" in seed_sources(trials.assign(features="random"))
    for _, row in trials.iterrows():
        outcomes = np.asarray(row.test_outcomes)
        assert outcomes.size == len(states.test)
        assert row.test_accuracy == pytest.approx((outcomes == 1).mean())
        assert row.test_accuracy_half_ties == pytest.approx(outcomes.mean())
        assert row.test_ties == pytest.approx((outcomes == 0.5).mean())
    c = compare_variants(trials, "Top-K directions", "Dense", dataset="truthfulqa")
    assert (c.n_pairs, c.n_seeds) == (len(states.test), 2)
    assert c.accuracy_a == pytest.approx(100 * topk.test_accuracy_half_ties.mean())
    with pytest.raises(SrlibError, match="no scored trials"):
        compare_variants(trials, "Top-K directions", "missing")
    # a tie share shows in the label where it is non-zero
    tied = trials.assign(test_ties=[0.25, 0.25, 0.0, 0.0])
    labels = summarize(tied, value="test_accuracy").set_index("variant")["label"]
    assert labels["Top-K directions"].endswith("(ties 25.0%)")
    assert "ties" not in labels["Dense"]


def test_paired_table_has_one_verdict_per_group_and_comparison():
    from srlib.experiments import compare_variants, paired_table

    rng = np.random.default_rng(4)
    rows = [
        dict(dataset=d, variant=v, seed=s, test_outcomes=list(rng.random(50) < p))
        for d in ("truthfulqa", "hh-harmless")
        for v, p in (("A", 0.9), ("B", 0.5))
        for s in (0, 1)
    ]
    import pandas as pd

    trials = pd.DataFrame(rows)
    table = paired_table(trials, [("A", "B")], labels={"truthfulqa": "TruthfulQA"})
    assert table["dataset"].tolist() == ["TruthfulQA", "hh-harmless"]
    expected = compare_variants(trials, "A", "B", dataset="hh-harmless")
    assert table.iloc[1]["verdict"] == expected.verdict()
    assert table.iloc[1]["CI low"] == expected.low


def test_a_true_difference_equal_to_the_detectable_one_is_found_about_80_percent_of_the_time():
    from srlib.evaluate import minimum_detectable_difference

    rng = np.random.default_rng(1)
    n, sd = 200, 40.0
    mdd = minimum_detectable_difference(rng.normal(0.0, sd, size=100_000)) * np.sqrt(100_000 / n)
    assert mdd == pytest.approx((1.959964 + 0.841621) * sd / np.sqrt(n), rel=0.01)
    found = 0
    for _ in range(2000):
        d = rng.normal(mdd, sd, size=n)
        found += abs(d.mean()) / (d.std(ddof=1) / np.sqrt(n)) > 1.959964
    assert 0.76 < found / 2000 < 0.84
    assert np.isnan(minimum_detectable_difference([1.0]))


def test_the_comparison_reports_what_it_could_detect_and_says_it_when_nothing_is_clear():
    rng = np.random.default_rng(2)
    a, b = (rng.random(400) < 0.70).astype(float), (rng.random(400) < 0.69).astype(float)  # unrelated errors
    c = compare_paired(a, b, name_a="A", name_b="B")
    assert c.detectable == pytest.approx(2.8016 * np.std(100 * (a - b), ddof=1) / np.sqrt(400), rel=1e-3)
    assert c.as_row()["detectable at 80% power (points)"] == c.detectable
    assert "no clear difference" in c.verdict() and f"{c.detectable:.1f} points would be found" in c.verdict()
    clear = compare_paired(np.ones(50), np.zeros(50), name_a="A", name_b="B")
    assert "would be found" not in clear.verdict()
