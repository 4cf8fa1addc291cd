"""RewardBench-style evaluation on a local sample in RewardBench's schema: per-subset accuracy,
RewardBench's section weighting (math-prm upweighted to the code subsets) and its tie rule
(a tie is a loss), from Python and from `python -m srlib eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from toy_data import error_line  # tests/ is on sys.path under pytest

from srlib import data, rewardbench
from srlib.cli import main
from srlib.errors import DataError
from srlib.rewardbench import SUBSET_MAPPING, evaluate_rewardbench, load_rewardbench, score_subsets

SAMPLE = Path(__file__).parent / "fixtures" / "rewardbench_sample.jsonl"


class WordCountRM:
    """A stand-in reward model: a response's reward is its number of words. The sample's rows
    are written so that this wins (chosen longer), loses (shorter) or ties (same length)."""

    def score_pairs(self, pairs, *, progress: bool = False):
        count = lambda text: float(len(text.split()))  # noqa: E731
        return (torch.tensor([count(p.chosen) for p in pairs]), torch.tensor([count(p.rejected) for p in pairs]))


# What WordCountRM scores on the sample, subset by subset: (pairs, wins, ties), from the
# W / L / T pattern each subset's rows were written with.
EXPECTED_SUBSETS = {
    "alpacaeval-easy": (2, 2, 0),
    "alpacaeval-length": (2, 1, 0),
    "alpacaeval-hard": (2, 1, 1),
    "mt-bench-easy": (1, 1, 0),
    "mt-bench-med": (2, 0, 0),
    "mt-bench-hard": (1, 1, 0),
    "llmbar-natural": (2, 1, 0),
    "llmbar-adver-neighbor": (2, 0, 2),
    "llmbar-adver-GPTInst": (2, 2, 0),
    "llmbar-adver-GPTOut": (1, 0, 0),
    "llmbar-adver-manual": (2, 1, 0),
    "refusals-dangerous": (2, 2, 0),
    "refusals-offensive": (2, 1, 0),
    "xstest-should-refuse": (4, 2, 0),
    "xstest-should-respond": (2, 1, 1),
    "donotanswer": (1, 0, 0),
    "math-prm": (4, 2, 0),
    "hep-cpp": (1, 1, 0),
    "hep-go": (1, 0, 0),
    "hep-java": (2, 2, 0),
    "hep-js": (2, 1, 0),
    "hep-python": (1, 0, 1),
    "hep-rust": (1, 1, 0),
    "my-custom": (1, 1, 0),
}
# By hand, with RewardBench's EXAMPLE_COUNTS as weights (ties are losses):
EXPECTED_SECTIONS = {
    # (1·100 + .5·95 + .5·95 + 1·28 + 0·40) / (100 + 95 + 95 + 28 + 40)
    "Chat": 223 / 358,
    # (1·37 + .5·100 + 0·134 + 1·92 + 0·47 + .5·46) / (37 + 100 + 134 + 92 + 47 + 46)
    "Chat Hard": 202 / 456,
    # (1·100 + .5·100 + .5·154 + .5·250 + 0·136) / (100 + 100 + 154 + 250 + 136)
    "Safety": 352 / 740,
    # (.5·984 + 164·(1 + 0 + 1 + .5 + 0 + 1)) / (984 + 6·164): math-prm weighs as much as all code
    "Reasoning": 1066 / 1968,
}


def test_the_sample_covers_every_subset_of_every_section():
    pairs, subsets = load_rewardbench(SAMPLE)
    assert len(pairs) == len(subsets) == 43
    for names in SUBSET_MAPPING.values():
        assert set(names) <= set(subsets)
    assert pairs[0].pair_id == "0" and pairs[0].source == subsets[0] == "alpacaeval-easy"


def test_known_answers_per_subset_and_per_section():
    result = evaluate_rewardbench(WordCountRM(), SAMPLE)
    assert {name: (s.n, s.wins, s.ties) for name, s in result.subsets.items()} == EXPECTED_SUBSETS
    assert result.sections.keys() == EXPECTED_SECTIONS.keys()
    for section, expected in EXPECTED_SECTIONS.items():
        assert result.sections[section] == pytest.approx(expected, abs=1e-12), section
    # neither the mean over the pairs present (7 of 12) nor math-prm at its real size (447)
    assert result.sections["Reasoning"] != pytest.approx(7 / 12)
    assert result.sections["Reasoning"] != pytest.approx((0.5 * 447 + 574) / (447 + 984))


def test_a_tie_is_a_loss_and_absent_sections_are_left_out():
    result = score_subsets(["hep-go", "hep-go", "mt-bench-med"], [1.0, 2.0, 0.5], [1.0, 1.0, 0.5])
    assert result.subsets["hep-go"].accuracy == 0.5 and result.subsets["hep-go"].ties == 1
    assert result.subsets["mt-bench-med"].accuracy == 0.0
    assert result.sections == {"Chat": 0.0, "Reasoning": 0.5}


def test_bare_hub_id_reads_the_filtered_split(monkeypatch):
    import datasets

    calls = []
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    result = evaluate_rewardbench(WordCountRM())  # the default: allenai/reward-bench
    assert calls == [("allenai/reward-bench", {"split": "filtered"})]
    assert result.sections["Safety"] == pytest.approx(EXPECTED_SECTIONS["Safety"])


def test_a_record_without_subset_names_file_and_line(tmp_path):
    path = tmp_path / "rb.jsonl"
    path.write_text(
        SAMPLE.read_text().splitlines()[0] + "\n" + json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
    )
    with pytest.raises(DataError, match=r"rb\.jsonl:2: field 'subset'"):
        load_rewardbench(path)


def test_cli_eval_prints_the_table_and_json_on_the_last_line(monkeypatch, capsys):
    from srlib import cli

    monkeypatch.setattr(cli, "_load_rm", lambda path: WordCountRM())
    assert main(["eval", "--rm", "stub", "--rewardbench", str(SAMPLE)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["n"] == 43 and summary["tie_rule"] == "a tie is a loss"
    assert summary["sections"] == pytest.approx(EXPECTED_SECTIONS)
    assert summary["subsets"]["math-prm"] == {"n": 4, "accuracy": 0.5, "ties": 0}
    table = "\n".join(lines[:-1])
    for section, score in EXPECTED_SECTIONS.items():
        assert any(
            line.startswith(section + " ") and line.split()[-1] == f"{score:.3f}" for line in table.splitlines()
        ), section
    assert "(no section)" in table and "my-custom" in table


def test_cli_eval_offline_hub_is_one_line(monkeypatch, capsys):
    from srlib import cli

    monkeypatch.setattr(cli, "_load_rm", lambda path: WordCountRM())
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert main(["eval", "--rm", "stub"]) == 2
    line = error_line(capsys)
    assert "allenai/reward-bench" in line and "HF_DATASETS_OFFLINE" in line


def test_cli_eval_with_a_saved_smoke_reward_model(tmp_path, capsys, monkeypatch):
    """End to end: a reward model fitted on the smoke profile, saved, loaded by `eval`; its
    per-subset accuracies are those of its own scores on the same pairs."""
    from toy_data import toy_pairs

    from srlib.reward import RewardModel

    monkeypatch.setenv("SRLIB_CACHE_DIR", str(tmp_path / "cache"))
    train = tmp_path / "train.jsonl"
    data.write_jsonl(toy_pairs(24), train)
    rm = tmp_path / "rm"
    assert main(["fit", "--profile", "smoke", "--features", "dense", "--train", str(train), "--out", str(rm)]) == 0
    capsys.readouterr()
    assert main(["eval", "--rm", str(rm), "--rewardbench", str(SAMPLE)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pairs, subsets = load_rewardbench(SAMPLE)
    s_w, s_l = RewardModel.from_pretrained(rm).score_pairs(pairs)
    expected = score_subsets(subsets, s_w.tolist(), s_l.tolist())
    assert summary["subsets"] == {
        name: {"n": s.n, "accuracy": s.accuracy, "ties": s.ties} for name, s in expected.subsets.items()
    }
    assert summary["sections"] == pytest.approx(
        rewardbench.section_scores({name: s.accuracy for name, s in expected.subsets.items()})
    )
