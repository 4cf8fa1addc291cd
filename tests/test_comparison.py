"""Chapter 8's comparison (`srlib.baselines.comparison`), its sentences and tables
(`srlib.present`), the one timed fit that chapter 8 and `benchmarks/rm_cost.py` share
(`srlib.baselines.costed_fit`), and the checks of chapter 8's exercises."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from srlib import checks, present
from srlib.baselines import METHOD_LABELS, costed_fit
from srlib.baselines import comparison as cmp
from srlib.errors import ConfigError
from srlib.evaluate import compare_paired
from srlib.profiles import get_profile

DATASETS = ("truthfulqa", "pku-saferlhf")


def _plan(**overrides) -> cmp.ComparisonPlan:
    return cmp.comparison_plan(get_profile("smoke"), k=8, datasets=DATASETS, seeds=(0, 1), **overrides)


def test_the_plan_falls_back_to_the_profile_and_the_comparison_methods():
    profile, plan = get_profile("smoke"), _plan()
    assert plan.baselines == ("standard", "generalizable", "judge", "logprob")
    assert (plan.train_pairs, plan.test_pairs, plan.extraction_sample) == (
        profile.baseline_train_pairs,
        profile.baseline_test_pairs,
        profile.extraction_sample,
    )
    assert (
        plan.efficiency_sizes == profile.efficiency_sizes
        and plan.efficiency_lora_sizes == profile.efficiency_lora_sizes
    )
    assert (plan.baseline_seeds, plan.epochs, plan.use_val, plan.efficiency_dataset) == ((0, 1), 1, False, "truthfulqa")
    assert plan.fair == "no model reads validation labels"
    assert plan.settings["standard"]["epochs"] == 1 and plan.settings["judge"]["max_length"] == 2 * profile.max_length


def test_the_plan_applies_its_overrides():
    plan = _plan(
        baselines=("judge",),
        baseline_datasets=("pku-saferlhf", "hh-harmless"),
        validation="all",
        baseline_seeds=(7,),
        train_pairs=5,
    )
    assert plan.baseline_datasets == ("pku-saferlhf",)  # only data sets SparseRM runs on
    assert (
        plan.efficiency_dataset == "pku-saferlhf" and plan.efficiency_lora_sizes == ()
    )  # no StandardRM, no LoRA points
    assert (plan.epochs, plan.use_val, plan.baseline_seeds, plan.train_pairs) == (3, True, (7,), 5)
    assert plan.metrics()["baseline_epochs"] == 3 and plan.metrics()["baselines"] == ["judge"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"validation": "some"}, "VALIDATION must be 'none' or 'all'"),
        ({"validation": "all", "epochs": 1}, "BASELINE_EPOCHS >= 2"),
    ],
)
def test_a_bad_plan_is_one_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _plan(**overrides)


def test_extraction_is_added_at_the_timed_rate():
    ours = pd.DataFrame(
        {
            "dataset": ["truthfulqa", "pku-saferlhf"],
            "n_train_pairs": [10, 4],
            "n_val_pairs": [0, 6],
            "fit_seconds": [1.0, 2.0],
        }
    )
    out = cmp.with_extraction(
        ours, {"truthfulqa": {"texts_per_second": 20.0}, "pku-saferlhf": {"texts_per_second": 5.0}}
    )
    assert out["extraction_seconds"].tolist() == [1.0, 4.0]  # 2 texts per pair, validation pairs counted when read
    assert out["fit_seconds_with_extraction"].tolist() == [2.0, 6.0] and out["pairs_per_second"].tolist() == [10.0, 2.5]
    assert "extraction_seconds" not in ours  # the input is left as it was


def test_all_trials_orders_by_data_set_then_sparserm_denserm_and_the_baselines():
    plan = _plan(baselines=("judge", "standard"))
    variants = [v for v, _, _ in cmp.FEATURE_VARIANTS]
    ours = pd.DataFrame([{"dataset": d, "variant": v} for d in ("pku-saferlhf", "truthfulqa") for v in variants[::-1]])
    theirs = pd.DataFrame(
        {"dataset": ["truthfulqa", "truthfulqa"], "variant": [METHOD_LABELS["standard"], METHOD_LABELS["judge"]]}
    )
    trials = cmp.all_trials(ours, theirs, plan)
    first = trials[trials["dataset"] == "truthfulqa"]["variant"].tolist()
    assert trials["dataset"].tolist()[:6] == ["truthfulqa"] * 6
    assert first == [
        "SparseRM · all train pairs",
        "SparseRM · baselines' pairs",
        "DenseRM · all train pairs",
        "DenseRM · baselines' pairs",
        "zero-shot judge",
        "StandardRM (LoRA)",
    ]


def _outcomes(seed: int, p: float) -> np.ndarray:
    return (np.random.default_rng(seed).random((2, 60)) < p).astype(float)


def test_the_verdicts_table_and_text_come_from_the_comparisons():
    better, worse = _outcomes(0, 0.95), _outcomes(1, 0.2)
    fair = compare_paired(better, worse, name_a="SparseRM (the same 8 pairs)", name_b="StandardRM (LoRA)")
    more = compare_paired(worse, better, name_a="SparseRM (all 80 train pairs)", name_b="StandardRM (LoRA)")
    early = compare_paired(better, better, name_a="SparseRM stopped early", name_b="SparseRM without them")
    found = [
        cmp.DatasetVerdicts(
            "truthfulqa", [(fair, more)], early, {"standard": 30.0, "sparse": 0.5, "sparse_with_extraction": 60.0}
        )
    ]
    table = cmp.verdict_table(found)
    assert table["fair"].tolist() == [True, False] and table["data set"].tolist() == ["TruthfulQA"] * 2
    assert table["verdict"].tolist() == [fair.verdict(), more.verdict()]
    text = present.comparison_text(
        found, _plan(), {"head": 17, "head_share": 0.01, "lora": 170, "lora_share": 0.1}
    ).data
    assert (
        f"- TruthfulQA: **{fair.verdict()}**; with more labelled pairs than the baselines had: {more.verdict()}."
        in text
    )
    assert early.verdict() in text and "give no model" in text
    assert "StandardRM 30 s, SparseRM 0.50 s from cached states (**60× less**)" in text
    assert "60.0 s counting the extraction of the states it reads (**2.0× more**)" in text
    assert "10.0× as many. Both are below the paper's 1% bound." in text
    assert "did not run on SafeRLHF" in text  # the plan's second data set has no baselines here
    assert present.fewer(3.25) == "3.2× less" and present.fewer(250) == "250× less"


def test_parameter_shares_read_the_head_and_the_largest_lora():
    trials = pd.DataFrame(
        {
            "variant": ["SparseRM · all train pairs", "StandardRM (LoRA)", "zero-shot judge"],
            "method": [None, "standard", "judge"],
            "trainable_parameters": [20, 400, 0],
        }
    )
    assert cmp.parameter_shares(trials, 2000) == {"head": 20, "head_share": 1.0, "lora": 400, "lora_share": 20.0}
    assert cmp.parameter_shares(trials[trials["method"] != "standard"], 2000) is None


def test_efficiency_verdicts_compare_at_each_size_where_standardrm_joins():
    rows = [
        {"method": method, "n_train_pairs": n, "seed": seed, "outcomes": _outcomes(seed + n, p)[0]}
        for method, p in (("SparseRM", 0.9), ("DenseRM", 0.5), (METHOD_LABELS["standard"], 0.5))
        for n in (8, 16)
        for seed in (0, 1)
    ]
    curve = pd.DataFrame([r for r in rows if r["n_train_pairs"] == 8 or r["method"] != METHOD_LABELS["standard"]])
    found = cmp.efficiency_verdicts(curve)
    assert [(c.name_a, c.name_b) for c in found] == [
        ("SparseRM (8 pairs)", "StandardRM (LoRA) (8 pairs)"),
        ("DenseRM (8 pairs)", "StandardRM (LoRA) (8 pairs)"),
    ]
    assert found[0].low > 0  # 0.9 against 0.5 on 60 pairs: a clear win
    assert present.efficiency_text(found).data.splitlines() == [f"- {c.verdict()}" for c in found]
    assert "StandardRM is not in" in present.efficiency_text([]).data


def test_costed_fit_times_and_scores_a_fit_on_the_given_test_pairs():
    from srlib import chapter
    from srlib.data_efficiency import fit_feature_rm
    from srlib.reward import pair_accuracy

    ch = chapter.setup("smoke", seeds=(0,), datasets=("truthfulqa",), show=False)
    states = ch.states(["truthfulqa"])["truthfulqa"]
    test = states.test.first(6)
    row = costed_fit(states, "projection", sae=ch.sae, k=4, seed=0, validation=False, test=test)
    model = fit_feature_rm(states, "projection", sae=ch.sae, k=4, seed=0, validation=False)
    assert row["test_accuracy"] == pair_accuracy(model.score_states(test.chosen), model.score_states(test.rejected))
    assert row["full_test_accuracy"] == pair_accuracy(
        model.score_states(states.test.chosen), model.score_states(states.test.rejected)
    )
    assert len(row["outcomes"]) == 6 and row["fit_seconds"] > 0 and row["n_val_pairs"] == 0
    assert (row["n_train_pairs"], row["trainable_parameters"]) == (len(states.train), model.num_trainable_parameters())


def _lora_solution(config, r):
    head_dim = config.hidden_size // config.num_attention_heads
    q_out, v_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return config.num_hidden_layers * r * (2 * config.hidden_size + q_out + v_out) + config.hidden_size


def test_the_lora_check_passes_the_count_and_catches_a_missed_grouped_query_head(capsys):
    checks.lora_parameters(_lora_solution)
    assert "lora_parameters: correct on 3 cases" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="lora_parameters"):
        checks.lora_parameters(lambda c, r: c.num_hidden_layers * r * 4 * c.hidden_size + c.hidden_size)


def test_the_judge_check_passes_both_orders_and_catches_one_order(capsys):
    def both(a, b):
        return (torch.softmax(a, dim=1)[:, 0] + torch.softmax(b, dim=1)[:, 1]) / 2

    checks.judge_preference(both)
    assert "judge_preference: correct on 2 cases" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="judge_preference"):
        checks.judge_preference(lambda a, b: torch.softmax(a, dim=1)[:, 0])


def test_the_comparison_tables_carry_their_captions():
    plan = _plan()
    table = pd.DataFrame({"method": ["SparseRM"], "% of backbone": [0.12345], "train time (s)": [1.234]})
    tables = present.comparison_results(
        table=table,
        verdicts=pd.DataFrame({"A": ["x"]}),
        efficiency=pd.DataFrame({"mean": [50.0]}),
        plan=plan,
        model_id="org/Model-1",
    )
    assert set(tables) == {"figure3", "verdicts", "data_efficiency"}
    assert (
        "Model-1" in tables["figure3"]["caption"]
        and f"{plan.test_pairs} common test pairs" in tables["figure3"]["caption"]
    )
    assert tables["figure3"]["rows"][0][1:] == [0.123, 1.23]
    assert "TruthfulQA" in tables["data_efficiency"]["caption"] and plan.fair in tables["verdicts"]["caption"]
    sizes = present.comparison_sizes(
        SimpleNamespace(
            states={"truthfulqa": SimpleNamespace(sizes=lambda: {"train": 10}, val=[1, 2])},
            baseline_train_size=lambda name: 4,
            common_test={"truthfulqa": [1] * 3},
        ),
        plan,
    )
    assert sizes["TruthfulQA"].to_dict() == {
        "train": 10,
        "baselines' train": 4,
        "validation read by each model": 0,
        "common test": 3,
    }


def test_the_baselines_pairs_are_drawn_per_seed_and_the_curve_reuses_their_fits(isolated_cache, monkeypatch):
    """Each seed's baselines' pairs are the data-efficiency curve's draw at that size: SparseRM and
    StandardRM of one seed see the same pairs, two seeds see different ones, and the curve's
    StandardRM at the comparison's size is the comparison's fit, loaded, not trained again."""
    from srlib import chapter
    from srlib.baselines import cache as baseline_cache
    from srlib.baselines import pairs_digest

    ch = chapter.setup("smoke", seeds=(0, 1), datasets=("truthfulqa",), show=False)
    plan = cmp.comparison_plan(
        ch.profile, k=4, datasets=("truthfulqa",), seeds=(0, 1), baselines=("standard",), train_pairs=4,
        test_pairs=6, efficiency_sizes=(2,), efficiency_lora_sizes=(4,),
    )  # fmt: skip
    data = cmp.comparison_data(ch.states(["truthfulqa"]), plan)
    draws = [pairs_digest(data.baseline_subset("truthfulqa", seed).train.pairs) for seed in plan.seeds]
    assert draws[0] != draws[1] and data.baseline_train_size("truthfulqa") == 4

    fits = []
    real_fit = baseline_cache.fit_baseline
    monkeypatch.setattr(baseline_cache, "fit_baseline", lambda *a, **kw: fits.append(kw["seed"]) or real_fit(*a, **kw))
    ours = cmp.feature_trials(data, plan, ch.sae)
    theirs = cmp.baseline_rows(ch.backbone, data, plan, ours.columns)
    assert fits == [0, 1] and list(theirs["seed"]) == [0, 1] and set(theirs["n_train_pairs"]) == {4}
    curve = cmp.efficiency_curve(ch.backbone, ch.sae, data, plan)
    assert fits == [0, 1]  # the curve's two StandardRM points at 4 pairs trained nothing
    standard = curve[(curve["method"] == METHOD_LABELS["standard"]) & (curve["n_train_pairs"] == 4)]
    assert list(standard["train_digest"]) == draws
    for seed, outcomes in zip(standard["seed"], standard["outcomes"], strict=True):
        assert np.array_equal(outcomes, theirs.loc[theirs["seed"] == seed, "outcomes"].iloc[0])
