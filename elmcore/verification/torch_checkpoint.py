"""Read PyTorch zip checkpoints of tensor ``state_dict``\\ s without PyTorch (docs/spec.md §8).

A ``torch.save`` zip archive holds ``<prefix>/data.pkl``, a pickle that
describes every tensor (storage key, offset, size, stride), and one raw
storage per key under ``<prefix>/data/<key>``, little-endian unless a
``<prefix>/byteorder`` record says ``big``.

A pickle is a program: whoever wrote the file chooses which callables it runs.
So ``data.pkl`` is read by :class:`_RestrictedUnpickler`, whose ``find_class``
resolves only the handful of names a tensor checkpoint uses, each mapped to a
stand-in defined here (never to PyTorch or to anything that can act on the
system). The stand-ins only record the tensor layout in immutable tuples; the
arrays are cut out of the storages after the pickle has finished, with every
offset, size and stride checked against the storage length first, because
``as_strided`` does no bounds checking of its own.
"""

import io
import json
import math
import os
import pickle
import stat
import struct
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from elmcore.neuron.config import ELMConfig
from elmcore.errors import CheckpointError
from elmcore.neuron.params import check_params
from elmcore.storage.pickle_guard import UnsafePickle, check_pickle_bytes


class _Dtype(NamedTuple):
    """A torch element type and how its elements are stored."""
    torch_name: str
    stored: str          # NumPy type code of one stored element, byte order applied later
    bfloat16: bool = False


_DTYPES = {d.torch_name: d for d in (
    _Dtype("float64", "f8"), _Dtype("float32", "f4"), _Dtype("float16", "f2"),
    _Dtype("bfloat16", "u2", bfloat16=True),
    _Dtype("int64", "i8"), _Dtype("int32", "i4"), _Dtype("int16", "i2"), _Dtype("int8", "i1"),
    _Dtype("uint64", "u8"), _Dtype("uint32", "u4"), _Dtype("uint16", "u2"), _Dtype("uint8", "u1"),
    _Dtype("bool", "b1"),
)}
# torch.float and friends are the same objects as torch.float32 etc.
_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16",
                  "long": "int64", "int": "int32", "short": "int16"}


class _StorageType(NamedTuple):
    """Stand-in for ``torch.FloatStorage`` etc.; untyped storages count bytes."""
    name: str
    dtype: _Dtype
    untyped: bool = False


_STORAGE_TYPES = {name: _StorageType(name, _DTYPES[dt]) for name, dt in (
    ("FloatStorage", "float32"), ("DoubleStorage", "float64"), ("HalfStorage", "float16"),
    ("BFloat16Storage", "bfloat16"), ("LongStorage", "int64"), ("IntStorage", "int32"),
    ("ShortStorage", "int16"), ("CharStorage", "int8"), ("ByteStorage", "uint8"),
    ("BoolStorage", "bool"),
)}
_UNTYPED_STORAGE = _StorageType("UntypedStorage", _DTYPES["uint8"], untyped=True)


class _Layout(NamedTuple):
    """Stand-in for a ``torch.layout``; only dense (strided) tensors are readable."""
    name: str


class _StorageRef(NamedTuple):
    """A persistent id: which record holds the storage, its type and element count."""
    key: str
    storage_type: _StorageType
    numel: int


class _TensorRef(NamedTuple):
    """A tensor as the pickle describes it; ``dtype`` overrides the storage's (``_rebuild_tensor_v3``)."""
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple
    dtype: Optional[_Dtype]


class _Malformed(Exception):
    """Raised while reading; :func:`load_torch_state_dict` adds the file name."""


# ---- stand-ins for the allowed torch callables ---------------------------------
# Tuples (not arrays or plain objects) come out of them on purpose: pickle's
# BUILD opcode can set attributes on anything it has built, and a NamedTuple has
# neither a __dict__ nor settable fields, so such an attempt fails.

def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value, what):
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
        raise _Malformed(f"tensor {what} must be a tuple of integers, got {value!r}")
    return tuple(value)


def _tensor_ref(storage, storage_offset, size, stride, dtype=None):
    if not isinstance(storage, _StorageRef):
        raise _Malformed(f"a tensor is rebuilt from {type(storage).__name__}, not from a storage record")
    if not _is_int(storage_offset):
        raise _Malformed(f"tensor storage offset must be an integer, got {storage_offset!r}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise _Malformed(f"tensor size {size} and stride {stride} have different lengths")
    return _TensorRef(storage, storage_offset, size, stride, dtype)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
    return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if not isinstance(dtype, _Dtype):
        raise _Malformed(f"_rebuild_tensor_v3 needs a torch dtype, got {dtype!r}")
    return _tensor_ref(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, _TensorRef):
        raise _Malformed(f"a Parameter wraps {type(data).__name__}, not a tensor")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    # ``state`` is the Parameter's Python attributes: not part of the array.
    return _rebuild_parameter(data, requires_grad, backward_hooks)


class _StateDict(dict):
    """Stand-in for ``collections.OrderedDict``: a dict whose pickled state (torch's
    ``_metadata``) is dropped; no attribute of it can be set from the file."""

    __slots__ = ()

    def __setstate__(self, state):
        if not isinstance(state, dict) and not (isinstance(state, tuple) and len(state) == 2
                                                and all(isinstance(s, (dict, type(None))) for s in state)):
            raise _Malformed(f"an OrderedDict has the state {type(state).__name__}, not its attributes' dict")


def _get_layout(name):
    if name != "torch.strided":
        raise _Malformed(f"tensor layout {name!r} is not supported (only dense torch.strided tensors)")
    return _Layout(name)


def _allowed_globals():
    allowed = {
        ("collections", "OrderedDict"): _StateDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch.serialization", "_get_layout"): _get_layout,
        ("torch", "UntypedStorage"): _UNTYPED_STORAGE,
        ("torch.storage", "UntypedStorage"): _UNTYPED_STORAGE,
    }
    allowed.update((("torch", name), st) for name, st in _STORAGE_TYPES.items())
    allowed.update((("torch", name), dt) for name, dt in _DTYPES.items())
    allowed.update((("torch", alias), _DTYPES[name]) for alias, name in _DTYPE_ALIASES.items())
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED_GLOBALS`; storages come back as :class:`_StorageRef`."""

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Malformed(f"refused global '{module}.{name}': a tensor checkpoint never needs it, "
                             "and loading it could run arbitrary code") from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) != 5:
            raise _Malformed(f"unsupported persistent id {pid!r} (expected ('storage', type, key, "
                             "location, numel))")
        tag, storage_type, key, location, numel = pid
        if isinstance(tag, bytes):
            tag = tag.decode("ascii", "replace")
        if tag != "storage" or not isinstance(storage_type, _StorageType):
            raise _Malformed(f"unsupported persistent id {pid!r} (expected a storage record)")
        if _is_int(key):
            key = str(key)
        if not isinstance(key, str) or not key or "/" in key or key in (".", ".."):
            raise _Malformed(f"invalid storage key {key!r}")
        if not _is_int(numel) or numel < 0:
            raise _Malformed(f"storage '{key}' has an invalid element count {numel!r}")
        return _StorageRef(key, storage_type, numel)


# Everything a hostile or damaged data.pkl can make the unpickler raise.
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
                  IndexError, KeyError, OverflowError, RecursionError, MemoryError)
# Everything zipfile raises on damaged headers (ValueError covers undecodable names).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, struct.error,
               zlib.error, NotImplementedError, RuntimeError)
# A state_dict pickle takes about 100 bytes per tensor; every byte of it can
# become a Python object, so its size is what bounds the unpickler's memory.
MAX_STATE_PICKLE_BYTES = 4 << 20
# A compressed record may inflate at most this much (beyond 1 MiB): float weights
# barely compress, while a zip bomb inflates a thousandfold.
MAX_INFLATION = 100
_SMALL_RECORD = 1 << 20
# What the arrays of one file may take, as a multiple of its storages (beyond
# 16 MiB): tied weights read one storage twice; more means entries repeat one.
MAX_OUTPUT_PER_STORED = 4
_MAX_DIMS = 32


def _check_inflation(info, nbytes):
    """Refuse reading ``nbytes`` from a compressed record that could not hold them honestly."""
    if info.compress_type != zipfile.ZIP_STORED and nbytes > MAX_INFLATION * info.compress_size + _SMALL_RECORD:
        raise _Malformed(f"record '{info.filename}' would inflate {info.compress_size} compressed bytes to "
                         f"{nbytes} (more than {MAX_INFLATION}x: a zip bomb)")


class _Archive:
    """The zip records of one checkpoint; storages are read once per key."""

    def __init__(self, zf):
        self.zf = zf
        pickles = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise _Malformed("not a PyTorch zip checkpoint: expected one '<prefix>/data.pkl' record, found "
                             f"{len(pickles)}")
        self.prefix = pickles[0].split("/")[0]
        self.byteorder = self._byteorder()
        self._storages = {}
        self._output_bytes = 0

    def _byteorder(self):
        name = f"{self.prefix}/byteorder"
        if name not in self.zf.namelist():
            return "<"
        value = self.zf.read(name).decode("ascii", "replace").strip()
        if value not in ("little", "big"):
            raise _Malformed(f"record '{name}' says {value!r}, expected 'little' or 'big'")
        return "<" if value == "little" else ">"

    def state_pickle(self):
        """``data.pkl``, read only after its declared sizes pass the limits above."""
        info = self.zf.getinfo(f"{self.prefix}/data.pkl")
        if info.file_size > MAX_STATE_PICKLE_BYTES:
            raise _Malformed(f"'{info.filename}' declares {info.file_size} bytes; a state_dict pickle needs "
                             f"far less (at most {MAX_STATE_PICKLE_BYTES} are read)")
        _check_inflation(info, info.file_size)
        with self.zf.open(info) as f:
            data = f.read(MAX_STATE_PICKLE_BYTES + 1)
        if len(data) > MAX_STATE_PICKLE_BYTES:
            raise _Malformed(f"'{info.filename}' holds more than {MAX_STATE_PICKLE_BYTES} bytes")
        return data

    def storage_bytes(self, ref: _StorageRef):
        """The raw bytes of a storage: exactly ``numel`` elements of its type."""
        cached = self._storages.get(ref.key)
        if cached is not None:
            if cached[0] != ref.storage_type:
                raise _Malformed(f"storage '{ref.key}' is declared as both {cached[0].name} and "
                                 f"{ref.storage_type.name}")
            return cached[1]
        name = f"{self.prefix}/data/{ref.key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise _Malformed(f"storage record '{name}' is missing from the archive") from None
        nbytes = ref.numel * np.dtype(ref.storage_type.dtype.stored).itemsize
        if info.file_size < nbytes:
            raise _Malformed(f"storage record '{name}' holds {info.file_size} bytes, but the pickle "
                             f"declares {ref.numel} {ref.storage_type.name} elements ({nbytes} bytes)")
        _check_inflation(info, nbytes)
        with self.zf.open(info) as f:
            data = f.read(nbytes)
        if len(data) != nbytes:
            raise _Malformed(f"storage record '{name}' ends after {len(data)} of {nbytes} bytes")
        self._storages[ref.key] = (ref.storage_type, data)
        return data

    def tensor(self, ref: _TensorRef, entry):
        """The array ``ref`` describes, copied out of its storage as C-contiguous native-endian data."""
        st = ref.storage.storage_type
        dtype = ref.dtype or st.dtype
        if ref.dtype is not None and not st.untyped and ref.dtype != st.dtype:
            raise _Malformed(f"entry '{entry}': dtype {ref.dtype.torch_name} disagrees with its "
                             f"{st.name}")
        stored = np.dtype(dtype.stored).newbyteorder(self.byteorder)
        if ref.offset < 0 or any(s < 0 for s in ref.size) or any(s < 0 for s in ref.stride):
            raise _Malformed(f"entry '{entry}': negative offset, size or stride (offset {ref.offset}, "
                             f"size {ref.size}, stride {ref.stride})")
        if len(ref.size) > _MAX_DIMS:
            raise _Malformed(f"entry '{entry}' has {len(ref.size)} dimensions (at most {_MAX_DIMS})")
        # Sizes and strides are checked as Python integers, before NumPy (whose
        # integers overflow) or memory sees them: an element count beyond the
        # storage's is a broadcast view (stride 0) that would inflate on copying.
        numel = math.prod(ref.size)
        if numel > ref.storage.numel:
            raise _Malformed(f"entry '{entry}': size {ref.size} has {numel} elements, but storage "
                             f"'{ref.storage.key}' holds only {ref.storage.numel} "
                             f"{ref.storage.storage_type.dtype.torch_name} elements (views that repeat "
                             "elements, stride 0, are read only up to the storage's size)")
        if any(n > 1 << 40 for n in ref.size):
            raise _Malformed(f"entry '{entry}': size {ref.size} is out of range")
        data = self.storage_bytes(ref.storage)
        self._output_bytes += numel * stored.itemsize
        stored_total = sum(len(d) for _, d in self._storages.values())
        if self._output_bytes > MAX_OUTPUT_PER_STORED * stored_total + 16 * _SMALL_RECORD:
            raise _Malformed(f"the entries up to '{entry}' would take {self._output_bytes} bytes from "
                             f"{stored_total} stored ones (entries repeating one storage)")
        elements = np.frombuffer(data, dtype=stored, count=len(data) // stored.itemsize)
        if numel == 0:
            arr = np.empty(ref.size, dtype=stored.newbyteorder("="))
        else:
            last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
            if last >= elements.size:
                raise _Malformed(
                    f"entry '{entry}': size {ref.size}, stride {ref.stride} at offset {ref.offset} reach "
                    f"element {last}, but storage '{ref.storage.key}' holds only {elements.size} "
                    f"{dtype.torch_name} elements")
            # A dimension of size 1 never steps, whatever stride the file claims.
            view = np.lib.stride_tricks.as_strided(
                elements[ref.offset:], shape=ref.size,
                strides=tuple(s * stored.itemsize if n > 1 else 0 for n, s in zip(ref.size, ref.stride)),
                writeable=False)
            try:
                arr = np.array(view, dtype=stored.newbyteorder("="), order="C")
            except (MemoryError, ValueError) as e:
                raise _Malformed(f"entry '{entry}': a tensor of size {ref.size} is too large ({e})") from None
        if dtype.bfloat16:
            # bfloat16 is the upper half of a float32.
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif dtype.torch_name == "bool":
            # Any byte other than 0/1 would make an invalid NumPy bool.
            arr = arr.view(np.uint8) != 0
        return arr


def load_torch_state_dict(path):
    """Read a ``torch.save``\\ d dict of tensors, without PyTorch and without running pickle code.

    Parameters
    ----------
    path : str or os.PathLike
        A PyTorch zip checkpoint (``torch.save`` since PyTorch 1.6) whose pickle
        is a dict (typically ``OrderedDict``) from names to dense tensors.

    Returns
    -------
    dict[str, numpy.ndarray]
        One C-contiguous native-endian array per entry, in the file's order, in
        the stored dtype (``bfloat16`` is widened to ``float32``).

    Raises
    ------
    CheckpointError
        If the file is missing, is not a zip archive, is truncated or corrupt,
        refers to a global outside the allow-list (``os.system``, ...), lacks a
        storage record, or describes a tensor its storage cannot hold. The
        message names the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block in open(), a device never end
        raise CheckpointError(f"{path} is not a regular file")
    try:
        with zipfile.ZipFile(path) as zf:
            archive = _Archive(zf)
            try:
                data = archive.state_pickle()
                check_pickle_bytes(data)
                state = _RestrictedUnpickler(io.BytesIO(data), encoding="utf-8").load()
            except _Malformed:
                raise
            except UnsafePickle as e:
                raise _Malformed(f"'{archive.prefix}/data.pkl': {e}") from None
            except _PICKLE_ERRORS as e:
                raise _Malformed(f"'{archive.prefix}/data.pkl' is not a readable pickle "
                                 f"({type(e).__name__}: {e})") from None
            if not isinstance(state, dict):
                raise _Malformed(f"the checkpoint holds a {type(state).__name__}, not a dict of tensors")
            arrays = {}
            # dict.items, not state.items: the pickle chose state's class.
            for key, value in dict.items(state):
                if not isinstance(key, str):
                    raise _Malformed(f"state_dict key {key!r} is not a string")
                if not isinstance(value, _TensorRef):
                    raise _Malformed(f"entry '{key}' is a {type(value).__name__}, not a tensor")
                arrays[key] = archive.tensor(value, key)
            return arrays
    except _Malformed as e:
        raise CheckpointError(f"{path}: {e}") from None
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: not a readable PyTorch zip checkpoint (truncated or corrupt: {e})") \
            from None
    except _ZIP_ERRORS as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None


def _read_config(path, version):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"model config not found: {path} (pass config_path)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read model config {path}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply to read") from None
    return ELMConfig.from_dict(data, version=version)


def load_release_model(pt_path, config_path=None, version="elm_v1"):
    """A release checkpoint as (config, parameters) ready for :class:`elmcore.ELM`.

    Parameters
    ----------
    pt_path : str or os.PathLike
        ``neuronio_best_model_state.pt`` (or any state_dict checkpoint of an ELM).
    config_path : str or os.PathLike, optional
        The release's constructor arguments; default ``model_config.json`` beside ``pt_path``.
    version : {"elm_v1", "branch_elm_v2"}
        Used when the config does not name one (release configs never do).

    Returns
    -------
    (ELMConfig, dict)
        Parameters in release order, validated against the config: float tensors
        as float64 (exact copies of the stored values), routing indices int64,
        the mask in its stored dtype.
    """
    pt_path = Path(pt_path)
    config_path = pt_path.parent / "model_config.json" if config_path is None else Path(config_path)
    cfg = _read_config(config_path, version)
    state = load_torch_state_dict(pt_path)
    return cfg, check_params(cfg, state, dtype=np.float64, source=str(pt_path))
