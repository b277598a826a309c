"""Safe file writes and hostile-file-proof reads of ``.npy`` / ``.npz`` / JSON.

Writes: a user's existing file is replaced only by a complete one, and only
the file is replaced, never what the path is. A symlink keeps pointing where
it did and its target is written; a FIFO, terminal or device node is written
through, as ``open(path, "w")`` would; an existing file keeps its permission
bits and a new one gets ``0666 & ~umask``, as ``open`` would give it; an
output that is one of the command's own inputs is refused before anything is
written. Every failure to write (missing or unwritable directory, disk full,
read-only file system) becomes one :class:`~elmcore.errors.ELMError` naming
the path, and no temporary file is left behind.
"""

import contextlib
import errno
import glob
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import zipfile

import numpy as np

from elmcore.errors import ELMError

# Temporaries are "." + basename + "." + random + TEMP_MARK + suffix, beside the target.
TEMP_MARK = ".tmp"

_ERRNO_WORDS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.EISDIR: "it is a directory",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "a component of the path exists and is not a directory",
}


def describe_os_error(error):
    """Words for an OSError a user can act on (its errno's meaning, else its own text)."""
    return _ERRNO_WORDS.get(error.errno) or error.strerror or str(error)


def write_error(path, error):
    return ELMError(f"cannot write {os.fspath(path)}: {describe_os_error(error)}")


def _current_umask():
    try:  # Linux states it without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere it can only be read by setting it (for a moment)
    os.umask(mask)
    return mask


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def refuse_inputs(output, inputs):
    """Raise if ``output`` is one of the files ``inputs`` (through symlinks and hard links); skips ``None``."""
    out_real = os.path.realpath(os.fspath(output))
    out_exists = os.path.lexists(out_real)
    for item in inputs:
        if item is None:
            continue
        item = os.fspath(item)
        if out_real == os.path.realpath(item) or (out_exists and _same_file(out_real, item)):
            raise ELMError(f"refusing to write {os.fspath(output)}: it is this command's input {item}; "
                           "choose another output path")


@contextlib.contextmanager
def atomic_output(path, suffix="", inputs=()):
    """Yield a temporary path to write; on success it becomes ``path`` (see the module docstring).

    ``inputs``: the files the command reads; an output that is one of them is
    refused with an ELMError before anything is written.
    The temporary name ends with ``suffix``, so extension-sensitive writers
    (``np.savez`` appends ``.npz`` to names without it) write exactly there.
    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    if not path or "\0" in path or path.endswith(os.sep):
        raise ELMError(f"cannot write {path!r}: not a file name")
    refuse_inputs(path, inputs)
    # A symlink (or a chain of them) is kept: its final target is what gets written.
    target = os.path.realpath(path)
    try:
        info = os.stat(path)  # the kernel follows every link, /dev/stdout's included
    except FileNotFoundError:
        info = None
    except OSError as e:
        raise write_error(path, e) from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise ELMError(f"cannot write {path}: it is a directory")
    through_proc = _proc_link(path)
    if info is not None and (not stat.S_ISREG(info.st_mode) or through_proc is not None):
        # A FIFO, device or terminal, or a descriptor named through /proc (/dev/stdout, /dev/fd/N):
        # renaming onto it would replace what it is, so the finished bytes are written into it.
        with _write_through(path, info, suffix, through_proc) as tmp:
            yield tmp
        return
    directory = os.path.dirname(target)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=TEMP_MARK + suffix,
                                   dir=directory)
    except OSError as e:
        raise write_error(path, e) from None
    os.close(fd)
    # A Ctrl-C in the middle of a writer (np.savez's zip, say) can leave it raising its own error
    # instead of KeyboardInterrupt: the run would end in a traceback, not its resume line. A regular
    # file's write is short and cannot block, so the interrupt waits for the file to be in place.
    with interrupts_deferred():
        yield from _write_and_replace(path, tmp, target, info)


def _write_and_replace(path, tmp, target, info):
    try:
        try:
            yield tmp
            mode = stat.S_IMODE(info.st_mode) if info is not None else 0o666 & ~_current_umask()
            os.chmod(tmp, mode)
            if info is not None and os.geteuid() == 0:
                with contextlib.suppress(OSError):  # root rewriting a user's file leaves it theirs
                    os.chown(tmp, info.st_uid, info.st_gid)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as e:
            raise write_error(path, e) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def interrupts_deferred():
    """Hold a SIGINT (Ctrl-C) that arrives inside the block and deliver it when the block ends.

    The handler in place before the block then runs as the signal would have run it (Python's
    raises KeyboardInterrupt). Outside the main thread, or when SIGINT is ignored or handled
    outside Python, the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None or previous == signal.SIG_IGN:
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            if callable(previous):
                previous(signal.SIGINT, held[0])
            else:  # SIG_DFL: the default action, now that it is back in place
                os.kill(os.getpid(), signal.SIGINT)


def _proc_link(path):
    """The path in /proc that resolving ``path`` passes through (``/dev/stdout`` -> ``/proc/self/fd/1``), or None."""
    current = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on links followed
        if current == "/proc" or current.startswith("/proc/"):
            return current
        parts = current.split(os.sep)
        for i in range(2, len(parts) + 1):
            prefix = os.sep.join(parts[:i])
            if os.path.islink(prefix):
                current = os.path.normpath(os.path.join(os.path.dirname(prefix), os.readlink(prefix), *parts[i:]))
                break
        else:
            return None
    return None


def _own_descriptor(proc_path):
    """N when ``proc_path`` names this process's descriptor N (``/proc/self/fd/N``)."""
    parts = proc_path.split(os.sep)
    if len(parts) == 5 and parts[3] == "fd" and parts[4].isdigit() and \
            parts[2] in ("self", "thread-self", str(os.getpid())):
        return int(parts[4])
    return None


@contextlib.contextmanager
def _write_through(path, info, suffix, proc_path):
    """Write the finished bytes into ``path`` (a FIFO, device, terminal or descriptor), never replacing it.

    This process's own descriptor (``/dev/stdout``) is written at its current
    position, as a shell's ``>&1`` would, so what the command prints around it
    is kept; anything else is opened for writing as ``open(path, "wb")`` would.
    """
    if stat.S_ISSOCK(info.st_mode):
        raise ELMError(f"cannot write {path}: it is a socket")
    scratch = tempfile.mkdtemp(prefix="elmcore-")
    try:
        tmp = os.path.join(scratch, "output" + suffix)
        yield tmp
        descriptor = _own_descriptor(proc_path) if proc_path else None
        try:
            if descriptor is not None:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                dst = os.fdopen(os.dup(descriptor), "wb")
            else:
                dst = open(path, "wb")
            with open(tmp, "rb") as src, dst:
                shutil.copyfileobj(src, dst)
        except OSError as e:
            raise write_error(path, e) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def atomic_write_text(path, text, inputs=()):
    with atomic_output(path, inputs=inputs) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_write_bytes(path, data, inputs=()):
    with atomic_output(path, inputs=inputs) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def remove_stale_temporaries(directory, names):
    """Delete temporaries that a killed writer of ``directory/<name>`` left behind; return them.

    Call only while holding whatever lock keeps other writers out of ``directory``.
    """
    removed = []
    for name in names:
        pattern = os.path.join(glob.escape(os.fspath(directory)), f".{glob.escape(name)}.*{TEMP_MARK}*")
        for stale in glob.glob(pattern):
            with contextlib.suppress(OSError):
                os.unlink(stale)
                removed.append(stale)
    return removed


# ---- reading ---------------------------------------------------------------------

def parse_json(text, source):
    """``json.loads`` whose every failure (bad syntax, nesting deep enough to exhaust the stack) is an ELMError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ELMError(f"{source}: not valid JSON ({e})") from None
    except RecursionError:
        raise ELMError(f"{source}: JSON nested too deeply to read") from None
    except ValueError as e:  # an integer past Python's digit limit for int(str)
        raise ELMError(f"{source}: not readable JSON ({too_long_number(e)})") from None


def too_long_number(error):
    """Words for the ValueError a parser raises on an integer of thousands of digits (else its own text)."""
    text = str(error)
    if "digits" in text and "limit" in text:
        return "it holds an integer of thousands of digits; no setting takes one"
    return text


# JSON files elmcore reads are configs and run settings: a few KiB. The cap stops /dev/zero and the like.
MAX_JSON_BYTES = 64 * 2 ** 20


def _read_settings_text(path, what, regular_only=False):
    """The text of a small UTF-8 settings file; every way it cannot be read is an ELMError naming it.

    ``regular_only``: refuse anything but a regular file (a FIFO would wait for a writer forever);
    for the files of a run or sweep directory, which elmcore writes itself.
    """
    path = os.fspath(path)
    if "\0" in path:
        raise ELMError(f"{what} {path!r}: not a file name")
    if regular_only:
        with contextlib.suppress(OSError):
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
                raise ELMError(f"{what} {path} is not a regular file")
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read(MAX_JSON_BYTES + 1)
        if len(text) > MAX_JSON_BYTES:
            raise ELMError(f"{what} {path} is larger than {MAX_JSON_BYTES // 2 ** 20} MiB; not a settings file")
    except FileNotFoundError:
        raise ELMError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ELMError(f"{what} {path} is a directory, expected a file") from None
    except UnicodeDecodeError:
        raise ELMError(f"{what} {path} is not UTF-8 text") from None
    except OSError as e:
        raise ELMError(f"cannot read {what} {path}: {describe_os_error(e)}") from None
    return path, text


def read_json(path, what="file", regular_only=False):
    """Parse the JSON file ``path``; missing, unreadable, oversized, non-UTF-8 or malformed files raise an ELMError."""
    path, text = _read_settings_text(path, what, regular_only)
    return parse_json(text, path)


def read_toml(path, what="file"):
    """Parse the TOML file ``path``, with :func:`read_json`'s checks."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            raise ELMError("reading TOML needs Python 3.11+ or the 'tomli' package") from None
    path, text = _read_settings_text(path, what)
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise ELMError(f"{path}: cannot parse {what} (nested too deeply)") from None
    except ValueError as e:  # TOMLDecodeError, or an integer past Python's digit limit
        raise ELMError(f"{path}: cannot parse {what} ({too_long_number(e)})") from None


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


def _check_array_header(stream, stored_bytes, where):
    """Read an .npy header from ``stream`` (holding ``stored_bytes`` in all); refuse object dtypes and
    shapes that the bytes after the header cannot hold."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise ELMError(f"{where}: not a readable .npy array ({e})") from None
    if dtype.hasobject:
        raise ELMError(f"{where}: holds Python objects (dtype {dtype}); only numeric and text arrays are read")
    needed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    available = stored_bytes - stream.tell()
    if needed > available:
        raise ELMError(f"{where}: its header declares shape {shape} of {dtype} ({needed} bytes) but only "
                       f"{available} bytes follow (truncated or forged)")


def read_npy(path, what="array"):
    """One ``.npy`` array, checked against its file size before any allocation; no pickle."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
            if head[:4] == _ZIP_MAGIC:
                raise ELMError(f"{path}: expected a single .npy array, got an .npz archive")
            if head != _NPY_MAGIC:
                raise ELMError(f"{path}: not a readable .npy array (no .npy header)")
            f.seek(0)
            _check_array_header(f, os.fstat(f.fileno()).st_size, path)
            f.seek(0)
            return np.lib.format.read_array(f, allow_pickle=False)
    except FileNotFoundError:
        raise ELMError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise ELMError(f"{path} is a directory, expected a .npy file") from None
    except (ValueError, OSError, EOFError) as e:
        raise ELMError(f"{path}: not a readable .npy array ({e})") from None


def read_npz(path, what="an .npz file"):
    """Every array of an ``.npz`` archive as a dict, without pickle, refusing forged sizes.

    Checks made before anything large is allocated: the file is a zip archive
    (a ``.npy`` handed over by mistake is named as such), the members' declared
    sizes fit in memory, and each member's header shape fits in the bytes it stores.
    """
    from elmcore.engine.memory import check_memory
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ELMError(f"file not found: {path}")
    if os.path.isdir(path):
        raise ELMError(f"{path} is a directory; expected {what} (.npz)")
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise ELMError(f"cannot read {path}: {describe_os_error(e)}") from None
    if head == _NPY_MAGIC:
        raise ELMError(f"{path} is a single .npy array; expected {what} (.npz archive)")
    if head[:4] != _ZIP_MAGIC:
        raise ELMError(f"{path} is not a zip archive; expected {what} (.npz)")
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if m.filename.endswith(".npy")]
            check_memory(sum(m.file_size for m in members), f"reading {path}")
            for member in members:
                where = f"{path}: entry {member.filename[:-4]!r}"
                with archive.open(member) as stream:
                    _check_array_header(stream, member.file_size, where)
                with archive.open(member) as stream:
                    arrays[member.filename[:-4]] = np.lib.format.read_array(stream, allow_pickle=False)
    except ELMError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, KeyError,
            NotImplementedError, RuntimeError) as e:
        raise ELMError(f"{path}: not readable as {what} (truncated or corrupt: {e})") from None
    return arrays
