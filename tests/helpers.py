"""Shared test utilities (imported by test modules; not a conftest so it stays explicit)."""

import os


from elmcore.neuron.config import ELMConfig

HERE = os.path.dirname(__file__)
GOLDEN_DIR = os.path.join(HERE, "data", "golden")
REFERENCE_DIR = os.path.join(HERE, "data", "reference_models")


def golden_files():
    return sorted(os.path.join(GOLDEN_DIR, f) for f in os.listdir(GOLDEN_DIR) if f.endswith(".npz"))


def random_config(rng, version=None, routing="any", layers=None, activation=None):
    """A small config drawn from every axis the engine supports."""
    version = version or rng.choice(["elm_v1", "branch_elm_v2"])
    if routing == "any":
        routing = rng.choice([None, "random_routing", "neuronio_routing"])
    num_input = int(rng.integers(1, 9))
    if routing is None:
        spb = int(rng.choice([d for d in range(1, num_input + 1) if num_input % d == 0]))
        branches = num_input // spb
    elif routing == "neuronio_routing":
        branches = int(rng.integers(1, num_input + 1))
        spb = -(-num_input // branches) + int(rng.integers(0, 3))
    else:
        branches, spb = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    d = dict(num_input=num_input, num_output=int(rng.integers(1, 4)), num_memory=int(rng.integers(1, 6)),
             mlp_num_layers=int(rng.integers(0, 4)) if layers is None else layers,
             mlp_hidden_size=int(rng.integers(1, 7)),
             mlp_activation=activation or str(rng.choice(["relu", "silu"])),
             num_branch=branches, num_synapse_per_branch=spb, input_to_synapse_routing=routing,
             learn_memory_tau=bool(rng.random() < 0.7), lambda_value=float(rng.uniform(1, 6)),
             memory_tau_min=float(rng.uniform(0.5, 2)), memory_tau_max=float(rng.uniform(10, 300)),
             delta_t=float(rng.choice([1.0, 0.5, 2.0])), version=str(version))
    return ELMConfig.from_dict(d)
