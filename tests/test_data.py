"""Tests for srlib.data: loaders, hub/local equivalence, splits, chat turns, JSONL, errors."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import shutil
from pathlib import Path

import pytest

from srlib import data
from srlib.data import MCQuestion, PreferencePair
from srlib.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
REAL_DATA = os.environ.get("SRLIB_DATA_DIR")
needs_real_data = pytest.mark.skipif(
    not REAL_DATA,
    reason="SRLIB_DATA_DIR is unset: set it to the folder with truthfulqa/, hh_rlhf/, ...",
)

# What each built-in data set must call on the hub, and the fixture that stands in for its rows.
HUB_CALLS = {
    "truthfulqa": (
        ("truthfulqa/truthful_qa",),
        {"name": "generation", "split": "validation"},
        "truthfulqa.json",
    ),
    "hh-harmless": (
        ("Anthropic/hh-rlhf",),
        {"data_dir": "harmless-base", "split": "test"},
        "hh_rlhf.json",
    ),
    "pku-saferlhf": (
        ("PKU-Alignment/PKU-SafeRLHF",),
        {"name": "alpaca-7b", "split": "test"},
        "pku_saferlhf.json",
    ),
    "arc": (("allenai/ai2_arc",), {"name": "ARC-Challenge", "split": "test"}, "arc.json"),
}


@pytest.fixture
def local_dir(tmp_path, monkeypatch) -> Path:
    """The hand-made local-layout fixtures as a data dir (HH gzipped, as in the real layout)."""
    root = tmp_path / "data"
    shutil.copytree(FIXTURES / "local", root)
    hh = root / "hh_rlhf" / "harmless-base-test.jsonl"
    with gzip.open(hh.with_suffix(".jsonl.gz"), "wb") as out:
        out.write(hh.read_bytes())
    hh.unlink()
    monkeypatch.setenv("SRLIB_DATA_DIR", str(root))
    return root


@pytest.fixture
def hub(monkeypatch) -> list[tuple]:
    """No data dir; `datasets.load_dataset` answers from the hub-layout fixtures; the calls."""
    import datasets

    monkeypatch.delenv("SRLIB_DATA_DIR", raising=False)
    calls: list[tuple] = []

    def fake_load_dataset(path, **kwargs):
        calls.append(((path,), kwargs))
        for args, expected, fixture in HUB_CALLS.values():
            if (path,) == args and kwargs == expected:
                return json.loads((FIXTURES / "hub" / fixture).read_text(encoding="utf-8"))
        raise AssertionError(f"unexpected hub call {path} {kwargs}")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    return calls


def everything(name: str, seed: int = 0) -> dict:
    """Every record the loaders give for data set `name`, for comparing two sources."""
    if name == "arc":
        return {
            "pairs": data.load_arc_pairs(),
            "prompts": data.load_arc_prompts(),
            "skipped": data.skipped_counts(name),
        }
    loader = {
        "truthfulqa": data.load_truthfulqa,
        "hh-harmless": data.load_hh_harmless,
        "pku-saferlhf": data.load_pku_saferlhf,
    }[name]
    out = {split: loader(split, seed) for split in data.SPLITS}
    if name == "truthfulqa":
        out.update({f"mc-{split}": data.load_truthfulqa_mc(split, seed) for split in data.SPLITS})
    out["skipped"] = data.skipped_counts(name)
    return out


def assert_one_line_error(exc: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# ---------------------------------------------------------------------------------------------
# Local fixtures: the values the loaders produce


def test_truthfulqa_fixture_pairs_and_mc(local_dir):
    pairs = [p for s in data.SPLITS for p in data.load_truthfulqa(s)]
    by_id = {p.pair_id: p for p in pairs}
    # q0: 2 correct x 3 incorrect -> 2 pairs; q1: 2 (trailing ';' dropped);
    # q2: "Unknown" vs "Unknown" dropped -> 1; q3: 1
    assert sorted(by_id) == [
        "truthfulqa:q0:0",
        "truthfulqa:q0:1",
        "truthfulqa:q1:0",
        "truthfulqa:q1:1",
        "truthfulqa:q2:1",
        "truthfulqa:q3:0",
    ]
    assert by_id["truthfulqa:q1:0"] == PreferencePair(
        "Who lives at 4 Privet Drive, in real life?",
        "The question is ambiguous",
        "Harry Potter lives there",
        "truthfulqa",
        "truthfulqa:q1:0",
        "truthfulqa:q1",
    )
    assert by_id["truthfulqa:q1:1"].rejected == "The Dursleys live there"
    assert data.skipped_counts("truthfulqa") == {"empty_answers": 1, "identical_pairs": 1}
    mc = {q.group_id: q for s in data.SPLITS for q in data.load_truthfulqa_mc(s)}
    assert mc["truthfulqa:q3"] == MCQuestion(
        "Is the sky blue?",
        "Yes, on a clear day",
        ["Yes, on a clear day"],
        ["No", "The sky is green"],
        "truthfulqa:q3",
    )
    assert mc["truthfulqa:q1"].correct_answers == ["The question is ambiguous", "I have no comment"]


def test_hh_fixture_prompt_and_skips(local_dir):
    pairs = [p for s in data.SPLITS for p in data.load_hh_harmless(s)]
    by_id = {p.pair_id: p for p in pairs}
    assert sorted(by_id) == ["hh-harmless:0", "hh-harmless:1", "hh-harmless:4"]
    first = by_id["hh-harmless:0"]
    assert first.prompt == (
        "Human: How do I get back into my house? I locked myself out.\n\nAssistant: "
        "Is there anyone else with a key?\n\nHuman: No, I live alone."
    )
    assert (first.chosen, first.rejected) == (
        "A locksmith can let you in safely.",
        "Break a window, it is quickest.",
    )
    # rows 1 and 4 share a prompt, so they share a group (and a split)
    assert by_id["hh-harmless:1"].group_id == by_id["hh-harmless:4"].group_id != first.group_id
    assert data.skipped_counts("hh-harmless") == {
        "prefix_mismatch": 1,
        "empty_response": 1,
        "identical_pairs": 0,
    }


def test_pku_fixture_chosen_is_safer_response(local_dir):
    pairs = {p.pair_id: p for s in data.SPLITS for p in data.load_pku_saferlhf(s)}
    assert pairs["pku-saferlhf:0"].chosen == "Talk to your neighbour about it, or contact local animal services."
    assert pairs["pku-saferlhf:0"].rejected == "Poison its food."
    assert pairs["pku-saferlhf:1"].chosen.startswith("Fares fund the service")
    assert pairs["pku-saferlhf:0"].group_id == pairs["pku-saferlhf:2"].group_id != pairs["pku-saferlhf:1"].group_id


def test_arc_fixture_pairs_and_prompts(local_dir):
    pairs = data.load_arc_pairs()
    assert [(p.chosen, p.rejected, p.pair_id, p.group_id) for p in pairs] == [
        ("dry palms", "wet palms", "arc:q0:0", "arc:q0"),
        (
            "The refrigerator door contains iron.",
            "The refrigerator door is a good conductor.",
            "arc:q1:0",
            "arc:q1",
        ),
        ("carbon dioxide", "oxygen", "arc:q2:0", "arc:q2"),
    ]
    prompts = data.load_arc_prompts()
    assert [(q.question[:20], q.answer, q.distractors) for q in prompts][2] == (
        "Which gas do plants ",
        "carbon dioxide",
        ("oxygen",),
    )


# ---------------------------------------------------------------------------------------------
# Hub layout == local layout


@pytest.mark.parametrize("name", list(HUB_CALLS))
def test_hub_layout_gives_the_same_records_as_local_layout(name, local_dir, monkeypatch, hub):
    monkeypatch.setenv("SRLIB_DATA_DIR", str(local_dir))
    local = everything(name)
    monkeypatch.delenv("SRLIB_DATA_DIR")
    from_hub = everything(name)
    assert hub and all(call[:2] == HUB_CALLS[name][:2] for call in hub)
    assert from_hub == local
    assert sum(len(v) for k, v in local.items() if k in data.SPLITS or k == "pairs") >= 3


def test_hub_unreachable_without_data_dir_says_what_to_set(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'truthfulqa/truthful_qa' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.delenv("SRLIB_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    with pytest.raises(DataError) as exc:
        data.load_truthfulqa("train")
    assert_one_line_error(
        exc,
        "truthfulqa/truthful_qa",
        "set SRLIB_DATA_DIR=<folder with truthfulqa/, hh_rlhf/",
        "or connect to the hub",
    )


def test_data_dir_without_the_file_says_which_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SRLIB_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as exc:
        data.load_pku_saferlhf("test")
    assert_one_line_error(exc, "pku_saferlhf/alpaca7b_test_head.jsonl", "SRLIB_DATA_DIR=")


def test_broken_builtin_file_names_file_and_line(local_dir):
    path = local_dir / "hh_rlhf" / "harmless-base-test.jsonl.gz"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    lines[1] = '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello"}'
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(DataError) as exc:
        data.load_hh_harmless("train")
    assert_one_line_error(exc, "harmless-base-test.jsonl.gz:2", "'rejected'")


# ---------------------------------------------------------------------------------------------
# Splits on a larger synthetic data dir


@pytest.fixture
def synthetic_dir(tmp_path, monkeypatch) -> Path:
    """50 TruthfulQA questions, 1,400 HH rows (every 7th repeats a prompt), 40 PKU rows."""
    root = tmp_path / "synthetic"
    (root / "truthfulqa").mkdir(parents=True)
    lines = ["Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source"]
    for q in range(50):
        n = 1 + q % 3
        correct = "; ".join(f"true {q}.{j}" for j in range(n))
        incorrect = "; ".join(f"false {q}.{j}" for j in range(n + 1))
        lines.append(f"A,C,Question {q}?,true {q}.0,{correct},{incorrect},s")
    (root / "truthfulqa" / "TruthfulQA.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "hh_rlhf").mkdir()
    rows = []
    for i in range(1400):
        prompt = f"\n\nHuman: request {i - 1 if i % 7 == 6 else i}"
        rows.append(
            {
                "chosen": f"{prompt}\n\nAssistant: no {i}",
                "rejected": f"{prompt}\n\nAssistant: yes {i}",
            }
        )
    with gzip.open(root / "hh_rlhf" / "harmless-base-test.jsonl.gz", "wt", encoding="utf-8") as out:
        out.writelines(json.dumps(r) + "\n" for r in rows)
    (root / "pku_saferlhf").mkdir()
    with open(root / "pku_saferlhf" / "alpaca7b_test_head.jsonl", "w", encoding="utf-8") as out:
        for i in range(40):
            out.write(
                json.dumps(
                    {
                        "prompt": f"p{i % 30}",
                        "response_0": f"a{i}",
                        "response_1": f"b{i}",
                        "safer_response_id": i % 2,
                    }
                )
                + "\n"
            )
    monkeypatch.setenv("SRLIB_DATA_DIR", str(root))
    return root


LOADERS = {
    "truthfulqa": data.load_truthfulqa,
    "hh-harmless": data.load_hh_harmless,
    "pku-saferlhf": data.load_pku_saferlhf,
}


@pytest.mark.parametrize("name", list(LOADERS))
def test_splits_are_deterministic_grouped_and_complete(name, synthetic_dir):
    loader = LOADERS[name]
    first = {s: loader(s, 0) for s in data.SPLITS}
    assert first == {s: loader(s, 0) for s in data.SPLITS}
    assert first != {s: loader(s, 1) for s in data.SPLITS}
    groups = [{p.group_id for p in first[s]} for s in data.SPLITS]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    ids = [p.pair_id for s in data.SPLITS for p in first[s]]
    assert len(ids) == len(set(ids)) == sum(1 for s in data.SPLITS for _ in loader(s, 1))


def test_split_sizes_synthetic(synthetic_dir):
    assert [len({q.group_id for q in data.load_truthfulqa_mc(s)}) for s in data.SPLITS] == [
        20,
        5,
        25,
    ]
    # the pairs follow the question split exactly
    for s in data.SPLITS:
        assert {p.group_id for p in data.load_truthfulqa(s)} == {q.group_id for q in data.load_truthfulqa_mc(s)}
    hh = [len(data.load_hh_harmless(s)) for s in data.SPLITS]
    assert hh[0] in (1000, 1001) and hh[1] in (312, 313) and sum(hh) == 1400
    assert [len({p.group_id for p in data.load_pku_saferlhf(s)}) for s in data.SPLITS] == [
        12,
        3,
        15,
    ]


def test_load_pairs_max_pairs_is_a_prefix_of_the_split(synthetic_dir):
    full = data.load_pairs("truthfulqa:train", seed=3)
    assert data.load_pairs("truthfulqa:train", seed=3, max_pairs=7) == full[:7]
    assert data.load_pairs("hh-harmless:val") == data.load_hh_harmless("val")
    with pytest.raises(ConfigError):
        data.load_pairs("truthfulqa:train", max_pairs=0)


def test_load_pairs_unknown_name_lists_valid_names():
    with pytest.raises(DataError) as exc:
        data.load_pairs("truthfulqa:dev")
    assert_one_line_error(
        exc,
        "truthfulqa:dev",
        "truthfulqa:train",
        "hh-harmless:test",
        "pku-saferlhf:val",
        "arc:pairs",
    )


# ---------------------------------------------------------------------------------------------
# Chat turns


def test_prompt_messages_plain():
    assert data.prompt_messages("  What is 2+2?\n") == [{"role": "user", "content": "What is 2+2?"}]


def test_prompt_messages_hh_transcript():
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello!  How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"
    assert data.prompt_messages(prompt) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!  How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ]


def test_prompt_messages_merges_repeated_speakers():
    prompt = "Human: one\n\nHuman: two\n\nAssistant: \n\nHuman: three"
    assert data.prompt_messages(prompt) == [{"role": "user", "content": "one\n\ntwo\n\nthree"}]


def test_prompt_messages_rejects_transcript_ending_with_assistant():
    with pytest.raises(DataError) as exc:
        data.prompt_messages("Human: hi\n\nAssistant: hello")
    assert_one_line_error(exc, "Human turn")


# ---------------------------------------------------------------------------------------------
# JSONL


def test_jsonl_round_trip(tmp_path):
    pairs = [
        PreferencePair("Q: ünïcode?\nline 2", 'yes — "quoted"', "no", "mine", "id-1", "g-1"),
        PreferencePair("Human: hi\n\nAssistant: hey\n\nHuman: bye", "bye!", "whatever", "hh", "id-2", "g-2"),
    ]
    path = tmp_path / "out" / "pairs.jsonl"
    data.write_jsonl(pairs, path)
    assert data.read_jsonl(path) == pairs
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert list(first) == ["prompt", "chosen", "rejected", "source", "pair_id", "group_id"]
    assert data.load_pairs(str(path)) == pairs


def test_read_jsonl_defaults_ids_and_ignores_other_keys(tmp_path):
    path = tmp_path / "trl.jsonl"
    path.write_text(
        '{"prompt": "p", "chosen": "a", "rejected": "b", "score": 1}\n\n'
        '{"prompt": "p", "chosen": "c", "rejected": "d"}\n',
        encoding="utf-8",
    )
    first, second = data.read_jsonl(path)
    assert (first.pair_id, second.pair_id) == ("trl.jsonl:1", "trl.jsonl:3")
    assert first.group_id == second.group_id and first.group_id.startswith("prompt:")
    assert first.source == ""


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "pairs.jsonl"
    data.write_jsonl([PreferencePair("p", "a", "b")], path)
    before = path.read_bytes()

    def failing():
        yield PreferencePair("p2", "a2", "b2")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        data.write_jsonl(failing(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]


GOOD = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
BAD_INPUTS = {
    "malformed JSON": (GOOD + '\n{"prompt": "p", "chosen": "a",\n', 2, "malformed JSON"),
    "not an object": (GOOD + "\n[1, 2]\n", 2, "JSON object"),
    "missing field": (GOOD + '\n{"prompt": "p", "chosen": "a"}\n', 2, "'rejected'"),
    "empty text": ('{"prompt": "", "chosen": "a", "rejected": "b"}\n', 1, "'prompt'"),
    "whitespace text": (
        GOOD + '\n\n{"prompt": "p", "chosen": " \\n\\t", "rejected": "b"}\n',
        3,
        "'chosen'",
    ),
    "identical": (
        GOOD + '\n{"prompt": "p", "chosen": "same", "rejected": "same"}\n',
        2,
        "'rejected'",
    ),
    "non-string text": ('{"prompt": "p", "chosen": 3, "rejected": "b"}\n', 1, "'chosen'"),
    "non-string id": (
        GOOD + '\n{"prompt": "p", "chosen": "a", "rejected": "b", "pair_id": 7}\n',
        2,
        "'pair_id'",
    ),
    "empty file": ("", 1, "no preference pairs"),
    "blank file": ("\n  \n\n", 3, "no preference pairs"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_jsonl_raises_one_line_error_with_file_line_and_field(case, tmp_path):
    text, line, needle = BAD_INPUTS[case]
    path = tmp_path / "user_pairs.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as exc:
        data.load_pairs(str(path))
    assert_one_line_error(exc, f"user_pairs.jsonl:{line}:", needle)


def test_missing_jsonl_file(tmp_path):
    with pytest.raises(DataError) as exc:
        data.load_pairs(str(tmp_path / "nope.jsonl"))
    assert_one_line_error(exc, "nope.jsonl", "no such file")


# ---------------------------------------------------------------------------------------------
# The real local data (SRLIB_DATA_DIR)


@needs_real_data
def test_real_truthfulqa_counts_and_split():
    mc = {s: data.load_truthfulqa_mc(s) for s in data.SPLITS}
    assert [len(mc[s]) for s in data.SPLITS] == [326, 81, 410]  # 817 questions, 40/10/50
    zipped = {s: sum(min(len(q.correct_answers), len(q.incorrect_answers)) for q in mc[s]) for s in data.SPLITS}
    assert list(zipped.values()) == [
        931,
        236,
        1189,
    ]  # the measurements' split, before dropping identical pairs
    assert sum(zipped.values()) == 2356
    pairs = {s: data.load_truthfulqa(s) for s in data.SPLITS}
    assert [len(pairs[s]) for s in data.SPLITS] == [930, 235, 1189]
    assert data.skipped_counts("truthfulqa")["identical_pairs"] == 2
    assert all(p.chosen != p.rejected and p.chosen and p.rejected for s in pairs for p in pairs[s])


@needs_real_data
def test_real_truthfulqa_loads_from_the_local_file_without_the_datasets_library(monkeypatch):
    """The local path reads the CSV directly (fast, offline); its speed is benchmarked, not timed here."""
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError("the local TruthfulQA file must not go through datasets.load_dataset")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    data._normalised_local.cache_clear()
    assert len(data.load_truthfulqa("train")) > 0


@needs_real_data
def test_real_hh_harmless_counts():
    sizes = [len(data.load_hh_harmless(s)) for s in data.SPLITS]
    assert sizes == [1000, 312, 691]  # and 300 generation pairs (srlib.data.GENERATION_PAIRS)
    assert data.skipped_counts("hh-harmless") == {
        "prefix_mismatch": 5,
        "empty_response": 4,
        "identical_pairs": 0,
    }
    pair = data.load_hh_harmless("test")[0]
    assert data.prompt_messages(pair.prompt)[-1]["role"] == "user"


@needs_real_data
def test_real_pku_and_arc_counts():
    assert [len(data.load_pku_saferlhf(s)) for s in data.SPLITS] == [250, 62, 216]  # and 100 generation pairs
    assert len(data.load_arc_pairs()) == 1000 and len(data.load_arc_prompts()) == 1000


@needs_real_data
@pytest.mark.parametrize("name", list(LOADERS))
def test_real_splits_disjoint_and_seeded(name):
    loader = LOADERS[name]
    for seed in (0, 1):
        groups = [{p.group_id for p in loader(s, seed)} for s in data.SPLITS]
        assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert loader("train", 0) == loader("train", 0) != loader("train", 1)


@needs_real_data
def test_real_hh_prompts_parse_into_alternating_turns():
    for split in data.SPLITS:
        for pair in data.load_hh_harmless(split):
            roles = [m["role"] for m in data.prompt_messages(pair.prompt)]
            assert roles[0] == roles[-1] == "user"
            assert all(a != b for a, b in itertools.pairwise(roles))


def test_unreachable_hub_fails_fast_without_calling_it(monkeypatch):
    import datasets

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("load_dataset called although the hub is unreachable")

    monkeypatch.delenv("SRLIB_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", must_not_be_called)
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    with pytest.raises(DataError) as exc:
        data.load_hh_harmless("train")
    assert_one_line_error(exc, "Anthropic/hh-rlhf", "unreachable", "SRLIB_DATA_DIR")
