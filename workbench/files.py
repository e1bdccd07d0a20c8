"""Atomic file writes: a file is replaced whole or not at all, and a failed write says so in one line.

Every output the workbench writes (checkpoints, JSON results) goes through `atomic_write`: the
bytes go to a temporary file beside the target, which is flushed to disk and renamed over it. A
write that fails (a full disk, no permission, a file-size limit) removes the temporary file, leaves
the previous version of the target as it was, and raises `WriteError`, whose message is one line
naming the path and the cause, rather than the chain of tracebacks torch.save gives.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


class WriteError(OSError):
    """An output file that could not be written; the previous version, if any, is unchanged."""


def _cause(exc: BaseException) -> str:
    """The operating system's reason behind a failed write (torch.save wraps it in a RuntimeError)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return f"[Errno {seen.errno}] {seen.strerror}"
        seen = seen.__cause__ or seen.__context__
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call write(f) on a temporary file beside `path`, then rename it over `path`; WriteError on failure."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; an output is an ordinary file
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        kept = "the previous version is kept" if path.exists() else "nothing was written"
        raise WriteError(f"cannot write {path}: {_cause(exc)} ({kept}); free space or fix permissions there, or "
                         f"write the run elsewhere") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path
