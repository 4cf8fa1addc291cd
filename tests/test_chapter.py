"""The chapters' one-call setup (`srlib.chapter`), the small measurements chapters 1-5 take
there, the presentation module (`srlib.present`) that formats them, and the chapters' shape:
short, with one collapsed setup cell and no figure code of their own."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from srlib import chapter, present

ROOT = Path(__file__).resolve().parents[1]
#: Chapters held to the length limit: every chapter of the book.
SHORT_CHAPTERS = sorted(path.stem for path in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MAX_CODE_LINES = 100


def _code_cells(stem: str) -> list[dict]:
    cells = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())["cells"]
    return [c for c in cells if c["cell_type"] == "code"]


def code_lines(cells: list[dict]) -> int:
    """Non-blank source lines over `cells`: what "lines of code of a chapter" counts."""
    return sum(1 for c in cells for line in "".join(c["source"]).splitlines() if line.strip())


@pytest.mark.parametrize("stem", SHORT_CHAPTERS)
def test_chapter_has_at_most_100_lines_of_code(stem):
    assert code_lines(_code_cells(stem)) <= MAX_CODE_LINES


@pytest.mark.parametrize("stem", SHORT_CHAPTERS)
def test_chapter_sets_up_in_one_collapsed_cell_and_draws_through_srlib_plots(stem):
    cells = _code_cells(stem)
    setups = [c for c in cells if "chapter.setup(" in "".join(c["source"])]
    assert len(setups) == 1 and "hide-input" in setups[0]["metadata"].get("tags", [])
    assert cells.index(setups[0]) == 1  # right after the parameters cell
    for cell in cells:
        tree = ast.parse("".join(cell["source"]))
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert not {"plt", "matplotlib"} & names and not {"set_ylim", "axhline", "axvline", "legend"} & calls


def test_every_chapter_is_held_to_the_limit():
    assert len(SHORT_CHAPTERS) >= 11 and "08_reward_model_comparison" in SHORT_CHAPTERS


def test_the_line_count_counts_non_blank_code_lines():
    cells = [{"cell_type": "code", "source": ["a = 1\n", "\n", "  \n", "b = 2"]}, {"cell_type": "code", "source": []}]
    assert code_lines(cells) == 2


def test_importing_the_chapter_module_first_silences_tqdms_widget_warning():
    import subprocess
    import sys

    code = (
        "import warnings\nimport srlib.chapter\nfrom tqdm import TqdmWarning\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        '    warnings.warn("IProgress not found. Please update jupyter and ipywidgets.", TqdmWarning)\n'
        '    warnings.warn("another tqdm warning", TqdmWarning)\n'
        "print(len(seen))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"  # the widget warning is dropped, any other still shows


def test_setup_applies_the_overrides_and_says_what_it_loaded(capsys):
    ch = chapter.setup("smoke", k=4, seeds=(5,), datasets=("truthfulqa",))
    assert (ch.k, ch.profile.k, ch.seeds, ch.datasets) == (4, 4, (5,), ("truthfulqa",))
    assert ch.d_sae == ch.sae.cfg.d_sae and torch.get_num_threads() == 1
    out = capsys.readouterr().out
    assert ch.header() in out and "K = 4 (2K = 8 head inputs)" in out and "seeds (5,)" in out
    defaults = chapter.setup("smoke", show=False)
    assert (defaults.k, defaults.seeds) == (defaults.profile.k, defaults.profile.seeds)
    assert capsys.readouterr().out == ""
    states = ch.states(["truthfulqa", "truthfulqa"], max_pairs=6)
    assert list(states) == ["truthfulqa"] and states["truthfulqa"].sizes()["train"] <= 6


def test_one_pair_per_question_keeps_the_first_pair_of_each_question():
    pairs = [SimpleNamespace(group_id=g) for g in "aabcb"]
    assert chapter.one_pair_per_question(pairs) == [0, 2, 3]


def test_shared_and_recurring_latents():
    lat_w = torch.tensor([[1.0, 2.0, 0.0, 3.0], [0.0, 2.0, 1.0, 3.0], [5.0, 0.0, 0.0, 0.0]])
    lat_l = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    shared = chapter.shared_latents(lat_w, lat_l, ["q1", "q2", "q3"])
    assert shared["fired"] == pytest.approx(7 / 3)
    assert shared["same_question"] == pytest.approx(1.0)  # latent 0 in pair 1, latents 2 and 3 in pair 2: (1+2+0)/3
    assert shared["other_question"] == pytest.approx(4 / 6)  # 1+1+0+1+1+0 over the six cross pairs
    # chosen-only latents among the top 2: row 0 -> {3, 1}, row 1 -> {1}, row 2 -> {0}; latent 1 recurs
    assert chapter.recurring_latents(lat_w, lat_l, [0, 1, 2], n=2) == [1]


def _directions(mu_w, mu_l, k):
    mu_w, mu_l = torch.tensor(mu_w), torch.tensor(mu_l)
    nabla = mu_w - mu_l
    order_w, order_l = torch.sort(-nabla, stable=True).indices[:k], torch.sort(nabla, stable=True).indices[:k]
    return SimpleNamespace(
        mu_w=mu_w, mu_l=mu_l, indices_w=order_w, indices_l=order_l, scores_w=nabla[order_w], scores_l=-nabla[order_l]
    )


def test_selection_against_chance_counts_scores_at_or_below_the_shuffle():
    directions = _directions([0.5, 0.2, 0.1, 0.0, 0.3], [0.1, 0.2, 0.15, 0.0, 0.3], k=2)
    null = torch.tensor([0.05, -0.1, 0.02, 0.9, 0.0])  # latent 3 never fires: its null score is ignored
    chance = chapter.selection_against_chance(directions, null)
    assert chance["firing"] == 4 and chance["chance"] == pytest.approx(0.1)
    assert chance["beyond"] == 1  # only latent 0's |∇| = 0.4 exceeds 0.1
    assert (chance["below_w"], chance["below_l"]) == (1, 2) and chance["flat"] == 2
    assert chance["top_w"] == pytest.approx(0.4) and chance["kth_l"] == pytest.approx(0.0)
    text = present.chance_text(chance, 2).data
    assert "picked only by the tie-break" in text and "no higher than that chance level" in text


def test_both_fire_share():
    lat_w = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    lat_l = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert chapter.both_fire_share(lat_w, lat_l, torch.tensor([0])) == pytest.approx(0.5)
    assert chapter.both_fire_share(lat_w, lat_l, torch.tensor([0, 1])) == pytest.approx(0.25)


def test_quality_table_and_sentences_format_the_reports():
    report = SimpleNamespace(n=10, l0=8.0, fve=0.75, dead_fraction=0.125)
    reports = {
        "every token, validation texts": report,
        "last token, validation answers (all data sets)": SimpleNamespace(n=4, l0=8.0, fve=0.5, dead_fraction=0.5),
    }
    table = present.sae_quality(reports)
    assert table["dead latents (%)"].tolist() == [12.5, 50.0] and table["rows"].tolist() == [10, 4]
    text = present.sae_quality_text(reports, n_texts=3, d_sae=256).data
    assert "**75.0%**" in text and "**50.0%**" in text and "12.5% of the 256 latents" in text
    fixed = {
        "every token": SimpleNamespace(active_per_row=torch.tensor([8, 8]), frequency=torch.tensor([0.5, 0.0])),
        "last token": SimpleNamespace(active_per_row=torch.tensor([8]), frequency=torch.tensor([0.25, 0.0])),
    }
    assert present.sparsity_text(fixed, 2).data.startswith("Every token has exactly 8 active latents.")
    fixed["every token"].active_per_row = torch.tensor([6, 8])
    assert "between 6 and 8 latents fire (mean 7.0)" in present.sparsity_text(fixed, 2).data


def test_stability_table_is_mean_and_sd_over_half_splits():
    runs = pd.DataFrame(
        {
            "K": [8, 8, 32, 32],
            "Jaccard I_w": [0.5, 0.7, 0.2, 0.2],
            "Jaccard I_l": [0.1, 0.3, 0.4, 0.6],
            "chance": [0.03, 0.03, 0.1, 0.1],
            "pairs per half": [20] * 4,
            "seed": [0, 1, 0, 1],
        }
    )
    table = present.stability_table(runs)
    assert table["I_w overlap"].tolist() == ["0.60 ± 0.14", "0.20 ± 0.00"]
    assert table["I_l overlap"].tolist() == ["0.20 ± 0.14", "0.50 ± 0.14"]
    text = present.stability_text(runs, [8, 32], k=16).data  # nearest K to 16 is 8
    assert text.startswith("At K = 8,") and "in 2 of the 2 half-splits" in text


def test_show_hides_the_index_and_formats_columns():
    html = present.show(
        pd.DataFrame({"a": [0.12345], "link": ["https://x.org"]}), {"a": "{:.2f}"}, links=True
    ).to_html()
    assert (
        "0.12" in html and "0.12345" not in html and '<a href="https://x.org"' in html and 'class="dataframe"' in html
    )


def test_head_inputs_select_per_seed_or_take_the_given_directions():
    sae, directions = object(), object()
    per_seed = chapter.head_inputs(sae, directions, k=8)
    assert list(per_seed) == ["SAE latents", "Random directions", "Top-K directions"]
    assert per_seed["SAE latents"] == dict(features="latents", sae=sae, select=dict(sae=sae, k=8))
    assert per_seed["Top-K directions"] == dict(features="projection", select=dict(sae=sae, k=8))
    assert per_seed["Random directions"] == dict(features="random", directions=directions)
    fixed = chapter.head_inputs(sae, directions)
    assert fixed["Top-K directions"] == dict(features="projection", directions=directions)


def test_selected_latent_activity_counts_what_a_latent_head_sees():
    class Sae:  # encode is the identity on 3 "latents"
        cfg = SimpleNamespace(d_in=3, d_sae=3)
        device, dtype = "cpu", torch.float32

        def encode(self, z):
            return z

    split = SimpleNamespace(
        chosen=torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]),
        rejected=torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
    )
    directions = SimpleNamespace(indices=torch.tensor([0, 1]), vectors=torch.eye(3)[:2])
    activity = chapter.selected_latent_activity(Sae(), directions, split)
    assert activity == {"active": 0.25, "empty": 0.75, "both_empty": 0.5, "nonzero_projections": 0.5}
    table = present.selected_activity_table({"truthfulqa": activity}, k=1)
    assert table.loc["TruthfulQA"].tolist() == ["0.2 of 2", 75.0, 50.0, "0 of 2"]
    text = present.selected_activity_text(table, k=1).data
    assert "50.0% of the test pairs (TruthfulQA) have none active" in text


def test_paper_gap_and_verdict_lines():
    comparisons = pd.DataFrame({"dataset": ["TruthfulQA"], "A": ["X"], "B": ["Y"], "verdict": ["X ahead"]})
    gapped = present.with_paper_gap(comparisons, {"X": {"truthfulqa": 80.0}, "Y": {"truthfulqa": 77.5}})
    assert gapped["paper's A − B"].tolist() == [2.5]
    assert present.verdict_lines(gapped).data == "- **TruthfulQA**: X ahead."


def test_k_probe_table_text_and_figure():
    summary = pd.DataFrame(
        {
            "K": [2, 2, 2, 8, 8, 8],
            "variant": ["SAE latents", "Random directions", "Top-K directions"] * 2,
            "mean": [50.0, 60.0, 70.0, 55.0, 65.0, 66.0],
            "label": list("abcdef"),
        }
    )
    gap = pd.DataFrame(
        {
            "K": [2, 8],
            "A − B (points)": [10.04, 1.0],
            "CI low": [2.0, -1.0],
            "CI high": [18.0, 3.0],
            "verdict": ["top-K ahead", "no clear difference"],
        }
    )
    table = present.k_probe_table(summary, gap)
    assert table["top-K − random (points)"].tolist() == [10.0, 1.0]
    assert table["95% CI (paired)"].tolist() == ["2.0 to 18.0", "-1.0 to 3.0"]
    text = present.k_probe_text(summary, gap, {"mean": 72.0, "std": 1.5}, [2, 8], ratio_k=20.5).data
    assert "excludes 0 at K = 2." in text and "At K = 8, top-K directions give 66.0%" in text and "K ≈ 20 here" in text
    from srlib import plots

    trials = pd.DataFrame(
        {"K": [2, 2, 8, 8], "variant": ["A", "B"] * 2, "seed": [0] * 4, "test_accuracy_half_ties": [0.5, 0.6, 0.7, 0.8]}
    )
    fig = plots.k_probe(trials, dense_mean=72.0, ratio_k=20.5, hidden_size=64, title="t")
    lines = fig.axes[0].get_lines()
    assert any(list(line.get_ydata()) == [72.0, 72.0] for line in lines)
    assert any(list(line.get_xdata()) == [20.5, 20.5] for line in lines)


def test_gamma_table_and_text():
    sweep = pd.DataFrame(
        {
            "gamma": [0.1, 0.1, 1.0, 1.0],
            "seed": [0, 1, 0, 1],
            "val_accuracy": [0.6, 0.7, 0.8, 0.8],
            "test_accuracy": [0.5, 0.6, 0.7, 0.7],
            "score_sd": [0.1, 0.1, 1.0, 1.0],
            "scale_vs_gamma1": [0.2, 0.2, 1.0, 1.0],
            "spearman_vs_gamma1": [0.9, 0.95, 1.0, 1.0],
            "same_decisions_vs_gamma1": [0.9, 1.0, 1.0, 1.0],
            "best_epoch": [3, 5, 4, 4],
            "test_ties": [0.0] * 4,
        }
    )
    reference = pd.DataFrame({"spearman_vs_gamma1": [0.97], "same_decisions_vs_gamma1": [0.95]})
    table = present.gamma_table(sweep, reference)
    assert table.index.tolist() == ["0.1", "1", "1 vs 1, other seed (reference)"]
    assert table.loc["0.1", "test accuracy (%)"] == "55.0 ± 7.1" and table.loc["1", "scale vs γ = 1"] == "1.00 ± 0.00"
    assert table.loc["1 vs 1, other seed (reference)", "Spearman ρ vs γ = 1"] == "0.970"
    paired = pd.DataFrame({"verdict": ["γ = 0.1 behind γ = 1"]})
    text = present.gamma_text(
        sweep, reference, paired, {"gamma": 1.0, "label": "80.0 ± 0.0", "tied": []}, gamma=1.0, rule="the best"
    ).data
    assert "goes from 0.20 to 1.00" in text and "- γ = 0.1 behind γ = 1." in text
    assert "γ = **1**" in text and text.endswith("the value Table 3 uses.")


def test_gamma_sweep_needs_the_reference_gamma():
    from srlib.errors import ConfigError

    with pytest.raises(ConfigError, match="include 1.0"):
        chapter.gamma_sweep(None, None, (0.1, 3.0), (0,))


def test_untrained_scores_are_standardised_projection_means():
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # K = 1: F_w reads the first coordinate, F_l the second
    train = SimpleNamespace(
        chosen=torch.tensor([[1.0, 0.0], [3.0, 2.0]]), rejected=torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    )
    test = SimpleNamespace(chosen=torch.tensor([[2.0 + 1.1547, 1.0]]), rejected=torch.tensor([[2.0, 1.0 + 1.1547]]))
    states = SimpleNamespace(train=train, test=test)
    u_w, u_l = chapter.untrained_scores(states, SimpleNamespace(vectors=vectors, k=1))
    # both coordinates have mean 2 / 1 and sd 1.1547 on the training answers: one sd up on F_w, one on F_l
    assert u_w.tolist() == pytest.approx([1.0], abs=1e-4) and u_l.tolist() == pytest.approx([-1.0], abs=1e-4)


def test_parameter_counts_and_their_table():
    backbone = SimpleNamespace(model=torch.nn.Linear(10, 10))  # 110 numbers
    sae = torch.nn.Linear(4, 5)  # 25
    model = SimpleNamespace(num_trainable_parameters=lambda: 11)
    counts = chapter.parameter_counts(backbone, sae, SimpleNamespace(vectors=torch.zeros(6, 10)), model)
    assert counts == {"backbone": 110, "sae": 25, "directions": 60, "head": 11}
    table = present.parameters_table(counts, k=3)
    assert table["trained"].tolist() == [False, False, False, True] and "2K = 6 inputs" in table["part"].iloc[3]
    assert table["share of the backbone (%)"].iloc[3] == pytest.approx(10.0)
    assert "**11** numbers, **10.000%** of the 0.0M-parameter backbone" in present.parameters_text(counts).data


def test_sweep_grid_falls_back_to_the_profile_and_drops_ks_above_the_sae_width():
    from srlib.profiles import SweepConfig, get_profile

    profile = get_profile("smoke").replace(sweep=SweepConfig(layers=(1, 2), ks=(4, 512), sae_tokens=100))
    ch = SimpleNamespace(profile=profile, d_sae=256, seeds=(0, 1))
    grid = chapter.sweep_grid(ch)
    assert (grid.layers, grid.ks, grid.seeds, grid.sae_tokens, grid.sae_corpus_tokens) == (
        (1, 2),
        (4,),
        (0, 1),
        100,
        None,
    )
    grid = chapter.sweep_grid(ch, layers=(3,), ks=(8, 16), seeds=(5,), sae_tokens=7, sae_corpus_tokens=9)
    assert (grid.layers, grid.ks, grid.seeds, grid.sae_tokens, grid.sae_corpus_tokens) == ((3,), (8, 16), (5,), 7, 9)


def test_training_and_accuracy_sentences():
    history = SimpleNamespace(
        val_accuracy=[0.5, 0.6, 0.55], epochs_run=3, stopped_early=True, best_epoch=2, best_val_accuracy=0.6
    )
    text = present.training_text(history, SimpleNamespace(test_accuracy=0.625, fit_seconds=1.25), n_val=40).data
    assert "ran 3 epochs and stopped early" in text and "**62.5%**" in text and "worth 2.50%" in text
    assert "moves by 7.5% per epoch" in text
    summary = pd.DataFrame(
        {
            "dataset": ["truthfulqa", "hh-harmless"],
            "variant": ["SparseRM"] * 2,
            "mean": [70.0, 52.0],
            "label": ["70.0 ± 1.0", "52.0 ± 2.0"],
        }
    )
    paper = {"SparseRM": {"truthfulqa": 93.6}}
    table = present.accuracy_beside_paper(summary, paper, model_id="org/Model-1", layer=4)
    assert table.index.tolist() == ["SparseRM, ours (Model-1, layer 4)", "SparseRM, paper (Gemma-2-9B-it)"]
    assert table.iloc[1].tolist() == ["93.6", "–"]
    profile = SimpleNamespace(layer=4, paper_gap_note="Smaller model.")
    text = present.accuracy_text(summary, paper, profile, "org/Model-1").data
    assert text.startswith("Ours (Model-1, layer 4): TruthfulQA: **70.0 ± 1.0%** (paper, Gemma-2-9B-it: 93.6%)")
    assert "Smaller model. On Red-Teaming (HH harmless) the reward model is barely above chance" in text


def test_validation_study_tables_and_selection_text():
    reading = pd.DataFrame(
        {
            "position": ["last", "last", "answer", "answer"] * 2,
            "standardize": [True, False] * 4,
            "seed": [0] * 4 + [1] * 4,
            "val_accuracy": [0.8, 0.7, 0.6, 0.5, 0.9, 0.7, 0.6, 0.5],
        }
    )
    table = present.reading_table(reading)
    assert table.loc["last", "standardised"] == "85.0 ± 7.1" and table.loc["answer", "raw"] == "50.0 ± 0.0"
    grid = pd.DataFrame(
        {"layer": [1, 1, 2, 2], "k": [4, 8, 4, 8], "seed": [0] * 4, "val_accuracy": [0.5, 0.6, 0.7, 0.8]}
    )
    assert present.sweep_table(grid).columns.tolist() == ["K=4", "K=8"]
    selected = {"position": "last", "standardize": True, "layer": 2, "k": 8}
    study = SimpleNamespace(
        selected=selected,
        both_columns=lambda: pd.DataFrame([{**selected, "test accuracy (%)": "71.0 ± 1.0"}]),
        choices={
            "reading": {"label": "85.0 ± 7.1", "tied": [{"position": "answer", "standardize": False}]},
            "grid": {"label": "80.0", "tied": []},
        },
        defaults_match=lambda profile: {"position": True, "standardize": True, "layer": False, "k": True},
    )
    profile = SimpleNamespace(name="smoke", layer=1, position="last", standardize=True, k=8)
    text = present.selection_text(study, profile, rule="best mean").data
    assert "(tied within one standard error: 'answer', raw)" in text and "**layer 2, K = 8** (80.0%)" in text
    assert "reaches **71.0 ± 1.0%**" in text and "differ from this selection in layer: 1 → 2" in text
    choices = present.choices_beside_paper(selected, SimpleNamespace(model_id="org/M", num_layers=4))
    assert choices["depth"].tolist() == ["75%", "54%", "76%"]
    shown = present.selection_report(study, profile, SimpleNamespace(model_id="org/M", num_layers=4), rule="r")
    assert (
        len(shown) == 4
        and "Stage 1**, TruthfulQA at layer 2"
        in present.stage_caption(1, dataset="truthfulqa", layer=2, k=8, n_seeds=3).data
    )


def test_sparserm_results_are_the_books_five_tables():
    frame = pd.DataFrame({"a": [1.0]})
    tables = present.sparserm_results(
        accuracy=frame,
        parameters=frame,
        reading=frame,
        sweep=frame,
        selected=frame,
        k=8,
        n_seeds=3,
        n_sweep_seeds=2,
        dataset="truthfulqa",
        layer=2,
    )
    assert list(tables) == ["accuracy", "parameters", "reading", "sweep", "selected"]
    assert "K = 8, mean ± sd over 3 seeds" in tables["accuracy"]["caption"]
    assert "TruthfulQA by layer and K, mean ± sd over 2 seeds" in tables["sweep"]["caption"]


#: The "Total ≈ N min" of a chapter's time line (its "**Time**" paragraph).
TIME_TOTAL = re.compile(r"\*\*Time\b[^\n]*(?:\n(?!\n)[^\n]*)*?Total ≈ (\d+) min")


def _chapter_total(stem: str) -> int:
    """Minutes of the "Total ≈ N min" on the chapter's own time line (the one there is)."""
    cells = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())["cells"]
    text = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    totals = TIME_TOTAL.findall(text)
    assert len(totals) == 1, f"{stem}: its time line needs one 'Total ≈ N min'"
    return int(totals[0])


def _teachers_times() -> dict[int, int]:
    """{chapter number: class time in minutes} from book/teachers.md's table."""
    rows = re.findall(r"^\| (\d+) [^|]+\| (\d+) min \|", (ROOT / "book" / "teachers.md").read_text(), re.MULTILINE)
    return {int(number): int(minutes) for number, minutes in rows}


def test_each_chapters_time_matches_its_row_for_teachers():
    times = _teachers_times()
    assert sorted(times) == [int(stem[:2]) for stem in SHORT_CHAPTERS]  # one row per chapter
    assert {int(stem[:2]): _chapter_total(stem) for stem in SHORT_CHAPTERS} == times


def test_the_time_test_reads_a_total_and_rejects_a_line_without_one():
    line = "**Time.** Reading 20 min; running a few minutes;\nexercises 20 min. Total ≈ 45 min."
    assert TIME_TOTAL.findall(line) == ["45"]
    assert TIME_TOTAL.findall("**Time.** Reading 20 min.\n\nTotal ≈ 45 min.") == []  # another paragraph's total
