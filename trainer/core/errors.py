"""The one exception type that the command line turns into a one-line message."""


class UsageError(Exception):
    """Bad input from the user: the message names the problem and the fix, on one line."""
