"""One factory for both model families: the single neuron (``elm_v1`` / ``branch_elm_v2``)
and the ELM Network (``elm_network``).

Callers that hold a config (training, checkpoints, oracles, gradcheck, the CLI) build the
model through :func:`build_model`; the config's own class says which family it is.
"""

import json

from elmcore.errors import ELMError
from elmcore.engine.fields import NETWORK_VERSION
from elmcore.network.config import NetworkConfig
from elmcore.neuron.config import ELMConfig


def is_network(config):
    return bool(getattr(config, "is_network", False))


def build_model(config, params=None, seed=0, dtype="float32", device="cpu"):
    """An ``ELM`` or an ``ELMNetwork`` for ``config``, with ``params`` (validated) or a seeded init."""
    if is_network(config):
        from elmcore.network.model import ELMNetwork
        return ELMNetwork(config, params=params, seed=seed, dtype=dtype, device=device)
    from elmcore.neuron.model import ELM
    return ELM(config, params=params, seed=seed, dtype=dtype, device=device)


def parameter_module(config):
    """The module that knows this family's state_dict keys, shapes, init and counts."""
    if is_network(config):
        from elmcore.network import params as network_params
        return network_params
    from elmcore.neuron import params as params
    return params


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
