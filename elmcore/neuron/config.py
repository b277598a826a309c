"""Model configuration: every constructor argument of the release (docs/spec.md §1).

Field names are the release's, so a release ``model_config.json`` loads as it
is. The one field the release does not write, ``version``, defaults to
``elm_v1`` (every published checkpoint is a v1 model).
"""

import dataclasses
import json
import math
from typing import Optional

from elmcore.errors import ConfigError, ELMError, did_you_mean
from elmcore.engine.fields import (ACTIVATIONS, NETWORK_VERSION, TAU_INIT_MARGIN, V2_MIN_TAU_SPAN,
                                   is_finite_number, require_int, require_mlp_depth, require_positive_float,
                                   require_tau_margin, shown)
from elmcore.engine.memory import ARRAY_OVERHEAD_BYTES, check_memory
from elmcore.storage.fileio import parse_json, read_json

VERSIONS = ("elm_v1", "branch_elm_v2")
ROUTINGS = (None, "random_routing", "neuronio_routing")



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
            require_int(name, getattr(self, name), minimum=1)
        require_int("mlp_num_layers", self.mlp_num_layers, minimum=0)
        for name in ("mlp_hidden_size", "num_branch"):
            if getattr(self, name) is not None:
                require_int(name, getattr(self, name), minimum=1)
        for name in ("lambda_value", "tau_s_value", "tau_b_value", "memory_tau_min",
                     "memory_tau_max", "delta_t"):
            require_positive_float(name, getattr(self, name))
        if not is_finite_number(self.w_s_value):
            raise ConfigError("w_s_value", f"must be a finite number, got {shown(self.w_s_value)}")
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
        require_tau_margin(self.memory_tau_min, self.effective_tau_max)
        sizes = ", ".join(f"{name}={getattr(self, name)}" for name in
                          ("num_input", "num_memory", "mlp_num_layers", "mlp_hidden_size", "num_branch",
                           "num_synapse_per_branch") if getattr(self, name) is not None)
        check_memory(self.training_bytes(),
                     f"a model with {sizes} ({self.parameter_count():.3g} parameters, trained in float64)")
        require_mlp_depth(self.mlp_num_layers)

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
            from elmcore.network.config import NetworkConfig
            return NetworkConfig.from_dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        wrong_tau = "tau_s_value" if ver == "branch_elm_v2" else "tau_b_value"
        for key in d:
            if key not in known:
                from elmcore.network.config import NetworkConfig
                others = {f.name: f" (a field of version {NETWORK_VERSION})" for f in dataclasses.fields(NetworkConfig)}
                raise ConfigError(key, "unknown field" + did_you_mean(key, {**others, **dict.fromkeys(known, "")}))
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
        from elmcore.storage.fileio import atomic_write_text
        atomic_write_text(path, self.to_json() + "\n", inputs=inputs)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
