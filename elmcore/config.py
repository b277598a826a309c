"""Model configuration: every constructor argument of the release (ELM_SPEC §1).

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
            raise ConfigError("version", f"must be one of {', '.join(VERSIONS)}, got {self.version!r}")
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
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ELMError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path):
        try:
            with open(path, "r", encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise ELMError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ELMError(f"cannot read config file {path}: {e}") from None
        return cls.from_json(text, source=os.fspath(path))

    def save(self, path):
        from .fileio import atomic_write_text
        atomic_write_text(path, self.to_json() + "\n")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


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
