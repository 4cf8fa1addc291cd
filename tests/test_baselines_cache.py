"""Caching of the baselines (fit once, then load; scores kept beside the model), the trial
table built from it, the shared cost meter, and chapter 8's Figure 3 plot, on the smoke
profile's tiny model with a fresh cache per test."""

from __future__ import annotations

import dataclasses

import matplotlib
import pandas as pd
import pytest
import torch

from srlib import baselines as B
from srlib import plots
from srlib.baselines import cache as baseline_cache
from srlib.data import PreferencePair
from srlib.errors import ConfigError, DataError
from srlib.profiles import get_profile

matplotlib.use("Agg")

PROFILE = get_profile("smoke")
QUICK = dict(max_steps=2, batch_size=4, learning_rate=5e-3, max_length=PROFILE.max_length)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def pairs():
    return [
        PreferencePair(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.", f"Maybe {2 * i + 1}.", pair_id=f"p{i}")
        for i in range(8)
    ]


def _entries(cache):
    folder = cache / "baselines"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def test_key_covers_what_changes_the_fit(tiny_backbone, pairs):
    key = B.baseline_key("standard", tiny_backbone, pairs[:4], None, seed=0, **QUICK)
    assert key.startswith("standard-")
    assert key == B.baseline_key("standard", tiny_backbone, pairs[:4], None, seed=0, **QUICK)
    # a default passed explicitly is the same fit as the default left out
    assert key == B.baseline_key("standard", tiny_backbone, pairs[:4], None, seed=0, lora_r=8, **QUICK)
    assert B.baseline_key("standard", tiny_backbone, pairs[:4], epochs=1, learning_rate=1) == B.baseline_key(
        "standard", tiny_backbone, pairs[:4], epochs=1.0, learning_rate=1.0
    )
    edited = [dataclasses.replace(pairs[0], chosen="something else"), *pairs[1:4]]
    other_backbone = dataclasses.replace(tiny_backbone, identity=tiny_backbone.identity + "x")
    different = [
        B.baseline_key("standard", tiny_backbone, pairs[:4], None, seed=1, **QUICK),
        B.baseline_key("generalizable", tiny_backbone, pairs[:4], None, seed=0, **QUICK),
        B.baseline_key("standard", tiny_backbone, pairs[:4], None, seed=0, **{**QUICK, "learning_rate": 1e-3}),
        B.baseline_key("standard", tiny_backbone, pairs[:5], None, seed=0, **QUICK),
        B.baseline_key("standard", tiny_backbone, edited, None, seed=0, **QUICK),
        B.baseline_key("standard", tiny_backbone, pairs[:4], pairs[4:], seed=0, **QUICK),
        B.baseline_key("standard", other_backbone, pairs[:4], None, seed=0, **QUICK),
    ]
    assert len({key, *different}) == len(different) + 1
    # methods that learn nothing ignore pairs and seed
    assert B.baseline_key("judge", tiny_backbone, pairs, None, seed=3) == B.baseline_key(
        "judge", tiny_backbone, None, None, seed=0
    )
    with pytest.raises(ConfigError, match="unknown baseline method"):
        B.baseline_key("sparse", tiny_backbone)
    with pytest.raises(ConfigError, match="unknown setting"):
        B.baseline_key("standard", tiny_backbone, pairs, learning_rte=1.0)


def test_cached_fit_trains_once_then_loads(tiny_backbone, pairs, isolated_cache, monkeypatch):
    rm = B.cached_fit_baseline("standard", tiny_backbone, pairs[:4], None, seed=0, progress=False, **QUICK)
    key = B.baseline_key("standard", tiny_backbone, pairs[:4], None, seed=0, **QUICK)
    assert not rm.from_cache and rm.cache_path == isolated_cache / "baselines" / key
    assert (rm.cache_path / "config.json").is_file() and _entries(isolated_cache) == [key]
    first = rm.score_pairs(pairs)

    def no_training(*args, **kwargs):
        raise AssertionError("a cached baseline was trained again")

    monkeypatch.setattr(baseline_cache, "fit_baseline", no_training)
    assert B.trainable_parameters("standard", tiny_backbone, **QUICK) == rm.num_trainable_parameters()
    again = B.cached_fit_baseline("standard", tiny_backbone, pairs[:4], None, seed=0, progress=False, **QUICK)
    assert again.from_cache and type(again) is type(rm)
    assert again.cost == rm.cost and again.num_trainable_parameters() == rm.num_trainable_parameters()
    for a, b in zip(first, again.score_pairs(pairs), strict=True):
        torch.testing.assert_close(a, b)


def test_failed_fit_leaves_no_cache_entry(tiny_backbone, pairs, isolated_cache, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(baseline_cache, "fit_baseline", broken)
    with pytest.raises(RuntimeError):
        B.cached_fit_baseline("standard", tiny_backbone, pairs[:4], seed=0, progress=False, **QUICK)
    assert _entries(isolated_cache) == []


def test_cached_scores_are_kept_with_their_time(tiny_backbone, pairs, isolated_cache, monkeypatch):
    rm = B.cached_fit_baseline("logprob", tiny_backbone, max_length=PROFILE.max_length)
    scores = B.cached_score_pairs(rm, pairs)
    assert not scores.from_cache and scores.seconds > 0 and scores.chosen.shape == (len(pairs),)
    assert scores.pairs_per_second == pytest.approx(len(pairs) / scores.seconds)
    direct = rm.score_pairs(pairs)
    torch.testing.assert_close(scores.chosen, direct[0])
    torch.testing.assert_close(scores.rejected, direct[1])

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored again")

    monkeypatch.setattr(type(rm), "score_pairs", no_scoring)
    loaded = B.cached_score_pairs(B.cached_fit_baseline("logprob", tiny_backbone, max_length=PROFILE.max_length), pairs)
    assert loaded.from_cache and loaded.seconds == pytest.approx(scores.seconds)
    assert loaded.accuracy == scores.accuracy
    torch.testing.assert_close(loaded.chosen, scores.chosen)
    with pytest.raises(AssertionError, match="scored again"):  # other pairs: other scores
        B.cached_score_pairs(rm, pairs[:3])


def test_cached_scores_need_a_cached_model(tiny_backbone, pairs):
    rm = B.fit_baseline("logprob", tiny_backbone)
    with pytest.raises(ConfigError, match="cached_fit_baseline"):
        B.cached_score_pairs(rm, pairs)
    rm.cache_path = "unused"
    with pytest.raises(DataError, match="empty"):
        B.cached_score_pairs(rm, [])


def test_baseline_trials_rows_and_rerun_from_cache(tiny_backbone, pairs, isolated_cache):
    settings = {"standard": QUICK, "logprob": {"max_length": PROFILE.max_length}}

    def run():
        return B.baseline_trials(
            tiny_backbone, "toy", pairs[:4], None, pairs[4:], ["standard", "logprob"], [0, 1], settings=settings
        )

    trials = run()
    assert list(trials["method"]) == ["standard", "standard", "logprob"]  # the floor runs once
    assert list(trials["seed"]) == [0, 1, 0] and set(trials["dataset"]) == {"toy"}
    assert list(trials["variant"]) == [B.METHOD_LABELS[m] for m in trials["method"]]
    assert trials["test_accuracy"].between(0, 1).all() and (trials["n_test_pairs"] == 4).all()
    assert list(trials["n_train_pairs"]) == [4, 4, 0]
    assert list(trials["trainable_parameters"] > 0) == [True, True, False]
    assert not trials["from_cache"].any() and (trials["pairs_per_second"] > 0).all()
    rerun = run()
    assert rerun["from_cache"].all()
    pd.testing.assert_frame_equal(rerun.drop(columns="from_cache"), trials.drop(columns="from_cache"))
    # only_cached reports what is cached and trains nothing: seed 2 is left out
    cached = B.baseline_trials(
        tiny_backbone,
        "toy",
        pairs[:4],
        None,
        pairs[4:],
        ["standard", "logprob"],
        [0, 2],
        settings=settings,
        only_cached=True,
    )
    assert list(zip(cached["method"], cached["seed"], strict=True)) == [("standard", 0), ("logprob", 0)]
    none = B.baseline_trials(
        tiny_backbone, "toy", pairs[:4], None, pairs[:3], ["standard"], [0], settings=settings, only_cached=True
    )  # model cached, scores of these pairs not
    assert none.empty and list(none.columns) == list(B.TRIAL_COLUMNS)
    with pytest.raises(ConfigError, match="unknown baseline method"):
        B.baseline_trials(tiny_backbone, "toy", pairs, None, pairs, ["sparse"], [0])
    with pytest.raises(ConfigError, match="at least one seed"):
        B.baseline_trials(tiny_backbone, "toy", pairs, None, pairs, ["logprob"], [])


def test_measure_cost_returns_result_and_cost():
    result, cost = B.measure_cost(lambda n: sum(range(n)), 10_000, n_train_pairs=7)
    assert result == sum(range(10_000))
    assert cost.n_train_pairs == 7 and cost.seconds >= 0 and cost.peak_rss_mb > 0


def test_accuracy_vs_parameters_plot():
    rows = []
    for dataset in ("truthfulqa", "hh-harmless"):
        for seed in (0, 1, 2):
            rows.append(
                dict(
                    dataset=dataset,
                    variant="SparseRM",
                    seed=seed,
                    test_accuracy=0.8 + seed / 100,
                    trainable_parameters=132_097,
                )
            )
            rows.append(
                dict(
                    dataset=dataset,
                    variant="StandardRM (LoRA)",
                    seed=seed,
                    test_accuracy=0.6,
                    trainable_parameters=461_376,
                )
            )
        rows.append(dict(dataset=dataset, variant="log-prob floor", seed=0, test_accuracy=0.45, trainable_parameters=0))
    fig = plots.accuracy_vs_parameters(pd.DataFrame(rows), title="Figure 3", backbone_parameters=134_515_008)
    axes = [ax for ax in fig.axes if ax.get_xscale() == "log"]
    assert len(axes) == 2 and axes[0].get_title() == "TruthfulQA"
    assert "trainable parameters" in axes[0].get_xlabel() and "accuracy" in axes[0].get_ylabel()
    labels = {t.get_text() for legend in fig.legends for t in legend.get_texts()}
    assert {"SparseRM", "StandardRM (LoRA)", "log-prob floor (0 trainable)"} <= labels
    matplotlib.pyplot.close(fig)


def test_comparison_table_means_and_labels():
    common = dict(trainable_parameters=1_000, peak_rss_mb=100.0, rss_increase_mb=10.0, n_train_pairs=64)
    trials = pd.DataFrame(
        [
            dict(
                dataset="truthfulqa",
                variant="SparseRM",
                seed=0,
                test_accuracy=0.80,
                full_test_accuracy=0.81,
                fit_seconds=1.0,
                fit_seconds_with_extraction=11.0,
                pairs_per_second=50.0,
                **common,
            ),
            dict(
                dataset="truthfulqa",
                variant="SparseRM",
                seed=1,
                test_accuracy=0.84,
                full_test_accuracy=0.83,
                fit_seconds=3.0,
                fit_seconds_with_extraction=13.0,
                pairs_per_second=70.0,
                **common,
            ),
            dict(
                dataset="truthfulqa",
                variant="StandardRM (LoRA)",
                seed=0,
                test_accuracy=0.6,
                full_test_accuracy=float("nan"),
                fit_seconds=500.0,
                fit_seconds_with_extraction=float("nan"),
                pairs_per_second=5.0,
                **common,
            ),
        ]
    )
    table = B.comparison_table(trials, backbone_parameters=100_000)
    assert list(table["method"]) == ["SparseRM", "StandardRM (LoRA)"]
    assert list(table["data set"]) == ["TruthfulQA"] * 2
    first, second = table.iloc[0], table.iloc[1]
    assert first["test accuracy (%)"] == "82.0 ± 2.8" and first["full test split (%)"] == "82.0 ± 1.4"
    assert first["seeds"] == 2 and first["% of backbone"] == pytest.approx(1.0)
    assert first["train time (s)"] == 2.0 and first["train time with extraction (s)"] == 12.0
    assert first["scoring pairs/s"] == 60.0
    assert second["test accuracy (%)"] == "60.0" and second["full test split (%)"] == "–"
    assert second["train time with extraction (s)"] == 500.0  # reads the texts itself


def test_baseline_settings_are_valid_for_every_method(tiny_backbone):
    settings = B.baseline_settings(96, epochs=2, learning_rate=1e-4, batch_size=2)
    assert set(settings) == set(B.METHODS)
    assert settings["standard"] == dict(epochs=2, learning_rate=1e-4, batch_size=2, max_length=96)
    assert settings["judge"]["max_length"] == settings["judge-lora"]["max_length"] == 192
    for method, keywords in settings.items():
        B.baseline_key(method, tiny_backbone, **keywords)  # accepted by each settings class


def test_trainable_parameters_without_training(tiny_backbone):
    config = tiny_backbone.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    q_out, v_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    lora = config.num_hidden_layers * 8 * (2 * config.hidden_size + q_out + v_out)  # rank 8 on q and v
    assert B.trainable_parameters("generalizable", tiny_backbone) == lora + config.hidden_size
    assert B.trainable_parameters("judge-lora", tiny_backbone) == lora
    assert B.trainable_parameters("standard", tiny_backbone, lora_r=4) == lora // 2 + config.hidden_size
    assert B.trainable_parameters("judge", tiny_backbone) == B.trainable_parameters("logprob", tiny_backbone) == 0
    assert not any("lora" in name for name, _ in tiny_backbone.model.named_parameters())  # backbone untouched
    with pytest.raises(ConfigError, match="unknown baseline method"):
        B.trainable_parameters("sparse", tiny_backbone)


def test_comparison_table_shows_the_tie_share_only_where_there_are_ties():
    import numpy as np

    common = dict(
        trainable_parameters=1_000,
        peak_rss_mb=100.0,
        rss_increase_mb=10.0,
        n_train_pairs=64,
        fit_seconds=1.0,
        pairs_per_second=5.0,
    )
    trials = pd.DataFrame(
        [
            dict(
                dataset="truthfulqa",
                variant="judge",
                seed=0,
                test_accuracy=0.25,
                outcomes=np.array([1.0, 0.5, 0.5, 0.0]),
                **common,
            ),
            dict(
                dataset="truthfulqa",
                variant="SparseRM",
                seed=0,
                test_accuracy=0.5,
                outcomes=np.array([1.0, 1.0, 0.0, 0.0]),
                **common,
            ),
        ]
    )
    table = B.comparison_table(trials, backbone_parameters=100_000)
    assert list(table["ties (%)"]) == [50.0, 0.0]
    untied = B.comparison_table(trials.iloc[1:], backbone_parameters=100_000)
    assert "ties (%)" not in untied
