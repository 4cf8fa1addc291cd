"""SAE quality where the reward model reads (srlib.sae.sae_quality, `sae report`) and chapter 11's
study of SAEs of graded quality (srlib.sae_study): known answers on built SAEs and outcomes."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig
from toy_data import error_line, toy_pairs  # tests/ is on sys.path under pytest

from srlib.activations import last_token_states
from srlib.backbone import format_text
from srlib.cli import main
from srlib.data import write_jsonl
from srlib.errors import ConfigError, DataError
from srlib.experiments import DatasetStates, SplitStates
from srlib.profiles import SAEFamily, SAETrainingConfig, get_profile
from srlib.sae import SAEQuality, SAEReport, sae_quality
from srlib.sae_study import (
    RANDOM,
    SCORED_ON,
    FamilyStudy,
    adopted_sae,
    family_of,
    gap_table,
    quality_trend,
    trend_conclusion,
    validation_view,
)


def half_dead_sae(d: int) -> TopKSAE:
    """f = relu([z, -z]) with the second half's encoder zeroed: those d latents never fire, the
    first d reconstruct relu(z) exactly (k = 2d keeps every latent)."""
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=2 * d, k=2 * d, rescale_acts_by_decoder_norm=False))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, torch.zeros(d, d)], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def texts(tiny_backbone):
    return [
        format_text(tiny_backbone.tokenizer, f"Is claim {i} true?", f"Answer number {i} says no.") for i in range(6)
    ]


def test_quality_at_the_read_position_beside_all_tokens(tiny_backbone, texts, isolated_cache):
    sae = half_dead_sae(tiny_backbone.hidden_size)
    quality = sae_quality(sae, tiny_backbone, texts, 2, max_length=64, progress=False)
    assert quality.read_position.n == len(texts) and quality.all_tokens.n > 3 * len(texts)
    # the read position is the text's last token, the state the reward model reads (and caches)
    Z = last_token_states(tiny_backbone, texts, 2, max_length=64, progress=False)
    expected_fve = 1 - (Z - Z.relu()).pow(2).sum() / (Z - Z.mean(0)).pow(2).sum()  # only relu(z) comes back
    assert quality.read_position.fve == pytest.approx(float(expected_fve), rel=1e-4)
    assert quality.read_position.alive_fraction == pytest.approx(float((Z > 0).any(0).float().sum()) / (2 * Z.shape[1]))
    assert quality.all_tokens.alive_fraction <= 0.5  # the zeroed half never fires
    again = sae_quality(sae, tiny_backbone, texts, 2, max_length=64, all_tokens=False, progress=False)
    assert again.all_tokens is None and again.read_position == quality.read_position
    row = quality.as_row()
    assert row["alive % read"] == pytest.approx(100 * quality.read_position.alive_fraction)
    assert row["rows all"] == quality.all_tokens.n and again.as_row()["FVE all"] is None
    with pytest.raises(DataError, match="at least one text"):
        sae_quality(sae, tiny_backbone, [], 2)


def test_quality_row_keeps_read_and_all_side_by_side():
    read = SAEReport(l0=4.0, fve=0.5, dead_fraction=0.75, n=10)
    every = SAEReport(l0=4.0, fve=0.8, dead_fraction=0.0, n=100)
    row = SAEQuality(read_position=read, all_tokens=every).as_row()
    assert list(row)[:4] == ["alive % read", "alive % all", "FVE read", "FVE all"]
    assert (row["alive % read"], row["alive % all"]) == (25.0, 100.0)


# ---------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SRLIB_CACHE_DIR", str(tmp_path_factory.mktemp("sae-report-cache")))
        yield


def test_sae_report_prints_read_position_and_all_tokens(module_cache, tiny_backbone, tmp_path, capsys):
    pairs, sae = tmp_path / "pairs.jsonl", tmp_path / "sae"
    write_jsonl(toy_pairs(12), pairs)
    half_dead_sae(tiny_backbone.hidden_size).save_model(sae)  # a saved SAE: nothing to train
    assert (
        main(["sae", "report", "--profile", "smoke", "--sae", str(sae), "--pairs", str(pairs), "--max-pairs", "5"]) == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    header = next(line for line in out if "alive % read" in line)
    assert "alive % all" in header and "FVE read" in header and "FVE all" in header
    quality = json.loads(out[-1])["quality"][str(pairs)]
    assert quality["read_position"]["n"] == 10  # both answers of the first 5 pairs
    assert quality["all_tokens"]["n"] > 10 and quality["position"] == "last"
    assert quality["read_position"]["dead_fraction"] >= 0.5  # half its latents never fire


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sae", "report", "--profile", "smoke", "--pairs", "no-such-file.jsonl"], "no-such-file.jsonl"),
        (["sae", "train", "--profile", "smoke", "--pairs", "x.jsonl"], "--pairs is for `sae report`"),
    ],
)
def test_sae_report_bad_input_is_exit_2_and_one_line(argv, message, module_cache, capsys):
    assert main(argv) == 2
    assert message in error_line(capsys)


# ---------------------------------------------------------------------------- the study


def _split(n: int, groups: int, offset: int = 0) -> SplitStates:
    pairs = [
        dataclasses.replace(pair, group_id=f"g{offset + i % groups}") for i, pair in enumerate(toy_pairs(n, offset))
    ]
    return SplitStates(pairs, torch.randn(n, 4), torch.randn(n, 4))


def test_validation_view_halves_validation_by_question_and_drops_test():
    states = DatasetStates("toy", 2, train=_split(8, 8), val=_split(12, 4, offset=100), test=_split(6, 6, offset=200))
    view = validation_view(states)
    early, scored = ({p.group_id for p in split.pairs} for split in (view.val, view.test))
    assert early == {"g100", "g101"} and scored == {"g102", "g103"}  # seeded order kept, halves by question
    assert len(view.val) + len(view.test) == 12 and view.train is states.train
    assert not {p.pair_id for p in view.test.pairs} & {p.pair_id for p in states.test.pairs}
    row = [p.pair_id for p in states.val.pairs].index(view.test.pairs[0].pair_id)
    assert torch.equal(view.test.chosen[0], states.val.chosen[row])
    swapped = validation_view(states, swapped=True)  # the replicate: the same halves, roles exchanged
    assert [p.pair_id for p in swapped.val.pairs] == [p.pair_id for p in view.test.pairs]
    assert [p.pair_id for p in swapped.test.pairs] == [p.pair_id for p in view.val.pairs]
    with pytest.raises(ConfigError, match="two questions"):
        validation_view(DatasetStates("toy", 2, train=_split(4, 4), val=_split(4, 1), test=_split(4, 4)))


def _trials(outcomes: dict[str, list[float]], dataset: str = "toy", k: int = 8) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"dataset": dataset, "K": k, "variant": name, "seed": seed, "test_outcomes": values}
            for name, values in outcomes.items()
            for seed in (0, 1)
        ]
    )


def test_gap_and_trend_are_paired_and_computed_from_the_outcomes():
    n = 40
    trials = _trials(
        {"weak": [1.0] * (n // 2) + [0.0] * (n // 2), "strong": [1.0] * n, RANDOM: [1.0] * (n // 2) + [0.0] * (n // 2)}
    )
    gaps = gap_table(trials, ["weak", "strong"])
    by_variant = gaps.set_index("variant")
    assert by_variant.loc["weak", "A − B (points)"] == 0.0 and by_variant.loc["strong", "A − B (points)"] == 50.0
    assert SCORED_ON in by_variant.loc["strong", "verdict"] and "test pairs" not in by_variant.loc["strong", "verdict"]
    quality = pd.DataFrame({"variant": ["weak", "strong"], "dataset": ["toy", "toy"], "FVE read": [0.2, 0.9]})
    trend = quality_trend(trials, gaps, quality)
    row = trend.iloc[0]
    assert (row["best"], row["weakest"]) == ("strong", "weak")
    assert row["gap change (points)"] == 50.0 and row["CI low"] > 0
    assert row["Spearman rho (gap, FVE read)"] == pytest.approx(1.0)
    assert "grows with quality) in 1," in trend_conclusion(trend)


def test_conclusion_counts_grew_shrank_and_unclear():
    trend = pd.DataFrame(
        {"gap change (points)": [5.0, -4.0, 1.0], "CI low": [1.0, -7.0, -2.0], "CI high": [9.0, -1.0, 4.0]}
    )
    text = trend_conclusion(trend)
    assert "in 1, loses (the gap shrinks) in 1, and shows no clear difference in 1" in text
    assert "-4.0 to +5.0 points" in text


def test_the_selection_verdict_counts_and_names_the_data_sets_at_one_k():
    import pandas as pd

    from srlib.sae_study import selection_verdict

    test_gaps = pd.DataFrame(
        [
            {"dataset": "truthfulqa", "K": 8, "CI low": 0.5, "CI high": 4.0},
            {"dataset": "pku-saferlhf", "K": 8, "CI low": -3.0, "CI high": 2.0},
            {"dataset": "hh-harmless", "K": 8, "CI low": -5.0, "CI high": -1.0},
            {"dataset": "truthfulqa", "K": 16, "CI low": -1.0, "CI high": 1.0},
        ]
    )
    text = selection_verdict(test_gaps, 8, {"truthfulqa": "TruthfulQA"})
    assert text.startswith("At K = 8, top-K directions beat random ones on 1 of 3 data sets (TruthfulQA)")
    assert "lose to them on 1 (hh-harmless)" in text and "no clear difference on 1 (pku-saferlhf)" in text
    with pytest.raises(ConfigError, match="did not measure K = 32"):
        selection_verdict(test_gaps, 32)


def test_an_sae_is_adopted_only_when_both_validation_halves_choose_it():
    assert adopted_sae("read-heavy", "read-heavy", "default") == "read-heavy"
    assert adopted_sae("read-heavy", "batchtopk", "default") == "default"  # the halves disagree: keep the default
    assert adopted_sae("default", "default", "default") == "default"


def _study(first: str, second: str, default: str = "d") -> FamilyStudy:
    return FamilyStudy(
        *[None] * 4,
        {"variant": first, "label": "70.0 ± 1.0"},
        None,
        None,
        {"variant": second, "label": "71.0 ± 1.0"},
        default,
        adopted_sae(first, second, default),
    )


def test_the_adoption_text_says_whether_the_halves_agree_and_what_is_kept():
    agree = _study("a", "a").adoption_text()
    assert "the same SAE is chosen (a, 71.0 ± 1.0%)" in agree and "adopts **a**: it suggests a new default" in agree
    disagree = _study("a", "b").adoption_text()
    assert disagree.startswith("With the halves' roles swapped another SAE is chosen (b, 71.0 ± 1.0%)")
    assert "do not separate these SAEs" in disagree and "keeps the profile's own SAE, **d**" in disagree
    assert "keeps **d**" in _study("d", "d").adoption_text()


def test_a_family_names_exactly_one_profile_sae():
    config = SAETrainingConfig(d_sae=8, k=2, training_tokens=64)
    assert SAEFamily((("mine", config), ("own", None)), ks=(2,)).default == "own"
    for variants in ((("a", config), ("b", config)), (("a", None), ("b", None))):
        with pytest.raises(ConfigError, match="exactly one variant whose config is None"):
            SAEFamily(variants, ks=(2,))


def test_the_profiles_define_a_graded_family():
    cpu = family_of(get_profile("cpu"))
    # the K values and the profile's own K, where the chapter states whether top-K wins
    assert 4 <= len(cpu.variants) <= 9 and {16, 64, 128, get_profile("cpu").k} <= set(cpu.ks)
    assert get_profile("smoke").k in family_of(get_profile("smoke")).ks
    assert sum(config is None for _, config in cpu.variants) == 1  # the profile's own SAE, by reference
    assert len(family_of(get_profile("smoke")).variants) >= 2
    with pytest.raises(ConfigError, match="no sae_family"):
        family_of(get_profile("paper"))


def test_the_cpu_family_holds_chapter_3s_sweep_sae_at_the_profile_layer():
    """That variant is the SAE chapter 3's sweep trains at the profile's layer (same training
    config and corpus cap, so the same cache entry): chapter 11 reads it instead of training it."""
    from srlib.experiments import sweep_profiles

    cpu = get_profile("cpu")
    at_layer = next(p for p in sweep_profiles(cpu) if p.layer == cpu.layer)
    family = dict(family_of(cpu).variants)
    assert at_layer.sae_corpus_tokens == cpu.sae_corpus_tokens  # the family trains on the profile's corpus
    assert at_layer.sae_training in family.values() and at_layer.sae_training != cpu.sae_training


def test_gap_figure_has_a_panel_per_data_set_and_the_paired_intervals():
    from srlib import plots

    gaps = pd.DataFrame(
        {
            "variant": ["weak", "strong"] * 2,
            "dataset": ["a", "a", "b", "b"],
            "K": [8] * 4,
            "A − B (points)": [1.0, 5.0, -2.0, 3.0],
            "CI low": [-1.0, 2.0, -6.0, 0.5],
            "CI high": [3.0, 9.0, 1.0, 4.0],
        }
    )
    quality = pd.DataFrame(
        {"variant": ["weak", "strong"] * 2, "dataset": ["a", "a", "b", "b"], "FVE read": [0.3, 0.8, 0.2, 0.7]}
    )
    fig = plots.gap_vs_quality(gaps, quality, title="t", dataset_labels={"a": "A"})
    assert [ax.get_title() for ax in fig.axes] == ["A", "b"]
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [0.3, 0.8] and list(line.get_ydata()) == [1.0, 5.0]
    (bars,) = fig.axes[0].collections  # the error bars: from CI low to CI high
    assert [tuple(segment[:, 1]) for segment in bars.get_segments()] == [(-1.0, 3.0), (2.0, 9.0)]


@pytest.mark.parametrize(
    "check, wrong",
    [
        ("alive_fraction", lambda z: float((z > 0).float().mean())),  # the firing rate, not the alive share
        ("gap_change", lambda best, weakest, random: float((best - random).mean())),  # a gap, not its change, no points
    ],
)
def test_the_chapter_checks_reject_a_wrong_answer(check, wrong):
    from srlib import checks

    with pytest.raises(AssertionError, match=check):
        getattr(checks, check)(wrong)


def test_closing_table_puts_quality_gaps_and_accuracy_in_one_row_per_sae():

    n = 40
    trials = _trials(
        {"weak": [1.0] * (n // 2) + [0.0] * (n // 2), "strong": [1.0] * n, RANDOM: [1.0] * (n // 2) + [0.0] * (n // 2)}
    )
    trials["heldout_val_accuracy"] = [sum(o) / n for o in trials["test_outcomes"]]
    gaps = gap_table(trials, ["weak", "strong"])
    quality = pd.DataFrame(
        {
            "variant": ["weak", "strong"],
            "dataset": ["toy", "toy"],
            "FVE read": [0.2, 0.9],
            "alive % read": [5.0, 40.0],
            "training s": [1.0, 9.0],
        }
    )
    study = FamilyStudy(quality, trials, gaps, quality_trend(trials, gaps, quality), {}, None, None, {}, "weak", "weak")
    table = study.table({"toy": "Toy"})
    assert list(table.index) == [("Toy", "weak"), ("Toy", "strong")]
    strong = table.loc[("Toy", "strong")]
    assert strong["top-K − random, K = 8"].startswith("+50.0 (") and strong["SparseRM accuracy %, K = 8"] == 100.0
    assert table.loc[("Toy", "weak"), "alive % read"] == 5.0
