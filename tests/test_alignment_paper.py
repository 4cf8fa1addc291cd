"""Chapter 7 as the paper describes it (§3.3, Table 1): generation prompts no reward model sees,
the base model as the DPO reference, and one runnable configuration per Table 1 track."""

from __future__ import annotations

import os

import pytest

from srlib import data

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
            sizes, split, 0, cut, data.GENERATION_PAIRS[dataset])


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
