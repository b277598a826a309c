"""Time blocks and recomputation segments: long sequences in bounded memory, bit for bit.

Both model families reduce their weight gradients over time in fixed **time blocks** of
``block`` steps (``TIME_BLOCK`` unless a model sets its ``time_block``): every operation
over the B·T rows (a GEMM, a sum, a per-row product) runs once per block on a contiguous
copy of the block's rows, and the blocks' partial sums are added last block first. A
backward that **recomputes** its cache segment by segment (segments of whole blocks,
last segment first) therefore issues exactly the same operations on exactly the same
arrays in exactly the same order as the cached backward, and its gradients are the same
to the last bit (docs/architecture.md, "Long sequences in bounded memory").
"""

from elmcore.engine.backend import array_module
from elmcore.engine.memory import available_bytes, check_memory
from elmcore.errors import ELMError

# Steps per time block. A sequence of at most this many steps is one block: its backward is
# the plain one (one GEMM over all B·T rows per weight).
TIME_BLOCK = 1024


def block_bounds(t0, t1, block):
    """The time blocks of [t0, t1), as (start, stop) pairs in time order (t0 a multiple of block)."""
    return [(s, min(s + block, t1)) for s in range(t0, t1, block)]


def aligned_segment(segment, block):
    """``segment`` steps rounded up to whole time blocks (a segment never splits a block)."""
    if isinstance(segment, bool) or not isinstance(segment, int) or segment < 1:
        raise ELMError(f"recompute_segment must be a whole number of steps >= 1, got {segment!r}")
    return -(-segment // block) * block


def segment_bounds(T, segment):
    """The segments [s0, s1) of a sequence of T steps, in time order."""
    return [(s, min(s + segment, T)) for s in range(0, T, segment)]


def rows(a, t0, t1, time_axis=1):
    """The rows of time block [t0, t1) of ``a`` (…, B, T, …) as one C-contiguous array (…, B·(t1−t0), …).

    A copy unless ``a`` is contiguous and the block is the whole time axis; either way both
    the cached and the recomputing backward hand the same contiguous array to the same
    operation (a strided view would take BLAS down another path, with another rounding).
    """
    view = a[(slice(None),) * time_axis + (slice(t0, t1),)]
    shape = a.shape[:time_axis - 1] + (a.shape[time_axis - 1] * (t1 - t0),) + a.shape[time_axis + 1:]
    return array_module(a).ascontiguousarray(view).reshape(shape)


def block_view(a, t0, t1, time_axis=1):
    """Time block [t0, t1) of ``a`` as a C-contiguous array of the same rank (a copy unless ``a`` is
    contiguous and the block is the whole time axis)."""
    return array_module(a).ascontiguousarray(a[(slice(None),) * time_axis + (slice(t0, t1),)])


class Recomputation:
    """What both model families share about recomputation: the time block, the segment a model was
    told to use (None: only when the whole cache would not fit) and how a pass's segment is chosen.
    A model says what every pass keeps whatever the segment (``_bytes_kept_whole``)."""
    time_block = TIME_BLOCK
    recompute_segment = None

    def segment_steps(self, batch, steps, recompute_segment=None):
        """Steps per recomputation segment for a pass over (batch, steps), or None for the whole cache."""
        segment = self.recompute_segment if recompute_segment is None else recompute_segment
        if segment is None:
            itemsize = self.dtype.itemsize
            segment = choose_segment(self.config.activation_bytes(batch, 1, itemsize),
                                     self._bytes_kept_whole(batch, steps), steps, self.time_block, self.backend)
            if segment is None:
                return None
        segment = aligned_segment(segment, self.time_block)
        return None if segment >= steps else segment

    def forward_segment(self, X, recompute_segment=None):
        """The segment of a forward pass over X [B,T,…] (None: the whole cache), once its cache is known to fit."""
        B, T = X.shape[0], X.shape[1]
        segment = self.segment_steps(B, T, recompute_segment)
        # Half of activation_bytes: the forward cache without the gradients.
        check_memory(self.config.activation_bytes(B, segment or T, self.dtype.itemsize) // 2,
                     f"a forward pass over {B} sequences of {T} steps"
                     + (f" in segments of {segment}" if segment else ""), self.backend)
        return segment


class BlockSums:
    """Partial sums over time blocks, added in the order they arrive (last block first).

    The first value of a key is kept as it is (not added to a zero), so a sequence of one
    block gives exactly the unblocked sum.
    """

    def __init__(self):
        self.total = {}

    def add(self, key, value):
        if key in self.total:
            self.total[key] = self.total[key] + value
        else:
            self.total[key] = value

    def __getitem__(self, key):
        return self.total[key]

    def get(self, key, default=None):
        return self.total.get(key, default)


def choose_segment(step_bytes, kept_bytes, T, block, backend=None):
    """The recomputation segment for a pass of T steps: None when the whole cache fits.

    step_bytes  what one step of the forward cache and its gradients holds (all batch rows).
    kept_bytes  what the pass keeps for the whole sequence whatever the segment (inputs,
                outputs and their gradients).
    Otherwise the largest whole number of time blocks whose cache fits beside kept_bytes
    (at least one block; the memory check then names what does not fit).
    """
    limit = available_bytes(backend)
    if limit is None or step_bytes * T <= limit:
        return None
    fit = (limit - kept_bytes) // max(step_bytes, 1)
    segment = max(block, (fit // block) * block)
    return None if segment >= T else segment
