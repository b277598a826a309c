"""Field values and checks shared by the configs of both model families."""

import math
import sys

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


# A size beyond this is a typo, not a model; bounding it keeps every size product a float can show.
MAX_SIZE = 2 ** 62
# Hidden MLP layers per neuron: each is a tensor of its own and a loop iteration at every time step,
# so a deeper MLP is no neuron model (the paper's have one or two).
MAX_MLP_LAYERS = 1000


def require_mlp_depth(layers):
    """After the memory check (which names every size): a depth the memory allows may still be no model."""
    if layers > MAX_MLP_LAYERS:
        raise ConfigError("mlp_num_layers", f"must be <= {MAX_MLP_LAYERS:,} (each hidden layer is a tensor and a "
                                            f"step of its own at every time step), got {layers:,}")


def shown(value):
    """``repr(value)`` cut to a line's worth (an integer of thousands of digits included)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def require_int(name, value, minimum, maximum=MAX_SIZE):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {shown(value)}")
    if value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")
    if value > maximum:
        raise ConfigError(name, f"must be <= {maximum:,}, got {shown(value)}")


def is_finite_number(value):
    """A finite int or float (not bool); an int past the float range counts as infinite, without overflowing."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max
            and math.isfinite(value))


def require_positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be a number, got {shown(value)}")
    if not is_finite_number(value) or value <= 0:
        raise ConfigError(name, f"must be a finite number > 0, got {shown(value)}")


def require_tau_margin(tau_min, tau_max):
    """The release initialises tau_m on [tau_min + margin, tau_max - margin]: both ends must differ from
    tau_min and tau_max in float64, or the initial logit divides by zero."""
    if tau_min + TAU_INIT_MARGIN == tau_min:
        raise ConfigError("memory_tau_min", f"{tau_min:g} is too large: tau_min + {TAU_INIT_MARGIN:g} (the "
                                            "initialisation margin) is the same float64 number")
    if tau_max - TAU_INIT_MARGIN == tau_max:
        raise ConfigError("memory_tau_max", f"{tau_max:g} is too large: tau_max - {TAU_INIT_MARGIN:g} (the "
                                            "initialisation margin) is the same float64 number; use at most 1e9")
