"""Where srlib reads data and keeps its caches, and how it writes files safely.

`SRLIB_DATA_DIR` points at local copies of the data sets (CI: `../shared/data`);
`SRLIB_CACHE_DIR` overrides the cache root (default: the user cache dir, `~/.cache/srlib`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import tempfile
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from srlib.errors import SrlibError


def data_dir() -> Path | None:
    """The local data directory from `SRLIB_DATA_DIR`, or None to use the dataset hub."""
    value = os.environ.get("SRLIB_DATA_DIR")
    return Path(value).expanduser() if value else None


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set: transformers, sae-lens and datasets then read only
    their local caches (the hub cache, the datasets cache) and never try the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host does not answer within `timeout` s.

    Asked before any hub call, it saves the ~25-40 s that transformers and datasets spend
    retrying before they give up on a machine without a network.
    """
    if hub_offline():
        return False
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def cache_dir(*parts: str) -> Path:
    """A folder under the srlib cache root (created), e.g. `cache_dir("sae")`."""
    root = os.environ.get("SRLIB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "srlib"
    )
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


#: Temporaries beside a target NAME are `.NAME.PID.new-XXXX` (being written) and
#: `.NAME.PID.old-XXXX` (the version being replaced, until deleted): the writer's process id in
#: the name lets a later write tell a dead writer's leftovers (swept) from a live one's (kept).
#: (Writers on other machines or in other pid namespaces sharing the folder are not told apart.)
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<kind>new|old)-\w+")
_OURS: set[Path] = set()  # this process's temporaries in use (an earlier process may have had its pid)
_SWEPT: set[Path] = set()  # folders swept by this process (once each: a cache folder holds thousands of files)


def _umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_mode(is_dir: bool) -> int:
    """The mode a plain mkdir() or open() would give a new folder or file under the umask."""
    return (0o777 if is_dir else 0o666) & ~_umask()


def _writer_alive(pid: int, temporary: Path) -> bool:
    """False when no process `pid` exists, or it is this process and `temporary` is not one of its
    own (a pid recycled by another process counts as alive: its temporary is kept, never lost)."""
    if pid == os.getpid():
        return temporary in _OURS
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_temporaries(folder: Path) -> None:
    """Remove the temporaries that dead writers (killed mid-write) left in `folder`.

    A dead writer's replaced version (`old`) is put back when its target is missing: the writer
    died between its two renames, and the old version is the complete one.
    """
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or _writer_alive(int(match["pid"]), entry):
            continue
        target = folder / match["name"]
        if match["kind"] == "old" and not os.path.lexists(target):
            os.replace(entry, target)
        else:
            _remove(entry)
    _SWEPT.add(folder)


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_creatable(final: str | os.PathLike) -> Path:
    """The absolute `final` if it can be created: its closest existing ancestor is a writable folder.

    Raises a one-line `SrlibError` naming the ancestor otherwise (a file on the way, a read-only folder).
    """
    final = Path(os.path.abspath(final))
    parent = _nearest_existing(final.parent)
    if not parent.is_dir():
        raise SrlibError(f"{parent} is a file, so {final} cannot be created; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SrlibError(f"{parent} is not writable, so {final} cannot be created; choose another path")
    return final


def check_output(
    final: str | os.PathLike,
    *,
    is_dir: bool = False,
    overwrite: bool = False,
    is_ours: Callable[[Path], bool] | None = None,
) -> Path:
    """The absolute path of output `final` if writing it there harms nothing; else a one-line `SrlibError`.

    Refused: a folder output on an existing file, a file output on an existing folder, the
    working directory or a folder holding it, an existing output without `overwrite`, and a
    folder holding files that `is_ours` does not recognise (a user's data: never replaced, not
    even with `overwrite`). `is_ours=None` takes whatever is there as srlib's own (a cache).
    A symbolic link stands for the path it names; a device or pipe (`/dev/stdout`, a FIFO) is
    written in place and needs no `overwrite`. Called by `atomic_path` when it starts and before
    it moves its result in; a command calls it first too, to refuse before any work.
    """
    final = Path(os.path.abspath(final))
    if not is_dir and _is_stream(final):
        return final
    if final.is_symlink():
        final = final.resolve()
    if is_dir:
        if final.exists() and not final.is_dir():
            raise SrlibError(f"{final} is a file, not a folder; choose a folder name for the output")
        if final == Path.cwd() or final in Path.cwd().parents:
            raise SrlibError(f"{final} is the working directory or holds it; choose a new folder for the output")
        if final.is_dir() and any(final.iterdir()):
            if is_ours is not None and not is_ours(final):
                raise SrlibError(
                    f"{final} already holds files srlib did not write; choose a new or empty "
                    "folder (nothing was changed)"
                )
            if not overwrite:
                raise SrlibError(
                    f"{final} holds an earlier output; pass --overwrite (overwrite=True) to "
                    "replace it, or choose a new folder"
                )
    else:
        if final.is_dir():
            raise SrlibError(f"{final} is a folder; choose a file name for the output")
        if final.exists() and not overwrite:
            raise SrlibError(
                f"{final} already exists; pass --overwrite (overwrite=True) to replace it, or choose a new file name"
            )
    return check_creatable(final)


def _is_stream(path: Path) -> bool:
    """True for an existing device or pipe, and for anything under /dev or /proc (/dev/stdout is
    a regular file when the shell redirects it to one): written in place, never replaced."""
    return (path.exists() and not path.is_file() and not path.is_dir()) or path.parts[1:2] in (("dev",), ("proc",))


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing folder `final` is renamed aside first and deleted last,
    so a reader sees the old version until the new one is in place (a crash between the two
    renames leaves the old version aside, which `sweep_temporaries` puts back)."""
    if not (tmp.is_dir() and os.path.lexists(final)):
        os.replace(tmp, final)
        return
    aside = final.with_name(f".{final.name}.{os.getpid()}.old-{uuid.uuid4().hex[:8]}")
    _OURS.add(aside)
    try:
        os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(aside, final)
            raise
        _remove(aside)
    finally:
        _OURS.discard(aside)


@contextlib.contextmanager
def atomic_path(
    final: str | os.PathLike,
    *,
    is_dir: bool = False,
    overwrite: bool = True,
    is_ours: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Yield a temporary path beside `final`; move it into place only if the block succeeds.

    An interrupted run (exception, Ctrl-C, kill) leaves no half-written file or folder at
    `final`; an existing `final` stays whole until the new one replaces it, and only as
    `check_output(final, is_dir=..., overwrite=..., is_ours=...)` allows (the defaults suit
    srlib's caches; a user's output passes `overwrite` and `is_ours`). The result gets the mode
    a plain open()/mkdir() would give (a replaced file keeps its mode). Dead writers'
    temporaries in the folder of `final` are swept first (once per folder and process).
    """
    final = check_output(final, is_dir=is_dir, overwrite=overwrite, is_ours=is_ours)
    if not is_dir and _is_stream(final):  # /dev/stdout, a pipe: nothing to replace, nothing to keep
        yield final
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.parent not in _SWEPT:
        sweep_temporaries(final.parent)
    prefix = f".{final.name}.{os.getpid()}.new-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    _OURS.add(tmp)
    try:
        yield tmp
        check_output(final, is_dir=is_dir, overwrite=overwrite, is_ours=is_ours)  # still so after the work
        mode = stat.S_IMODE(final.stat().st_mode) if not is_dir and final.exists() else _plain_mode(is_dir)
        os.chmod(tmp, mode)
        _move_into_place(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _OURS.discard(tmp)
