"""Reading a run's ``metrics.jsonl`` whatever a kill, a full disk or a hand edit left in it.

The trainer appends one JSON object per line: ``{"type": "step", "step", "epoch",
"loss", ...}``, ``{"type": "epoch", "epoch", "step", "split", "metric", "metrics": {...}, ...}`` (epochs
numbered from 1; see :func:`epochs_from_one` for older logs) and,
when training stops on divergence, ``{"type": "diverged", ...}``. A line that
is not UTF-8, not JSON, not an object, or lacks its type's fields (a line torn
by SIGKILL, say) is skipped and counted, never fatal: the log is a record of
the run, and every reader of it (resume, ``elm plot``) can go on without it.
"""

import json
import math
import numbers
import os
import stat

from elmcore.errors import ELMError
from elmcore.storage.fileio import describe_os_error


def _is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_table(v):
    return isinstance(v, dict)


# Fields every record of a type must hold, with the check each must pass.
REQUIRED = {
    "step": {"step": _is_count, "epoch": _is_count, "loss": _is_number},
    "epoch": {"step": _is_count, "epoch": _is_count, "metrics": _is_table},
    "diverged": {"step": _is_count},
}


def parse_record(line):
    """The record on one line (bytes or str), or None if the line is damaged."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    fields = REQUIRED.get(record.get("type"))
    if fields is None or not all(name in record and ok(record[name]) for name, ok in fields.items()):
        return None
    return record


def read_records(path):
    """(records in file order, number of damaged lines skipped); an absent file holds none."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode) and not os.path.isdir(path):
            # Reading /dev/zero would never end, and opening a FIFO waits for a writer.
            raise ELMError(f"{path} is not a regular file, expected the run's metrics log")
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return [], 0
    except IsADirectoryError:
        raise ELMError(f"{path} is a directory, expected the run's metrics log") from None
    except OSError as e:
        raise ELMError(f"cannot read {path}: {describe_os_error(e)}") from None
    records, damaged = [], 0
    for line in lines:
        if not line.strip():
            continue
        record = parse_record(line)
        if record is None:
            damaged += 1
        else:
            records.append(record)
    return records, damaged


def epochs_from_one(records):
    """``records`` with their epochs numbered from 1, as the console counts them.

    Logs written before numbered epochs from 0. Such a log names epoch 0 (its first
    steps are in it), which a log numbered from 1 never does: its records are shifted.
    """
    if not any(record.get("epoch") == 0 for record in records):
        return records
    return [{**record, "epoch": record["epoch"] + 1} if _is_count(record.get("epoch")) else record
            for record in records]


def finite_or_none(value):
    """A float for JSON (which has no NaN or infinity): the value if finite, else None."""
    return float(value) if isinstance(value, numbers.Real) and math.isfinite(value) else None


def metrics_path(run_dir):
    return os.path.join(os.fspath(run_dir), "metrics.jsonl")
