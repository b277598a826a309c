"""How many Numba threads a training run on the CPU uses when the user has not said.

Each parallel kernel splits the batch over the threads and waits for the slowest at its
end, so a thread pays only when its share of a step's work outweighs that wait (and, on
a shared machine, the stall of a thread that lost its core). The work of a training step
is taken as batch × time steps × trainable parameters; ``bench/bench_threads.py`` times
steps at 1 and at 2 threads over model sizes, and the rule gives a thread every
``WORK_PER_THREAD`` of it: below 2 × ``WORK_PER_THREAD`` one thread runs the step.

A model called directly applies the rule to each pass's GEMMs by itself
(``CPUBackend.kernel_threads``): below 2 × ``WORK_PER_THREAD`` they run on one thread,
whatever count is set (an exported one excepted, as below); an ELM Network's Numba
kernels likewise, below a lower work.

An exported ``NUMBA_NUM_THREADS`` (the user's, or set per rank by ``elm_cli.launch``
and per job by ``elm sweep --jobs``) is always kept. The choice depends only on the
run's shapes and the cores, so a resumed run makes the same one (the batch reductions
keep one partial sum per thread: the same count keeps a resume bit-identical).
"""

import os

# Work per step (batch × steps × parameters) each thread needs before another one pays: one thread
# wins by far at 0.3M (×3.6), two win from about 150M (×1.3 for a network, ×1.7 for NeuronIO-best),
# and in between they are even (bench/bench_threads.py; README, "Speed"). Two threads from 50M.
WORK_PER_THREAD = 25_000_000


def choose_threads(work, available, environ=os.environ):
    """(threads, why) for a training step of ``work`` with ``available`` threads."""
    if environ.get("NUMBA_NUM_THREADS"):
        return available, f"{available} thread{'s' if available != 1 else ''} (NUMBA_NUM_THREADS)"
    threads = max(1, min(available, int(work // WORK_PER_THREAD)))
    if threads == available:
        return threads, f"{threads} thread{'s' if threads != 1 else ''}"
    more = (f"a second thread pays from {2 * WORK_PER_THREAD / 1e6:.3g}M" if threads == 1 else
            f"one thread per {WORK_PER_THREAD / 1e6:.3g}M")
    return threads, (f"{threads} of {available} threads: a step's work (batch x steps x parameters) is "
                     f"{work / 1e6:.3g}M, {more}")
