"""Every kernel module keeps the kernel contract (elmcore/kernels/contract.py)."""

import types

import pytest

from elmcore import ELMError
from elmcore.kernels import contract


def _modules():
    from elmcore.kernels import cpu
    from elmcore.kernels import cuda
    return {"cpu": cpu, "cuda": cuda}


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_kernel_module_keeps_the_contract(name):
    module = _modules()[name]
    assert contract.problems(module) == []
    assert contract.check(module) is module
    for function, params in contract.REQUIRED.items():
        assert contract._parameters(getattr(module, function)) == params


def test_capabilities_are_declared_by_the_modules():
    modules = _modules()
    assert contract.capabilities(modules["cpu"]) == {"sparse_first_layer"}
    assert contract.capabilities(modules["cuda"]) == frozenset()
    for function in contract.CAPABILITY_FUNCTIONS["sparse_first_layer"]:
        assert callable(getattr(modules["cpu"], function))


def test_cpu_and_cuda_name_their_arguments_alike():
    # One meaning per name: the routed channel input is A (A_out), the activations act_out.
    modules = _modules()
    for function in contract.REQUIRED:
        assert (contract._parameters(getattr(modules["cpu"], function))
                == contract._parameters(getattr(modules["cuda"], function))), function
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
