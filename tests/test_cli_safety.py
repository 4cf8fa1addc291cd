"""The command line never loses a user's data, turns operating-system errors into one line,
validates before it writes and respects the umask (issue 12, items 1, 4, 6 and 8).

One test per class of fault, on the smoke profile. A reward model is fitted once per module
(`--features dense`, a few seconds) and copied where a test needs its own.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from toy_data import error_line, toy_pairs  # tests/ is on sys.path under pytest

from srlib.cli import main
from srlib.data import write_jsonl
from srlib.reward import RewardModel

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Pair files and one fitted model, shared by the module (its cache too)."""
    root = tmp_path_factory.mktemp("cli-safety")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SRLIB_CACHE_DIR", str(root / "cache"))
        write_jsonl(toy_pairs(24), root / "train.jsonl")
        write_jsonl(toy_pairs(8, 24), root / "val.jsonl")
        assert _fit(root, root / "rm") == 0
        yield root


def _fit(root: Path, out: Path | str, *extra: str) -> int:
    return main(
        [
            "fit",
            "--profile",
            "smoke",
            "--features",
            "dense",
            "--train",
            str(root / "train.jsonl"),
            "--val",
            str(root / "val.jsonl"),
            "--out",
            str(out),
            *extra,
        ]
    )


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- data loss


def test_out_folder_with_a_users_files_is_refused(workdir, tmp_path, capsys, monkeypatch):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "thesis.tex").write_text("years of work")
    assert _fit(workdir, keep) == 2
    assert "keep" in error_line(capsys)
    assert (keep / "thesis.tex").read_text() == "years of work" and len(list(keep.iterdir())) == 1

    monkeypatch.chdir(keep)
    assert _fit(workdir, ".") == 2
    error_line(capsys)
    assert sorted(p.name for p in keep.iterdir()) == ["thesis.tex"]
    monkeypatch.chdir(tmp_path)

    for command in ("score", "filter"):  # an existing file is replaced only with --overwrite
        out = tmp_path / f"{command}.jsonl"
        out.write_text("mine\n")
        args = [command, "--rm", str(workdir / "rm"), "--pairs", str(workdir / "val.jsonl"), "--out", str(out)]
        assert main(args) == 2
        assert "--overwrite" in error_line(capsys) and out.read_text() == "mine\n"
        assert main([*args, "--overwrite"]) == 0
        assert out.read_text() != "mine\n"
    capsys.readouterr()

    run = tmp_path / "not-a-run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    from srlib.alignment import TRACKS

    assert (
        main(["align", "--profile", "smoke", "--track", next(iter(TRACKS)), "--include-wo-rm", "--out", str(run)]) == 2
    )
    assert "not-a-run" in error_line(capsys) and sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_a_model_atomically(workdir, tmp_path, capsys, monkeypatch):
    import srlib.reward

    rm = tmp_path / "rm"
    shutil.copytree(workdir / "rm", rm)
    before = json.loads((rm / "config.json").read_text())
    assert _fit(workdir, rm, "--seed", "1") == 2
    assert "--overwrite" in error_line(capsys)
    assert json.loads((rm / "config.json").read_text()) == before

    # a dead writer's leftovers beside the target are swept by the next write; a live one's stay
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / f".rm.{dead.pid}.new-stale").mkdir()
        (tmp_path / f".rm.{dead.pid}.old-stale").mkdir()
        (tmp_path / f".rm.{live.pid}.new-busy").mkdir()
        (tmp_path / f".rm.{os.getpid()}.new-earlier").mkdir()  # an earlier process that had our pid

        def crash(*args, **kwargs):
            raise RuntimeError("simulated crash while writing the weights")

        monkeypatch.setattr(srlib.reward, "save_file", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            _fit(workdir, rm, "--seed", "1", "--overwrite")
        assert json.loads((rm / "config.json").read_text()) == before
        RewardModel.from_pretrained(rm)  # the old model is whole and loadable
        assert _hidden(tmp_path) == [f".rm.{live.pid}.new-busy"]

        monkeypatch.undo()
        assert _fit(workdir, rm, "--seed", "1", "--overwrite") == 0
        assert json.loads((rm / "config.json").read_text())["config"]["head"]["seed"] == 1
        assert RewardModel.from_pretrained(rm).history.settings["seed"] == 1
        assert _hidden(tmp_path) == [f".rm.{live.pid}.new-busy"]
    finally:
        live.kill()
        live.wait()


def test_a_crash_between_the_two_renames_leaves_the_old_folder(tmp_path, monkeypatch):
    from srlib import paths

    final = tmp_path / "rm"
    final.mkdir()
    (final / "weights").write_text("old")
    real_rename = os.rename

    def second_rename_fails(src, dst):
        if Path(src).name.startswith(".rm.") and ".new-" in Path(src).name:
            raise OSError(5, "Input/output error", str(dst))
        real_rename(src, dst)

    monkeypatch.setattr(paths.os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="Input/output"):
        with paths.atomic_path(final, is_dir=True) as tmp:
            (tmp / "weights").write_text("new")
    monkeypatch.undo()
    assert (final / "weights").read_text() == "old" and _hidden(tmp_path) == []

    # killed between the renames: the old folder waits aside and the next write puts it back
    dead = subprocess.Popen(["true"])
    dead.wait()
    real_rename(final, tmp_path / f".rm.{dead.pid}.old-abcd")
    paths.sweep_temporaries(tmp_path)
    assert (final / "weights").read_text() == "old" and _hidden(tmp_path) == []


# ----------------------------------------------------------------------------- operating-system errors


def test_os_errors_are_one_line(workdir, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    score = ["score", "--rm", str(workdir / "rm"), "--pairs", str(workdir / "val.jsonl")]

    assert _fit(workdir, a_file) == 2  # a folder output on an existing file
    assert "a-file" in error_line(capsys) and a_file.read_text() == "x"
    assert _fit(workdir, a_file / "rm") == 2  # under a file
    assert "a-file" in error_line(capsys)
    assert main([*score, "--out", str(a_dir)]) == 2  # a file output on a folder
    assert "a-dir" in error_line(capsys) and a_dir.is_dir()
    assert main(["score", "--rm", str(workdir / "rm"), "--pairs", str(a_dir)]) == 2  # a folder as pairs
    assert "a-dir" in error_line(capsys)


def _root_can_mount_read_only() -> bool:
    """Root ignores file modes; a read-only bind mount in a private mount namespace stops it too."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


def test_read_only_parent_is_one_line(workdir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    fit = [
        sys.executable,
        "-m",
        "srlib",
        "fit",
        "--profile",
        "smoke",
        "--features",
        "dense",
        "--train",
        str(workdir / "train.jsonl"),
        "--out",
        str(locked / "rm"),
    ]
    score = [
        sys.executable,
        "-m",
        "srlib",
        "score",
        "--rm",
        str(workdir / "rm"),
        "--pairs",
        str(workdir / "val.jsonl"),
        "--out",
        str(locked / "s.jsonl"),
    ]
    if os.geteuid() != 0:
        locked.chmod(0o555)
        prefix = []
    elif _root_can_mount_read_only():  # the commands run in a namespace where `locked` is mounted read-only
        prefix = ["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{locked}" "{locked}" && exec "$@"', "sh"]
    else:
        pytest.skip("running as root, which ignores file modes, and cannot mount a folder read-only")
    try:
        for command in (fit, score):
            run = subprocess.run(
                [*prefix, *command],
                capture_output=True,
                text=True,
                timeout=300,
                env={**os.environ, "SRLIB_CACHE_DIR": str(workdir / "cache")},
            )
            assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-500:]
            last = run.stderr.strip().splitlines()[-1]
            assert last.startswith("error: ") and "locked" in last and "not writable" in last
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_main_turns_os_errors_into_one_line(monkeypatch, capsys):
    import srlib.cli

    def denied(args):
        raise PermissionError(13, "Permission denied", "/somewhere/out")

    monkeypatch.setattr(srlib.cli, "cmd_score", denied)
    assert main(["score", "--rm", "x", "--pairs", "y"]) == 2
    assert error_line(capsys) == "error: Permission denied: /somewhere/out"


# ----------------------------------------------------------------------------- pipes as --pairs


def test_fifo_and_process_substitution_as_pairs(workdir, tmp_path, capsys):
    fifo = tmp_path / "pairs.fifo"
    os.mkfifo(fifo)
    text = (workdir / "val.jsonl").read_text()

    def feed():
        with open(fifo, "w") as handle:
            handle.write(text)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    assert main(["score", "--rm", str(workdir / "rm"), "--pairs", str(fifo)]) == 0
    writer.join(timeout=10)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 8

    # a FIFO (or /dev/stdout) as --out is written in place, not replaced by a regular file
    received: list[str] = []

    def drain():
        with open(fifo) as handle:
            received.extend(handle)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    assert main(["score", "--rm", str(workdir / "rm"), "--pairs", str(workdir / "val.jsonl"), "--out", str(fifo)]) == 0
    reader.join(timeout=10)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and len(received) == 8 and _hidden(tmp_path) == []
    capsys.readouterr()

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash for process substitution")
    command = (
        f'"{sys.executable}" -m srlib score --rm "{workdir / "rm"}" --pairs <(cat "{workdir / "val.jsonl"}")'
        f' && cat "{workdir / "val.jsonl"}" | "{sys.executable}" -m srlib score --rm "{workdir / "rm"}"'
        " --pairs /dev/stdin"
    )
    run = subprocess.run(
        [bash, "-c", command],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SRLIB_CACHE_DIR": str(workdir / "cache")},
    )
    assert run.returncode == 0, run.stderr[-500:]
    assert [json.loads(line)["n"] for line in run.stdout.splitlines() if line.startswith("{")] == [8, 8]


# ----------------------------------------------------------------------------- validate before write


def test_align_validates_before_it_writes(tmp_path, capsys):
    from srlib.alignment import TRACKS

    run = tmp_path / "run"
    align = [
        "align",
        "--profile",
        "smoke",
        "--track",
        next(iter(TRACKS)),
        "--include-wo-rm",
        "--rounds",
        "1",
        "--out",
        str(run),
    ]
    assert main([*align, "--prompts", "100000"]) == 2
    assert "n_prompts=100000" in error_line(capsys)
    assert not run.exists()
    assert main([*align, "--prompts", "2"]) == 0
    assert (run / "result.json").is_file()


def test_fit_refuses_its_out_before_training(workdir, tmp_path, capsys, monkeypatch):
    import srlib.reward

    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "a.txt").write_text("mine")

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(srlib.reward.DenseRM, "fit", no_training)
    assert _fit(workdir, keep) == 2
    error_line(capsys)


# ----------------------------------------------------------------------------- umask


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_respect_the_umask(workdir, tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        assert _fit(workdir, tmp_path / "rm") == 0
        out = tmp_path / "scores.jsonl"
        assert (
            main(["score", "--rm", str(tmp_path / "rm"), "--pairs", str(workdir / "val.jsonl"), "--out", str(out)]) == 0
        )
    finally:
        os.umask(old)
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "rm") == 0o777 & ~umask
    assert mode(tmp_path / "rm" / "config.json") == 0o666 & ~umask
    assert mode(out) == 0o666 & ~umask
