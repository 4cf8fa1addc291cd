"""Loading untrusted input (issue 12, items 2, 3 and 5): no code runs from a folder, a damaged
file or cache entry gets one line naming it and the fix, and text or numbers JSON allows but
srlib cannot use are refused with a line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from srlib.cli import main
from srlib.data import PreferencePair, read_jsonl, write_jsonl
from srlib.errors import SrlibError
from srlib.reward import DenseRM, RewardModel, fit_head
from srlib.reward_config import HeadConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _dense_rm(directory: Path) -> Path:
    """A tiny DenseRM fitted on random 8-wide states and saved to `directory`."""
    generator = torch.Generator().manual_seed(0)
    Z_w, Z_l = torch.randn(16, 8, generator=generator) + 1, torch.randn(16, 8, generator=generator)
    model = DenseRM(8, layer=1, max_length=32).fit_states(Z_w, Z_l, head=HeadConfig(epochs=2, hidden=4))
    model.save_pretrained(directory)
    return directory


@pytest.fixture
def saved_rm(tmp_path: Path) -> Path:
    return _dense_rm(tmp_path / "rm")


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    write_jsonl(
        [PreferencePair("Is it true?", "Yes, with evidence.", "No idea lol", pair_id=f"p{i}") for i in range(3)], path
    )
    return path


def _one_line_error(capsys, code: int) -> str:
    """The CLI's stderr after a refused command: exit 2, exactly one line, no traceback."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- item 2: no code runs


def test_a_config_naming_a_foreign_module_runs_no_code(saved_rm, tmp_path, monkeypatch, capsys, pairs_file):
    marker = tmp_path / "pwned"
    (tmp_path / "evil_module.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from srlib.reward import DenseRM\nclass EvilRM(DenseRM):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = json.loads((saved_rm / "config.json").read_text())
    for rm_class in ("EvilRM", "DenseRM"):  # a foreign class, and srlib's own class with a foreign module
        config.update(rm_class=rm_class, rm_module="evil_module")
        (saved_rm / "config.json").write_text(json.dumps(config))
        if rm_class == "EvilRM":
            with pytest.raises(SrlibError, match="EvilRM"):
                RewardModel.from_pretrained(saved_rm)
            code = main(["score", "--rm", str(saved_rm), "--pairs", str(pairs_file)])
            assert "EvilRM" in _one_line_error(capsys, code)
        else:
            assert isinstance(RewardModel.from_pretrained(saved_rm), DenseRM)
        assert not marker.exists(), "loading a folder imported the module its config names"


def test_every_srlib_reward_model_class_is_known_without_importing_it_first():
    from srlib import reward

    assert set(reward.RM_CLASSES) == {
        "SparseRM",
        "DenseRM",
        "FeatureRM",
        "StandardRM",
        "GeneralizableRM",
        "GenerativeJudge",
        "LogProbPreference",
        "SteeredSparseRM",
    }
    for name in reward.RM_CLASSES:
        assert reward.rm_class(name).__name__ == name


# ----------------------------------------------------------------------------- item 3: damaged files


def _damage(folder: Path, how: str) -> Path:
    """Damage a saved reward model one way; returns the file the error must name."""
    weights, config_path = folder / "model.safetensors", folder / "config.json"
    config = json.loads(config_path.read_text())
    if how == "empty weights":
        weights.write_bytes(b"")
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "no weights":
        weights.unlink()
    elif how == "garbage weights":
        weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    elif how == "weights of another shape":
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        tensors["head.net.0.weight"] = torch.zeros(3, 3)
        save_file(tensors, weights)
    elif how == "config not JSON":
        config_path.write_text('{"format": ')
        return config_path
    elif how == "config a list":
        config_path.write_text("[1, 2]")
        return config_path
    elif how == "config misses a key":
        del config["features"]
    elif how == "unknown feature kind":
        config["config"]["features"] = "quantum"
    elif how == "version from the future":
        config["format_version"] = 99
    elif how == "version not a number":
        config["format_version"] = "one"
    elif how == "head of the wrong type":
        config["config"]["head"]["hidden"] = "four"
    else:
        raise AssertionError(how)
    if how.startswith("config") or how in (
        "unknown feature kind",
        "version from the future",
        "version not a number",
        "head of the wrong type",
    ):
        config_path.write_text(json.dumps(config))
        return config_path
    return weights


DAMAGES = [
    "empty weights",
    "truncated weights",
    "no weights",
    "garbage weights",
    "weights of another shape",
    "config not JSON",
    "config a list",
    "config misses a key",
    "unknown feature kind",
    "version from the future",
    "version not a number",
    "head of the wrong type",
]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_reward_model_gets_one_line_naming_the_file(saved_rm, pairs_file, capsys, how):
    named = _damage(saved_rm, how)
    with pytest.raises(SrlibError) as error:
        RewardModel.from_pretrained(saved_rm)
    message = str(error.value)
    assert str(named) in message or (how == "version from the future" and str(saved_rm) in message), message
    assert "\n" not in message
    code = main(["score", "--rm", str(saved_rm), "--pairs", str(pairs_file)])
    err = _one_line_error(capsys, code)
    assert "None" not in err and str(saved_rm) in err


def test_a_bad_sae_folder_gets_one_line_naming_it(tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig

    from srlib.sae import load_sae

    folder = tmp_path / "sae"
    StandardSAE(StandardSAEConfig(d_in=4, d_sae=8)).save_model(str(folder))
    assert load_sae(folder).cfg.d_sae == 8
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:30])
    with pytest.raises(SrlibError, match=str(weights)):  # truncated weights
        load_sae(folder)
    weights.unlink()
    with pytest.raises(SrlibError, match=str(folder)):  # no weights
        load_sae(folder)
    (folder / "cfg.json").write_text("{oops")
    with pytest.raises(SrlibError, match="cfg.json"):
        load_sae(folder)


def _corrupt_first(folder: Path, pattern: str) -> Path:
    entry = sorted(folder.rglob(pattern))[0]
    entry.write_bytes(entry.read_bytes()[:20])
    return entry


def test_a_corrupt_activation_cache_entry_is_recomputed_with_a_warning(tiny_backbone, isolated_cache):
    from srlib.activations import last_token_states

    texts = ["a first text", "a second text"]
    cold = last_token_states(tiny_backbone, texts, 1, progress=False)
    entry = _corrupt_first(isolated_cache / "activations", "*.safetensors")
    with pytest.warns(UserWarning, match=str(entry)) as caught:
        warm = last_token_states(tiny_backbone, texts, 1, progress=False)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    torch.testing.assert_close(warm, cold)
    assert last_token_states(tiny_backbone, texts, 1, progress=False).shape == (2, 64)  # rewritten: no warning


def test_cache_list_verify_clear(tiny_backbone, isolated_cache, capsys, tmp_path):
    from srlib.activations import last_token_states

    last_token_states(tiny_backbone, ["one text", "two texts"], 1, progress=False)
    outside = tmp_path / "keep.txt"
    outside.write_text("not srlib's")
    assert main(["cache", "list"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert listed["activations"]["entries"] == 2 and listed["activations"]["bytes"] > 0
    assert main(["cache", "verify"]) == 0
    capsys.readouterr()

    entry = _corrupt_first(isolated_cache / "activations", "*.safetensors")
    code = main(["cache", "verify", "--what", "activations"])
    captured = capsys.readouterr()
    assert code == 2 and str(entry) in captured.err
    assert "cache clear --what activations" in captured.err

    assert main(["cache", "clear", "--what", "activations"]) == 0
    assert "activations" in capsys.readouterr().out
    assert not (isolated_cache / "activations").exists() and outside.read_text() == "not srlib's"
    assert main(["cache", "verify"]) == 0


def test_cache_clear_needs_a_kind_and_knows_only_its_own(isolated_cache, capsys):
    with pytest.raises(SystemExit):
        main(["cache", "clear", "--what", "home"])
    capsys.readouterr()
    assert main(["cache", "clear"]) == 2
    assert "--what" in capsys.readouterr().err


def test_a_corrupt_baseline_scores_entry_is_recomputed(tiny_backbone, isolated_cache):
    from srlib.baselines import cached_fit_baseline, cached_score_pairs

    pairs = [PreferencePair("Is it true?", "Yes, with evidence.", "No idea lol", pair_id="p0")]
    rm = cached_fit_baseline("logprob", tiny_backbone, progress=False, max_length=32)
    first = cached_score_pairs(rm, pairs)
    entry = _corrupt_first(rm.cache_path / "scores", "*.safetensors")
    with pytest.warns(UserWarning, match=str(entry)):
        again = cached_score_pairs(rm, pairs)
    assert not again.from_cache
    torch.testing.assert_close(again.chosen, first.chosen)
    (rm.cache_path / "config.json").write_text("{")
    with pytest.warns(UserWarning, match="config.json"):
        assert not cached_fit_baseline("logprob", tiny_backbone, progress=False, max_length=32).from_cache


# ----------------------------------------------------------------------------- item 5: text and numbers


def test_a_lone_surrogate_is_refused_with_its_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": "bad \ud800 text"}) + "\n")
    assert "\\ud800" in path.read_text()
    with pytest.raises(SrlibError, match=rf"{path}:2: .*surrogate"):
        read_jsonl(path)


def test_duplicate_pair_ids_are_refused(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Q?", "chosen": f"yes {i}", "rejected": "no", "pair_id": "same"} for i in range(2)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(SrlibError, match=rf"{path}:2: .*'same'.*line 1"):
        read_jsonl(path)
    # an explicit id equal to another line's default id is a duplicate too
    rows = [
        {"prompt": "Q?", "chosen": "yes", "rejected": "no"},
        {"prompt": "Q?", "chosen": "sure", "rejected": "no", "pair_id": "pairs.jsonl:1"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(SrlibError, match="pair_id"):
        read_jsonl(path)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_cli_floats_are_refused(value, pairs_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(
            ["fit", "--profile", "smoke", "--train", str(pairs_file), "--out", str(tmp_path / "rm"), f"--gamma={value}"]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "finite" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "rm").exists()


@pytest.mark.parametrize(
    "setting", [dict(lr=float("inf")), dict(gamma=float("inf")), dict(lr=float("nan")), dict(weight_decay=float("nan"))]
)
def test_non_finite_fit_settings_are_refused(setting):
    X = torch.randn(8, 3)
    with pytest.raises(SrlibError, match="finite"):
        fit_head(X + 1, X, config=HeadConfig(epochs=1, hidden=2, **setting))


def test_non_finite_lora_and_alignment_settings_are_refused():
    from srlib.alignment import AlignmentConfig
    from srlib.baselines import LoraSettings

    with pytest.raises(SrlibError, match="finite"):
        LoraSettings(learning_rate=float("inf")).check()
    for name in ("learning_rate", "beta", "temperature"):
        with pytest.raises(SrlibError, match=f"{name} must be a finite"):
            AlignmentConfig.for_profile("smoke", track="red-teaming", **{name: float("nan")})


def test_non_finite_states_at_scoring_are_refused(saved_rm):
    model = RewardModel.from_pretrained(saved_rm)
    Z = torch.zeros(2, 8)
    Z[1, 3] = float("nan")
    with pytest.raises(SrlibError, match="NaN or infinite"):
        model.score_states(Z)
    Z[1, 3] = float("inf")
    with pytest.raises(SrlibError, match="NaN or infinite"):
        model.score_states(Z)


def test_a_corrupt_generated_pairs_entry_is_generated_again(isolated_cache, monkeypatch):
    from srlib import alignment
    from srlib.alignment import AlignmentConfig
    from srlib.shift import generated_pairs

    made = [PreferencePair("Q?", "good answer", "bad answer", pair_id="g0")]
    calls = []
    monkeypatch.setattr(alignment, "generate_tuples", lambda *args, **kwargs: calls.append(1) or made)
    config = AlignmentConfig.for_profile("smoke", track="red-teaming")
    assert generated_pairs(None, None, ["Q?"], [], config, model_identity="m", progress=False) == made
    entry = next((isolated_cache / "generated").glob("*.json"))
    entry.write_text('[{"prompt": "Q?"')
    with pytest.warns(UserWarning, match=str(entry)):
        assert generated_pairs(None, None, ["Q?"], [], config, model_identity="m", progress=False) == made
    assert len(calls) == 2
    assert generated_pairs(None, None, ["Q?"], [], config, model_identity="m", progress=False) == made
    assert len(calls) == 2  # rewritten: read back


def test_a_damaged_converted_model_gets_one_line_with_the_clear_command(tiny_backbone, tmp_path, monkeypatch):
    from srlib import backbone as backbone_module

    folder = tmp_path / "converted"
    tiny_backbone.model.save_pretrained(folder)
    tiny_backbone.tokenizer.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    original = backbone_module._from_pretrained

    def hub_copy_missing(name, *args, **kwargs):
        if name == backbone_module.DEFAULT_MODEL_ID:
            raise OSError("not in the Hugging Face cache")
        return original(name, *args, **kwargs)

    monkeypatch.setattr(backbone_module, "hub_reachable", lambda *args, **kwargs: False)
    monkeypatch.setattr(backbone_module, "_from_pretrained", hub_copy_missing)
    monkeypatch.setattr(backbone_module, "_smollm2_from_wheel", lambda progress: folder)
    with pytest.raises(SrlibError, match=rf"{folder}: .*cache clear --what models"):
        backbone_module.load_backbone(backbone_module.DEFAULT_MODEL_ID, device="cpu", progress=False)


def test_a_corrupt_sae_corpus_entry_is_recomputed(tiny_backbone, isolated_cache):
    from srlib.sae import corpus_activations

    texts = ["a first corpus text", "a second corpus text", "and a third one"]
    cold = corpus_activations(tiny_backbone, 1, texts, progress=False)
    entry = _corrupt_first(isolated_cache / "sae-corpus", "activations.safetensors")
    with pytest.warns(UserWarning, match=str(entry)):
        again = corpus_activations(tiny_backbone, 1, texts, progress=False)
    assert not again.from_cache
    torch.testing.assert_close(again.train_tokens, cold.train_tokens)
    assert corpus_activations(tiny_backbone, 1, texts, progress=False).from_cache


def test_srlib_has_no_loader_that_can_run_code_from_a_file():
    """No pickle-based loading anywhere in the package: safetensors and JSON only."""
    import re

    import srlib

    risky = re.compile(
        r"torch\.load\(|\bpickle\b|allow_pickle\s*=\s*True|trust_remote_code\s*=\s*True"
        r"|weights_only\s*=\s*False|importlib\.import_module\(config"
    )
    package = Path(srlib.__file__).parent
    hits = [
        f"{path.name}:{n}"
        for path in sorted(package.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if risky.search(line)
    ]
    assert hits == []


def test_cache_clear_removes_a_symlinked_cache_folder_but_not_what_it_points_to(isolated_cache, tmp_path, capsys):
    users = tmp_path / "user-data"
    users.mkdir()
    (users / "thesis.txt").write_text("mine")
    isolated_cache.mkdir(parents=True, exist_ok=True)
    (isolated_cache / "sae").symlink_to(users, target_is_directory=True)
    assert main(["cache", "clear", "--what", "sae"]) == 0
    assert not (isolated_cache / "sae").exists() and (users / "thesis.txt").read_text() == "mine"


def test_a_damaged_alignment_run_file_gets_one_line_naming_it(tmp_path):
    from srlib.alignment import AlignmentResult, read_tuples

    tuples, result = tmp_path / "tuples.jsonl", tmp_path / "result.json"
    tuples.write_text('{"prompt": "Q?", "chosen": "a", "rejected": "b"}\n{"prompt": ')
    result.write_text("{")
    for load, path in ((read_tuples, tuples), (AlignmentResult.load, result)):
        with pytest.raises(SrlibError, match=rf"{path}: .*remove it") as error:
            load(path)
        assert "\n" not in str(error.value)
