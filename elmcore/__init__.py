"""elmcore: the Expressive Leaky Memory neuron and Branch-ELM without a deep-learning framework."""

import os

# Numba's OpenMP threads spin after each parallel kernel by default and starve
# OpenBLAS's threads in the GEMMs that follow (measured: a 0.3 ms GEMM took 20 ms
# right after a parallel kernel on 2 cores). Sleeping idle threads fix it; this
# must be set before Numba first loads its OpenMP layer. A user's setting wins.
# ELMCORE_THREAD_DEFAULTS=0 leaves both variables alone (the benchmark's PyTorch
# baseline runs that way: its many tiny ops prefer spinning threads).
_tune_threads = os.environ.get("ELMCORE_THREAD_DEFAULTS", "1") != "0"
if _tune_threads:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
