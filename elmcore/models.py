"""One factory for both model families: the single neuron (``elm_v1`` / ``branch_elm_v2``)
and the ELM Network (``elm_network``).

Callers that hold a config (training, checkpoints, oracles, gradcheck, the CLI) build the
model through :func:`build_model`; the config's own class says which family it is.
"""

from .config import load_config_dict  # noqa: F401  (the config side of the factory)


def is_network(config):
    return bool(getattr(config, "is_network", False))


def build_model(config, params=None, seed=0, dtype="float32", device="cpu"):
    """An ``ELM`` or an ``ELMNetwork`` for ``config``, with ``params`` (validated) or a seeded init."""
    if is_network(config):
        from .network import ELMNetwork
        return ELMNetwork(config, params=params, seed=seed, dtype=dtype, device=device)
    from .model import ELM
    return ELM(config, params=params, seed=seed, dtype=dtype, device=device)


def parameter_module(config):
    """The module that knows this family's state_dict keys, shapes, init and counts."""
    if is_network(config):
        from . import network_params
        return network_params
    from . import params
    return params
