"""Pieces every ``elm`` command group shares: how user errors are shown, KEY=VALUE options."""

import json

import click

from elmcore.errors import ELMError


class UserError(click.ClickException):
    """A problem with the user's input: one line ``error: …`` on stderr, exit code 2 (as click's usage errors)."""
    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def _user_error(e: click.ClickException) -> UserError:
    """Click's own errors (unknown option, bad value, …) in the project's one style: ``error: …``, exit 2."""
    hint = ""
    if isinstance(e, click.UsageError) and e.ctx is not None:
        hint = f" (see '{e.ctx.command_path} --help')"
    return UserError(e.format_message().rstrip(".") + hint)


class ELMGroup(click.Group):
    """Turns every ELMError raised by a command, and Click's own usage errors, into a UserError.

    So a user sees one ``error: …`` line and exit code 2 whatever went wrong, never a
    traceback and never Click's multi-line ``Usage: … Error: …`` block.
    """

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # a bare group prints its help
        except click.ClickException as e:
            if isinstance(e, UserError):
                raise
            raise _user_error(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ELMError as e:
            raise UserError(str(e)) from None
        except MemoryError:
            raise UserError("out of memory: reduce the batch size or sequence length") from None
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.ClickException as e:
            if isinstance(e, UserError):
                raise
            raise _user_error(e) from None


def parse_assignments(pairs, what="option"):
    """``KEY=VALUE`` strings -> dict; VALUE is read as JSON where it parses (numbers, true, null), else a string.

    Dashes in keys become underscores, so ``--set mlp-num-layers=2`` works too.
    """
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{what} expects KEY=VALUE, got {pair!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip().replace("-", "_")] = value
    return out


class TaskChoice(click.Choice):
    """A task name from the registry (any case; ``_`` and ``-`` interchangeable), so shells complete it."""

    def __init__(self, names=None):
        from elmcore.data.registry import TASKS
        super().__init__(list(TASKS if names is None else names), case_sensitive=False)

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            value = value.strip().lower().replace("_", "-")
        return super().convert(value, param, ctx)
