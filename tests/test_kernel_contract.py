"""Every kernel module keeps the kernel contract (elmcore/kernels/contract.py)."""

import types

import pytest

from elmcore import ELMError
from elmcore.kernels import contract


def _modules():
    from elmcore.kernels import cpu
    from elmcore.kernels import cuda
    return {"cpu": cpu, "cuda": cuda}


def _network_modules():
    from elmcore.kernels import network_cpu
    from elmcore.kernels import network_cuda
    return {"cpu": network_cpu, "cuda": network_cuda}


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_kernel_module_keeps_the_contract(name):
    module = _modules()[name]
    assert contract.problems(module) == []
    assert contract.check(module) is module
    for function, params in contract.REQUIRED.items():
        assert contract._parameters(getattr(module, function)) == params


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_network_kernel_module_keeps_the_contract(name):
    module = _network_modules()[name]
    assert contract.problems(module, "network") == []
    assert contract.check(module, "network") is module
    for function, params in contract.NETWORK_REQUIRED.items():
        assert contract._parameters(getattr(module, function)) == params
    # A single neuron's module is not a network's, and the other way round.
    assert "lacks network_forward" in " ".join(contract.problems(_modules()[name], "network"))
    assert "lacks recur_forward" in " ".join(contract.problems(module, "neuron"))
    with pytest.raises(ELMError, match="unknown model family 'tree'"):
        contract.problems(module, "tree")


def test_backends_hand_each_family_its_kernel_modules():
    from elmcore.engine.backend import get_backend
    backend = get_backend("cpu")
    assert backend.kernels is _modules()["cpu"]
    assert backend.network_kernels is _network_modules()["cpu"]
    for family, module in (("neuron", backend.kernels), ("network", backend.network_kernels)):
        assert contract.problems(module, family) == []


def test_models_ask_the_backend_not_its_name(monkeypatch):
    # A backend under another name that hands out the CPU modules: the models must use exactly those.
    import numpy as np

    from elmcore import ELM, ELMNetwork
    from elmcore.engine import backend as backend_module
    from elmcore.neuron.config import ELMConfig

    class Renamed(backend_module.CPUBackend):
        name = "renamed"

    monkeypatch.setattr(backend_module, "get_backend", lambda device="cpu": Renamed())
    net_cfg = ELMConfig.from_dict(dict(version="elm_network", num_input=3, num_output=2, num_neurons=2,
                                       num_memory=2, num_branch=2, num_synapse_per_branch=2))
    network = ELMNetwork(net_cfg, dtype="float64")
    assert network.backend.name == "renamed" and network.kernels is _network_modules()["cpu"]
    assert np.isfinite(network.forward(np.ones((1, 3, 3)))).all()
    neuron = ELM(ELMConfig(num_input=3, num_output=1, num_memory=2), dtype="float64")
    assert neuron.backend.kernels is _modules()["cpu"]
    assert np.isfinite(neuron.forward(np.ones((1, 3, 3)))).all()


def test_cuda_kernels_are_named_apart_from_their_launchers():
    # The @cuda.jit kernels end in _kernel; the contract's names belong to the launchers.
    import numpy as np

    from elmcore.kernels import cuda, network_cuda
    factories = [cuda._routing_kernels, cuda._scan_kernels, cuda._activation_kernels,
                 lambda dt: cuda._recurrence_kernels(dt, True), lambda dt: cuda._recurrence_kernels(dt, False),
                 network_cuda.kernel_set]
    launchers = set(contract.REQUIRED) | set(contract.NETWORK_REQUIRED)
    names = set()
    for factory in factories:
        names |= set(factory(np.float64))
    assert names and all(name.endswith("_kernel") for name in names), sorted(names)
    # helper kernels of a launcher: the zero fill, act(Z), the weight gradient's chunk sums
    assert not {name[:-len("_kernel")] for name in names} - launchers - {"zero_2d", "activate", "chunk_sum"}
    assert set(network_cuda.KERNELS) == set(network_cuda.kernel_set(np.float32))


def test_capabilities_are_declared_by_the_modules():
    modules = _modules()
    assert contract.capabilities(modules["cpu"]) == {"sparse_first_layer", "forward_without_cache"}
    assert contract.capabilities(modules["cuda"]) == frozenset()
    for capability in ("sparse_first_layer", "forward_without_cache"):
        for function in contract.CAPABILITY_FUNCTIONS[capability]:
            assert callable(getattr(modules["cpu"], function))


def test_cpu_and_cuda_name_their_arguments_alike():
    # One meaning per name: the routed channel input is A (A_out), the activations act_out.
    modules, network_modules = _modules(), _network_modules()
    for function in contract.REQUIRED:
        assert (contract._parameters(getattr(modules["cpu"], function))
                == contract._parameters(getattr(modules["cuda"], function))), function
    for function in contract.NETWORK_REQUIRED:
        assert (contract._parameters(getattr(network_modules["cpu"], function))
                == contract._parameters(getattr(network_modules["cuda"], function))), function
    # The MLP activation reaches every time walk as its integer code, under one name.
    for table, walks in ((contract.REQUIRED, ("recur_forward", "recur_backward")),
                         (contract.NETWORK_REQUIRED, ("network_forward", "network_backward"))):
        for walk in walks:
            assert table[walk][table[walk].index("activation") + 1:][:2] == ("phi_scale", "phi_slope"), walk
    assert contract.REQUIRED["recur_backward"][-1] == "act_out"
    assert "A_out" in contract.REQUIRED["route_forward"]
    every_name = [p for params in contract.REQUIRED.values() for p in params]
    assert every_name.count("A_out") == 1


def _fake_module(**overrides):
    cpu = _modules()["cpu"]
    functions = {name: getattr(cpu, name) for name in contract.REQUIRED}
    functions.update(CAPABILITIES=frozenset())
    functions.update(overrides)
    return types.SimpleNamespace(__name__="fake", **functions)


def test_contract_names_what_a_module_gets_wrong():
    assert contract.problems(_fake_module()) == []
    missing = _fake_module(scan_backward=None)
    assert contract.problems(missing) == ["fake lacks scan_backward"]
    renamed = _fake_module(scan_forward=lambda A, kappa, u0, out: None)
    assert contract.problems(renamed) == [
        "fake.scan_forward takes (A, kappa, u0, out), the contract says (A, kappa, u0, U_out)"]
    claims = _fake_module(CAPABILITIES=frozenset({"sparse_first_layer", "teleport"}))
    found = contract.problems(claims)
    assert "fake declares unknown capabilities ['teleport']" in found
    assert "fake lacks sparse_rows_product" in found and "fake lacks batch_chunks" in found
    undeclared = _fake_module(CAPABILITIES=None)
    assert contract.problems(undeclared) == ["fake declares no CAPABILITIES set"]
    with pytest.raises(ELMError, match="kernel contract broken: fake lacks scan_backward"):
        contract.check(missing)


def test_model_asks_the_kernel_module_for_the_sparse_first_layer(monkeypatch):
    import numpy as np

    from elmcore import ELM
    from elmcore.neuron.config import ELMConfig
    from elmcore.kernels import cpu
    cfg = ELMConfig(num_input=6, num_output=1, num_memory=3, version="branch_elm_v2",
                    num_branch=4, num_synapse_per_branch=2, input_to_synapse_routing="random_routing")
    model = ELM(cfg, dtype="float64")
    X = np.zeros((2, 4, 6))
    X[0, 1, 2] = 1.0
    _, cache = model.forward(X, return_cache=True)
    assert cache["input_path"] == "sparse"
    monkeypatch.setattr(cpu, "CAPABILITIES", frozenset())
    _, cache = model.forward(X, return_cache=True)
    assert cache["input_path"] == "dense"
