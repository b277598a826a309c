"""Pieces every ``elm`` command group shares: how user errors are shown, KEY=VALUE options, number types."""

import json
import math

import click

from elmcore.errors import ELMError
from elmcore.storage.fileio import describe_os_error


class UserError(click.ClickException):
    """A problem with the user's input: one line ``error: …`` on stderr, exit code 2 (as click's usage errors).

    In a job of several MPI ranks the line is printed once and the job ends with it:
    ``silent`` when another rank reports the same error, ``collective`` when every rank
    raised it (so none is left waiting and no abort is needed).
    """
    exit_code = 2

    def __init__(self, message, silent=False, collective=False):
        super().__init__(message)
        self.silent, self.collective = silent, collective

    def show(self, file=None):
        from elmcore.training.distributed import end_job_after

        def report():
            if not self.silent:
                click.echo(f"error: {self.format_message()}", err=True)
        # A silent rank still takes part in ending the job: it must not exit before rank 0 has reported.
        end_job_after(report, self.exit_code, self.collective)

    @classmethod
    def of(cls, error, message=None):
        """The UserError for ``error`` (an ELMError or another exception), keeping what MPI jobs need to know."""
        return cls(str(error) if message is None else message, silent=getattr(error, "silent", False),
                   collective=getattr(error, "collective", False))


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
            raise UserError.of(e) from None
        except MemoryError as e:
            raise UserError.of(e, "out of memory: reduce the batch size or sequence length") from None
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.ClickException as e:
            if isinstance(e, UserError):
                raise
            raise _user_error(e) from None
        except RecursionError as e:
            raise UserError.of(e, "an input is nested too deeply to read") from None
        except KeyboardInterrupt:  # Ctrl-C: the shell's convention, 128 + SIGINT (not Click's "Aborted!", 1)
            click.echo("interrupted", err=True)
            raise SystemExit(130) from None
        except OSError as e:
            # The file system refused something (disk full, read-only, vanished path): the user's to fix.
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            raise UserError.of(e, f"{where}{describe_os_error(e)}") from None


class FiniteFloat(click.ParamType):
    """A float option that refuses NaN and ±inf (click's FloatRange lets NaN through every bound)."""
    name = "float"

    def __init__(self, min=None, max=None, min_open=False, max_open=False):
        self.min, self.max, self.min_open, self.max_open = min, max, min_open, max_open

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.min is not None and (number < self.min or (self.min_open and number == self.min)):
            self.fail(f"{number:g} is not {'>' if self.min_open else '>='} {self.min:g}", param, ctx)
        if self.max is not None and (number > self.max or (self.max_open and number == self.max)):
            self.fail(f"{number:g} is not {'<' if self.max_open else '<='} {self.max:g}", param, ctx)
        return number


def parse_assignments(pairs, what="option", reserved=()):
    """``KEY=VALUE`` strings -> dict; VALUE is read as JSON where it parses (numbers, true, null), else a string.

    Dashes in keys become underscores, so ``--set mlp-num-layers=2`` works too.
    ``reserved`` keys are set by the command itself (its own options) and refused here.
    """
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{what} expects KEY=VALUE, got {pair!r}")
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            value = raw
        key = key.strip().replace("-", "_")
        if key in reserved:
            raise UserError(f"{what} {key}=… is not an option here; use the command's own --{key.replace('_', '-')}"
                            if key != "name" else f"{what} name=… is not an option here")
        out[key] = value
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
