"""elmcore: the Expressive Leaky Memory neuron and Branch-ELM without a deep-learning framework."""

from .config import ELMConfig
from .errors import ConfigError, DataError, ELMError
from .model import ELM

__all__ = ["ELM", "ELMConfig", "ELMError", "ConfigError", "DataError"]
__version__ = "0.1.0"
