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
            warnings.warn("a notice", FutureWarning, stacklevel=1)
            warnings.warn("a user notice", UserWarning, stacklevel=1)
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
    assert read.labels["hh-harmless"] == {} and set(read.labels["truthfulqa"]) <= set(
        read.cards["truthfulqa"]["latent"]
    )
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
    frame = pd.DataFrame(
        {
            "m": [1, 1, 2, 2],
            "deleted": ["top-m attributed", "random m"] * 2,
            "accuracy after (%)": [40.0, 60.0, 30.0, 55.0],
        }
    )
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
    assert present.reading_line(states, 4) == (
        "one SparseRM per data set (seed 4): TruthfulQA {'train': 3, 'val': 1, 'test': 2}"
    )


# --------------------------------------------------------------------------- chapter 7


def _alignment_result(track: str = "red-teaming"):
    """A made-up two-round run: the base policy right on items 0-2 of 10, SparseRM on all,
    DenseRM on 0-2 and 9, WO RM like the base."""
    from srlib.alignment import AlignmentConfig, AlignmentResult, RoundRecord, RunRecord
    from srlib.evaluate import binomial_se

    def metrics(right):
        items = [1.0 if i in right else 0.0 for i in range(10)]
        p = sum(items) / 10
        return {"accuracy": p, "se": binomial_se(p, 10), "n": 10, "accuracy_items": items}

    def run(name, right, kept):
        rounds = [
            RoundRecord(
                round=r,
                n_generated=6,
                n_kept=k,
                val=metrics(right if r == 2 else range(6)),
                train={"steps": 2, "epochs": [{"loss": 0.5, "rewards/accuracies": 0.75}]},
                seconds={"generate": 1.0, "dpo": 2.0},
            )
            for r, k in zip((1, 2), kept, strict=True)
        ]
        return RunRecord(name=name, rounds=rounds, best_round=2, test=metrics(right))

    config = AlignmentConfig.for_profile("smoke", track=track)
    runs = {
        "WO RM": run("WO RM", range(3), [6, 6]),
        "SparseRM": run("SparseRM", range(10), [4, 3]),
        "DenseRM": run("DenseRM", [0, 1, 2, 9], [5, 2]),
    }
    round1 = {
        "n_generated": 6,
        "kept": {"WO RM": 6, "SparseRM": 4, "DenseRM": 5},
        "kept_fraction": {"WO RM": 1.0, "SparseRM": 4 / 6, "DenseRM": 5 / 6},
        "agreement": {"SparseRM": {"SparseRM": 1.0, "DenseRM": 0.5}, "DenseRM": {"SparseRM": 0.5, "DenseRM": 1.0}},
    }
    return AlignmentResult(config, metrics(range(3)), metrics(range(3)), runs, round1)


def test_table1_rows_are_the_policies_with_their_paired_change_and_the_papers_numbers():
    result = _alignment_result()
    table = present.table1(result)
    assert [p for _, p in table.index] == ["base policy", "WO RM", "SparseRM", "DenseRM"]
    row = table.loc[("red-teaming", "SparseRM")]
    assert row["pairwise accuracy (%)"] == "100.0 ± 0.0" and row["kept tuples per round"] == "4, 3"
    assert row["pairwise accuracy: change from base (points, 95% CI)"].startswith("+70.0 (")
    assert table.loc[("red-teaming", "base policy"), "kept tuples per round"] == "–"
    assert any("· paper (Gemma-2-9B-it)" in c for c in table.columns)


def test_alignment_verdicts_and_the_sparse_vs_wo_answer_come_from_the_paired_intervals():
    result = _alignment_result()
    verdicts = present.alignment_verdicts(result).data
    assert (
        "SparseRM beats WO RM by 70.0 points" in verdicts
        and "on the 10 test items of the red-teaming track" in verdicts
    )
    assert "StandardRM" not in verdicts  # a comparison whose policy the run lacks is left out
    win = {"accuracy": result.compare("SparseRM", "WO RM", "accuracy")}
    assert chapter.clear_win(win)
    assert "Yes: the 95% interval excludes zero on every metric." in present.sparse_vs_wo_text(result, win).data
    tie = {"accuracy": result.compare("DenseRM", "WO RM", "accuracy")}
    assert not chapter.clear_win(tie)
    assert "No clear difference" in present.sparse_vs_wo_text(result, tie).data
    metrics = chapter.alignment_metrics(result, win, alignment_seconds=1.234, seconds=5.0)
    assert metrics["sparserm_beat_wo_rm"] is True and metrics["alignment_seconds"] == 1.2
    assert metrics["table1"] == result.table()


def test_table4_alignment_sets_rm_accuracy_beside_the_aligned_policy():
    result = _alignment_result()
    rm_table = pd.DataFrame({"test accuracy (%)": [70.0, 62.5]}, index=pd.Index(["SparseRM", "DenseRM"]))
    table = present.table4_alignment(result, rm_table)
    assert table.loc["SparseRM", "RM accuracy (ours, %)"] == "70.0"
    assert table.loc["DenseRM", "alignment: pairwise accuracy (ours, %)"] == "40.0 ± 15.5"
    text = present.table4_alignment_text(result, rm_table).data
    assert text.startswith("Ours: SparseRM − DenseRM is +7.5 points of RM accuracy")


def test_rounds_table_and_figures_read_every_round():
    import matplotlib.pyplot as plt

    from srlib import plots

    result = _alignment_result()
    rounds = present.rounds_table(result)
    assert len(rounds) == 6 and rounds["kept"].tolist() == [6, 6, 4, 3, 5, 2]
    assert rounds["DPO reward accuracy (last epoch, %)"].tolist() == [75.0] * 6
    assert rounds["val pairwise accuracy (%)"].tolist()[2:4] == [60.0, 100.0]
    fig = plots.validation_rounds(result, metric_labels=present.METRIC_LABELS, se_key=present.se_key, title="t")
    ax = fig.axes[0]
    assert [round(x) for x in ax.get_xticks()] == [0, 1, 2] and len(ax.containers) == 3  # one error-bar line each
    plt.close(fig)
    heat = plots.agreement_heatmap(result.round1_filter, title="t")
    assert sorted(t.get_text() for t in heat.axes[0].texts) == ["100", "100", "50", "50"]
    plt.close(heat)
    frame = pd.DataFrame(
        {"SparseRM s_w - s_l": [1.0, -1.0], "DenseRM s_w - s_l": [0.5, 0.2], "contrast": [True, False]}
    )
    scatter = plots.score_differences(frame, safety=True)
    assert [t.get_text() for t in scatter.axes[0].get_legend().get_texts()] == ["y_w refuses, y_l does not", "other"]
    plt.close(scatter)


def test_the_default_run_folder_hashes_what_the_run_depends_on(tmp_path, monkeypatch):
    from srlib.alignment import AlignmentConfig, default_run_dir

    monkeypatch.setenv("SRLIB_CACHE_DIR", str(tmp_path))
    profile = SimpleNamespace(name="smoke", sae_source="train")
    sae = SimpleNamespace(cfg=SimpleNamespace(metadata={}))  # no srlib record: the profile's SAE source names it
    rm = SimpleNamespace(config=lambda: {"k": 8, "history": [1, 2], "cost": {"s": 3}})
    config = AlignmentConfig.for_profile("smoke", track="red-teaming")
    folder = default_run_dir(config, {"WO RM": None, "SparseRM": rm}, profile=profile, sae=sae)
    assert folder.parent == tmp_path / "alignment" and folder.name.startswith("smoke-red-teaming-")
    noisy = SimpleNamespace(config=lambda: {"k": 8, "history": [9], "cost": {"s": 1}})  # curves and costs left out
    assert default_run_dir(config, {"SparseRM": noisy}, profile=profile, sae=sae) == folder
    other = SimpleNamespace(config=lambda: {"k": 16})
    assert default_run_dir(config, {"SparseRM": other}, profile=profile, sae=sae) != folder
    assert default_run_dir(config.replace(seed=1), {"SparseRM": rm}, profile=profile, sae=sae) != folder


def test_alignment_config_falls_back_to_the_profile_for_each_none():
    config = chapter.alignment_config("smoke", track="truthfulqa", seed=2, rounds=None, beta=0.3)
    assert (config.track, config.seed, config.beta) == ("truthfulqa", 2, 0.3)
    from srlib.alignment import AlignmentConfig

    assert config.rounds == AlignmentConfig.for_profile("smoke", track="truthfulqa").rounds


def test_one_line_cuts_to_the_width_with_an_ellipsis():
    assert present.one_line("a  b\nc", 10) == "a b c"
    assert present.one_line("abcdefghij", 5) == "abcd…"


# --------------------------------------------------------------------------- chapter 6


def _similarity_frame():
    """Made-up per-answer similarities: held-out answers at 0.8 and 0.6 (nearest, centered) and
    generated ones at 0.5 and 0.3 in the dense space; the projection space shifted less."""
    rows = []
    for space, gen in (("dense", (0.5, 0.3)), ("projection", (0.65, 0.55))):
        for group, values in (("held-out (test split)", (0.8, 0.6)), ("generated (policy)", gen)):
            for aggregate, centered in (("nearest", True), ("mean", False), ("nearest", False), ("mean", True)):
                rows += [
                    {"space": space, "group": group, "aggregate": aggregate, "centered": centered, "similarity": v}
                    for v in values
                ]
    return pd.DataFrame(rows)


def test_figure5_numbers_and_text_measure_the_drop_below_the_held_out_answers():
    from srlib.shift import shift_size

    numbers = chapter.figure5_numbers(_similarity_frame())
    dense = numbers["dense"]
    assert dense["nearest_centered_generated"] == pytest.approx(0.4)
    assert dense["nearest_centered_held_out"] == pytest.approx(0.7)
    expected = shift_size(torch.tensor([0.8, 0.6], dtype=torch.float64), torch.tensor([0.5, 0.3], dtype=torch.float64))
    assert dense["shift_primary_sd"] == pytest.approx(expected["standardised"])
    assert numbers["projection"]["shift_primary_sd"] < dense["shift_primary_sd"]  # its generated answers fell less
    text = present.figure5_text(numbers).data
    assert f"{dense['shift_primary_sd']:.2f} ± {dense['shift_primary_se']:.2f} sd in the dense space" in text
    assert "the dense space shows the lower similarity" in text  # 0.4 < 0.6 mean similarity of the generated


def test_similarity_table_leaves_out_the_centered_mean():
    table = present.similarity_table(_similarity_frame())
    assert list(table.columns) == ["nearest, centered (primary)", "mean (paper-style)", "nearest"]
    assert table.loc[("dense", "generated (policy)"), "nearest, centered (primary)"] == "0.400 ± 0.141"


def test_decision_tables_and_text():
    agreement = pd.DataFrame(
        {
            "comparison": ["DenseRM vs SparseRM"] * 2
            + ["DenseRM vs DenseRM (other seed)", "SparseRM vs SparseRM (other seed)"] * 2,
            "data": [
                "held-out pairs",
                "generated pairs",
                "generated pairs",
                "generated pairs",
                "held-out pairs",
                "held-out pairs",
            ],
            "agreement": [0.9, 0.5, 0.7, 0.8, 1.0, 1.0],
        }
    )
    keep = pd.DataFrame(
        {
            "method": ["DenseRM", "DenseRM", "SparseRM", "SparseRM"],
            "data": ["generated pairs"] * 4,
            "keep": [0.4, 0.6, 0.5, 0.5],
        }
    )
    table = present.agreement_table(agreement)
    assert table.loc["DenseRM vs SparseRM", "generated pairs"] == "50.0"  # one seed pair: no spread
    heading, _, _, kept = present.decisions_report(agreement, keep)
    assert kept.loc["DenseRM", "generated pairs"] == "50.0 ± 14.1"
    text = present.decisions_text(agreement, keep).data
    assert "on 90.0% of the held-out pairs and on 50.0% of the generated pairs" in text
    assert "DenseRM agrees with itself on 70.0%" in text and "SparseRM on 80.0%" in text


def test_shift_spaces_tsne_and_mixing_on_the_smoke_states(smoke):
    ch, states = smoke
    s = states["hh-harmless"]
    from srlib.experiments import select_for

    directions = select_for(s, ch.sae, ch.k)
    generated = chapter.PolicyPairs(
        pairs=s.val.pairs[:3], chosen=s.val.chosen[:3], rejected=s.val.rejected[:3], config=None, seconds=0.0
    )
    spaces = chapter.shift_spaces(s, generated, directions)
    assert spaces["dense"]["generated (policy)"].shape == (6, ch.backbone.hidden_size)
    assert spaces["projection"]["training"].shape == (2 * len(s.train), 2 * ch.k)
    mixing = chapter.neighbour_mixing(spaces, k=100)
    assert mixing["dense"]["k"] == 2 * len(s.train) + 6 - 1  # capped by the answers there are
    tsne = chapter.shift_tsne(s, generated, directions, n_train=4, perplexity=3.0)
    assert tsne.n_train == 4 and len(tsne.labels) == len(tsne.sources) == 14
    assert tsne.embeddings["projection"].shape == (14, 2) and tsne.sources.count("generated") == 6
    text = present.mixing_text(mixing, n_train=2 * len(s.train), n_generated=6).data
    assert f"{100 * mixing['dense']['chance']:.0f}%" in text
