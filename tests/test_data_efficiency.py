"""Chapter 8's fair comparison: the LoRA baselines' epoch is chosen on the validation split,
SparseRM/DenseRM fit with or without it, and the data-efficiency curve gives every method the
same seeded training subsets. The tiny random model, synthetic states and a random sae-lens SAE."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

from srlib import baselines as B
from srlib import data_efficiency as de
from srlib.data import PreferencePair
from srlib.errors import ConfigError
from srlib.experiments import DatasetStates, SplitStates
from srlib.profiles import get_profile
from srlib.reward import RewardModel
from srlib.reward_config import HeadConfig

PROFILE = get_profile("smoke")
LORA = dict(batch_size=4, learning_rate=5e-3, max_length=PROFILE.max_length)

pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(n: int, start: int = 0) -> list[PreferencePair]:
    return [
        PreferencePair(
            f"What is {i} plus {i}?",
            f"{i} plus {i} is {2 * i}.",
            f"I think it is {2 * i + 1}, or maybe more.",
            pair_id=str(i),
        )
        for i in range(start, start + n)
    ]


def _flipped(pairs: list[PreferencePair]) -> list[PreferencePair]:
    return [dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen) for p in pairs]


def _split(pairs: list[PreferencePair], d: int, seed: int) -> SplitStates:
    """States where the chosen side leans along the first axis: a head can learn them."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(len(pairs), d, generator=generator)
    signal = torch.zeros(d)
    signal[0] = 1.0
    return SplitStates(pairs, base + signal, base - signal + 0.3 * torch.randn(len(pairs), d, generator=generator))


@pytest.fixture(scope="module")
def states(tiny_backbone) -> DatasetStates:
    d = tiny_backbone.model.config.hidden_size
    return DatasetStates(
        "toy",
        PROFILE.layer,
        train=_split(_pairs(12), d, 0),
        val=_split(_pairs(6, 100), d, 1),
        test=_split(_pairs(10, 200), d, 2),
    )


@pytest.fixture(scope="module")
def sae(tiny_backbone) -> TopKSAE:
    torch.manual_seed(0)
    return TopKSAE(TopKSAEConfig(d_in=tiny_backbone.model.config.hidden_size, d_sae=32, k=4))


def test_standard_rm_keeps_the_epoch_the_validation_split_picks(tiny_backbone, tmp_path):
    train = _pairs(8)
    # Validation = the training pairs: the loss falls every epoch, so the last is kept; with
    # their labels flipped it rises every epoch, so the first is kept.
    agree = B.StandardRM.fit(tiny_backbone, train, train, seed=0, progress=False, epochs=3, **LORA)
    flipped = B.StandardRM.fit(tiny_backbone, train, _flipped(train), seed=0, progress=False, epochs=3, **LORA)
    assert len(agree.val_loss) == len(flipped.val_loss) == 3
    assert agree.val_loss[-1] < agree.val_loss[0] and agree.best_epoch == 3
    assert flipped.val_loss[-1] > flipped.val_loss[0] and flipped.best_epoch == 1
    # the kept weights are the chosen epoch's: the flipped run scores the training pairs worse
    margin = {
        name: float((lambda s: (s[0] - s[1]).mean())(rm.score_pairs(train)))
        for name, rm in (("agree", agree), ("flipped", flipped))
    }
    assert margin["agree"] > margin["flipped"]
    flipped.save_pretrained(tmp_path / "rm")
    loaded = RewardModel.from_pretrained(tmp_path / "rm", backbone=tiny_backbone)
    assert loaded.best_epoch == 1 and loaded.val_loss == pytest.approx(flipped.val_loss)
    without = B.StandardRM.fit(tiny_backbone, train, seed=0, progress=False, max_steps=1, **LORA)
    assert without.best_epoch is None and without.val_loss == []


def test_lora_judge_keeps_the_epoch_the_validation_split_picks(tiny_backbone, tmp_path):
    train = _pairs(8)
    # two answers per prompt; a larger step than StandardRM's so that four epochs overfit
    settings = dict(LORA, max_length=2 * PROFILE.max_length, learning_rate=2e-2)
    # Validation = the training pairs: the loss falls every epoch, so the last is kept. With
    # their labels flipped (the other verdict is correct) it falls while the judge learns to
    # answer with a verdict token at all, then rises as it learns the training verdicts: an
    # earlier epoch is kept.
    agree = B.fit_baseline("judge-lora", tiny_backbone, train, train, seed=0, progress=False, epochs=4, **settings)
    flipped = B.fit_baseline(
        "judge-lora", tiny_backbone, train, _flipped(train), seed=0, progress=False, epochs=4, **settings
    )
    assert len(agree.val_loss) == len(flipped.val_loss) == 4
    for rm in (agree, flipped):
        assert rm.best_epoch == 1 + int(np.argmin(rm.val_loss))
    assert agree.best_epoch == 4 and flipped.best_epoch < 4 and flipped.val_loss[-1] > min(flipped.val_loss)
    # the kept weights are the chosen epoch's: the flipped run prefers the chosen answers less
    preference = {name: float(rm.score_pairs(train)[0].mean()) for name, rm in (("agree", agree), ("flipped", flipped))}
    assert preference["agree"] > preference["flipped"]
    flipped.save_pretrained(tmp_path / "judge")
    loaded = RewardModel.from_pretrained(tmp_path / "judge", backbone=tiny_backbone)
    assert loaded.best_epoch == flipped.best_epoch and loaded.val_loss == pytest.approx(flipped.val_loss)
    without = B.fit_baseline("judge-lora", tiny_backbone, train, seed=0, progress=False, max_steps=1, **settings)
    assert without.best_epoch is None and without.val_loss == []


def test_feature_rm_reads_validation_labels_only_when_asked(states, sae):
    flipped = dataclasses.replace(states, val=SplitStates(states.val.pairs, states.val.rejected, states.val.chosen))
    for features in ("projection", "dense"):
        fits = {
            name: de.fit_feature_rm(
                data, features, sae=sae, k=4, seed=0, validation=validation, head=HeadConfig(epochs=12, patience=12)
            )
            for name, data, validation in (
                ("none", states, False),
                ("none-flipped", flipped, False),
                ("val", states, True),
                ("val-flipped", flipped, True),
            )
        }
        assert fits["none"].history.val_accuracy == [] and fits["none"].history.epochs_run == 12
        # without validation, flipping its labels changes nothing
        assert torch.equal(
            fits["none"].score_states(states.test.chosen), fits["none-flipped"].score_states(states.test.chosen)
        )
        assert len(fits["val"].history.val_accuracy) == 12
        # with it, the flipped labels' accuracy is one minus the true one, every epoch
        assert np.allclose(fits["val-flipped"].history.val_accuracy, [1 - a for a in fits["val"].history.val_accuracy])
    with pytest.raises(ConfigError, match="SAE and K"):
        de.fit_feature_rm(states, "projection")


def test_heads_follow_the_profiles_standardize(states, sae, monkeypatch):
    """The profile's `head.standardize` reaches every head through the states it builds: raw inputs
    leave the head's standardisation the identity, standardised ones do not."""
    from srlib import activations
    from srlib import experiments as ex

    def fake_states(backbone, pairs, layer, *, positions, **kwargs):
        split = {8: states.train, 4: states.val}.get(len(pairs), states.test)
        return {position: (split.chosen[: len(pairs)], split.rejected[: len(pairs)]) for position in positions}

    monkeypatch.setattr(ex, "load_pairs", lambda name, seed, max_pairs: _pairs(8 if name.endswith("train") else 4))
    monkeypatch.setattr(activations, "pair_token_states", fake_states)
    for scaled in (False, True):
        built = ex.dataset_states(
            None, "toy", PROFILE.replace(head=HeadConfig(standardize=scaled, epochs=1)), progress=False
        )
        assert built.head.standardize is scaled
        heads = [
            ex.fit_variant(built, features="projection", select=dict(sae=sae, k=4))[0].head,
            ex.fit_variant(built, features="dense")[0].head,
            de.fit_feature_rm(built, "projection", sae=sae, k=4).head,
            de.fit_feature_rm(built, "dense", validation=False).head,
        ]
        for head in heads:
            identity = bool(torch.all(head.mean == 0) and torch.all(head.std == 1))
            assert identity is not scaled
    # an explicit setting (chapter 3's study compares both) still overrides the profile's
    unscaled = dataclasses.replace(built.head, standardize=False)
    assert ex.fit_variant(built, features="dense", head=unscaled)[0].head.mean.abs().sum() == 0


def test_training_subsets_are_seeded_and_nested(states):
    small, large = de.training_subset(states.train, 4, seed=3), de.training_subset(states.train, 8, seed=3)
    assert len(small) == 4 and len(large) == 8
    assert [p.pair_id for p in large.pairs[:4]] == [p.pair_id for p in small.pairs]
    index = {p.pair_id: i for i, p in enumerate(states.train.pairs)}
    assert torch.equal(small.chosen, states.train.chosen[[index[p.pair_id] for p in small.pairs]])
    again = de.training_subset(states.train, 4, seed=3)
    assert [p.pair_id for p in again.pairs] == [p.pair_id for p in small.pairs]
    other = de.training_subset(states.train, 8, seed=4)
    assert [p.pair_id for p in other.pairs] != [p.pair_id for p in large.pairs]
    assert sorted(p.pair_id for p in de.training_subset(states.train, 99, seed=3).pairs) == sorted(
        p.pair_id for p in states.train.pairs
    )
    assert de.curve_sizes([4, 8, 64], 12) == [4, 8, 12]


def test_data_efficiency_gives_every_method_the_same_pairs(tiny_backbone, states, sae, isolated_cache):
    run = dict(
        sizes=(4,), lora_sizes=(4,), seeds=(0, 1), backbone=tiny_backbone, lora_settings=dict(max_steps=1, **LORA)
    )
    curve = de.data_efficiency(states, sae, 4, **run)
    # SparseRM and DenseRM at 4 and 12 (all) pairs, StandardRM at 4, each with 2 seeds
    assert list(curve.columns) == list(de.EFFICIENCY_COLUMNS) and len(curve) == (2 * 2 + 1) * 2
    assert sorted(curve.loc[curve["method"] == B.METHOD_LABELS["standard"], "n_train_pairs"]) == [4, 4]
    assert set(curve.loc[curve["method"] == "SparseRM", "n_train_pairs"]) == {4, 12}
    digests = curve.groupby(["n_train_pairs", "seed"])["train_digest"].nunique()
    assert (digests == 1).all()  # one subset per (size, seed), whatever the method
    assert curve.loc[(curve["n_train_pairs"] == 4), "train_digest"].nunique() == 2  # the seed draws the subset
    assert all(o.shape == (len(states.test),) for o in curve["outcomes"])
    assert np.allclose(curve["test_accuracy"], [o.mean() for o in curve["outcomes"]])
    again = de.data_efficiency(states, sae, 4, **run)  # the StandardRM fits now come from the cache
    assert all(np.array_equal(a, b) for a, b in zip(curve["outcomes"], again["outcomes"], strict=True))

    summary = de.efficiency_summary(curve)
    assert len(summary) == 5 and (summary["seeds"] == 2).all()
    assert ((summary["low"] <= summary["mean"]) & (summary["mean"] <= summary["high"])).all()
    matrix = de.outcome_matrix(curve, method="SparseRM", n_train_pairs=4)
    assert matrix.shape == (2, len(states.test))
    with pytest.raises(ConfigError, match="no rows"):
        de.outcome_matrix(curve, method="nothing")
    with pytest.raises(ConfigError, match="backbone"):
        de.data_efficiency(states, sae, 4, sizes=(4,), lora_sizes=(4,), seeds=(0,))


def test_data_efficiency_figure_has_a_line_per_method_and_a_band_per_interval():
    import matplotlib.pyplot as plt
    import pandas as pd

    from srlib import plots

    summary = pd.DataFrame(
        {
            "dataset": ["toy"] * 4,
            "method": ["SparseRM", "SparseRM", "StandardRM", "StandardRM"],
            "n_train_pairs": [16, 64, 16, 64],
            "mean": [60.0, 70.0, 55.0, 65.0],
            "low": [55.0, 66.0, 50.0, 61.0],
            "high": [65.0, 74.0, 60.0, 69.0],
        }
    )
    fig = plots.data_efficiency(summary, title="toy curve")
    ax = fig.axes[0]
    lines = [line for line in ax.get_lines() if line.get_label() in ("SparseRM", "StandardRM")]
    assert [list(line.get_ydata()) for line in lines] == [[60.0, 70.0], [55.0, 65.0]]
    assert len(ax.collections) == 2 and ax.get_xscale() == "log"
    plt.close(fig)
