"""What a build of the book costs: a cold build in a scratch cache, then a warm one.

    SRLIB_DATA_DIR=... python benchmarks/book_cost.py --profile cpu [--jobs 2] [--keep DIR]

Copies the tracked files of this checkout into a scratch folder (so the builds start with no
`_build/` and touch nothing here), points `SRLIB_CACHE_DIR` at an empty scratch cache, and runs
`python -m bookbuild` there twice: the first build computes everything (SAEs, hidden states,
generated answers, baselines), the second changes nothing and should reuse every chapter.
Prints, per chapter, the seconds of each build and whether it was executed or reused (from
`_build/<profile>/build-report.json`), then each build's wall-clock time.

The cold cpu build takes hours on two cores; `--profile smoke` takes minutes. `--keep DIR`
keeps the scratch checkout and cache in DIR (default: a temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def scratch_checkout(target: Path) -> Path:
    """The tracked files of this checkout (as they are in the working tree) under `target`."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    mathjax = ROOT / "book" / "_static" / "mathjax"
    if mathjax.is_dir():  # fetched from npm once; not what this benchmark measures
        shutil.copytree(mathjax, target / "book" / "_static" / "mathjax")
    return target


def build(checkout: Path, cache: Path, profile: str, jobs: int) -> tuple[float, list[dict]]:
    """Run one book build in `checkout` with `cache`; (wall-clock seconds, chapter records)."""
    env = {**os.environ, "SRLIB_CACHE_DIR": str(cache), "PYTHONPATH": str(checkout)}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bookbuild", "--profile", profile, "--jobs", str(jobs)],
        cwd=checkout,
        env=env,
        check=True,
    )
    seconds = time.perf_counter() - started
    report = json.loads((checkout / "_build" / profile / "build-report.json").read_text())
    return seconds, report["chapters"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep the scratch checkout and cache in this folder")
    args = parser.parse_args(argv)
    base = args.keep or Path(tempfile.mkdtemp(prefix="book-cost-"))
    try:
        checkout = scratch_checkout(base / "checkout")
        cache = base / "cache"
        cold_seconds, cold = build(checkout, cache, args.profile, args.jobs)
        warm_seconds, warm = build(checkout, cache, args.profile, args.jobs)
    except subprocess.CalledProcessError as error:
        print(f"book_cost: the build stopped (exit {error.returncode}); its error is above", file=sys.stderr)
        return 1
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\nprofile {args.profile}, {args.jobs} job(s), {os.cpu_count()} CPU(s)")
    print(f"{'chapter':40s} {'cold (s)':>10s} {'warm (s)':>10s}  warm build")
    for first, second in zip(cold, warm, strict=True):
        spent = 0.0 if second["reused"] else second["seconds"]
        print(
            f"{first['chapter']:40s} {first['seconds']:10.1f} {spent:10.1f}  "
            f"{'reused' if second['reused'] else 'executed'}"
        )
    print(f"{'whole build (wall clock, HTML included)':40s} {cold_seconds:10.1f} {warm_seconds:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
