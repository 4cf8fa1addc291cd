"""Chapter 7 as the paper describes it (§3.3, Table 1): generation prompts no reward model sees,
the base model as the DPO reference, and one runnable configuration per Table 1 track."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import srlib.alignment as al
from srlib import data
from srlib.backbone import load_backbone
from srlib.cli import build_parser
from srlib.data import PreferencePair
from srlib.paper import TABLE1_COLUMNS
from srlib.profiles import PROFILES, TINY_MODEL_ID

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

needs_real_data = pytest.mark.skipif(
    not os.environ.get("SRLIB_DATA_DIR"),
    reason="SRLIB_DATA_DIR is unset: set it to the folder with truthfulqa/, hh_rlhf/, ...",
)


def _rm_prompts(dataset: str, seed: int) -> set[str]:
    """Every prompt of the train, val and test splits a reward model of `dataset` is built on."""
    return {p.prompt for split in data.SPLITS for p in data.load_pairs(f"{dataset}:{split}", seed=seed)}


@needs_real_data
@pytest.mark.parametrize("dataset", ["truthfulqa", "hh-harmless", "pku-saferlhf"])
@pytest.mark.parametrize("seed", [0, 1])
def test_generation_prompts_are_disjoint_from_every_reward_model_split(dataset, seed):
    prompts = data.generation_prompts(dataset, seed=seed)
    assert len(prompts) >= 96 and len(set(prompts)) == len(prompts)  # chapter 6's cpu Figure 5 needs 96
    assert not set(prompts) & _rm_prompts(dataset, seed)
    assert data.generation_prompts(dataset, seed=seed) == prompts  # deterministic


@needs_real_data
@pytest.mark.parametrize("dataset", list(data.GENERATION_PAIRS))
def test_generation_split_is_carved_from_test_and_leaves_train_and_val_alone(dataset):
    groups = {s: {p.group_id for p in data.load_pairs(f"{dataset}:{s}")} for s in (*data.SPLITS, "gen")}
    assert all(not groups[a] & groups[b] for a in groups for b in groups if a < b)
    gen = data.load_pairs(f"{dataset}:gen")
    assert data.GENERATION_PAIRS[dataset] <= len(gen) < data.GENERATION_PAIRS[dataset] + 5
    assert len(data.load_pairs(f"{dataset}:test")) >= len(gen)
    # train and val are the groups they were before the generation split existed
    sizes = [len(g) for g in data._normalised(dataset).groups]
    cut = data._size_cut(data.HH_SPLIT_SIZES) if dataset == "hh-harmless" else data._fraction_cut
    for split in ("train", "val"):
        assert data._split_indices(sizes, split, 0, cut) == data._split_indices(
            sizes, split, 0, cut, data.GENERATION_PAIRS[dataset]
        )


def test_split_rule_on_toy_groups():
    sizes = [1] * 40  # 16 train, 4 val, 20 after val
    cut = data._fraction_cut
    assert len(data._split_indices(sizes, "gen", 0, cut, 8)) == 8
    assert len(data._split_indices(sizes, "test", 0, cut, 8)) == 12
    # too few pairs after val for test and generation: no generation split, test untouched
    assert data._split_indices(sizes, "gen", 0, cut, 11) == []
    assert len(data._split_indices(sizes, "test", 0, cut, 11)) == 20
    with pytest.raises(data.DataError, match="gen"):
        data._split_indices(sizes, "gen", 0, cut)  # a data set without one names the valid splits


# ---------------------------------------------------------------------------------------------
# The DPO reference, the tie rule and the three tracks


def _tuples(n: int = 8) -> list[PreferencePair]:
    return [
        PreferencePair(f"Question number {i}?", "I am sorry, but I cannot help with that.", "Here is a careful answer.")
        for i in range(n)
    ]


def test_the_paper_reference_is_the_default_and_dpo_measures_against_it(tmp_path):
    assert al.AlignmentConfig(track="red-teaming").reference == "base"
    base = load_backbone(TINY_MODEL_ID)
    tok, tuples = base.tokenizer, _tuples()
    cfg = al.AlignmentConfig.for_profile("smoke", track="red-teaming", epochs=3, learning_rate=5e-3)
    policy, _ = al.dpo_round(
        copy.deepcopy(base.model), tok, tuples, cfg, seed=0, adapter_dir=tmp_path / "round1", progress=False
    )
    weights = {k: v.clone() for k, v in base.model.state_dict().items()}
    # a second round that barely moves: its first-epoch loss is the loss at the start
    still = cfg.replace(epochs=1, learning_rate=1e-9)
    _, against_base = al.dpo_round(
        copy.deepcopy(policy),
        tok,
        tuples,
        still,
        seed=1,
        adapter_dir=tmp_path / "a",
        reference=base.model,
        progress=False,
    )
    _, against_self = al.dpo_round(
        copy.deepcopy(policy), tok, tuples, still, seed=1, adapter_dir=tmp_path / "b", progress=False
    )
    assert abs(against_self["epochs"][0]["loss"] - 0.6931) < 1e-3  # pi_ref = pi_theta: log 2
    assert against_base["epochs"][0]["loss"] < 0.6  # round 1 already prefers y_w over the base
    assert against_base["epochs"][0]["rewards/margins"] > 0.5
    # the reference is left as it was: same weights, no patched forward
    assert all(torch.equal(v, weights[k]) for k, v in base.model.state_dict().items())
    assert "forward" not in base.model.__dict__


def test_run_alignment_passes_the_configured_reference(tmp_path, monkeypatch):
    seen = []
    real = al.dpo_round

    def spy(*args, **kwargs):
        seen.append(kwargs.get("reference"))
        return real(*args, **kwargs)

    monkeypatch.setattr(al, "dpo_round", spy)
    cfg = al.AlignmentConfig.for_profile("smoke", track="red-teaming", rounds=2, n_prompts=4)
    al.run_alignment(cfg, {"WO RM": None}, out_dir=tmp_path / "base", progress=False)
    assert len(seen) == 2 and all(ref is not None for ref in seen)
    assert seen[0] is seen[1]  # the one base model, both rounds
    seen.clear()
    al.run_alignment(cfg.replace(reference="previous"), {"WO RM": None}, out_dir=tmp_path / "prev", progress=False)
    assert seen == [None, None]


class _Scores:
    def __init__(self, s_w, s_l):
        self.s_w, self.s_l = s_w, s_l

    def score_pairs(self, pairs):
        return torch.tensor(self.s_w), torch.tensor(self.s_l)


def test_the_tie_rule_is_a_setting_and_the_deviation_table_reports_it():
    tuples = [PreferencePair("x", "a", "b"), PreferencePair("x", "c", "d"), PreferencePair("x", "e", "f")]
    rm = _Scores([1.0, 0.5, 0.0], [0.0, 0.5, 1.0])
    assert al.filter_tuples(tuples, rm).keep == [True, False, False]
    assert al.filter_tuples(tuples, rm, keep_ties=True).keep == [True, True, False]
    rows = {
        r["setting"]: r
        for r in al.AlignmentConfig(track="red-teaming", keep_ties=True, reference="previous").paper_deviations()
    }
    assert rows["filter on a tie s_w = s_l"]["here"] == "kept"
    assert rows["DPO reference pi_ref"]["here"] == "the previous round's policy"
    default = {r["setting"]: r for r in al.AlignmentConfig(track="red-teaming").paper_deviations()}
    assert default["DPO reference pi_ref"]["here"] == default["DPO reference pi_ref"]["paper"] == "the base model"


@needs_real_data
@pytest.mark.parametrize("track", ["truthfulqa", "saferlhf", "red-teaming"])
def test_each_table1_track_has_a_runnable_configuration(track):
    assert set(al.TRACKS) == {"truthfulqa", "saferlhf", "red-teaming"}
    assert {c for t in al.TRACKS.values() for c in t.paper_columns} == set(TABLE1_COLUMNS)
    assert build_parser().parse_args(["align", "--track", track, "--out", "x", "--include-wo-rm"]).track == track
    for profile in PROFILES:
        cfg = al.AlignmentConfig.for_profile(profile, track=track)
        assert cfg.metric in al.TRACKS[track].metrics
    cfg = al.AlignmentConfig.for_profile("smoke", track=track)
    prompts, shots = al.prompts_and_shots(cfg)
    assert len(prompts) == cfg.n_prompts and len(shots) == cfg.n_shots
    assert not set(prompts) & _rm_prompts(cfg.data_name, cfg.split_seed)
    data = al._eval_data(cfg)
    assert len(data.val) == cfg.max_val and len(data.test) == cfg.max_test


def test_the_cli_refuses_a_track_that_is_not_in_table1(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["align", "--track", "safety", "--out", "x"])
    assert "red-teaming" in capsys.readouterr().err


def test_a_round_whose_prompts_all_fill_max_length_trains_nothing(tmp_path):
    base = load_backbone(TINY_MODEL_ID)
    model = copy.deepcopy(base.model)
    cfg = al.AlignmentConfig.for_profile("smoke", track="red-teaming", max_length=4)
    out, stats = al.dpo_round(
        model, base.tokenizer, _tuples(2), cfg, seed=0, adapter_dir=tmp_path / "a", progress=False
    )
    assert out is model and stats["steps"] == 0 and stats["n_trained"] == 0 and not (tmp_path / "a").exists()


def test_choose_track_takes_the_most_accurate_filter_unless_a_better_measured_one_is_within_one_se():
    import pandas as pd

    table = pd.DataFrame(
        {"accuracy (%)": [61.0, 74.0, 70.0], "se (points)": [2.0, 2.0, 2.0], "n": [300, 60, 300]},
        index=["truthfulqa", "saferlhf", "red-teaming"],
    )
    assert al.choose_track(table) == "saferlhf"  # 70 is more than one se below 74
    # chapter 7's cpu figures at layer 22: 65.1 (se 6.1, 62 pairs) against 64.7 (se 2.7, 312 pairs)
    close = table.assign(**{"accuracy (%)": [54.1, 65.1, 64.7], "se (points)": [2.9, 6.1, 2.7], "n": [300, 62, 312]})
    assert al.choose_track(close) == "red-teaming"
    # a tie on the same number of pairs goes to Table 1's order
    even = table.assign(**{"accuracy (%)": [80.0, 74.0, 80.0], "n": [300, 300, 300]})
    assert al.choose_track(even) == "truthfulqa"


@needs_real_data
def test_track_filter_accuracy_reads_validation_and_arc_pairs_only(smoke_profile, tiny_backbone, monkeypatch):
    from srlib import experiments
    from srlib.sae import sae_for_profile

    fitted = []
    fit_variant = experiments.fit_variant

    def recording_fit_variant(states, **kwargs):
        fitted.append(kwargs["score_test"])
        return fit_variant(states, **kwargs)

    monkeypatch.setattr(experiments, "fit_variant", recording_fit_variant)
    sae = sae_for_profile(smoke_profile, tiny_backbone, progress=False)
    table = al.track_filter_accuracy(tiny_backbone, smoke_profile, sae, k=4, seeds=(0, 1), arc_pairs=12)
    assert list(table.index) == list(al.TRACKS) and fitted == [False] * 6  # never scores a test split
    assert (table["seeds"] == 2).all()
    assert table.loc["truthfulqa", "n"] == 12 and table.loc["truthfulqa", "held-out pairs"] == "ARC gold vs distractor"
    for track in ("saferlhf", "red-teaming"):
        val = experiments.dataset_states(tiny_backbone, al.TRACKS[track].dataset, smoke_profile, progress=False).val
        assert table.loc[track, "n"] == len(val.pairs)
    assert table["accuracy (%)"].between(0, 100).all() and (table["se (points)"] > 0).all()
    assert al.choose_track(table) in al.TRACKS
    with pytest.raises(al.ConfigError, match="arc_pairs"):
        al.track_filter_accuracy(tiny_backbone, smoke_profile, sae, k=4, arc_pairs=0)
    with pytest.raises(al.ConfigError, match="seed"):
        al.track_filter_accuracy(tiny_backbone, smoke_profile, sae, k=4, seeds=())
