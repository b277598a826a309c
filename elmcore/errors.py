"""The one exception type users see.

Every problem caused by what a user handed us (a config, a file, an array)
raises :class:`ELMError` with a message that names the offending field or
file. The CLI turns it into one line on stderr and exit code 2; anything else
escaping is a bug in elmcore.
"""


class ELMError(ValueError):
    """A problem with user input: config, data, file or option."""


class ConfigError(ELMError):
    """An impossible or malformed model configuration; names the field."""

    def __init__(self, field, message):
        self.field = field
        super().__init__(f"config field '{field}': {message}")


class DataError(ELMError):
    """Malformed, missing or non-finite input data."""


class CheckpointError(ELMError):
    """A missing, truncated, corrupt or unsafe checkpoint file."""


class NonFiniteOutputError(DataError):
    """A model's outputs are not finite although its input is: its parameters have diverged."""
