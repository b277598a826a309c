"""Model configuration: every constructor argument of the release (docs/spec.md §1).

Field names are the release's, so a release ``model_config.json`` loads as it
is. The one field the release does not write, ``version``, defaults to
``elm_v1`` (every published checkpoint is a v1 model).
"""

import dataclasses
import json
import math
import os
from typing import Optional

from .errors import ConfigError, ELMError
from .fileio import parse_json, read_json

VERSIONS = ("elm_v1", "branch_elm_v2")
ACTIVATIONS = ("relu", "silu")
ROUTINGS = (None, "random_routing", "neuronio_routing")

# v2 only: the release widens a degenerate τ range instead of rejecting it.
V2_MIN_TAU_SPAN = 3e-6
# The release initialises τ_m on logspace(τ_min + 1e-6, τ_max − 1e-6): the
# range must be wider than twice that margin for the logit to be finite.
TAU_INIT_MARGIN = 1e-6


@dataclasses.dataclass
class ELMConfig:
    num_input: int
    num_output: int
    num_memory: int = 100
    lambda_value: float = 5.0
    mlp_num_layers: int = 1
    mlp_hidden_size: Optional[int] = None
    mlp_activation: str = "relu"
    tau_s_value: float = 5.0
    tau_b_value: float = 5.0
    memory_tau_min: float = 1.0
    memory_tau_max: float = 1000.0
    learn_memory_tau: bool = False
    w_s_value: float = 0.5
    num_branch: Optional[int] = None
    num_synapse_per_branch: int = 1
    input_to_synapse_routing: Optional[str] = None
    delta_t: float = 1.0
    version: str = "elm_v1"

    is_network = False

    def __post_init__(self):
        self._validate()

    # ---- derived sizes -------------------------------------------------
    @property
    def is_v2(self):
        return self.version == "branch_elm_v2"

    @property
    def hidden_size(self):
        return self.mlp_hidden_size if self.mlp_hidden_size else 2 * self.num_memory

    @property
    def branches(self):
        return self.num_input if self.num_branch is None else self.num_branch

    @property
    def num_synapse(self):
        return self.num_synapse_per_branch * self.branches

    @property
    def mlp_input_size(self):
        return self.branches + self.num_memory

    @property
    def input_tau_value(self):
        """τ_s (v1, per synapse) or τ_b (v2, per branch)."""
        return self.tau_b_value if self.is_v2 else self.tau_s_value

    @property
    def effective_tau_max(self):
        if self.is_v2:
            return max(self.memory_tau_min + V2_MIN_TAU_SPAN, self.memory_tau_max)
        return self.memory_tau_max

    # ---- validation ----------------------------------------------------
    def _validate(self):
        if self.version not in VERSIONS:
            raise ConfigError("version", f"must be one of {', '.join(VERSIONS + ('elm_network',))}, "
                                         f"got {self.version!r}")
        for name in ("num_input", "num_output", "num_memory", "num_synapse_per_branch"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("mlp_num_layers", self.mlp_num_layers, minimum=0)
        for name in ("mlp_hidden_size", "num_branch"):
            if getattr(self, name) is not None:
                _require_int(name, getattr(self, name), minimum=1)
        for name in ("lambda_value", "tau_s_value", "tau_b_value", "memory_tau_min",
                     "memory_tau_max", "delta_t"):
            _require_positive_float(name, getattr(self, name))
        v = self.w_s_value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError("w_s_value", f"must be a finite number, got {v!r}")
        if not isinstance(self.learn_memory_tau, bool):
            raise ConfigError("learn_memory_tau", f"must be true or false, got {self.learn_memory_tau!r}")
        if self.mlp_activation not in ACTIVATIONS:
            raise ConfigError("mlp_activation",
                              f"must be one of {', '.join(ACTIVATIONS)}, got {self.mlp_activation!r}")
        if self.input_to_synapse_routing not in ROUTINGS:
            raise ConfigError("input_to_synapse_routing",
                              f"must be null, 'random_routing' or 'neuronio_routing', got "
                              f"{self.input_to_synapse_routing!r}")
        if self.input_to_synapse_routing is None and self.num_synapse != self.num_input:
            raise ConfigError(
                "num_synapse_per_branch",
                f"without routing the synapse count num_branch*num_synapse_per_branch = "
                f"{self.branches}*{self.num_synapse_per_branch} = {self.num_synapse} must equal "
                f"num_input = {self.num_input}")
        if self.input_to_synapse_routing == "neuronio_routing":
            stride = math.ceil(self.num_input / self.branches)
            if stride > self.num_synapse_per_branch:
                raise ConfigError(
                    "num_synapse_per_branch",
                    f"neuronio_routing needs ceil(num_input/num_branch) = {stride} <= "
                    f"num_synapse_per_branch = {self.num_synapse_per_branch}")
        if self.effective_tau_max <= self.memory_tau_min:
            raise ConfigError("memory_tau_max",
                              f"must exceed memory_tau_min = {self.memory_tau_min}, got {self.memory_tau_max}")
        if self.effective_tau_max - self.memory_tau_min <= 2 * TAU_INIT_MARGIN:
            raise ConfigError("memory_tau_max",
                              f"must exceed memory_tau_min by more than {2 * TAU_INIT_MARGIN:g} "
                              "(the release's initialisation margin)")
        sizes = ", ".join(f"{name}={getattr(self, name)}" for name in
                          ("num_input", "num_memory", "mlp_num_layers", "mlp_hidden_size", "num_branch",
                           "num_synapse_per_branch") if getattr(self, name) is not None)
        check_memory(self.training_bytes(),
                     f"a model with {sizes} ({self.parameter_count():.3g} parameters, trained in float64)")

    # ---- size ------------------------------------------------------------
    def parameter_count(self):
        """Entries of every state_dict tensor, in closed form (no allocation, any layer count)."""
        h, m, layers = self.hidden_size, self.num_memory, self.mlp_num_layers
        fan_in = self.mlp_input_size
        if layers:
            mlp = fan_in * h + (layers - 1) * h * h + h * m + layers * h + m
        else:
            mlp = fan_in * m + m
        routing = 2 * self.num_synapse if self.input_to_synapse_routing else 0
        tau_input = self.branches if self.is_v2 else self.num_synapse
        return mlp + self.num_synapse + self.num_output * (m + 1) + tau_input + m + routing

    def activation_bytes(self, batch, steps, itemsize=4):
        """About what one forward and backward pass over ``batch`` sequences of ``steps`` steps holds:
        per step the input, routed and branch inputs, memory and its update, every MLP layer's
        pre-activations and the outputs, once for the forward cache and once for the gradients."""
        per_step = (self.num_input + self.branches + self.num_synapse + 3 * self.num_memory
                    + (self.mlp_num_layers + 1) * self.hidden_size + self.num_output)
        return 2 * batch * steps * per_step * itemsize

    def training_bytes(self):
        """A lower bound on the memory training needs: parameters, gradients and two Adam moments in float64,
        plus NumPy's per-array overhead for each layer's tensors."""
        tensors = 2 * (self.mlp_num_layers + 1) + 8
        return 4 * (8 * self.parameter_count() + ARRAY_OVERHEAD_BYTES * tensors)

    # ---- (de)serialisation ---------------------------------------------
    def to_dict(self):
        """The release's constructor arguments plus ``version``."""
        d = dataclasses.asdict(self)
        # Each version takes only its own input time constant.
        d.pop("tau_s_value" if self.is_v2 else "tau_b_value")
        return d

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d, version=None):
        if not isinstance(d, dict):
            raise ELMError(f"a model config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        if version is not None:
            d.setdefault("version", version)
        ver = d.get("version", "elm_v1")
        if ver == NETWORK_VERSION:
            # One factory for both model families: every caller of ELMConfig.from_dict / load
            # (training, checkpoints, oracles, the CLI) gets a network config when asked for one.
            return NetworkConfig.from_dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        wrong_tau = "tau_s_value" if ver == "branch_elm_v2" else "tau_b_value"
        for key in d:
            if key not in known:
                raise ConfigError(key, "unknown field")
            if key == wrong_tau:
                raise ConfigError(key, f"not a field of version {ver} (use "
                                       f"{'tau_b_value' if wrong_tau == 'tau_s_value' else 'tau_s_value'})")
        for key in ("num_input", "num_output"):
            if key not in d:
                raise ConfigError(key, "is required")
        if isinstance(d.get("input_to_synapse_routing"), str) and \
                d["input_to_synapse_routing"].lower() in ("none", "null", ""):
            d["input_to_synapse_routing"] = None
        return cls(**d)

    @classmethod
    def from_json(cls, text, source="config"):
        return cls.from_dict(parse_json(text, source))

    @classmethod
    def load(cls, path):
        return cls.from_dict(read_json(path, "config file"))

    def save(self, path, inputs=()):
        from .fileio import atomic_write_text
        atomic_write_text(path, self.to_json() + "\n", inputs=inputs)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# ---- memory estimates (shared by every model family and by data generated in memory) ----

ARRAY_OVERHEAD_BYTES = 112  # sys.getsizeof(np.empty(0)): what each tensor costs besides its data


def memory_limit_bytes():
    """What this process may allocate: physical memory, lowered by a cgroup limit or RLIMIT_AS / RLIMIT_DATA.

    ``None`` where none of them can be read.
    """
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for cgroup_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(cgroup_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    try:
        import resource
        for which in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
            soft, _ = resource.getrlimit(which)
            if soft != resource.RLIM_INFINITY and soft > 0:
                limits.append(soft)
    except (ImportError, ValueError, OSError):
        pass
    return min(limits) if limits else None


def format_bytes(n):
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} bytes"


def check_memory(nbytes, what):
    """Refuse, before allocating, work that cannot fit in this machine's memory.

    ``what`` names the thing being built; the message says how much it would
    need and how much there is, so the user can see which size to shrink.
    """
    limit = memory_limit_bytes()
    if limit is not None and nbytes > limit:
        raise ELMError(f"{what} would need at least {format_bytes(nbytes)} of memory; this machine "
                       f"allows {format_bytes(limit)}")


def _require_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")


def _require_positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(name, f"must be a finite number > 0, got {value!r}")


# ---- ELM Network (docs/spec.md §7) ------------------------------------------------

NETWORK_VERSION = "elm_network"
# A config whose parameters or per-step state would need more elements than this is
# a typo (num_neurons=1e9), not an experiment: refuse it before allocating anything.
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
    widths = [n_b + d_m] + [h] * mlp_num_layers + [d_m]
    mlp = sum(w_in * w_out + w_out for w_in, w_out in zip(widths[:-1], widths[1:]))
    per_neuron = n_b * num_synapse_per_branch + mlp + (d_m + 1) + (d_m if learn_memory_tau else 0)
    return num_layers * N * per_neuron + num_output * (N + 1)


MAX_NETWORK_ELEMENTS = 1 << 31


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
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("mlp_num_layers", self.mlp_num_layers, minimum=0)
        if self.mlp_hidden_size is not None:
            _require_int("mlp_hidden_size", self.mlp_hidden_size, minimum=1)
        for name in ("lambda_value", "tau_b_value", "memory_tau_min", "memory_tau_max", "delta_t"):
            _require_positive_float(name, getattr(self, name))
        rho = self.recurrent_fraction
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) \
                or not 0 <= rho <= 1:
            raise ConfigError("recurrent_fraction", f"must be a number in [0, 1], got {rho!r}")
        if not isinstance(self.learn_memory_tau, bool):
            raise ConfigError("learn_memory_tau", f"must be true or false, got {self.learn_memory_tau!r}")
        if self.mlp_activation not in ACTIVATIONS:
            raise ConfigError("mlp_activation",
                              f"must be one of {', '.join(ACTIVATIONS)}, got {self.mlp_activation!r}")
        if self.effective_tau_max - self.memory_tau_min <= 2 * TAU_INIT_MARGIN:
            raise ConfigError("memory_tau_max",
                              f"must exceed memory_tau_min by more than {2 * TAU_INIT_MARGIN:g} "
                              "(the initialisation margin)")
        self._check_sizes()

    def _check_sizes(self):
        """Name the field that makes the network absurdly large (Python ints: no overflow)."""
        N, h, d_m = self.num_neurons, self.hidden_size, self.num_memory
        widths = [self.mlp_input_size] + [h] * self.mlp_num_layers + [d_m]
        per_neuron = self.num_synapse + sum((widths[j] + 1) * widths[j + 1] for j in range(len(widths) - 1))
        per_neuron += 2 * d_m + 1 + self.num_branch
        synapse_field = "num_synapse_per_branch" if self.num_synapse_per_branch >= self.num_branch else "num_branch"
        memory_field = "mlp_hidden_size" if h > d_m else "num_memory"
        sizes = [(synapse_field, N * self.num_synapse * self.num_layers),
                 ("num_input" if self.num_input > N else "num_neurons", max(self.num_input, N) * N * self.num_branch),
                 ("num_output", self.num_output * (N + 1)),
                 (memory_field, per_neuron),
                 ("num_neurons", N * per_neuron * self.num_layers)]
        for field, elements in sizes:
            if elements > MAX_NETWORK_ELEMENTS:
                raise ConfigError(field, f"the network would need {elements:,} parameters "
                                         f"(more than {MAX_NETWORK_ELEMENTS:,}); check the sizes")
        check_memory(self.training_bytes(),
                     f"a network of {self.num_layers} x {N} neurons (d_m {d_m}, k_c {self.num_synapse}, "
                     f"{self.parameter_count():.3g} parameters, trained in float64)")

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
                    if key in _SINGLE_NEURON_ONLY else ""
                raise ConfigError(key, f"unknown field for version {NETWORK_VERSION}{hint}")
        for key in ("num_input", "num_output"):
            if key not in d:
                raise ConfigError(key, "is required")
        return cls(**d)

    @classmethod
    def from_json(cls, text, source="config"):
        return load_config_json(text, source)

    @classmethod
    def load(cls, path):
        return ELMConfig.load(path)

    def save(self, path):
        from .fileio import atomic_write_text
        atomic_write_text(path, self.to_json() + "\n")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


_SINGLE_NEURON_ONLY = ("tau_s_value", "w_s_value", "input_to_synapse_routing")


def load_config_dict(d, version=None):
    """The model config for a dict of fields: an ``NetworkConfig`` or an ``ELMConfig`` by ``version``."""
    if isinstance(d, dict) and (d.get("version") or version) == NETWORK_VERSION:
        return NetworkConfig.from_dict(d, version=version)
    return ELMConfig.from_dict(d, version=version)


def load_config_json(text, source="config"):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ELMError(f"{source}: not valid JSON ({e})") from None
    return load_config_dict(data)
