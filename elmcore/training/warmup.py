"""Compiling the kernels before the first batch, and saying so when it takes a while.

Numba compiles each kernel on its first call and keeps it in a disk cache, so the
first run on a machine spends a minute or more compiling (two on a loaded 2-core
machine for an ELM Network) and later runs load the kernels in a second or two.
:func:`warm_up` makes those first calls on a few steps of one example before the
trainer's clock starts, so compile time never counts in an epoch's seconds or in
samples/s, and says "compiling kernels (first run only) …" when they take longer
than a cache load would. ``elm warmup`` calls it ahead of any run.
"""

import sys
import threading
import time

import numpy as np

from elmcore.errors import NonFiniteOutputError

# Loading cached kernels takes well under this; compiling takes far longer.
NOTICE_AFTER_S = 3.0
NOTICE = "compiling kernels (first run only) …"


def compiled_kernels():
    """How many kernel versions Numba has compiled in this process (rather than loaded from its disk cache)."""
    from numba.core.registry import CPUDispatcher
    count = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("elmcore.kernels") and module is not None:
            count += sum(sum(value.stats.cache_misses.values()) for value in vars(module).values()
                         if isinstance(value, CPUDispatcher))
    return count


def warm_up(model, X, log=print, notice_after=NOTICE_AFTER_S):
    """Run what a training step and a validation pass run, on ``X`` (a few steps).

    Returns (seconds, kernel versions compiled). Nothing of the model changes: a forward
    pass with its cache, a backward pass of a zero gradient (no update), and a forward
    pass without cache.
    """
    said = []

    def notice():
        said.append(True)
        log(NOTICE)

    timer = threading.Timer(notice_after, notice)
    timer.daemon = True
    compiled_before = compiled_kernels()
    start = time.perf_counter()
    timer.start()
    try:
        X = model.xp.asarray(X)
        with np.errstate(all="ignore"):
            Y, cache = model.forward(X, return_cache=True)
            model.backward(model.xp.zeros_like(Y), cache)
            model.forward(X)
    except NonFiniteOutputError:
        # Judged by the first training step, on every rank alike: one rank raising here alone would
        # leave the others waiting in the gradient all-reduce.
        pass
    finally:
        timer.cancel()
    seconds = time.perf_counter() - start
    compiled = compiled_kernels() - compiled_before
    if said:
        log(f"kernels compiled in {seconds:.0f} s; they are cached on disk, so later runs start in seconds"
            if compiled else f"kernels loaded from the disk cache in {seconds:.0f} s (the machine is busy)")
    return seconds, compiled
