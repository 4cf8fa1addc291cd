"""srlib's caches: reading their entries back safely, and `python -m srlib cache list|verify|clear`.

Every cache lives in one folder per kind under the cache root (`srlib.paths.cache_dir`, i.e.
`SRLIB_CACHE_DIR` or `~/.cache/srlib`). `CACHE_KINDS` names them all; `clear` removes only
those folders, never anything else under (or outside) the root.

Files srlib wrote can be damaged (a full disk, a copy cut short, a hand edit). The readers here
(`read_tensors`, `read_json`) turn every way such a file fails to load into one
`DamagedFileError` line that names the file and says what to do. During normal work a damaged
cache entry is not fatal: `read_cache_entry` warns in one line naming it and the caller
recomputes it (the new entry replaces the damaged one).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from srlib.errors import DamagedFileError, SrlibError, one_line
from srlib.paths import cache_dir


@dataclass(frozen=True)
class CacheKind:
    """One kind of cache: its folder name under the root, what it holds, what one entry is."""

    name: str
    holds: str
    entry: str  # "file:<glob>" (entries are files found recursively) or "dir" (each subfolder)


#: Every folder srlib writes under the cache root (each `cache_dir(<name>, ...)` caller).
CACHE_KINDS: dict[str, CacheKind] = {
    kind.name: kind
    for kind in (
        CacheKind(
            "activations", "last-token hidden states, one file per text (srlib.activations)", "file:*.safetensors"
        ),
        CacheKind("sae", "SAEs trained here, in sae-lens format (srlib.sae.train_sae)", "dir"),
        CacheKind("sae-corpus", "all-token activations of SAE corpora (srlib.sae.corpus_activations)", "dir"),
        CacheKind("models", "converted and saved backbones (srlib.backbone)", "dir"),
        CacheKind("baselines", "fitted baseline reward models and their scores (srlib.baselines)", "dir"),
        CacheKind("generated", "generated preference pairs (srlib.shift.generated_pairs)", "file:*.json"),
        CacheKind("alignment", "iterative-DPO run folders of chapter 7", "dir"),
    )
}


def clear_command(kind: str) -> str:
    """The command that removes the cache of `kind` (the remedy named for a damaged entry)."""
    return f"python -m srlib cache clear --what {kind}"


def _reason(error: BaseException) -> str:
    return one_line(str(error)) or type(error).__name__


def read_tensors(path: str | Path, remedy: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file; a missing, empty, truncated or garbled one raises
    `DamagedFileError` naming `path` and ending with `remedy`."""
    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(f"{path}: file missing; {remedy}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise DamagedFileError(f"{path}: not a readable safetensors file ({_reason(error)}); {remedy}") from None


def check_safetensors(path: str | Path, remedy: str) -> None:
    """Open only the header of a safetensors file (cheap for large weights): a missing, empty,
    truncated or garbled file raises `DamagedFileError` naming `path` and ending with `remedy`."""
    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(f"{path}: file missing; {remedy}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            list(handle.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise DamagedFileError(f"{path}: not a readable safetensors file ({_reason(error)}); {remedy}") from None


def read_json(path: str | Path, remedy: str) -> Any:
    """The JSON value in `path`; a missing, non-UTF-8 or malformed file raises `DamagedFileError`."""
    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(f"{path}: file missing; {remedy}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DamagedFileError(f"{path}: not valid JSON ({_reason(error)}); {remedy}") from None


def warn_recomputing(path: str | Path, error: BaseException) -> None:
    """One warning line: the cache entry at `path` is damaged and is being recomputed."""
    reason = str(error).split("; ")[0].removeprefix(f"{path}: ")
    warnings.warn(f"{path}: damaged cache entry ({one_line(reason)}); recomputing it", UserWarning, stacklevel=3)


def read_cache_entry(
    path: str | Path, kind: str, check: Callable[[dict[str, Tensor]], bool] | None = None
) -> dict[str, Tensor] | None:
    """The tensors of the cache entry at `path`, or None when it is damaged (warned) or fails
    `check`: the caller then recomputes the entry and writes it again."""
    try:
        tensors = read_tensors(path, f"clear the cache with: {clear_command(kind)}")
        if check is not None and not check(tensors):
            raise DamagedFileError(f"{path}: unexpected tensor names or shapes")
    except DamagedFileError as error:
        warn_recomputing(path, error)
        return None
    return tensors


# ----------------------------------------------------------------------------- list, verify, clear


def kind_folder(kind: str) -> Path:
    """The folder of cache `kind` under the cache root (not created)."""
    if kind not in CACHE_KINDS:
        raise SrlibError(f"unknown cache {kind!r}; choose from: {', '.join(CACHE_KINDS)}")
    return cache_dir() / kind


def _entries(kind: str) -> Iterator[Path]:
    """The entries of cache `kind` (hidden temporaries of an interrupted write are not entries)."""
    folder = kind_folder(kind)
    if not folder.is_dir() or folder.is_symlink():
        return
    spec = CACHE_KINDS[kind].entry
    found = (
        sorted(folder.rglob(spec[len("file:") :]))
        if spec.startswith("file:")
        else sorted(path for path in folder.iterdir() if path.is_dir())
    )
    for path in found:
        if not any(part.startswith(".") for part in path.relative_to(folder).parts):
            yield path


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def list_caches(kinds: list[str]) -> dict[str, dict[str, Any]]:
    """Per kind: its folder, number of entries and bytes on disk."""
    return {
        kind: {
            "folder": str(kind_folder(kind)),
            "entries": sum(1 for _ in _entries(kind)),
            "bytes": _size(kind_folder(kind)) if kind_folder(kind).is_dir() else 0,
        }
        for kind in kinds
    }


def _check_file(path: Path, remedy: str) -> None:
    """Open one file an entry holds: JSON must parse, safetensors must have a sound header."""
    if path.suffix == ".json":
        read_json(path, remedy)
    elif path.suffix == ".safetensors":
        check_safetensors(path, remedy)


def verify_entry(kind: str, entry: Path) -> None:
    """Open one cache entry the way srlib reads it; raise `DamagedFileError` if it is damaged."""
    remedy = f"clear the cache with: {clear_command(kind)}"
    files = [entry] if entry.is_file() else sorted(p for p in entry.rglob("*") if p.is_file())
    if not files:
        raise DamagedFileError(f"{entry}: empty entry; {remedy}")
    for path in files:
        _check_file(path, remedy)
    if kind == "activations":
        tensors = read_tensors(entry, remedy)
        if set(tensors) != {"state"} or tensors["state"].ndim != 1:
            raise DamagedFileError(f"{entry}: not a cached hidden state; {remedy}")
    elif kind == "sae":
        from srlib.sae import load_sae

        try:
            load_sae(entry)
        except SrlibError as error:
            raise DamagedFileError(f"{one_line(str(error)).split('; ')[0]}; {remedy}") from None
    elif kind == "generated":
        records = read_json(entry, remedy)
        if not isinstance(records, list) or not all(
            isinstance(r, dict) and {"prompt", "chosen", "rejected"} <= set(r) for r in records
        ):
            raise DamagedFileError(f"{entry}: not a list of preference pairs; {remedy}")


def verify_caches(kinds: list[str]) -> tuple[dict[str, int], list[str]]:
    """(entries checked per kind, one line per damaged entry naming it and the remedy)."""
    checked, damaged = {}, []
    for kind in kinds:
        checked[kind] = 0
        for entry in _entries(kind):
            checked[kind] += 1
            try:
                verify_entry(kind, entry)
            except DamagedFileError as error:
                damaged.append(one_line(str(error), 500))
    return checked, damaged


def clear_caches(kinds: list[str]) -> list[dict[str, Any]]:
    """Remove the folders of the given cache kinds (a symlinked folder: only the link); returns
    what was removed. Nothing outside those folders is touched."""
    removed = []
    for kind in kinds:
        folder = kind_folder(kind)
        if folder.is_symlink():
            folder.unlink()
            removed.append({"kind": kind, "folder": str(folder), "entries": 0, "bytes": 0})
        elif folder.is_dir():
            listed = list_caches([kind])[kind]
            shutil.rmtree(folder)
            removed.append({"kind": kind, **listed})
    return removed
