"""elmcore: the Expressive Leaky Memory neuron and Branch-ELM without a deep-learning framework."""

import os

# Numba's OpenMP threads spin after each parallel kernel by default and starve
# OpenBLAS's threads in the GEMMs that follow (measured: a 0.3 ms GEMM took 20 ms
# right after a parallel kernel on 2 cores). Sleeping idle threads fix it; this
# must be set before Numba first loads its OpenMP layer. A user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import ELMConfig
from .errors import ConfigError, DataError, ELMError
from .model import ELM

__all__ = ["ELM", "ELMConfig", "ELMError", "ConfigError", "DataError"]
__version__ = "0.1.0"
