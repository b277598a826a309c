"""ELM Network configuration (docs/spec.md §7.1)."""

import dataclasses
import json
from typing import Optional

from elmcore.errors import ConfigError, ELMError, did_you_mean
from elmcore.engine.fields import (ACTIVATIONS, NETWORK_VERSION, SINGLE_NEURON_ONLY_FIELDS,
                                   TAU_INIT_MARGIN, V2_MIN_TAU_SPAN, is_finite_number, require_int,
                                   require_mlp_depth, require_positive_float, require_tau_margin, shown)
from elmcore.engine.memory import check_memory


def mlp_parameter_count(fan_in, hidden, layers, fan_out):
    """Weights and biases of an MLP fan_in -> ``layers`` hidden layers of width ``hidden`` -> fan_out,
    in closed form (no per-layer list, so a config with absurdly many layers is counted at once)."""
    if layers == 0:
        return fan_in * fan_out + fan_out
    return fan_in * hidden + hidden + (layers - 1) * (hidden * hidden + hidden) + hidden * fan_out + fan_out


def network_parameter_count(num_output, num_neurons, num_memory, num_branch, num_synapse_per_branch,
                            mlp_num_layers=1, mlp_hidden_size=None, learn_memory_tau=False, num_layers=1):
    """Trainable parameters of an ELM Network (docs/spec.md §7.2).

    Per neuron: k_c = num_branch·num_synapse_per_branch synapse weights, the MLP
    (in_0 = num_branch + d_m, ``mlp_num_layers`` hidden layers of width h, default
    2·d_m, out d_m), w_o (d_m + 1) and τ_m (d_m) if learned; every layer alike; a
    readout K·(N + 1). The input width does not enter: a neuron has k_c synapses
    whatever it reads.
    """
    d_m, n_b, N = num_memory, num_branch, num_neurons
    h = mlp_hidden_size or 2 * d_m
    mlp = mlp_parameter_count(n_b + d_m, h, mlp_num_layers, d_m)
    per_neuron = n_b * num_synapse_per_branch + mlp + (d_m + 1) + (d_m if learn_memory_tau else 0)
    return num_layers * N * per_neuron + num_output * (N + 1)


# A config whose parameters or per-step state would need more elements than this is
# a typo (num_neurons=1e9), not an experiment: refuse it before allocating anything.
MAX_NETWORK_ELEMENTS = 1 << 31
# Each size field's usual value: a field reset to it shows how much of a network's size it causes.
_USUAL_SIZES = {"num_neurons": 8, "num_layers": 1, "num_memory": 10, "mlp_num_layers": 1, "mlp_hidden_size": 20,
                "num_branch": 4, "num_synapse_per_branch": 4, "num_input": 1, "num_output": 1}


def _size_counts(sizes):
    """(elements, the size fields they multiply) of what a network of ``sizes`` allocates per layer stack:
    synapse weights, synapse sources, the readout, and every neuron's parameters."""
    N, L, d_m, n_b = sizes["num_neurons"], sizes["num_layers"], sizes["num_memory"], sizes["num_branch"]
    k_c = n_b * sizes["num_synapse_per_branch"]
    h = sizes["mlp_hidden_size"] or 2 * d_m
    per_neuron = k_c + mlp_parameter_count(n_b + d_m, h, sizes["mlp_num_layers"], d_m) + 2 * d_m + 1 + n_b
    return [(N * k_c * L, ("num_neurons", "num_layers", "num_branch", "num_synapse_per_branch")),
            (max(sizes["num_input"], N) * N * n_b, ("num_input", "num_neurons", "num_branch")),
            (sizes["num_output"] * (N + 1), ("num_output", "num_neurons")),
            (N * per_neuron * L, ("num_neurons", "num_layers", "mlp_num_layers", "mlp_hidden_size", "num_memory",
                                  "num_branch", "num_synapse_per_branch"))]


@dataclasses.dataclass
class NetworkConfig:
    """A recurrent ELM Network: ``num_layers`` layers of ``num_neurons`` Branch-ELM neurons.

    Field names follow docs/spec.md §7.1. Each neuron has ``num_synapse`` = k_c synapses,
    ``round(recurrent_fraction · k_c)`` of them reading other neurons' previous outputs.
    """
    num_input: int
    num_output: int
    num_neurons: int = 8
    num_layers: int = 1
    num_memory: int = 10
    mlp_num_layers: int = 1
    mlp_hidden_size: Optional[int] = None
    mlp_activation: str = "relu"
    num_branch: int = 4
    num_synapse_per_branch: int = 4
    recurrent_fraction: float = 0.5
    lambda_value: float = 5.0
    tau_b_value: float = 5.0
    memory_tau_min: float = 1.0
    memory_tau_max: float = 1000.0
    learn_memory_tau: bool = False
    delta_t: float = 1.0
    version: str = NETWORK_VERSION

    is_network = True
    # The memory update is Branch-ELM v2's (κ_λ), see docs/spec.md §7.3.
    is_v2 = True

    def __post_init__(self):
        self._validate()

    # ---- derived sizes -------------------------------------------------
    @property
    def hidden_size(self):
        return self.mlp_hidden_size if self.mlp_hidden_size else 2 * self.num_memory

    @property
    def branches(self):
        return self.num_branch

    @property
    def num_synapse(self):
        """k_c: synapses per neuron."""
        return self.num_branch * self.num_synapse_per_branch

    @property
    def num_recurrent_synapse(self):
        """Synapses per neuron reading o_{t−1} (round half to even, as Python's round)."""
        return int(round(self.recurrent_fraction * self.num_synapse))

    @property
    def mlp_input_size(self):
        return self.num_branch + self.num_memory

    @property
    def input_tau_value(self):
        return self.tau_b_value

    @property
    def effective_tau_max(self):
        return max(self.memory_tau_min + V2_MIN_TAU_SPAN, self.memory_tau_max)

    def layer_input_size(self, layer):
        """D_ℓ: the external inputs of layer ℓ (the previous layer's neurons above layer 0)."""
        return self.num_input if layer == 0 else self.num_neurons

    # ---- validation ----------------------------------------------------
    def _validate(self):
        if self.version != NETWORK_VERSION:
            raise ConfigError("version", f"must be {NETWORK_VERSION!r} for a network config, got {self.version!r}")
        for name in ("num_input", "num_output", "num_neurons", "num_layers", "num_memory", "num_branch",
                     "num_synapse_per_branch"):
            require_int(name, getattr(self, name), minimum=1)
        require_int("mlp_num_layers", self.mlp_num_layers, minimum=0)
        if self.mlp_hidden_size is not None:
            require_int("mlp_hidden_size", self.mlp_hidden_size, minimum=1)
        for name in ("lambda_value", "tau_b_value", "memory_tau_min", "memory_tau_max", "delta_t"):
            require_positive_float(name, getattr(self, name))
        rho = self.recurrent_fraction
        if not is_finite_number(rho) or not 0 <= rho <= 1:
            raise ConfigError("recurrent_fraction", f"must be a number in [0, 1], got {shown(rho)}")
        if not isinstance(self.learn_memory_tau, bool):
            raise ConfigError("learn_memory_tau", f"must be true or false, got {self.learn_memory_tau!r}")
        if self.mlp_activation not in ACTIVATIONS:
            raise ConfigError("mlp_activation",
                              f"must be one of {', '.join(ACTIVATIONS)}, got {self.mlp_activation!r}")
        if self.effective_tau_max - self.memory_tau_min <= 2 * TAU_INIT_MARGIN:
            raise ConfigError("memory_tau_max",
                              f"must exceed memory_tau_min by more than {2 * TAU_INIT_MARGIN:g} "
                              "(the initialisation margin)")
        require_tau_margin(self.memory_tau_min, self.effective_tau_max)
        self._check_sizes()

    def _check_sizes(self):
        """Name the field that makes the network absurdly large (Python ints: no overflow).

        Each count of :func:`_size_counts` multiplies some of the size fields; when one
        exceeds the limit, the field to blame is the one whose usual value would shrink
        that count the most.
        """
        sizes = {name: getattr(self, name) for name in _USUAL_SIZES}
        for index, (elements, fields) in enumerate(_size_counts(sizes)):
            if elements > MAX_NETWORK_ELEMENTS:
                field = min(fields, key=lambda f: _size_counts({**sizes, f: _USUAL_SIZES[f]})[index][0])
                raise ConfigError(field, f"{getattr(self, field):,} makes the network need {elements:,} "
                                         f"parameters (more than {MAX_NETWORK_ELEMENTS:,}); check the sizes")
        try:
            check_memory(self.training_bytes(),
                         f"a network of {self.num_layers} x {self.num_neurons} neurons (d_m {self.num_memory}, "
                         f"k_c {self.num_synapse}, {self.parameter_count():.3g} parameters, trained in float64)")
        except ELMError as e:
            def parameters(f):  # with field f at its usual value
                d = {**sizes, f: _USUAL_SIZES[f]}
                return network_parameter_count(d["num_output"], d["num_neurons"], d["num_memory"], d["num_branch"],
                                               d["num_synapse_per_branch"], d["mlp_num_layers"], d["mlp_hidden_size"],
                                               self.learn_memory_tau, d["num_layers"])
            field = min(_USUAL_SIZES, key=parameters)
            raise ConfigError(field, f"{getattr(self, field):,}: {e}") from None
        require_mlp_depth(self.mlp_num_layers)

    # ---- size ------------------------------------------------------------
    def parameter_count(self):
        """Trainable entries in closed form, without building the parameters."""
        return network_parameter_count(self.num_output, self.num_neurons, self.num_memory, self.num_branch,
                                       self.num_synapse_per_branch, self.mlp_num_layers, self.mlp_hidden_size,
                                       self.learn_memory_tau, self.num_layers)

    def activation_bytes(self, batch, steps, itemsize=4):
        """About what one forward and backward pass holds: per step and neuron the synaptic and branch
        inputs, the first layer's input, every MLP layer's pre-activations, memory and its update and the
        output, per layer; once for the forward cache and once for the gradients."""
        per_neuron = (self.num_synapse + self.mlp_input_size + (self.mlp_num_layers + 1) * self.hidden_size
                      + 3 * self.num_memory + 1)
        per_step = self.num_input + self.num_layers * self.num_neurons * per_neuron + self.num_output
        return 2 * batch * steps * per_step * itemsize

    def training_bytes(self):
        """A lower bound on training memory: parameters, gradients and two Adam moments in float64."""
        return 4 * 8 * (self.parameter_count() + self.num_layers * self.num_neurons * self.num_synapse)

    # ---- (de)serialisation ---------------------------------------------
    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d, version=None):
        if not isinstance(d, dict):
            raise ELMError(f"a model config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        if version is not None:
            d.setdefault("version", version)
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                hint = " (a single-neuron field; networks have no routing, w_s is learned per synapse)" \
                    if key in SINGLE_NEURON_ONLY_FIELDS else did_you_mean(key, known)
                raise ConfigError(key, f"unknown field for version {NETWORK_VERSION}{hint}")
        for key in ("num_input", "num_output"):
            if key not in d:
                raise ConfigError(key, "is required")
        return cls(**d)

    @classmethod
    def from_json(cls, text, source="config"):
        from elmcore.engine.factory import load_config_json
        return load_config_json(text, source)

    @classmethod
    def load(cls, path):
        from elmcore.neuron.config import ELMConfig
        return ELMConfig.load(path)

    def save(self, path):
        from elmcore.storage.fileio import atomic_write_text
        atomic_write_text(path, self.to_json() + "\n")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
