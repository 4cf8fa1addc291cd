"""The command line on the smoke profile: fit → score → filter, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from toy_data import error_line, toy_pairs  # tests/ is on sys.path under pytest

from srlib.cli import main
from srlib.data import read_jsonl, write_jsonl


@pytest.fixture(scope="module", autouse=True)
def module_cache(tmp_path_factory):
    """One cache for this module, so the smoke SAE is trained once, not once per test."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SRLIB_CACHE_DIR", str(tmp_path_factory.mktemp("cli-cache")))
        yield


@pytest.fixture
def pair_files(tmp_path: Path) -> dict[str, Path]:
    files = {"train": tmp_path / "train.jsonl", "val": tmp_path / "val.jsonl", "test": tmp_path / "test.jsonl"}
    for (name, path), offset in zip(files.items(), (0, 40, 52), strict=True):
        write_jsonl(toy_pairs(40 if name == "train" else 12, offset), path)
    return files


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _fit(pair_files, out: Path, *extra: str) -> int:
    return main(
        [
            "fit",
            "--profile",
            "smoke",
            "--train",
            str(pair_files["train"]),
            "--val",
            str(pair_files["val"]),
            "--out",
            str(out),
            *extra,
        ]
    )


@pytest.mark.parametrize("extra", [("--features", "dense"), ("--features", "projection", "--k", "4")])
def test_fit_score_filter_round_trip(pair_files, tmp_path, capsys, extra):
    rm = tmp_path / "rm"
    assert _fit(pair_files, rm, *extra) == 0
    fitted = _last_json(capsys.readouterr().out)
    assert fitted["n_train"] == 40 and fitted["n_val"] == 12
    assert (rm / "config.json").is_file() and (rm / "model.safetensors").is_file()
    in_dim = 64 if extra[1] == "dense" else 2 * 4
    assert fitted["trainable_parameters"] == in_dim * 512 + 512 + 512 + 1

    scores = tmp_path / "scores.jsonl"
    assert main(["score", "--rm", str(rm), "--pairs", str(pair_files["test"]), "--out", str(scores)]) == 0
    result = _last_json(capsys.readouterr().out)
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert result["n"] == len(rows) == 12
    wins = sum(r["score_chosen"] > r["score_rejected"] for r in rows)
    assert result["accuracy"] == pytest.approx(wins / 12)

    kept = tmp_path / "kept.jsonl"
    assert main(["filter", "--rm", str(rm), "--pairs", str(pair_files["test"]), "--out", str(kept)]) == 0
    filtered = _last_json(capsys.readouterr().out)
    assert filtered["kept"] == wins
    kept_ids = [p.pair_id for p in read_jsonl(kept)] if wins else []
    assert kept_ids == [r["pair_id"] for r in rows if r["score_chosen"] > r["score_rejected"]]


def test_fit_is_deterministic_given_the_seed(pair_files, tmp_path, capsys):
    for name in ("a", "b"):
        assert _fit(pair_files, tmp_path / name, "--features", "dense", "--seed", "3") == 0
    outputs = []
    for name in ("a", "b"):
        assert (
            main(
                [
                    "score",
                    "--rm",
                    str(tmp_path / name),
                    "--pairs",
                    str(pair_files["test"]),
                    "--out",
                    str(tmp_path / f"{name}.jsonl"),
                ]
            )
            == 0
        )
        outputs.append((tmp_path / f"{name}.jsonl").read_text())
    assert outputs[0] == outputs[1]


def test_bad_inputs_exit_2_with_one_line(pair_files, tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": \n')
    assert main(["score", "--rm", str(tmp_path), "--pairs", str(broken)]) == 2
    assert "config.json" in error_line(capsys)  # the rm folder is checked first

    assert _fit({**pair_files, "train": broken}, tmp_path / "x", "--features", "dense") == 2
    assert "broken.jsonl" in error_line(capsys) and not (tmp_path / "x").exists()

    assert _fit(pair_files, tmp_path / "x", "--features", "dense", "--layer", "40") == 2
    assert "layer 40" in error_line(capsys)

    assert _fit(pair_files, tmp_path / "x", "--features", "projection", "--k", "100000") == 2
    assert "k=100000" in error_line(capsys)

    assert main(["score", "--rm", str(tmp_path / "missing"), "--pairs", str(pair_files["test"])]) == 2
    assert "not a saved reward model" in error_line(capsys)

    assert main(["score", "--rm", str(tmp_path), "--pairs", "nosuchset:train"]) == 2
    error_line(capsys)


def test_sae_width_mismatch_is_reported(pair_files, tmp_path, capsys):
    from sae_lens import StandardSAE, StandardSAEConfig

    sae_dir = tmp_path / "narrow-sae"
    StandardSAE(StandardSAEConfig(d_in=32, d_sae=64)).save_model(str(sae_dir))  # the backbone has 64
    assert _fit(pair_files, tmp_path / "x", "--sae", str(sae_dir), "--k", "4") == 2
    line = error_line(capsys)
    assert "32" in line and "64" in line


def test_real_process_prints_no_traceback(tmp_path):
    missing = tmp_path / "nothing-here"
    run = subprocess.run(
        [sys.executable, "-m", "srlib", "score", "--rm", str(missing), "--pairs", "x.jsonl"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip().startswith("error:") and "Traceback" not in run.stderr


def test_sae_report_prints_the_held_out_quality(capsys):
    assert main(["sae", "report", "--profile", "smoke"]) == 0
    report = _last_json(capsys.readouterr().out)["report"]
    for where in ("all_tokens", "last_tokens"):
        quality = report["heldout"][where]
        assert 0 < quality["l0"] <= 8  # TopK with k=8 under the smoke profile
        assert quality["fve"] <= 1.0 and 0.0 <= quality["dead_fraction"] <= 1.0
