"""The kernel contract: what a kernel module gives the model.

A backend (``backend.py``) hands ``model.ELM`` one kernel module: ``kernels/cpu.py``
(Numba ``@njit``, NumPy arrays) or ``kernels/cuda.py`` (Numba CUDA, CuPy arrays).
The model calls only the functions listed here, with exactly these parameter names
in this order; shapes, ownership and lifetime of every argument are documented in
``kernels/cpu.py`` (the reference) and the section "Kernel contract" of
``docs/architecture.md``. ``tests/test_kernel_contract.py`` holds every kernel
module to this list.

Optional work a module can do faster is a *capability*: the module declares it in
``CAPABILITIES`` and then provides that capability's functions too; the model asks
:func:`capabilities` instead of guessing from the backend's name.
"""

import inspect

from ..errors import ELMError

# name -> parameter names, in order.
REQUIRED = {
    "route_forward": ("X", "indptr", "entry_syn", "entry_weight", "syn_per_channel", "A_out"),
    "route_weight_grad": ("X", "indptr", "entry_syn", "entry_mask", "syn_per_channel", "dA", "partial_out"),
    "route_input_grad": ("dA", "indptr", "entry_syn", "entry_weight", "syn_per_channel", "dX_out"),
    "scan_forward": ("A", "kappa", "u0", "U_out"),
    "scan_backward": ("dU", "kappa", "dA_out"),
    "recur_forward": ("Zb", "W0mT", "WhT", "ch", "WoT", "co", "kappa_m", "c_m", "m0", "activation",
                      "phi_scale", "phi_slope", "tile", "M_out", "Z_out", "DM_out", "KM_out"),
    "recur_backward": ("dM", "W0m", "Wh", "Wo", "kappa_m", "c_m", "m0", "M", "Z", "DM", "activation",
                       "phi_scale", "phi_slope", "tile", "dZ_out", "dO_out", "gkappa_out", "gc_out", "act_out"),
    "batch_tile": ("B",),
}

# capability -> the functions a module declaring it provides (name -> parameter names).
CAPABILITY_FUNCTIONS = {
    # The first layer's branch columns computed from the sparse routed input
    # (scan_κ(R) @ W0bᵀ = scan_κ(R @ W0bᵀ) when every channel shares one κ).
    "sparse_first_layer": {
        "sparse_rows_product": ("R", "W0bT", "P_out"),
        "sparse_rows_weight_grad": ("R", "G", "partial_out"),
        "route_weight_grad_projected": ("X", "indptr", "entry_syn", "entry_mask", "syn_per_channel", "G",
                                        "W0bT", "partial_out"),
        "batch_chunks": (),
    },
}


def capabilities(module):
    """The optional capabilities ``module`` declares (its ``CAPABILITIES`` set; none without one)."""
    declared = getattr(module, "CAPABILITIES", None)
    return frozenset(declared) if isinstance(declared, (set, frozenset)) else frozenset()


def _parameters(function):
    target = getattr(function, "py_func", function)  # a Numba dispatcher's Python function
    return tuple(inspect.signature(target).parameters)


def problems(module):
    """Every way ``module`` departs from the contract, one sentence each (empty when it keeps it)."""
    name = getattr(module, "__name__", repr(module))
    found = []
    if not isinstance(getattr(module, "CAPABILITIES", None), (frozenset, set)):
        found.append(f"{name} declares no CAPABILITIES set")
    unknown = capabilities(module) - set(CAPABILITY_FUNCTIONS)
    if unknown:
        found.append(f"{name} declares unknown capabilities {sorted(unknown)}")
    wanted = dict(REQUIRED)
    for capability in capabilities(module) & set(CAPABILITY_FUNCTIONS):
        wanted.update(CAPABILITY_FUNCTIONS[capability])
    for function, params in wanted.items():
        provided = getattr(module, function, None)
        if not callable(provided):
            found.append(f"{name} lacks {function}")
        elif _parameters(provided) != params:
            found.append(f"{name}.{function} takes ({', '.join(_parameters(provided))}), "
                         f"the contract says ({', '.join(params)})")
    return found


def check(module):
    """Raise ELMError naming every departure of ``module`` from the contract."""
    found = problems(module)
    if found:
        raise ELMError("kernel contract broken: " + "; ".join(found))
    return module
