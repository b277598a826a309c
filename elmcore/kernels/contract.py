"""The kernel contract: what a kernel module gives the model.

A backend (``engine/backend.py``) hands each model family one kernel module: the single
neuron (``ELM``) gets ``backend.kernels``, ``kernels/cpu.py`` (Numba ``@njit``, NumPy
arrays) or ``kernels/cuda.py`` (Numba CUDA, CuPy arrays); the ELM Network gets
``backend.network_kernels``, ``kernels/network_cpu.py`` or ``kernels/network_cuda.py``.
The models call only the functions listed here for their family, with exactly these
parameter names in this order; shapes, ownership and lifetime of every argument are
documented in the CPU modules (the reference) and the section "Kernel contract" of
``docs/architecture.md``. ``tests/test_kernel_contract.py`` holds every kernel module
to this list.

Optional work a module can do faster is a *capability*: the module declares it in
``CAPABILITIES`` and then provides that capability's functions too; the model asks
:func:`capabilities` instead of guessing from the backend's name.
"""

import inspect

from ..errors import ELMError

# The single neuron's kernel modules: name -> parameter names, in order.
REQUIRED = {
    "route_forward": ("X", "indptr", "entry_syn", "entry_weight", "syn_per_channel", "A_out"),
    "route_weight_grad": ("X", "indptr", "entry_syn", "entry_mask", "syn_per_channel", "dA", "partial_out"),
    "route_input_grad": ("dA", "indptr", "entry_syn", "entry_weight", "syn_per_channel", "dX_out"),
    "scan_forward": ("A", "kappa", "u0", "U_out"),
    "scan_backward": ("dU", "kappa", "dA_next", "dA_out"),
    "recur_forward": ("Zb", "W0mT", "WhT", "ch", "WoT", "co", "kappa_m", "c_m", "m0", "activation",
                      "phi_scale", "phi_slope", "tile", "M_out", "Z_out", "DM_out", "KM_out"),
    "recur_backward": ("dM", "W0m", "Wh", "Wo", "kappa_m", "c_m", "m0", "M", "Z", "DM", "activation",
                       "phi_scale", "phi_slope", "tile", "carry", "dZ_out", "dO_out", "gkappa_out", "gc_out",
                       "act_out"),
    "batch_tile": ("B",),
}

# The ELM Network's kernel modules (the external synapses are routed as the single neuron's are).
NETWORK_REQUIRED = {
    "route_forward": REQUIRED["route_forward"],
    "route_weight_grad": REQUIRED["route_weight_grad"],
    "route_input_grad": REQUIRED["route_input_grad"],
    "network_forward": ("E", "kappa_b", "rec_ptr", "rec_i", "rec_k", "rec_src", "rec_w", "W_in", "c_in", "W_hid",
                        "c_hid", "W_out", "c_out", "kappa_m", "c_m", "w_o", "c_o", "b0", "m0", "o0", "activation",
                        "phi_scale", "phi_slope", "A0_out", "Z_out", "DM_out", "M_out", "O_out", "b_out"),
    "network_backward": ("dO", "kappa_b", "rec_ptr", "rec_i", "rec_k", "rec_src", "rec_w", "src_ptr", "src_entry",
                         "W_in", "W_hid", "W_out", "kappa_m", "c_m", "w_o", "m0", "A0", "Z", "DM", "M", "activation",
                         "phi_scale", "phi_slope", "GB_out", "dZ_out", "dP_out", "GO_out", "act_out", "gkappa_out",
                         "gc_out", "carry_b", "carry_m", "carry_o"),
    "neuron_weight_grad": ("G", "A", "t0", "t1", "out", "bias_out"),
    "recurrent_weight_grad": ("GB", "O", "o0", "rec_i", "rec_k", "rec_src", "partial_out"),
    "rows_product": ("A", "Bt", "bias", "out"),
    "rows_transposed_product": ("A", "G", "out"),
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
    # The recurrence for inference and streaming keeps no cache: it writes m_t, not the backward's
    # z, Δm and κ_m ⊙ m_{t−1} of every step.
    "forward_without_cache": {
        "recur_forward_without_cache": REQUIRED["recur_forward"][:13] + ("num_hidden_layers", "M_out"),
    },
}


NETWORK_CAPABILITY_FUNCTIONS = {
    # The backward walk over one time block sums the MLP's, w_o's and the recurrent synapses'
    # weight gradients itself, instead of writing ∂z, act(z), ∂(pre-φ) and ∂o for
    # neuron_weight_grad to read back, and g_b for recurrent_weight_grad.
    "weight_grads_in_walk": {
        "network_backward_block": NETWORK_REQUIRED["network_backward"][:23] + (
            "t0", "t1", "O", "o0", "GB_out", "gkappa_out", "gc_out", "carry_b", "carry_m", "carry_o", "grad_W_in",
            "grad_c_in", "grad_W_hid", "grad_c_hid", "grad_W_out", "grad_c_out", "grad_w_o", "grad_c_o", "grad_w_rec"),
    },
    # The forward walk for inference and streaming keeps no cache: it writes the outputs and
    # the last state, not a_0, z, Δm and m of every step.
    "forward_without_cache": {
        "network_forward_without_cache": NETWORK_REQUIRED["network_forward"][:23] + (
            "num_hidden_layers", "O_out", "b_out", "m_out"),
    },
}

# family -> (required functions, capability -> its functions).
FAMILIES = {
    "neuron": (REQUIRED, CAPABILITY_FUNCTIONS),
    "network": (NETWORK_REQUIRED, NETWORK_CAPABILITY_FUNCTIONS),
}


def capabilities(module):
    """The optional capabilities ``module`` declares (its ``CAPABILITIES`` set; none without one)."""
    declared = getattr(module, "CAPABILITIES", None)
    return frozenset(declared) if isinstance(declared, (set, frozenset)) else frozenset()


def _parameters(function):
    target = getattr(function, "py_func", function)  # a Numba dispatcher's Python function
    return tuple(inspect.signature(target).parameters)


def problems(module, family="neuron"):
    """Every way ``module`` departs from its family's contract, one sentence each (empty when it keeps it).

    family  "neuron" (``backend.kernels``) or "network" (``backend.network_kernels``).
    """
    if family not in FAMILIES:
        raise ELMError(f"unknown model family {family!r}: one of {', '.join(FAMILIES)}")
    required, optional = FAMILIES[family]
    name = getattr(module, "__name__", repr(module))
    found = []
    if not isinstance(getattr(module, "CAPABILITIES", None), (frozenset, set)):
        found.append(f"{name} declares no CAPABILITIES set")
    unknown = capabilities(module) - set(optional)
    if unknown:
        found.append(f"{name} declares unknown capabilities {sorted(unknown)}")
    wanted = dict(required)
    for capability in capabilities(module) & set(optional):
        wanted.update(optional[capability])
    for function, params in wanted.items():
        provided = getattr(module, function, None)
        if not callable(provided):
            found.append(f"{name} lacks {function}")
        elif _parameters(provided) != params:
            found.append(f"{name}.{function} takes ({', '.join(_parameters(provided))}), "
                         f"the contract says ({', '.join(params)})")
    return found


def check(module, family="neuron"):
    """Raise ELMError naming every departure of ``module`` from its family's contract."""
    found = problems(module, family)
    if found:
        raise ELMError("kernel contract broken: " + "; ".join(found))
    return module
