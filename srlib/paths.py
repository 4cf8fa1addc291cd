"""Where srlib reads data and keeps its caches, and how it writes files safely.

`SRLIB_DATA_DIR` points at local copies of the data sets (CI: `../shared/data`);
`SRLIB_CACHE_DIR` overrides the cache root (default: the user cache dir, `~/.cache/srlib`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import urllib.parse
from pathlib import Path
from typing import Iterator


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


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `final`; move it into place only if the block succeeds.

    An interrupted run (exception, Ctrl-C) leaves no half-written file or folder at `final`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir and final.exists():
            import shutil

            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        import shutil

        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
