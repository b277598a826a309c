"""NeuronIO pickles: a restricted reader that cannot run code or read memory it did not
allocate, and a writer in the Python 2 style of the published files.

A pickle is a program. The reader resolves only the names pickled NumPy arrays,
dtypes and scalars use, each to a stand-in defined here, never to NumPy's own
constructors: ``numpy.dtype`` plus its state could otherwise build a dtype with
an object field (then reading the array follows a pointer from the file) or a
field offset past the item size (reading the heap), and ``ndarray.__setstate__``
would accept either. The stand-ins accept a dtype only when it equals what
``np.dtype(descr)`` builds from a plain numeric descriptor (``'<f8'``, ``'|b1'``),
and give an array its data only from bytes of exactly its size. Before the C
unpickler runs, :func:`elmcore.storage.pickle_guard.check_pickle_bytes` refuses memo
indices and lengths the file cannot fill, and the stand-ins allocate at most a
few times the file's size in all (memo references can repeat one string).
"""

import io
import os
import pickle
import re
import reprlib
import stat
import struct

import numpy as np

from elmcore.errors import DataError
from elmcore.storage.fileio import atomic_output
from elmcore.storage.pickle_guard import UnsafePickle, check_pickle_bytes


def _numpy_multiarray():
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy < 2
        from numpy.core import multiarray
    return multiarray


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel = 2
short_repr = _short.repr


class _Refused(Exception):
    """Something in the pickle that a NeuronIO file never holds; the loader names the file."""


class _AllocationBudget:
    """Bytes the stand-ins may still allocate for this file.

    A real file allocates each byte of array data about twice (latin1 string to
    bytes, bytes to array); more means memo references repeat one large string.
    """

    def __init__(self, file_size):
        self.left = 4 * file_size + (1 << 20)

    def take(self, nbytes, what):
        self.left -= nbytes
        if self.left < 0:
            raise _Refused(f"{what} would allocate more than the file could hold (memo references "
                           "repeat one large string)")


_PLAIN_DESCR = re.compile(r"[biufc][0-9]{1,2}\Z")


class _PickledDtype:
    """Stand-in for ``numpy.dtype(descr, align, copy)``: resolves, once its state arrives, to a plain numeric dtype."""

    __slots__ = ("descr", "dtype")

    def __init__(self, descr):
        self.descr = descr
        self.dtype = None

    def __setstate__(self, state):
        if self.dtype is not None:
            raise _Refused("a dtype is given a state twice")
        descr = self.descr.decode("ascii", "replace") if isinstance(self.descr, bytes) else self.descr
        if not (isinstance(descr, str) and _PLAIN_DESCR.match(descr)):
            raise _Refused(f"dtype {_short.repr(descr)} is not a plain numeric type (only bool, integer, "
                           "float and complex arrays are read)")
        try:
            base = np.dtype(descr)
        except TypeError:
            raise _Refused(f"dtype {descr!r} is not a NumPy type") from None
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        order = order.decode("ascii", "replace") if isinstance(order, bytes) else order
        if order not in ("<", ">", "|", "="):
            raise _Refused(f"dtype {descr!r} has an invalid state {_short.repr(state)}")
        expected = base if order == "|" else base.newbyteorder(order)
        if base.kind not in "biufc" or expected.__reduce__()[2] != tuple(
                s.decode("ascii", "replace") if isinstance(s, bytes) else s for s in state):
            raise _Refused(f"dtype {descr!r} comes with the state {_short.repr(state)}, not that of a "
                           "plain numeric type (fields, offsets and object flags are refused)")
        self.dtype = expected


def _resolved(dtype, what):
    if not isinstance(dtype, _PickledDtype) or dtype.dtype is None:
        raise _Refused(f"{what} needs a numeric dtype, got {_short.repr(dtype)}")
    return dtype.dtype


def _latin1_bytes(data, budget, what):
    """Python 2 files hold array data as ``str``, which the reader decodes as ASCII or latin1 text."""
    if isinstance(data, str):
        budget.take(len(data), what)
        try:
            return data.encode("latin1")
        except UnicodeEncodeError:
            raise _Refused(f"{what} holds text that is not a byte string") from None
    if isinstance(data, bytes):
        return data
    raise _Refused(f"{what} must be bytes, got {type(data).__name__}")


class _PickledArray(np.ndarray):
    """What the ``_reconstruct`` stand-in returns: an empty array that gets data only from a checked state.

    Pickled arrays are ``_reconstruct(ndarray, (0,), 'b')`` followed by a state
    ``(version, shape, dtype, is_fortran, data)``. The state reaches
    ``ndarray.__setstate__`` only with a dtype resolved by :class:`_PickledDtype`
    and ``data`` of exactly ``prod(shape) * itemsize`` bytes.
    """

    def __setstate__(self, state):
        budget = self.__dict__.pop("_budget", None)
        if budget is None:
            raise _Refused("an array is given a state twice")
        if isinstance(state, tuple) and len(state) == 4:
            state = (1, *state)
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise _Refused(f"array state {_short.repr(state)} is not (1, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, data = state
        if not (isinstance(shape, tuple) and len(shape) <= 32
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise _Refused(f"array shape {_short.repr(shape)} is not a tuple of sizes")
        dtype = _resolved(dtype, "an array")
        if fortran not in (0, 1):  # also True / False
            raise _Refused(f"array order flag {_short.repr(fortran)} is not a boolean")
        data = _latin1_bytes(data, budget, "array data")
        nbytes = dtype.itemsize
        for n in shape:
            nbytes *= n
        if nbytes != len(data):
            raise _Refused(f"an array of shape {shape} and dtype {dtype} needs {nbytes} bytes, the file "
                           f"gives {len(data)}")
        budget.take(len(data), "array data")
        np.ndarray.__setstate__(self, (1, shape, dtype, bool(fortran), data))

    def __reduce__(self):
        # Pickled again, it is a plain array: this class is no name a reader should accept.
        return self.view(np.ndarray).__reduce__()


class _NDArrayName:
    """What ``numpy.ndarray`` resolves to: a marker ``_reconstruct`` accepts, not the class."""


_NDARRAY = _NDArrayName()


def _stand_ins(budget):
    """(module, name) as written in the pickle -> the stand-in it resolves to, for one file.

    Both NumPy 1 (``numpy.core``) and NumPy 2 (``numpy._core``) module names, plus
    the two helpers Python 3 uses for bytes at protocol 2 (restricted to that use).
    """

    def dtype(descr, align=False, copy=False):
        return _PickledDtype(descr)

    def reconstruct(subtype, shape, typecode):
        if subtype is not _NDARRAY:
            raise _Refused(f"_reconstruct builds only numpy.ndarray, got {_short.repr(subtype)}")
        array = np.ndarray.__new__(_PickledArray, (0,), np.uint8)
        array.__dict__["_budget"] = budget
        return array

    def scalar(dtype_, data=None):
        resolved = _resolved(dtype_, "a NumPy scalar")
        if type(data) is not bytes:  # a published file holds millions of scalars: bytes skip the call
            data = _latin1_bytes(data, budget, "scalar data")
        if len(data) != resolved.itemsize:
            raise _Refused(f"a {resolved} scalar needs {resolved.itemsize} bytes, the file gives {len(data)}")
        return np.frombuffer(data, dtype=resolved)[0]

    def latin1_encode(text, encoding="latin1"):
        """Python 3 writes bytes at protocol 2 as ``_codecs.encode(text, 'latin1')``; allow only that."""
        if not isinstance(text, str) or str(encoding).lower().replace("-", "") not in ("latin1", "iso88591"):
            raise _Refused("_codecs.encode is only allowed as a latin1 bytes literal")
        return _latin1_bytes(text, budget, "a bytes literal")

    def empty_bytes(*args):
        """Python 3 writes b'' at protocol 2 as ``bytes()``; anything else could allocate at will."""
        if args:
            raise _Refused("bytes(...) is only allowed without arguments")
        return b""

    table = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): dtype,
             ("_codecs", "encode"): latin1_encode,
             ("__builtin__", "bytes"): empty_bytes, ("builtins", "bytes"): empty_bytes}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = reconstruct
        table[(module, "scalar")] = scalar
    return table


class _RefusedGlobal(Exception):
    """Raised from ``find_class`` so the loader can name the global and the file."""

    def __init__(self, module, name):
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class _NeuronIOUnpickler(pickle.Unpickler):
    def __init__(self, file, budget, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = _stand_ins(budget)

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            raise _RefusedGlobal(module, name) from None


def read_pickle_bytes(path):
    """The bytes of a NeuronIO file, or a DataError naming it."""
    path = os.fspath(path)
    try:
        # A FIFO or device named like a data file would block in open() or never end.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DataError(f"NeuronIO file {path} is not a regular file")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read NeuronIO file {path}: {e}") from None


def unpickle_neuronio_bytes(data, path):
    """The object a NeuronIO pickle ``data`` (read from ``path``) holds; see :func:`load_neuronio_pickle`."""
    try:
        check_pickle_bytes(data)
    except UnsafePickle as e:
        raise DataError(f"NeuronIO file {path}: refused: {e}") from None
    for encoding in ("ASCII", "latin1"):
        try:
            return _NeuronIOUnpickler(io.BytesIO(data), _AllocationBudget(len(data)), encoding=encoding).load()
        except UnicodeDecodeError:
            continue  # latin1 decodes every byte string, so the second pass cannot end here
        except _RefusedGlobal as e:
            raise DataError(f"NeuronIO file {path}: refused to load pickled global '{e.qualified}' "
                            "(only NumPy arrays and plain containers are allowed)") from None
        except _Refused as e:
            raise DataError(f"NeuronIO file {path}: refused: {e}") from None
        except MemoryError:
            raise DataError(f"NeuronIO file {path}: out of memory while unpickling it") from None
        except Exception as e:  # truncated / corrupt pickles raise many different types
            raise DataError(f"NeuronIO file {path} is not a readable pickle "
                            f"({type(e).__name__}: {_short.repr(str(e))})") from None
    raise DataError(f"NeuronIO file {path}: byte strings decode neither as ASCII nor as latin1")


def load_neuronio_pickle(path):
    """The object stored in a NeuronIO pickle, without executing any code it names.

    Only NumPy arrays of plain numeric dtypes, those dtypes, numeric scalars and
    plain containers (dict, list, tuple, str, numbers) are rebuilt; any other
    global is refused with a :class:`DataError` that names it and the file, as is
    a dtype with fields or object elements, array data of the wrong length, or a
    pickle that would allocate far beyond its own size. Python 2 files are read
    with ``encoding='ASCII'`` first and, if their byte strings are not ASCII, again
    with ``'latin1'`` (the release's rule; array data goes back to the original bytes).
    """
    path = os.fspath(path)
    return unpickle_neuronio_bytes(read_pickle_bytes(path), path)


# ---- writing -------------------------------------------------------------------------

class _Python2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: byte and ASCII strings as ``str`` opcodes, NumPy 1 names.

    Python 3 at protocol 2 would store bytes through ``_codecs.encode`` and NumPy 2
    names (``numpy._core``); the published files do neither, and a surrogate should
    exercise exactly the reader path real files take (ASCII, then latin1).
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, data):
        n = len(data)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + data)

    def save_bytes(self, obj):
        self._save_py2_str(obj)
        self.memoize(obj)

    def save_str(self, obj):
        if obj.isascii():
            self._save_py2_str(obj.encode("ascii"))
            self.memoize(obj)
        else:
            super().save_str(obj)

    def save_global(self, obj, name=None):
        for known, module, attr in _py2_global_names():
            if obj is known:
                self.write(pickle.GLOBAL + f"{module}\n{attr}\n".encode("ascii"))
                self.memoize(obj)
                return
        super().save_global(obj, name)

    def save_list(self, obj):
        """Lists of small non-negative ints (spike times: millions per file) in one join.

        The bytes are those of the generic path (BININT1 / BININT2 items, APPENDS
        per 1000); anything else takes the generic path.
        """
        if not obj or not all(type(v) is int and 0 <= v < 65536 for v in obj):
            return super().save_list(obj)
        self.write(pickle.EMPTY_LIST)
        self.memoize(obj)
        codes = _small_int_codes()
        for start in range(0, len(obj), self._BATCHSIZE):
            chunk = obj[start:start + self._BATCHSIZE]
            if len(chunk) == 1:
                self.write(codes[chunk[0]] + pickle.APPEND)
            else:
                self.write(pickle.MARK + b"".join([codes[v] for v in chunk]) + pickle.APPENDS)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str
    dispatch[list] = save_list


_SMALL_INT_CODES = []


def _small_int_codes():
    """Pickle encodings of 0..65535 (BININT1 below 256, else BININT2), built once."""
    if not _SMALL_INT_CODES:
        _SMALL_INT_CODES.extend(pickle.BININT1 + bytes([v]) for v in range(256))
        _SMALL_INT_CODES.extend(pickle.BININT2 + struct.pack("<H", v) for v in range(256, 65536))
    return _SMALL_INT_CODES


def _py2_global_names():
    ma = _numpy_multiarray()
    return ((ma._reconstruct, "numpy.core.multiarray", "_reconstruct"),
            (ma.scalar, "numpy.core.multiarray", "scalar"),
            (np.ndarray, "numpy", "ndarray"), (np.dtype, "numpy", "dtype"))


def write_neuronio_file(path, params, simulations):
    """Write a NeuronIO pickle ``{'Params': params, 'Results': {'listOfSingleSimulationDicts': ...}}``
    atomically, at protocol 2 in the Python 2 style of the published files."""
    obj = {"Params": params, "Results": {"listOfSingleSimulationDicts": list(simulations)}}
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            _Python2Pickler(f, protocol=2).dump(obj)
