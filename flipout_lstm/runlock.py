"""One process at a time per run directory: an advisory lock on ``<run_dir>/train.lock``.

``fcntl.flock`` locks belong to an open file and the kernel drops them when the process ends
in any way (exit, crash, SIGKILL), so a killed trainer never leaves a run stuck: the next one
takes the lock at once. The file holds the holder's PID, so that a second process can say who
holds the run. A process that finishes removes the file (and the run directory, if it wrote
nothing else there); after a SIGKILL the file stays behind, unlocked, naming a dead PID, and
is simply taken over.

Removing a lock file is safe only because :func:`hold` checks, after locking, that the path
still names the file it locked (another process may have removed it in between) and starts
over if not.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from flipout_lstm.errors import UserError

LOCK_NAME = "train.lock"


def _holder(path: Path) -> str:
    """The PID written in the lock file, as words for the error message."""
    try:
        pid = path.read_text(encoding="ascii").split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        return "another process"  # it has the lock but has not written its PID yet
    return f"process {pid}" if pid.isdigit() else "another process"


def _acquire(run_dir: Path) -> int:
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{run_dir} is in use by {_holder(path)} (it holds {path}); wait for "
                            f"it to finish or stop it, or choose another train.run_name=NAME") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    return fd


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike):
    """Hold ``run_dir`` (creating it) for the duration of the block.

    Raises :class:`UserError` naming the holder's PID if another process holds it, or naming
    ``train.out_dir`` if the folder cannot be created. On leaving the block the lock file is
    removed, and so is the run directory if this block created it and nothing else was
    written to it (a run that failed before writing anything leaves no trace).
    """
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = _acquire(run_dir)
    except OSError as exc:
        raise UserError(f"cannot write the run directory {run_dir}: {exc.strerror or exc}; set "
                        f"train.out_dir to a writable folder") from None
    try:
        yield run_dir
    finally:
        # Unlink while still holding the lock, so no one can lock the old file in between.
        with contextlib.suppress(OSError):
            (run_dir / LOCK_NAME).unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # fails, as it should, unless the folder is empty


__all__ = ["LOCK_NAME", "hold"]
