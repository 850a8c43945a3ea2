"""The one exception type for mistakes a user can fix.

Anything raised as ``UserError`` reaches the command line as a single line,
``error: <message>``, and exit status 2. Messages name the problem and the fix.
"""
import re
import sys


class UserError(Exception):
    """A bad config, data file, checkpoint or command-line argument."""


class ConfigError(UserError):
    """A recipe or override that does not validate."""


class DataError(UserError):
    """A corpus that is missing, corrupt or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, is untrusted, or does not fit the run."""


def exit_status(exc: UserError) -> int:
    """How every command ends on a user's mistake: ``error: <message>`` as one line on stderr,
    and exit status 2 (returned, for ``main`` to return)."""
    print(f"error: {exc}", file=sys.stderr)
    return 2


def one_line(text: object) -> str:
    """Collapse whitespace, so that a message quoting another (an OS error, a library's
    exception) stays on one line."""
    return " ".join(str(text).split())


def with_option(exc: UserError, setting: str, option: str) -> UserError:
    """``exc`` again, its advice naming ``option`` wherever it names the recipe key ``setting``.

    The data layer advises recipe keys (``set data.root ... to the folder``), which is right
    for train.py; a command that takes no recipe has its own option for the same value
    (evaluate.py's ``--data-root``), and advice to set a key it cannot take leads nowhere.
    Only the key as a word is replaced: a path that happens to contain it (``/x/data.root/``)
    is left alone, and the class of the error is kept.
    """
    pattern = r"(?<![\w./-])" + re.escape(setting) + r"(?![\w/-])"
    return type(exc)(re.sub(pattern, option, str(exc)))
