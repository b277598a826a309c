"""Field values and checks shared by the configs of both model families."""

import math

from elmcore.errors import ConfigError
from elmcore.kernels import pointwise

# The MLP activations a config accepts: those the kernels have a code for.
ACTIVATIONS = pointwise.ACTIVATIONS
NETWORK_VERSION = "elm_network"
# Fields a single neuron has and a network does not (a network learns w_s per synapse and has no routing).
SINGLE_NEURON_ONLY_FIELDS = ("tau_s_value", "w_s_value", "input_to_synapse_routing")

# v2 only: the release widens a degenerate τ range instead of rejecting it.
V2_MIN_TAU_SPAN = 3e-6
# The release initialises τ_m on logspace(τ_min + 1e-6, τ_max − 1e-6): the
# range must be wider than twice that margin for the logit to be finite.
TAU_INIT_MARGIN = 1e-6


def require_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")


def require_positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(name, f"must be a finite number > 0, got {value!r}")
