"""TRL's preference formats wherever pairs are read: standard, conversational, implicit prompt,
a datasets.Dataset, a parquet file and a hub data set, with the chat template for multi-turn
prompts and one-line errors (file:line) for bad records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from toy_data import BAD, GOOD, error_line  # tests/ is on sys.path under pytest

from srlib import data
from srlib.backbone import format_text
from srlib.cli import main
from srlib.data import PreferencePair, load_pairs
from srlib.errors import DataError


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "You answer carefully."}
MULTI_TURN = (SYSTEM, user("Is the moon made of cheese?"), assistant("No."), user("Why do people say so?"))


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def texts(pairs: list[PreferencePair]) -> list[tuple]:
    return [(p.prompt, p.chosen, p.rejected, p.group_id) for p in pairs]


# ---------------------------------------------------------------------------------------------
# The formats give the same pairs


STANDARD = {"prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green."}
CONVERSATIONAL = {
    "prompt": [user("What colour is the sky?")],
    "chosen": [assistant("Blue.")],
    "rejected": [assistant("Green.")],
}
IMPLICIT = {
    "chosen": [user("What colour is the sky?"), assistant("Blue.")],
    "rejected": [user("What colour is the sky?"), assistant("Green.")],
}


def test_one_turn_conversational_and_implicit_records_are_the_standard_pair(tmp_path):
    pairs = load_pairs(write_records(tmp_path / "p.jsonl", [STANDARD, CONVERSATIONAL, IMPLICIT]))
    assert [p.pair_id for p in pairs] == ["p.jsonl:1", "p.jsonl:2", "p.jsonl:3"]
    assert texts(pairs)[0] == ("What colour is the sky?", "Blue.", "Green.", pairs[0].group_id)
    assert texts(pairs)[1] == texts(pairs)[2] == texts(pairs)[0]  # same prompt text, same group, same states


def test_multi_turn_conversation_stays_a_conversation_and_goes_through_the_chat_template(tmp_path, tiny_backbone):
    explicit = {
        "prompt": list(MULTI_TURN),
        "chosen": [assistant("A myth from old fables.")],
        "rejected": [assistant("Because it is cheese.")],
    }
    implicit = {
        "chosen": [*MULTI_TURN, assistant("A myth from old fables.")],
        "rejected": [*MULTI_TURN, assistant("Because it is cheese.")],
    }
    first, second = load_pairs(write_records(tmp_path / "conv.jsonl", [explicit, implicit]))
    assert first.prompt == second.prompt == MULTI_TURN
    assert (first.chosen, first.rejected) == ("A myth from old fables.", "Because it is cheese.")
    assert (
        first.group_id
        == second.group_id
        != data.load_pairs(write_records(tmp_path / "one.jsonl", [STANDARD]))[0].group_id
    )
    assert data.prompt_messages(first.prompt) == list(MULTI_TURN)

    tokenizer = tiny_backbone.tokenizer
    rendered = format_text(tokenizer, first.prompt, first.chosen)
    expected = tokenizer.apply_chat_template([*MULTI_TURN, assistant(first.chosen)], tokenize=False)
    assert rendered == expected
    # every turn is in the text, each in its own template block, in order
    positions = [rendered.index(m["content"]) for m in MULTI_TURN]
    assert positions == sorted(positions) and rendered.count("<|im_start|>user") == 2


def test_template_without_system_role_gets_the_system_turn_folded(tiny_backbone):
    from jinja2.exceptions import TemplateError

    class NoSystem:
        chat_template = "x"

        def apply_chat_template(self, messages, **kwargs):
            if messages[0]["role"] == "system":
                raise TemplateError("System role not supported")
            return " | ".join(f"{m['role']}={m['content']}" for m in messages)

    text = format_text(NoSystem(), MULTI_TURN, "A myth.")
    assert text.startswith("user=You answer carefully.\n\nIs the moon made of cheese?")
    assert text.endswith("user=Why do people say so? | assistant=A myth.")


def test_implicit_hh_transcripts_split_at_the_last_assistant_turn(tmp_path):
    shared = "\n\nHuman: How do I pick a lock?\n\nAssistant: I"
    record = {"chosen": shared + " can't help with that.", "rejected": shared + " will explain: first..."}
    (pair,) = load_pairs(write_records(tmp_path / "hh.jsonl", [record]))
    # TRL's character prefix would put "I" into the prompt; the transcript split does not
    assert pair.prompt == "Human: How do I pick a lock?"
    assert (pair.chosen, pair.rejected) == ("I can't help with that.", "I will explain: first...")


def test_implicit_plain_strings_use_trls_shared_prefix(tmp_path):
    record = {"chosen": "The capital of France is Paris.", "rejected": "The capital of France is Rome."}
    (pair,) = load_pairs(write_records(tmp_path / "s.jsonl", [record]))
    assert (pair.prompt, pair.chosen, pair.rejected) == ("The capital of France is", "Paris.", "Rome.")


def test_a_conversation_pair_round_trips_through_write_jsonl(tmp_path):
    pair = PreferencePair(MULTI_TURN, "A myth.", "It is cheese.", pair_id="c1", group_id="g")
    data.write_jsonl([pair], tmp_path / "out.jsonl")
    record = json.loads((tmp_path / "out.jsonl").read_text())
    assert record["prompt"] == list(MULTI_TURN)  # TRL's conversational prompt
    assert data.read_jsonl(tmp_path / "out.jsonl") == [pair]


# ---------------------------------------------------------------------------------------------
# Bad conversational records: one line with file:line


BAD_RECORDS = {
    "message without content": ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "'prompt' message 0"),
    "unknown role": ({"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"}, "'robot'"),
    "prompt ends on the assistant": (
        {"prompt": [user("hi"), assistant("hello")], "chosen": "a", "rejected": "b"},
        "ends on a 'assistant' message",
    ),
    "two answer messages": (
        {"prompt": [user("hi")], "chosen": [assistant("a"), user("b")], "rejected": [assistant("c")]},
        "one assistant message",
    ),
    "empty conversation": ({"prompt": [], "chosen": "a", "rejected": "b"}, "empty conversation"),
    "mixed implicit": ({"chosen": [user("q"), assistant("a")], "rejected": "q b"}, "both be strings"),
    "nothing shared": ({"chosen": "yes", "rejected": "no"}, "share no prefix"),
    "identical answers": (CONVERSATIONAL | {"rejected": [assistant("Blue.")]}, "identical"),
    "hh prefix mismatch": (
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
        "differ before their last Assistant turn",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_trl_records_are_one_line_errors_with_file_and_line(case, tmp_path):
    record, needle = BAD_RECORDS[case]
    path = write_records(tmp_path / "user.jsonl", [STANDARD, record])
    with pytest.raises(DataError) as error:
        load_pairs(path)
    message = str(error.value)
    assert "\n" not in message and "user.jsonl:2:" in message and needle in message, message


# ---------------------------------------------------------------------------------------------
# A datasets.Dataset, a parquet file, a hub data set


RECORDS = [
    STANDARD,
    {"prompt": list(MULTI_TURN), "chosen": [assistant("A myth.")], "rejected": [assistant("It is cheese.")]},
]


def test_dataset_and_parquet_give_the_pairs_of_the_jsonl_file(tmp_path):
    import datasets

    conversational = [RECORDS[1], {**RECORDS[1], "chosen": [assistant("Old fables.")]}]
    from_jsonl = load_pairs(write_records(tmp_path / "c.jsonl", conversational))
    dataset = datasets.Dataset.from_list(conversational)
    from_dataset = load_pairs(dataset)
    dataset.to_parquet(str(tmp_path / "c.parquet"))
    from_parquet = load_pairs(str(tmp_path / "c.parquet"))
    assert texts(from_dataset) == texts(from_parquet) == texts(from_jsonl)
    assert [p.pair_id for p in from_dataset] == ["dataset:0", "dataset:1"]
    assert [p.pair_id for p in from_parquet] == ["c.parquet:1", "c.parquet:2"]


def test_bad_parquet_row_names_the_file_and_row(tmp_path):
    import datasets

    datasets.Dataset.from_list([STANDARD, {**STANDARD, "chosen": "  "}]).to_parquet(str(tmp_path / "b.parquet"))
    with pytest.raises(DataError, match=r"b\.parquet:row 2: field 'chosen' is empty"):
        load_pairs(str(tmp_path / "b.parquet"))


@pytest.fixture
def hub_calls(monkeypatch) -> list[tuple]:
    """`datasets.load_dataset` answers two HH-style rows and one unusable row; the calls."""
    import datasets

    calls: list[tuple] = []
    rows = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: hi\n\nAssistant: Go away."},
        {"chosen": "\n\nHuman: x\n\nAssistant: same", "rejected": "\n\nHuman: x\n\nAssistant: same"},
        {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"},
    ]

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    return calls


def test_hub_spec_loads_the_split_and_drops_unusable_rows_with_one_warning(hub_calls):
    with pytest.warns(UserWarning, match=r"hub:Anthropic/hh-rlhf:test: dropped 1 of 3 .*identical"):
        pairs = load_pairs("hub:Anthropic/hh-rlhf:test")
    assert hub_calls == [("Anthropic/hh-rlhf", {"split": "test"})]
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Human: hi", "Hello!", "Go away."),
        ("Human: 2+2?", "4", "5"),
    ]
    assert [p.pair_id for p in pairs] == ["Anthropic/hh-rlhf:test:0", "Anthropic/hh-rlhf:test:2"]
    with pytest.warns(UserWarning, match="dropped 1 of 3"):
        load_pairs("hub:someone/prefs")
    assert hub_calls[-1] == ("someone/prefs", {"split": "train"})


def test_hub_spec_offline_is_one_line_saying_what_to_set(monkeypatch):
    import datasets

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("load_dataset called although the hub is unreachable")

    monkeypatch.setattr(datasets, "load_dataset", must_not_be_called)
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(DataError) as error:
        load_pairs("hub:Anthropic/hh-rlhf:test")
    message = str(error.value)
    assert "\n" not in message and "Anthropic/hh-rlhf" in message
    assert "HF_DATASETS_OFFLINE=1" in message and ".jsonl or .parquet" in message

    def offline_cache_miss(*args, **kwargs):  # what datasets raises offline without a cached copy
        raise ConnectionError("Couldn't reach 'Anthropic/hh-rlhf' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline_cache_miss)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # offline: datasets reads its cache, so it is asked
    with pytest.raises(
        DataError,
        match=r"cannot load Anthropic/hh-rlhf from the hub \(ConnectionError.*"
        r"HF_DATASETS_OFFLINE",
    ):
        load_pairs("hub:Anthropic/hh-rlhf:test")


@pytest.mark.parametrize("spec", ["hub:", "hub:a/b/c", "hub:a/b:test:x"])
def test_malformed_hub_spec_says_how_to_write_one(spec):
    with pytest.raises(DataError, match="hub:<owner>/<name>"):
        load_pairs(spec)


# ---------------------------------------------------------------------------------------------
# The command line on a TRL conversational file


@pytest.fixture(scope="module", autouse=True)
def module_cache(tmp_path_factory):
    """One cache for this module, so the smoke SAE is trained once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SRLIB_CACHE_DIR", str(tmp_path_factory.mktemp("trl-cache")))
        yield


def conversational_file(path: Path, n: int, offset: int = 0) -> Path:
    """`n` TRL conversational records; every third prompt is a multi-turn conversation."""
    records = []
    for i in range(offset, offset + n):
        question = user(f"Question number {i}: is claim {i % 7} true?")
        prompt = [SYSTEM, user("Hello."), assistant("Hi! Ask away."), question] if i % 3 == 0 else [question]
        records.append(
            {"prompt": prompt, "chosen": [assistant(GOOD[i % 4])], "rejected": [assistant(BAD[(i + 1) % 4])]}
        )
    return write_records(path, records)


def test_cli_fits_and_scores_a_trl_conversational_file(tmp_path, capsys):
    train = conversational_file(tmp_path / "conv.jsonl", 30)
    test = conversational_file(tmp_path / "conv_test.jsonl", 9, offset=30)
    rm = tmp_path / "rm"
    assert main(["fit", "--profile", "smoke", "--train", str(train), "--out", str(rm), "--k", "4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_train"] == 30
    scores = tmp_path / "scores.jsonl"
    assert main(["score", "--rm", str(rm), "--pairs", str(test), "--out", str(scores)]) == 0
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert [r["pair_id"] for r in rows] == [f"conv_test.jsonl:{i}" for i in range(1, 10)]
    # a multi-turn prompt scores differently from its last user turn alone: the template saw every turn
    from srlib.reward import RewardModel

    model = RewardModel.from_pretrained(rm)
    (multi,) = [p for p in load_pairs(test) if not isinstance(p.prompt, str)][:1]
    last_turn_only = PreferencePair(multi.prompt[-1]["content"], multi.chosen, multi.rejected)
    assert model.score_pairs([multi])[0].item() != model.score_pairs([last_turn_only])[0].item()


def test_cli_bad_conversational_record_exits_2_with_the_line(tmp_path, capsys):
    path = write_records(
        tmp_path / "conv.jsonl", [CONVERSATIONAL, {"prompt": [assistant("hi")], "chosen": "a", "rejected": "b"}]
    )
    assert main(["fit", "--profile", "smoke", "--train", str(path), "--out", str(tmp_path / "rm")]) == 2
    assert "conv.jsonl:2: field 'prompt' ends on a 'assistant' message" in error_line(capsys)
