"""What the hostile-input test modules share: run an `elm` command on crafted input and check the promise.

The promise (README): exit code 2, exactly one stderr line ``error: …`` naming the
problem, no traceback, no file the user had changed, no hang. Commands run in
this process through Click's runner under an alarm (fast), or in a subprocess
under an address-space limit and a timeout where a case could exhaust memory.
"""

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import warnings

from click.testing import CliRunner

from elm_cli.main import cli

# A case that is refused "at once" is refused well within this.
ALARM_S = 60
MEMORY_LIMIT = 8 << 30
SUBPROCESS_TIMEOUT_S = 240

_RUN_ELM = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
            "from elm_cli.main import main; sys.argv = ['elm'] + sys.argv[1:]; main()")


class Timeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds):
    def ring(signum, frame):
        raise Timeout(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def invoke(*args, seconds=ALARM_S):
    """``elm ARGS`` in this process; (result, warnings it raised)."""
    with alarm(seconds), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(cli, [str(a) for a in args])
    if isinstance(result.exception, Timeout):
        raise AssertionError(f"elm {' '.join(map(str, args))}: {result.exception}")
    result.caught_warnings = [str(w.message) for w in caught]
    return result


def run_elm(*args, timeout=SUBPROCESS_TIMEOUT_S, cwd=None):
    """``elm ARGS`` in a subprocess under an 8 GiB address-space limit (a CompletedProcess)."""
    code = _RUN_ELM.format(limit=MEMORY_LIMIT)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)


def assert_refused(result, *fragments):
    """Exit 2, stderr exactly one line ``error: …`` holding every fragment, no traceback, no warning."""
    if hasattr(result, "exit_code"):  # Click's runner
        code, stderr = result.exit_code, result.stderr
        assert isinstance(result.exception, SystemExit), repr(result.exception)
        assert not result.caught_warnings, result.caught_warnings
    else:
        code, stderr = result.returncode, result.stderr
    assert code == 2, f"exit {code}; stderr: {stderr[-3000:]}"
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(*roots):
    """{path: sha256} of every file under ``roots`` (files or directories), for "nothing changed" checks."""
    out = {}
    for root in map(os.fspath, roots):
        paths = [root] if os.path.isfile(root) else \
            [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]
        for path in paths:
            with open(path, "rb") as f:
                out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_unchanged(before, *roots):
    after = snapshot(*roots)
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert not changed, f"changed or removed: {changed}"
