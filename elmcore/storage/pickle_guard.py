"""A check every untrusted pickle passes before the C unpickler sees it.

The restricted unpicklers (``data/neuronio/pickle_io.py``, ``torch_checkpoint.py``)
decide which callables a pickle may name. They cannot stop the C unpickler's
own allocations, which follow numbers written in the file: a ``LONG_BINPUT``
memo index of 2**28 (the nine bytes ``\\x80\\x02Nr\\x00\\x00\\x00\\x10.``) makes it
grow and zero a 4 GB memo table, and a ``BINBYTES8`` length of 2**40 makes it
allocate before it finds the bytes missing. :func:`check_pickle_bytes` walks the
opcodes once (compiled: a NeuronIO file has millions of them) and refuses both
before anything is allocated. A pickle written by ``pickle`` numbers its memo
slots 0, 1, 2, … and never claims more bytes than follow, so real files pass.
"""

import numpy as np
from numba import njit

# Status codes of _scan.
_OK, _MEMO_INDEX, _LENGTH, _PUT_TEXT = 0, 1, 2, 3

# Opcode -> size of its fixed-width argument in bytes (0: none); -1 marks the
# opcodes handled separately below. Names as in ``pickletools``.
_FIXED = np.full(256, -2, np.int64)  # -2: not an opcode
for _code in b"()NQR]abdelostu}.012\x81\x85\x86\x87\x88\x89\x8f\x90\x91\x92\x93\x94\x97\x98":
    _FIXED[_code] = 0
for _code, _size in ((b"K", 1), (b"M", 2), (b"J", 4), (b"h", 1), (b"j", 4), (b"q", 1), (b"r", 4),
                     (b"G", 8), (b"\x80", 1), (b"\x82", 1), (b"\x83", 2), (b"\x84", 4), (b"\x95", 8)):
    _FIXED[_code[0]] = _size
# Length-prefixed: opcode -> width of the little-endian length.
_PREFIXED = np.zeros(256, np.int64)
for _code, _width in ((b"U", 1), (b"T", 4), (b"C", 1), (b"B", 4), (b"\x8e", 8), (b"\x8c", 1), (b"X", 4),
                      (b"\x8d", 8), (b"\x96", 8), (b"\x8a", 1), (b"\x8b", 4)):
    _PREFIXED[_code[0]] = _width
    _FIXED[_code[0]] = -1
# Text arguments ending in b"\n": opcode -> number of lines.
_LINES = np.zeros(256, np.int64)
for _code, _lines in ((b"I", 1), (b"L", 1), (b"F", 1), (b"S", 1), (b"V", 1), (b"p", 1), (b"g", 1),
                      (b"P", 1), (b"c", 2), (b"i", 2)):
    _LINES[_code[0]] = _lines
    _FIXED[_code[0]] = -1
del _code, _size, _width, _lines


@njit(cache=True, nogil=True)
def _scan(data, fixed, prefixed, lines):
    """(status, offset, value): the first opcode that could make the unpickler allocate more than ``data`` holds.

    Stops at STOP, at a byte that is no opcode, or at a truncated argument: the
    unpickler fails there too, before it acts on anything further.
    """
    n = data.size
    pos = 0
    while pos < n:
        op = data[pos]
        start = pos
        pos += 1
        size = fixed[op]
        if size == -2:
            return _OK, start, 0
        if op == 46:  # STOP
            return _OK, start, 0
        if size >= 0:
            if pos + size > n:
                return _OK, start, 0
            if op == 114 or op == 149:  # LONG_BINPUT (memo index), FRAME (length of what follows)
                value = np.int64(0)
                for k in range(size):
                    if k == 7 and data[pos + k] >= 128:
                        return _LENGTH, start, 0
                    value |= np.int64(data[pos + k]) << (8 * k)
                if op == 114 and value > n:
                    return _MEMO_INDEX, start, value
                if op == 149 and value > n - pos - size:
                    return _LENGTH, start, 0
            pos += size
            continue
        width = prefixed[op]
        if width > 0:
            if pos + width > n:
                return _OK, start, 0
            length = np.int64(0)
            for k in range(width):
                if k == 7 and data[pos + k] >= 128:
                    return _LENGTH, start, 0  # beyond 2**63: no file is that long
                length |= np.int64(data[pos + k]) << (8 * k)
            if width == 4 and (op == 84 or op == 139) and length >= 2 ** 31:
                return _OK, start, 0  # BINSTRING / LONG4 lengths are signed: the unpickler refuses them
            pos += width
            if length > n - pos:
                return _LENGTH, start, 0
            pos += length
            continue
        for line in range(lines[op]):
            end = pos
            while end < n and data[end] != 10:
                end += 1
            if end == n:
                return _OK, start, 0
            if op == 112:  # PUT: the memo index as decimal text
                if end == pos or end - pos > 19:
                    return _PUT_TEXT, start, 0
                index = np.int64(0)
                for k in range(pos, end):
                    if data[k] < 48 or data[k] > 57:
                        return _PUT_TEXT, start, 0
                    index = index * 10 + (data[k] - 48)
                if index > n:
                    return _MEMO_INDEX, start, index
            pos = end + 1
    return _OK, n, 0


class UnsafePickle(Exception):
    """The pickle would make the unpickler allocate far more than the file holds."""


def check_pickle_bytes(data):
    """Raise :class:`UnsafePickle` if ``data`` names a memo slot or a length it cannot fill.

    Parameters
    ----------
    data : bytes-like
        The whole pickle, exactly as the unpickler will read it.
    """
    array = np.frombuffer(data, dtype=np.uint8)
    status, offset, value = _scan(array, _FIXED, _PREFIXED, _LINES)
    if status == _MEMO_INDEX:
        raise UnsafePickle(f"the pickle stores memo slot {value} at byte {offset}, more than a "
                           f"{array.size}-byte pickle could fill (the unpickler would allocate a table that large)")
    if status == _LENGTH:
        raise UnsafePickle(f"the pickle declares a string or number at byte {offset} longer than the "
                           f"{array.size} bytes it holds")
    if status == _PUT_TEXT:
        raise UnsafePickle(f"the pickle's memo index at byte {offset} is not plain decimal digits")
