"""Pieces every ``elm`` command group shares: how user errors are shown, KEY=VALUE options."""

import json

import click

from elmcore.errors import ELMError


class UserError(click.ClickException):
    """A problem with the user's input: one line ``error: …`` on stderr, exit code 2 (as click's usage errors)."""
    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


class ELMGroup(click.Group):
    """Turns every ELMError raised by a command into a UserError, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ELMError as e:
            raise UserError(str(e)) from None
        except MemoryError:
            raise UserError("out of memory: reduce the batch size or sequence length") from None


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
