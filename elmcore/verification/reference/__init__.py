"""A plain NumPy reference of both model families, forward and backward (rung 1b of the
verification ladder, docs/architecture.md §4).

The engine's time walks are fused, tiled kernels. This package computes the same numbers
the readable way: one Python loop over time per stage, float64, one statement per line of
docs/gradients.md, each labelled with its step letter. ``neuron.py`` holds the single
neuron (v1 and v2), ``network.py`` the ELM Network; their module docstrings list every
array of the trace, adjoints included.

    from elmcore.verification import reference
    Y, trace = reference.forward(model.config, model.state_dict(), X)
    grads = reference.backward(model.config, model.state_dict(), trace, dY)   # model.backward's keys + "X"
    trace["adjoint_m"]                       # the neuron's ∂loss/∂m_t [B,T,Dm]
    trace["layers.0.adjoint_o"]              # a network layer's ∂loss/∂o_t [B,T,N]

It is slow (Python steps over time), and meant for reading, checking and plotting, not training.
"""

import numpy as np

from elmcore.verification.reference import network, neuron


def _family(config):
    return network if getattr(config, "is_network", False) else neuron


def zero_state(config, batch, dtype=np.float64):
    """The state before step 0 when training (all zeros), in the keys ``forward``'s ``state`` takes."""
    return _family(config).zero_state(config, batch, dtype)


def forward(config, params, X, state=None, dtype=np.float64):
    """Y [B,T,K] and the trace of inputs X [B,T,D] through the model ``config`` with ``params``.

    ``params`` is a state_dict (as ``model.state_dict()`` returns); ``state`` the state before
    step 0 (keys as ``zero_state``), zeros when None.
    """
    return _family(config).forward(config, params, X, state, dtype)


def backward(config, params, trace, dY):
    """∂loss/∂θ for every trainable key and "X" (the keys of ``model.backward(..., input_grad=True)``),
    given dY = ∂loss/∂Y and ``forward``'s trace; adds the per-step adjoints to ``trace``."""
    return _family(config).backward(config, params, trace, dY)


def gradients(model, X, dY, state=None):
    """(Y, grads, trace) of ``forward`` and ``backward`` on ``model``'s config and parameters, in float64."""
    params = model.state_dict()
    Y, trace = forward(model.config, params, X, state)
    return Y, backward(model.config, params, trace, dY), trace
