"""Durable file writes shared by checkpoints, the vocabulary and the corpus download."""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # no directory file descriptors here: the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new file beside ``path``, open for writing, with the permissions the umask gives.

    Not ``tempfile.mkstemp``: it creates files ``0o600`` whatever the umask, and the rename
    then leaves every run file readable by its owner alone. Opened with mode ``0o666``, the
    kernel applies the umask itself (``0o644`` under the usual ``022``), as for any file
    ``open()`` creates, with no need to read the umask (``os.umask`` can only be read by
    changing it, which races with other threads creating files). ``O_EXCL`` keeps the name
    ours; a name already taken is drawn again.
    """
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                           0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike):
    """A binary file to write ``path`` through, so that readers see the old file or the new
    one, whole: the bytes go to a temporary file in the same folder (with the permissions
    the umask gives), which is flushed, fsync'ed and renamed over ``path`` when the block
    ends (``os.replace`` is atomic within a filesystem). On any failure the temporary file
    is removed and the previous ``path`` is untouched. For data written in pieces (an
    encoded corpus); :func:`atomic_write_bytes` for data in hand."""
    path = Path(path)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_writer`)."""
    with atomic_writer(path) as fh:
        fh.write(data)
