"""The one exception type for mistakes a user can fix.

Anything raised as ``UserError`` reaches the command line as a single line,
``error: <message>``, and exit status 2. Messages name the problem and the fix.
"""


class UserError(Exception):
    """A bad config, data file, checkpoint or command-line argument."""


class ConfigError(UserError):
    """A recipe or override that does not validate."""


class DataError(UserError):
    """A corpus that is missing, corrupt or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, is untrusted, or does not fit the run."""
