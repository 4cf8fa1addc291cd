"""Preference data: the records every later step reads, the built-in data sets and their splits.

A `PreferencePair` is one prompt with a preferred (`chosen`) and a dispreferred (`rejected`)
response. The built-in data sets come from `SRLIB_DATA_DIR` (local copies, see
`../shared/data/README.md` for the layout) or, when that is unset, from the dataset hub.
Each data set has ONE normalisation function that takes rows in a common shape; the local
reader and the hub adapter only bring their rows into that shape, so both give identical
records.

Splits are deterministic and grouped: every pair carries a `group_id` (the question or the
prompt it came from), the groups are shuffled with `random.Random(seed)` and cut into
train / val / test, so no question or prompt is in two splits. The pairs of a split come in
the shuffled group order, so the first `n` of them are a seeded random subset of groups. The
safety data sets also have a generation split "gen" (`GENERATION_PAIRS`): prompts that only
the aligning policy answers (`generation_prompts`).

Rows a loader drops on purpose (identical responses, a malformed transcript) are counted in
`skipped_counts(name)`. User files (`read_jsonl`) are checked strictly instead: every
problem is a `DataError` naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import json
import os
import random
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from srlib.errors import ConfigError, DataError, one_line
from srlib.paths import atomic_path, data_dir, hub_offline, hub_reachable

SPLITS = ("train", "val", "test")
#: How the book names the data sets (the paper's names, with what the data here really is).
DATASET_LABELS = {
    "truthfulqa": "TruthfulQA",
    "pku-saferlhf": "SafeRLHF",
    "hh-harmless": "Red-Teaming (HH harmless)",
}
BUILTIN_NAMES = (
    *(f"truthfulqa:{s}" for s in SPLITS),
    *(f"hh-harmless:{s}" for s in SPLITS),
    *(f"pku-saferlhf:{s}" for s in SPLITS),
    "hh-harmless:gen",
    "pku-saferlhf:gen",
    "arc:pairs",
)
_DATA_DIR_HINT = "set SRLIB_DATA_DIR=<folder with truthfulqa/, hh_rlhf/, pku_saferlhf/, arc/> or connect to the hub"
#: HH-RLHF pair counts for train and val (test and generation share the rest). The paper
#: samples 1,000 / 1,000 for train / val (plus 2,000 generation and 1,000 test prompts); the
#: local harmless-base copy has 2,312 pairs, so train keeps the paper's 1,000 and val is cut to
#: 312 to leave pairs for test and generation.
HH_SPLIT_SIZES = (1000, 312)
#: The generation split ("gen"): prompts that no reward model trains, validates or is tested
#: on, for the policy to answer during alignment (the paper samples 2,000 additional prompts).
#: It is carved from the END of each safety data set's shuffled prompt order, so train and val
#: are the same groups as without it and test is what lies between; about this many pairs
#: (whole groups). The truthfulness track needs none: it generates from ARC-Challenge questions.
GENERATION_SPLIT = "gen"
GENERATION_PAIRS = {"hh-harmless": 300, "pku-saferlhf": 100}


#: A conversation in TRL's conversational format: {"role", "content"} messages, in order.
Conversation = tuple[dict[str, str], ...]


@dataclass(frozen=True)
class PreferencePair:
    """One preference: `chosen` is the better response to `prompt`, `rejected` the worse.

    `prompt` is a string (one user turn, or an HH-style "Human: ... Assistant: ..." transcript)
    or, for multi-turn data in TRL's conversational format, a `Conversation` that ends on a
    user turn; `prompt_messages` turns either into chat turns for the chat template.
    `group_id` names the question or prompt the pair came from; splits never separate a group.
    `pair_id` is unique and stable across runs (it names the source row).
    """

    prompt: str | Conversation
    chosen: str
    rejected: str
    source: str = ""
    pair_id: str = ""
    group_id: str = ""


@dataclass(frozen=True)
class MCQuestion:
    """A TruthfulQA question with its answer sets, for MC1 (best vs incorrect) and MC2 scoring."""

    question: str
    best_answer: str
    correct_answers: list[str]
    incorrect_answers: list[str]
    group_id: str


@dataclass(frozen=True)
class ArcQuestion:
    """An ARC-Challenge question, its gold answer and its distractors (a prompt for generation)."""

    question: str
    answer: str
    distractors: tuple[str, ...]
    group_id: str


# ---------------------------------------------------------------------------------------------
# Chat turns


_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def prompt_messages(prompt: str | Conversation) -> list[dict[str, str]]:
    """The chat turns of a prompt, for a chat template.

    A `Conversation` (TRL's conversational format) is its own turns, as given. A plain prompt
    is one user turn. An HH-style transcript ("Human: ...\\n\\nAssistant: ...
    \\n\\nHuman: ...") becomes alternating user/assistant turns ending on a user turn; empty
    turns are dropped and consecutive turns of one speaker merged, since most chat templates
    insist on alternation. A transcript that ends on a non-empty Assistant turn is an error.
    """
    if not isinstance(prompt, str):
        return [dict(message) for message in prompt]
    return _string_prompt_messages(prompt)


def prompt_text(prompt: str | Conversation) -> str:
    """A prompt as one text, for a judge's instructions or a table: a string as written, a
    conversation as "User: ..." / "Assistant: ..." paragraphs (never fed to a chat template)."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content'].strip()}" for m in prompt)


def _string_prompt_messages(prompt: str) -> list[dict[str, str]]:
    """The chat turns of a string prompt: one user turn, or an HH-style transcript's turns."""
    text = prompt.strip()
    if not text.startswith("Human:"):
        return [{"role": "user", "content": text}]
    parts = _TURN.split(text)  # ["", "Human", " text", "Assistant", " text", ...]
    messages: list[dict[str, str]] = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if not content:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != "user":
        raise DataError(
            f"prompt transcript {text[:60]!r}... does not end with a Human turn; "
            "a prompt must end where the assistant is to answer"
        )
    return messages


# ---------------------------------------------------------------------------------------------
# Reading files line by line with locations for error messages


Row = tuple[str, dict[str, Any]]  # (location "file:line" or "hub_id[row]", fields)


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) for a UTF-8 text file, gzip-compressed if it ends in .gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text") from None
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({one_line(str(exc)) or type(exc).__name__})") from exc


def _json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file."""
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        try:  # JSON allows a lone surrogate escape ("\ud800"); no tokenizer or file can hold one
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(
                f"{path}:{lineno}: a string holds a lone surrogate escape (\\ud800-\\udfff), "
                "which is not text; fix or remove it"
            ) from None
        yield lineno, obj


def _json_rows(path: Path) -> Iterator[Row]:
    """The objects of a JSONL file as rows located "file:line"."""
    for lineno, obj in _json_objects(path):
        yield f"{path}:{lineno}", obj


def _read_json_lines(path: Path) -> list[Row]:
    """A JSONL file whose rows already have the common shape (HH-RLHF, PKU-SafeRLHF)."""
    return list(_json_rows(path))


def _identity(row: Row) -> Row:
    """Hub rows that already have the common shape (same columns as the local file)."""
    return row


def _field(row: Row, name: str, kind: type = str) -> Any:
    """Field `name` of a row, checked to be present and of type `kind`."""
    where, fields = row
    if name not in fields:
        raise DataError(f"{where}: missing field '{name}'")
    value = fields[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"{where}: field '{name}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _text_field(row: Row, name: str) -> str:
    """A string field that must not be empty or whitespace-only."""
    value = _field(row, name)
    if not value.strip():
        raise DataError(f"{row[0]}: field '{name}' is empty")
    return value


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Built-in data sets: where they live, and how each becomes records


class _Normalised(NamedTuple):
    """What a normalisation function returns: groups of records, and the rows it dropped."""

    groups: tuple[Any, ...]
    skipped: dict[str, int]


@dataclass(frozen=True)
class _Source:
    """A built-in data set: its local file, its hub call, and how rows reach the common shape."""

    relpath: str
    read_local: Callable[[Path], list[Row]]
    hub_id: str
    hub_kwargs: dict[str, str]  # config `name`, `data_dir`, `split` for datasets.load_dataset
    from_hub: Callable[[Row], Row]
    normalise: Callable[[list[Row]], _Normalised]


def _hub_rows(hub_id: str, hub_kwargs: dict[str, str], hint: str) -> list[Row]:
    """Rows of `datasets.load_dataset(hub_id, **hub_kwargs)`, located "hub_id[i]", or a one-line
    DataError ending in `hint` (what to set instead).

    Under HF_HUB_OFFLINE or HF_DATASETS_OFFLINE, `datasets` reads its own cache (a data set
    loaded once online), so the call is made; otherwise an unreachable hub is reported at once
    (see `hub_reachable`).
    """
    offline = hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    if not offline and not hub_reachable():
        raise DataError(
            f"cannot load {hub_id}: the hub is unreachable; "
            + hint
            + " (or set HF_HUB_OFFLINE=1 to read the datasets cache)"
        )
    try:
        import datasets

        dataset = datasets.load_dataset(hub_id, **hub_kwargs)
        return [(f"{hub_id}[{i}]", dict(row)) for i, row in enumerate(dataset)]
    except Exception as exc:  # offline, hub down, changed schema: all mean "cannot use the hub"
        detail = one_line(str(exc), 120)
        raise DataError(
            f"cannot load {hub_id} from the hub ({type(exc).__name__}{': ' + detail if detail else ''}); " + hint
        ) from exc


def _file_stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=32)
def _normalised_local(name: str, path: str, stamp: tuple[int, int]) -> _Normalised:
    """The normalised records of a local file, parsed once per process (and per file version)."""
    del stamp  # part of the cache key only: an edited file is parsed again
    source = _SOURCES[name]
    return source.normalise(source.read_local(Path(path)))


def _normalised(name: str) -> _Normalised:
    """The normalised records of built-in data set `name`, from SRLIB_DATA_DIR or the hub."""
    source = _SOURCES[name]
    folder = data_dir()
    if folder is None:
        return source.normalise(
            [source.from_hub(row) for row in _hub_rows(source.hub_id, source.hub_kwargs, _DATA_DIR_HINT)]
        )
    path = folder / source.relpath
    if not path.is_file():
        raise DataError(f"SRLIB_DATA_DIR={folder} has no {source.relpath}; " + _DATA_DIR_HINT)
    return _normalised_local(name, str(path), _file_stamp(path))


def skipped_counts(name: str) -> dict[str, int]:
    """How many rows (or answers) the loader of `name` dropped, by reason.

    `name` is a data set name: "truthfulqa", "hh-harmless", "pku-saferlhf" or "arc".
    """
    if name not in _SOURCES:
        raise DataError(f"unknown data set {name!r}; valid: {', '.join(_SOURCES)}")
    return dict(_normalised(name).skipped)


# --- TruthfulQA ------------------------------------------------------------------------------
# Common row: question, best_answer, correct_answers (list), incorrect_answers (list).

_TQA_COLUMNS = {
    "question": "Question",
    "best_answer": "Best Answer",
    "correct_answers": "Correct Answers",
    "incorrect_answers": "Incorrect Answers",
}


def _read_truthfulqa_csv(path: Path) -> list[Row]:
    """TruthfulQA.csv rows in the common shape (answers split on ';')."""
    text = "".join(line for _, line in _text_lines(path))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [col for col in _TQA_COLUMNS.values() if col not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}:1: missing column '{missing[0]}'")
    rows: list[Row] = []
    for record in reader:
        where = f"{path}:{reader.line_num}"
        fields = {key: record[col] for key, col in _TQA_COLUMNS.items()}
        for key in ("correct_answers", "incorrect_answers"):
            fields[key] = (fields[key] or "").split(";")
        rows.append((where, fields))
    return rows


def _answers(row: Row, name: str, counts: dict[str, int]) -> list[str]:
    """A list-of-strings field, stripped, empty answers dropped (and counted)."""
    value = _field(row, name, list)
    answers = []
    for answer in value:
        if not isinstance(answer, str):
            raise DataError(f"{row[0]}: field '{name}' must hold strings, got {type(answer).__name__}")
        if answer.strip():
            answers.append(answer.strip())
        else:
            counts["empty_answers"] += 1
    return answers


def _normalise_truthfulqa(rows: list[Row]) -> _Normalised:
    """One group per question: (MCQuestion, its pairs).

    Pairs zip the i-th correct answer with the i-th incorrect answer; a pair whose two answers
    are the same text is dropped (the CSV lists "Unknown" as both correct and incorrect twice).
    """
    counts = {"empty_answers": 0, "identical_pairs": 0}
    groups = []
    for index, row in enumerate(rows):
        question = _text_field(row, "question").strip()
        best = _text_field(row, "best_answer").strip()
        correct = _answers(row, "correct_answers", counts)
        incorrect = _answers(row, "incorrect_answers", counts)
        group_id = f"truthfulqa:q{index}"
        pairs = []
        # the j-th correct answer against the j-th incorrect one: as many pairs as the shorter list
        for j, (good, bad) in enumerate(zip(correct, incorrect, strict=False)):
            if good == bad:
                counts["identical_pairs"] += 1
                continue
            pairs.append(PreferencePair(question, good, bad, "truthfulqa", f"{group_id}:{j}", group_id))
        mc = (question, best, tuple(correct), tuple(incorrect), group_id)
        groups.append((mc, tuple(pairs)))
    return _Normalised(tuple(groups), counts)


# --- HH-RLHF harmless-base -------------------------------------------------------------------
# Common row: chosen, rejected (full transcripts), as in both the file and the hub.

_ASSISTANT = "\n\nAssistant:"


class _Unusable(DataError):
    """A row that cannot be a pair, with the `reason` a built-in loader counts it under."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _is_transcript(text: str) -> bool:
    """True for an HH-style transcript ("Human: ... Assistant: ...")."""
    return text.lstrip().startswith("Human:") and _ASSISTANT in text


def _split_transcripts(row: Row, chosen_text: str, rejected_text: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of two HH-style transcripts: the prompt is the shared dialogue
    before each one's last Assistant turn, the answers that turn's text (stripped).

    Raises `_Unusable` (a DataError naming the row) when the transcripts differ before their
    last Assistant turn, a final answer is empty, or both final answers are the same.
    """
    where = row[0]
    cut_c, cut_r = chosen_text.rfind(_ASSISTANT), rejected_text.rfind(_ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        raise DataError(f"{where}: field '{'chosen' if cut_c < 0 else 'rejected'}' has no Assistant turn")
    if chosen_text[:cut_c] != rejected_text[:cut_r]:
        raise _Unusable(
            f"{where}: 'chosen' and 'rejected' differ before their last Assistant turn, so they share no prompt",
            "prefix_mismatch",
        )
    chosen = chosen_text[cut_c + len(_ASSISTANT) :].strip()
    rejected = rejected_text[cut_r + len(_ASSISTANT) :].strip()
    if not chosen or not rejected:
        raise _Unusable(
            f"{where}: field '{'chosen' if not chosen else 'rejected'}' has an empty last Assistant turn",
            "empty_response",
        )
    if chosen == rejected:
        raise _Unusable(f"{where}: field 'rejected' is identical to 'chosen'", "identical_pairs")
    return chosen_text[:cut_c].strip(), chosen, rejected


def _normalise_hh(rows: list[Row]) -> _Normalised:
    """One pair per row: prompt = the shared dialogue before the last Assistant turn.

    Rows are dropped (and counted) when the two transcripts differ before their last
    Assistant turn (a malformed transcript: 5 rows in the test split), when a final answer
    is empty (4 rows), or when both final answers are the same.
    """
    counts = {"prefix_mismatch": 0, "empty_response": 0, "identical_pairs": 0}
    pairs = []
    for index, row in enumerate(rows):
        try:
            prompt, chosen, rejected = _split_transcripts(row, _text_field(row, "chosen"), _text_field(row, "rejected"))
        except _Unusable as skip:
            counts[skip.reason] += 1
            continue
        pairs.append(
            PreferencePair(
                prompt,
                chosen,
                rejected,
                "hh-harmless",
                f"hh-harmless:{index}",
                f"hh-harmless:{_short_hash(prompt)}",
            )
        )
    return _Normalised(_group_pairs(pairs), counts)


def _group_pairs(pairs: Iterable[PreferencePair]) -> tuple[tuple[PreferencePair, ...], ...]:
    """Pairs grouped by group_id, groups in order of first appearance."""
    groups: dict[str, list[PreferencePair]] = {}
    for pair in pairs:
        groups.setdefault(pair.group_id, []).append(pair)
    return tuple(tuple(group) for group in groups.values())


# --- PKU-SafeRLHF ----------------------------------------------------------------------------
# Common row: prompt, response_0, response_1, safer_response_id, as in both the file and the hub.


def _normalise_pku(rows: list[Row]) -> _Normalised:
    """chosen = response[safer_response_id], rejected = the other response; grouped by prompt."""
    counts = {"identical_pairs": 0}
    pairs = []
    for index, row in enumerate(rows):
        prompt = _text_field(row, "prompt").strip()
        responses = (_text_field(row, "response_0").strip(), _text_field(row, "response_1").strip())
        safer = _field(row, "safer_response_id", int)
        if safer not in (0, 1):
            raise DataError(f"{row[0]}: field 'safer_response_id' must be 0 or 1, got {safer}")
        if responses[0] == responses[1]:
            counts["identical_pairs"] += 1
            continue
        pairs.append(
            PreferencePair(
                prompt,
                responses[safer],
                responses[1 - safer],
                "pku-saferlhf",
                f"pku-saferlhf:{index}",
                f"pku-saferlhf:{_short_hash(prompt)}",
            )
        )
    return _Normalised(_group_pairs(pairs), counts)


# --- ARC-Challenge ---------------------------------------------------------------------------
# Common row: question, answer, distractors (list).


def _read_arc_jsonl(path: Path) -> list[Row]:
    """arc_challenge.jsonl: a label-1 line (question, gold answer) then its label-0 distractors."""
    rows: list[Row] = []
    for row in _json_rows(path):
        question, answer = _field(row, "question"), _field(row, "answer")
        label = _field(row, "label", int)
        if label == 1:
            rows.append((row[0], {"question": question, "answer": answer, "distractors": []}))
        elif label == 0:
            if not rows or rows[-1][1]["question"] != question:
                raise DataError(f"{row[0]}: field 'question' does not match the label-1 line before it")
            rows[-1][1]["distractors"].append(answer)
        else:
            raise DataError(f"{row[0]}: field 'label' must be 0 or 1, got {label}")
    return rows


def _arc_from_hub(row: Row) -> Row:
    """allenai/ai2_arc rows (question, choices{text,label}, answerKey) in the common shape."""
    choices = _field(row, "choices", dict)
    texts, labels = choices.get("text"), choices.get("label")
    key = _field(row, "answerKey")
    if not isinstance(texts, list) or not isinstance(labels, list) or key not in labels:
        raise DataError(f"{row[0]}: field 'answerKey' {key!r} is not among the choice labels")
    gold = labels.index(key)
    fields = {
        "question": _field(row, "question"),
        "answer": texts[gold],
        "distractors": [text for i, text in enumerate(texts) if i != gold],
    }
    return row[0], fields


def _normalise_arc(rows: list[Row]) -> _Normalised:
    """One group per question: (ArcQuestion, one pair per distractor: gold vs distractor)."""
    counts = {"empty_answers": 0, "identical_pairs": 0}
    groups = []
    for index, row in enumerate(rows):
        question, answer = _text_field(row, "question").strip(), _text_field(row, "answer").strip()
        distractors = tuple(_answers(row, "distractors", counts))
        group_id = f"arc:q{index}"
        pairs = []
        for j, distractor in enumerate(distractors):
            if distractor == answer:
                counts["identical_pairs"] += 1
                continue
            pairs.append(PreferencePair(question, answer, distractor, "arc", f"{group_id}:{j}", group_id))
        groups.append((ArcQuestion(question, answer, distractors, group_id), tuple(pairs)))
    return _Normalised(tuple(groups), counts)


_SOURCES = {
    "truthfulqa": _Source(
        "truthfulqa/TruthfulQA.csv",
        _read_truthfulqa_csv,
        "truthfulqa/truthful_qa",
        {"name": "generation", "split": "validation"},
        _identity,
        _normalise_truthfulqa,
    ),
    "hh-harmless": _Source(
        "hh_rlhf/harmless-base-test.jsonl.gz",
        _read_json_lines,
        "Anthropic/hh-rlhf",
        {"data_dir": "harmless-base", "split": "test"},
        _identity,
        _normalise_hh,
    ),
    # The hub path reads the whole Alpaca-7B test file; the local file holds its first rows.
    "pku-saferlhf": _Source(
        "pku_saferlhf/alpaca7b_test_head.jsonl",
        _read_json_lines,
        "PKU-Alignment/PKU-SafeRLHF",
        {"name": "alpaca-7b", "split": "test"},
        _identity,
        _normalise_pku,
    ),
    # The hub has every distractor (3 pairs a question); the local file has one per question.
    "arc": _Source(
        "arc/arc_challenge.jsonl",
        _read_arc_jsonl,
        "allenai/ai2_arc",
        {"name": "ARC-Challenge", "split": "test"},
        _arc_from_hub,
        _normalise_arc,
    ),
}


# ---------------------------------------------------------------------------------------------
# Splits


def _check_split(split: str, gen_pairs: int = 0) -> None:
    valid = (*SPLITS, GENERATION_SPLIT) if gen_pairs else SPLITS
    if split not in valid:
        raise DataError(f"unknown split {split!r}; valid: {', '.join(valid)}")


def _fraction_cut(sizes: Sequence[int]) -> tuple[int, int]:
    """4:1:5 by number of groups: floor(0.4 n) train, floor(0.1 n) val, the rest test."""
    n = len(sizes)
    return n * 4 // 10, n * 4 // 10 + n // 10


def _reach(sizes: Sequence[int], start: int, target: int) -> int:
    """The index after the groups from `start` that first hold `target` pairs together."""
    end, total = start, 0
    while end < len(sizes) and total < target:
        total += sizes[end]
        end += 1
    return end


def _size_cut(targets: tuple[int, int]) -> Callable[[Sequence[int]], tuple[int, int]]:
    """Train = the first groups reaching `targets[0]` pairs, val the next reaching `targets[1]`."""

    def cut(sizes: Sequence[int]) -> tuple[int, int]:
        train_end = _reach(sizes, 0, targets[0])
        return train_end, _reach(sizes, train_end, targets[1])

    return cut


def _generation_start(sizes: Sequence[int], test_start: int, gen_pairs: int) -> int:
    """Where the generation groups begin: the last groups holding `gen_pairs` pairs together.

    Only when the groups after val hold at least 2 × `gen_pairs` pairs, so test keeps at least
    as many pairs as generation; a smaller data set (a test fixture) has no generation split.
    """
    start, total = len(sizes), 0
    if sum(sizes[test_start:]) < 2 * gen_pairs:
        return start
    while total < gen_pairs:
        start -= 1
        total += sizes[start]
    return start


def _split_indices(
    sizes: Sequence[int],
    split: str,
    seed: int,
    cut: Callable[[Sequence[int]], tuple[int, int]],
    gen_pairs: int = 0,
) -> list[int]:
    """Indices of the groups in `split`, in seeded shuffled order (groups have `sizes` pairs).

    With `gen_pairs` > 0 the last groups of the order, about `gen_pairs` pairs, form the
    generation split "gen" and the test split ends before them.
    """
    _check_split(split, gen_pairs)
    order = list(range(len(sizes)))
    random.Random(seed).shuffle(order)
    ordered = [sizes[i] for i in order]
    a, b = cut(ordered)
    g = _generation_start(ordered, b, gen_pairs)
    return {"train": order[:a], "val": order[a:b], "test": order[b:g], GENERATION_SPLIT: order[g:]}[split]


def _split_pairs(
    groups: Sequence[Sequence[PreferencePair]],
    split: str,
    seed: int,
    cut: Callable[[Sequence[int]], tuple[int, int]],
    gen_pairs: int = 0,
) -> list[PreferencePair]:
    chosen = _split_indices([len(g) for g in groups], split, seed, cut, gen_pairs)
    return [pair for i in chosen for pair in groups[i]]


# ---------------------------------------------------------------------------------------------
# Public loaders


def load_truthfulqa(split: str, seed: int = 0) -> list[PreferencePair]:
    """TruthfulQA pairs (correct vs incorrect answer) of one split, by question 4:1:5."""
    groups = _normalised("truthfulqa").groups
    return _split_pairs([pairs for _, pairs in groups], split, seed, _fraction_cut)


def load_truthfulqa_mc(split: str, seed: int = 0) -> list[MCQuestion]:
    """TruthfulQA questions of one split (the same question split as `load_truthfulqa`)."""
    groups = _normalised("truthfulqa").groups
    indices = _split_indices([len(pairs) for _, pairs in groups], split, seed, _fraction_cut)
    questions = []
    for i in indices:
        question, best, correct, incorrect, group_id = groups[i][0]
        questions.append(MCQuestion(question, best, list(correct), list(incorrect), group_id))
    return questions


def load_hh_harmless(split: str, seed: int = 0) -> list[PreferencePair]:
    """HH-RLHF harmless-base test pairs, split ~1,000 / 312 / rest / ~300 (train / val / test /
    gen) by prompt."""
    return _split_pairs(
        _normalised("hh-harmless").groups, split, seed, _size_cut(HH_SPLIT_SIZES), GENERATION_PAIRS["hh-harmless"]
    )


def load_pku_saferlhf(split: str, seed: int = 0) -> list[PreferencePair]:
    """PKU-SafeRLHF pairs (safer response chosen) of one split, by prompt 4:1:5, the last ~100
    pairs of the test share kept apart as the generation split "gen"."""
    return _split_pairs(
        _normalised("pku-saferlhf").groups, split, seed, _fraction_cut, GENERATION_PAIRS["pku-saferlhf"]
    )


def generation_prompts(dataset: str, seed: int = 0) -> list[str | Conversation]:
    """The prompts a policy answers during alignment on `dataset`'s track, none of which any
    reward model of that data set trains, validates or is tested on.

    "truthfulqa": the ARC-Challenge questions (the paper's prompts for the truthfulness track;
    the reward models see TruthfulQA only). "hh-harmless", "pku-saferlhf": the distinct prompts
    of the "gen" split of `seed`'s split, in split order.
    """
    if dataset == "truthfulqa":
        return list(dict.fromkeys(question.question for question in load_arc_prompts()))
    if dataset not in GENERATION_PAIRS:
        raise DataError(f"no generation prompts for {dataset!r}; valid: truthfulqa, {', '.join(GENERATION_PAIRS)}")
    prompts = list(dict.fromkeys(pair.prompt for pair in load_pairs(f"{dataset}:{GENERATION_SPLIT}", seed=seed)))
    if not prompts:
        raise DataError(
            f"{dataset} is too small for a generation split (it needs {2 * GENERATION_PAIRS[dataset]} "
            "pairs after train and val); point SRLIB_DATA_DIR at the full local copy"
        )
    return prompts


def load_arc_pairs() -> list[PreferencePair]:
    """ARC-Challenge pairs, gold answer vs distractor, in file order (no split)."""
    return [pair for _, pairs in _normalised("arc").groups for pair in pairs]


def load_arc_prompts() -> list[ArcQuestion]:
    """ARC-Challenge questions with their gold answer, as prompts for self-generated pairs."""
    return [question for question, _ in _normalised("arc").groups]


_LOADERS: dict[str, Callable[[int], list[PreferencePair]]] = {
    **{f"truthfulqa:{s}": functools.partial(load_truthfulqa, s) for s in SPLITS},
    **{f"hh-harmless:{s}": functools.partial(load_hh_harmless, s) for s in SPLITS},
    **{f"pku-saferlhf:{s}": functools.partial(load_pku_saferlhf, s) for s in SPLITS},
    f"hh-harmless:{GENERATION_SPLIT}": functools.partial(load_hh_harmless, GENERATION_SPLIT),
    f"pku-saferlhf:{GENERATION_SPLIT}": functools.partial(load_pku_saferlhf, GENERATION_SPLIT),
    "arc:pairs": lambda seed: load_arc_pairs(),
}


def load_pairs(spec: str | os.PathLike | Any, *, seed: int = 0, max_pairs: int | None = None) -> list[PreferencePair]:
    """Pairs from a built-in name (see `BUILTIN_NAMES`), a file, a hub data set or a Dataset.

    `spec` is one of: a built-in name; a JSONL file (".jsonl", ".jsonl.gz", a pipe) or a parquet
    file (".parquet") of records in one of TRL's preference formats (see `pairs_from_records`);
    "hub:<dataset id>[:<split>]" (split "train" by default), read with `datasets.load_dataset`;
    or a `datasets.Dataset` object. Problems in a file or a Dataset are errors naming the row;
    a hub data set cannot be fixed by its user, so its unusable rows are dropped, counted in
    one warning.

    `seed` picks the split of a built-in data set (ignored otherwise);
    `max_pairs` keeps the first n pairs, i.e. a seeded subset of whole groups plus a part of one.
    """
    if max_pairs is not None and max_pairs < 1:
        raise ConfigError(f"max_pairs must be at least 1, got {max_pairs}")
    text = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else None
    if text in _LOADERS:
        pairs = _LOADERS[text](seed)
    elif (
        text is None
        or isinstance(spec, os.PathLike)
        or text.startswith(HUB_PREFIX)
        or text.endswith((".jsonl", ".jsonl.gz", ".parquet"))
        or os.sep in text
        or os.path.exists(text)
    ):
        pairs = pairs_from_records(read_records(spec))
    else:
        raise DataError(
            f"unknown data set {text!r}; valid: {', '.join(BUILTIN_NAMES)}, a .jsonl or .parquet"
            " file, or hub:<dataset id>[:<split>]"
        )
    return pairs[:max_pairs] if max_pairs is not None else pairs


# ---------------------------------------------------------------------------------------------
# User data in TRL's preference formats

_EXTRA_FIELDS = ("source", "pair_id", "group_id")
_ROLES = ("system", "user", "assistant")
HUB_PREFIX = "hub:"
_HUB_HINT = (
    "set HF_DATASETS_OFFLINE=1 (or HF_HUB_OFFLINE=1) to read a data set cached by an earlier online "
    "load, or give a local .jsonl or .parquet file"
)


def _conversation(row: Row, name: str) -> Conversation:
    """Field `name` as a conversation: a non-empty list of {"role", "content"} string messages."""
    where, value = row[0], row[1][name]
    if not value:
        raise DataError(f"{where}: field '{name}' is an empty conversation")
    messages = []
    for index, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DataError(f'{where}: field \'{name}\' message {index} must be {{"role": str, "content": str}}')
        if message["role"] not in _ROLES:
            raise DataError(
                f"{where}: field '{name}' message {index} has role {message['role']!r}; valid: {', '.join(_ROLES)}"
            )
        if not message["content"].strip():
            raise DataError(f"{where}: field '{name}' message {index} is empty")
        messages.append({"role": message["role"], "content": message["content"]})
    return tuple(messages)


def _text_or_conversation(row: Row, name: str) -> str | Conversation:
    """Field `name`: a non-empty string (standard format) or a conversation (conversational)."""
    where, fields = row
    if name not in fields:
        raise DataError(f"{where}: missing field '{name}'")
    if isinstance(fields[name], list):
        return _conversation(row, name)
    return _text_field(row, name)


def _answer(row: Row, name: str, value: str | Conversation) -> str:
    """A response as text: a string as written, a conversational response its one assistant message."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{row[0]}: field '{name}' is empty")
        return value
    if len(value) != 1 or value[0]["role"] != "assistant":
        roles = ", ".join(message["role"] for message in value)
        raise DataError(
            f"{row[0]}: field '{name}' must be one assistant message after the prompt, got [{roles}]; "
            "srlib scores one answer to a prompt"
        )
    return value[0]["content"]


def _implicit_prompt(row: Row, chosen: str | Conversation, rejected: str | Conversation):
    """(prompt, chosen, rejected) of a record without a prompt: TRL's implicit-prompt format,
    where both responses are whole conversations (or transcripts) that share the prompt.

    Conversations and plain strings are split by TRL's own `extract_prompt` (the longest
    shared prefix: whole messages for conversations, characters for strings). HH-style
    transcripts ("Human: ... Assistant: ...") are split at each one's last Assistant turn, as
    the built-in HH-RLHF loader does, since a character prefix would take the answers' shared
    first words into the prompt.
    """
    from trl.data_utils import extract_prompt

    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(f"{row[0]}: fields 'chosen' and 'rejected' must both be strings or both conversations")
    if isinstance(chosen, str) and isinstance(rejected, str) and _is_transcript(chosen) and _is_transcript(rejected):
        return _split_transcripts(row, chosen, rejected)
    split = extract_prompt({"chosen": chosen, "rejected": rejected})
    if not split["prompt"]:
        raise DataError(
            f"{row[0]}: no field 'prompt', and 'chosen' and 'rejected' share no prefix to be one; add the prompt"
        )
    if isinstance(chosen, str):
        return split["prompt"], split["chosen"].strip(), split["rejected"].strip()
    return tuple(split["prompt"]), tuple(split["chosen"]), tuple(split["rejected"])


def _plain_prompt(row: Row, prompt: str | Conversation) -> str | Conversation:
    """The prompt, a one-user-turn conversation as its text (so both formats give the same pair
    and share cached states); a conversation must end on a user turn, where the answer starts."""
    if isinstance(prompt, str):
        return prompt
    if prompt[-1]["role"] != "user":
        raise DataError(
            f"{row[0]}: field 'prompt' ends on a '{prompt[-1]['role']}' message; "
            "a prompt must end on a user turn, where the answer starts"
        )
    if len(prompt) == 1 and not prompt[0]["content"].lstrip().startswith("Human:"):
        return prompt[0]["content"]
    return prompt


def _record_pair(row: Row, default_pair_id: str) -> PreferencePair:
    """The pair of one record in any of TRL's preference formats (see `pairs_from_records`)."""
    where, obj = row
    chosen, rejected = (_text_or_conversation(row, key) for key in ("chosen", "rejected"))
    if "prompt" in obj:
        prompt = _text_or_conversation(row, "prompt")
    else:
        prompt, chosen, rejected = _implicit_prompt(row, chosen, rejected)
    prompt = _plain_prompt(row, prompt)
    chosen, rejected = _answer(row, "chosen", chosen), _answer(row, "rejected", rejected)
    if chosen == rejected:
        raise DataError(f"{where}: field 'rejected' is identical to 'chosen'")
    extras = {key: _field(row, key) for key in _EXTRA_FIELDS if key in obj}
    extras.setdefault("pair_id", default_pair_id)
    key = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    extras.setdefault("group_id", f"prompt:{_short_hash(key)}")
    return PreferencePair(prompt, chosen, rejected, **extras)


def pairs_from_records(records: Records) -> list[PreferencePair]:
    """The pairs of `records` (see `read_records`), each record in one of TRL's preference formats.

    A record is standard ("prompt", "chosen", "rejected" strings), conversational (the same
    keys as lists of {"role", "content"} messages; the prompt ends on a user turn, each
    response is one assistant message) or implicit-prompt ("chosen" and "rejected" only, whole
    conversations or transcripts sharing the prompt: see `_implicit_prompt`). Multi-turn
    prompts stay conversations and reach the model through the backbone's chat template
    (`prompt_messages`). Optional string keys `source`, `pair_id`, `group_id` are kept; other
    keys are ignored; a missing group_id is a hash of the prompt, so splits keep a prompt's
    pairs together. A pair_id used twice is refused (scores are matched back by it).

    With `records.strict` a bad record is a DataError naming its location; otherwise it is
    dropped and the drops are counted in one UserWarning naming the source and the first problem.
    """
    pairs: list[PreferencePair] = []
    first_use: dict[str, str] = {}  # pair_id -> the location that used it first
    dropped: list[str] = []
    for where, default_id, obj in records.rows:
        try:
            pair = _record_pair((where, obj), default_id)
            if pair.pair_id in first_use:
                raise DataError(
                    f"{where}: pair_id {pair.pair_id!r} repeats the pair_id of {first_use[pair.pair_id]}; "
                    "give each pair its own pair_id (or leave it out)"
                )
        except DataError as error:
            if records.strict:
                raise
            dropped.append(str(error))
            continue
        tail = where.rpartition(":")[2]
        first_use[pair.pair_id] = f"line {tail}" if tail.isdigit() else where
        pairs.append(pair)
    if dropped:
        warnings.warn(
            f"{records.name}: dropped {len(dropped)} of {len(records.rows)} records that are no "
            f"preference pair (first: {one_line(dropped[0], 160)})",
            UserWarning,
            stacklevel=3,
        )
    if not pairs:
        raise DataError(f"{records.name}: no preference pairs among its {len(records.rows)} records")
    return pairs


class Records(NamedTuple):
    """The raw records of a file, a Dataset or a hub split, before they become pairs."""

    rows: list[tuple[str, str, dict[str, Any]]]  # (location for messages, default pair_id, record)
    strict: bool  # True: a bad record is a DataError; False (a hub split): dropped, with one warning
    name: str  # where the records came from, for messages


def read_records(spec: str | os.PathLike | Any) -> Records:
    """The records of a JSONL file (".jsonl", ".jsonl.gz", a pipe), a parquet file, a
    `datasets.Dataset` or "hub:<dataset id>[:<split>]" (split "train" by default, read with
    `datasets.load_dataset`), located for error messages.

    Default pair_ids: "<file name>:<line>" (JSONL), "<file name>:<row>" (parquet, rows counted
    from 1), "dataset:<i>", "<dataset id>:<split>:<i>". An empty source is a DataError. A hub
    split cannot be fixed by its user, so its records are not strict (see `pairs_from_records`).
    """
    if not isinstance(spec, (str, os.PathLike)):
        if not (hasattr(spec, "column_names") and hasattr(spec, "__iter__")):
            raise DataError(
                f"cannot read pairs from a {type(spec).__name__}; give a datasets.Dataset, a file or a data set name"
            )
        rows = [(f"dataset[{i}]", f"dataset:{i}", dict(row)) for i, row in enumerate(spec)]
        if not rows:
            raise DataError("the Dataset has no rows")
        return Records(rows, True, "the Dataset")
    text = os.fspath(spec)
    if text.startswith(HUB_PREFIX):
        hub_id, split = parse_hub_spec(text)
        rows = [
            (where, f"{hub_id}:{split}:{i}", obj)
            for i, (where, obj) in enumerate(_hub_rows(hub_id, {"split": split}, _HUB_HINT))
        ]
        return Records(rows, False, text)
    path = Path(text)
    if path.is_dir():
        raise DataError(f"{path} is a folder; give a .jsonl or .parquet file of pairs or a built-in name")
    if not path.exists():  # a pipe or FIFO (/dev/stdin, <(...)) is read like a file
        raise DataError(f"{path}: no such file")
    if text.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow's errors for a damaged or foreign file
            raise DataError(f"{path}: not a readable parquet file ({one_line(str(exc), 120)})") from exc
        if not table:
            raise DataError(f"{path}: no preference pairs in the file (it has no rows)")
        return Records(
            [(f"{path}:row {i}", f"{path.name}:{i}", obj) for i, obj in enumerate(table, start=1)], True, str(path)
        )
    rows = [(f"{path}:{lineno}", f"{path.name}:{lineno}", obj) for lineno, obj in _json_objects(path)]
    if not rows:
        n_lines = sum(1 for _ in _text_lines(path)) if path.is_file() else 1  # a pipe reads once
        raise DataError(f"{path}:{max(n_lines, 1)}: no preference pairs in the file (it is empty)")
    return Records(rows, True, str(path))


def read_jsonl(path: str | os.PathLike) -> list[PreferencePair]:
    """Pairs from a JSONL file of records in TRL's preference formats: every problem is a
    DataError naming the file and the line, including a lone surrogate escape ("\\ud800"),
    which JSON allows but is not text."""
    return pairs_from_records(read_records(Path(path)))


def parse_hub_spec(spec: str) -> tuple[str, str]:
    """(dataset id, split) of "hub:<dataset id>[:<split>]"; the split defaults to "train"."""
    hub_id, _, split = spec.removeprefix(HUB_PREFIX).partition(":")
    if not hub_id or hub_id.count("/") > 1 or ":" in split:
        raise DataError(
            f"{spec!r} is no hub data set; write hub:<owner>/<name>[:<split>], e.g. hub:Anthropic/hh-rlhf:test"
        )
    return hub_id, split or "train"


def write_jsonl(pairs: Iterable[PreferencePair], path: str | os.PathLike, *, overwrite: bool = True) -> None:
    """Write pairs as JSONL in TRL's format (non-empty source/pair_id/group_id kept), atomically;
    an existing file is replaced only with `overwrite`."""
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for pair in pairs:
            record = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
            record.update({key: getattr(pair, key) for key in _EXTRA_FIELDS if getattr(pair, key)})
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
