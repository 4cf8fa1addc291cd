"""What chapters 6, 7, 9 and 10 measure through `srlib.chapter` and show through
`srlib.present`: values of each helper and sentence, on the smoke profile or small made-up
inputs."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from srlib import chapter, explain, present


@pytest.fixture(scope="module")
def smoke():
    """The smoke chapter with small TruthfulQA and HH-harmless states."""
    ch = chapter.setup("smoke", show=False)
    return ch, ch.states(["truthfulqa", "hh-harmless"], max_pairs=12)


def test_quiet_setup_silences_library_warnings():
    from transformers.utils import logging as hf_logging

    with warnings.catch_warnings():
        chapter.quiet_libraries()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default", DeprecationWarning)  # a category it leaves alone
            warnings.warn("a notice", FutureWarning)
            warnings.warn("a user notice", UserWarning)
        assert caught == []
    assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()


def test_attached_rm_reads_texts_as_the_training_pairs_were_read(smoke):
    ch, states = smoke
    s = states["truthfulqa"]
    rm, trial = chapter.attached_rm(ch, s, features="dense", seed=3, variant="DenseRM")
    assert rm.max_length == ch.profile.max_length and trial.variant == "DenseRM" and trial.seed == 3
    pair = s.test.pairs[0]
    scored = rm.score_pairs([pair])  # through the backbone: the same score as the cached state's
    assert scored[0][0] == pytest.approx(float(rm.score_states(s.test.chosen[:1])[0]), abs=1e-5)


def test_reading_models_quote_truthfulqa_only_unless_asked(smoke):
    ch, states = smoke
    read = chapter.reading_models(ch, states, seed=0, n_texts=1, chars=40, quote_safety=False)
    assert read.quote == {"truthfulqa": True, "hh-harmless": False}
    assert read.labels["hh-harmless"] == {} and set(read.labels["truthfulqa"]) <= set(read.cards["truthfulqa"]["latent"])
    assert len(read.cards["truthfulqa"]) == 2 * ch.k
    assert all(m.history.best_val_accuracy is not None for m in read.models.values())
    assert chapter.reading_models(ch, states, seed=0, n_texts=1, chars=40, quote_safety=True).quote["hh-harmless"]
    attributed = chapter.attributions(read.models, states)
    table = chapter.attribution_completeness(read.models, states, attributed)
    assert table["data set"].tolist() == ["TruthfulQA", present.label("hh-harmless")]
    assert table["test answers"].tolist() == [2 * len(s.test) for s in states.values()]
    assert (table["largest |baseline + Σ contributions − score|"] < explain.TOLERANCE).all()
    run = chapter.length_steering(read.models["truthfulqa"], states["truthfulqa"], 2)
    assert len(run.tracking) == 2 and set(run.rho) == {"before", "after"}
    assert run.steered.config()["steering"]["scales"] == {str(int(latent)): 0.0 for latent in run.tracking["latent"]}
    text = present.steering_text(run, dataset="truthfulqa", n_pairs=len(states["truthfulqa"].test), n=2).data
    assert f"{100 * run.effect.accuracy_before:.1f}%" in text and f"{run.rho['after']:+.2f}" in text
    flipped = present.flipped_pairs(run, states["truthfulqa"].test.pairs, quote=False, chars=40)
    assert len(flipped) == len(run.effect.flipped_to_wrong) + len(run.effect.flipped_to_right)


def test_verdict_m_is_the_largest_m_at_or_below_the_asked_one():
    assert chapter.verdict_m([1, 2, 4, 8, 16], 8) == 8
    assert chapter.verdict_m([1, 2, 4, 16], 8) == 4
    assert chapter.verdict_m([16, 32], 8) == 16


def test_deletion_gaps_read_each_curve_at_each_m():
    frame = pd.DataFrame({"m": [1, 1, 2, 2], "deleted": ["top-m attributed", "random m"] * 2,
                          "accuracy after (%)": [40.0, 60.0, 30.0, 55.0]})
    curve = SimpleNamespace(frame=lambda: frame, gap=lambda m: (0.1 * m, 0.05 * m, 0.2 * m))
    gaps = chapter.deletion_gaps({"truthfulqa": curve}, [1, 2])
    assert gaps["top − random drop"].tolist() == pytest.approx([0.1, 0.2])
    assert gaps["accuracy after top-m (%)"].tolist() == [40.0, 30.0]
    assert gaps["accuracy after random m (%)"].tolist() == [60.0, 55.0]
    assert gaps["data set"].unique().tolist() == ["TruthfulQA"]
    text = present.labelled_verdicts({"truthfulqa": "A is better"}, m=2).data
    assert text == "- **TruthfulQA**, m = 2: A is better."


def test_reading_line_names_each_data_set_with_its_sizes():
    states = {"truthfulqa": SimpleNamespace(sizes=lambda: {"train": 3, "val": 1, "test": 2})}
    assert present.reading_line(states, 4) == ("one SparseRM per data set (seed 4): "
                                               "TruthfulQA {'train': 3, 'val': 1, 'test': 2}")
