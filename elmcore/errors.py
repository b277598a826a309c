"""The one exception type users see.

Every problem caused by what a user handed us (a config, a file, an array)
raises :class:`ELMError` with a message that names the offending field or
file. The CLI turns it into one line on stderr and exit code 2; anything else
escaping is a bug in elmcore.
"""


class ELMError(ValueError):
    """A problem with user input: config, data, file or option."""


def did_you_mean(word, choices):
    """``"; did you mean NAME?"`` for the choice closest to ``word`` (difflib), or ``""`` when none is close.

    ``choices``: names, or {name: a note to add after the name}.
    """
    import difflib
    notes = choices if isinstance(choices, dict) else dict.fromkeys(choices, "")
    close = difflib.get_close_matches(str(word), [str(name) for name in notes], n=1)
    return f"; did you mean {close[0]}{notes[close[0]]}?" if close else ""


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
