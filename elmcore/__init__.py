"""elmcore: the Expressive Leaky Memory neuron and Branch-ELM without a deep-learning framework."""

import os

# Numba's OpenMP threads spin after each parallel kernel by default and starve
# OpenBLAS's threads in the GEMMs that follow (measured: a 0.3 ms GEMM took 20 ms
# right after a parallel kernel on 2 cores). Sleeping idle threads fix it; this
# must be set before Numba first loads its OpenMP layer. A user's setting wins.
# ELMCORE_THREAD_DEFAULTS=0 leaves these variables alone (the benchmark's PyTorch
# baseline runs that way: its many tiny ops prefer spinning threads).
_tune_threads = os.environ.get("ELMCORE_THREAD_DEFAULTS", "1") != "0"
if _tune_threads:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Not straight to sleep, though: then every parallel kernel woke the threads again, and an ELM
# Network's step, whose kernels come a fraction of a millisecond apart, spent a sixth of its
# samples in the scheduler (perf, the 173-parameter network). 10,000 spins (GNU OpenMP's count,
# which overrides the policy; ~0.2 ms on the test machine) bridge those gaps and end long before
# a GEMM's: measured on 2 cores, 2026-12-08, five rounds each, the 173-parameter network's step
# went from 2.0-2.8 to 1.36-1.42 ms and N 16 with d_m 8 from 6.1-6.9 to 4.9-5.5 ms, while the
# single neuron's GEMM-heavy steps stayed as they were or got faster (NeuronIO-best 56-67 ms
# before, 57-65 after; d_m 100 8.6-12.1 before, 7.8-9.3 after). 300,000, GNU OpenMP's own
# default, slowed NeuronIO-best to 70 ms.
if _tune_threads:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
# The same the other way round: OpenBLAS's threads busy-wait ~2^28 cycles after
# each GEMM and slowed the Numba kernel that followed by half. 2^4 cycles instead.
# OpenBLAS reads this when NumPy loads it, so it only helps if elmcore is imported
# before NumPy (the `elm` command is); otherwise export it in the shell.
if _tune_threads:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

# Numba's disk cache checks only the file that defines a kernel, not the modules it
# inlines; a cache directory per version of the kernel sources makes stale machine code
# impossible (see numba_cache.py). Must happen before the kernels below are defined.
from elmcore import numba_cache

numba_cache.configure()

from elmcore.neuron.config import ELMConfig
from elmcore.network.config import NetworkConfig
from elmcore.errors import ConfigError, DataError, ELMError
from elmcore.neuron.model import ELM
from elmcore.engine.factory import build_model
from elmcore.network.model import ELMNetwork

__all__ = ["ELM", "ELMConfig", "ELMNetwork", "NetworkConfig", "build_model", "ELMError", "ConfigError",
           "DataError"]
__version__ = "0.1.0"
