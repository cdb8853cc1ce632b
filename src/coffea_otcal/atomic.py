"""Atomic file writes: a temporary file beside the destination, then one rename.

Every file coffea-otcal writes outside a stage folder (bundles, correctionlib exports,
control-region stores, skims, checkpoints, plots, generated samples) goes through
:func:`atomic_path`: a reader never sees a half-written file, an interrupted write leaves
the previous file in place, and the result gets the permissions a plain ``open()`` would
give it (``0o666`` minus the umask; ``tempfile.mkstemp`` alone creates ``0o600`` files,
which colleagues on a shared area could not read).
"""

from __future__ import annotations

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextmanager
def atomic_path(
    path: str | os.PathLike[str], suffix: str = ".tmp", fsync: bool = False
) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; publish it when the block succeeds.

    After the block the temporary file gets mode ``0o666 & ~umask``, is optionally
    flushed to disk (``fsync``), and replaces ``path`` in one rename; on any error it is
    removed and ``path`` is left as it was. The parent folder is created when missing.

    Arguments:
        path: the destination.
        suffix: suffix of the temporary name (writers that infer the format from the file
            name, such as ``matplotlib.savefig``, need the real one, e.g. ``".png"``).
        fsync: flush the file's data to disk before the rename.

    Example:
        >>> import tempfile, numpy as np
        >>> out = Path(tempfile.mkdtemp()) / "a.npy"
        >>> with atomic_path(out, suffix=".npy") as tmp:
        ...     np.save(tmp, np.arange(3))
        >>> np.load(out).tolist()
        [0, 1, 2]
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())
        if fsync:
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`); returns the path."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`); returns the path."""
    return atomic_write_bytes(path, text.encode(), fsync=fsync)
