"""The one exception type for user mistakes and bad input.

The library raises `CaptionerError` (or a subclass) with a message that names the
option, path or line at fault; `captioner.cli` prints it on one line and exits 2,
with no traceback. Anything else that escapes is a bug and keeps its traceback.
"""


class CaptionerError(Exception):
    """A user mistake or unusable input, explained in one line."""


class ConfigError(CaptionerError):
    """An unknown config key, a value of the wrong type, or a bad config file."""
