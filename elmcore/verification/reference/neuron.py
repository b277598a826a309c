"""The single neuron (``elm_v1``, ``branch_elm_v2``) in plain NumPy, forward and backward.

This file is meant to be read beside docs/spec.md §3–§4 (the model) and docs/gradients.md
§2–§6 (every backward formula). It follows the math, not the engine's cut: v1 keeps one
trace per synapse and sums them per branch, whatever τ_s holds, and every time walk is one
Python loop over t with one statement per line of the derivation. Each backward line
carries the step letter and formula of docs/gradients.md. Weight gradients are summed
inside the walk as each step's term appears, which is what §4's GEMMs over all B·T rows add up.

The stages, forward and backward side by side:

    routing    x̃_t[j] = X_t[idx[j]]·mask[j], v_t[j] = w_s[j]·x̃_t[j]       (spec §3)
    scan       v1: s_t = κ_s ⊙ s_{t−1} + v_t, u_t[k] = Σ_{j∈k} s_t[j]       (spec §4)
               v2: b_t = κ_b ⊙ b_{t−1} + Σ_{j∈k} v_t[j],  u_t = b_t
    recurrence Δm_t = φ(MLP([u_t ; κ_m ⊙ m_{t−1}])), m_t = κ_m ⊙ m_{t−1} + c_m ⊙ Δm_t
    readout    y_t = W_y m_t + b_y

Shapes: B batch, T steps, D inputs, S synapses, nb branches, Dm memory units, H hidden
width, L hidden layers. Everything is float64 unless ``dtype`` says otherwise.

The trace (a dict) that ``forward`` returns holds, besides the inputs:

    "X" [B,T,D], "x_syn" [B,T,S] (x̃), "s" [B,T,S] (v1) or "b" [B,T,nb] (v2), "u" [B,T,nb],
    "mlp_input" [B,T,nb+Dm] ([u_t ; κ_m ⊙ m_{t−1}]), "z" and "a" (L arrays [B,T,H]: z_l and
    act(z_l)), "o" [B,T,Dm] (the MLP's output), "dm" [B,T,Dm] (Δm_t), "m" [B,T,Dm], "Y" [B,T,K],
    "state0" (the state before step 0: {"m": [B,Dm], "s": [B,S] or "b": [B,nb]}) and
    "derived" ({"w_s", "kappa_in" (κ_s or κ_b), "tau_m", "kappa_m", "kappa_lambda", "c_m"}).

``backward`` adds the adjoints ∂loss/∂(·) to it:

    "adjoint_m" [B,T,Dm]   ∂loss/∂m_t, through y_t and every later step (g of step (a))
    "adjoint_o" [B,T,Dm]   ∂loss/∂o_t (step (c))
    "adjoint_z"            L arrays [B,T,H]: ∂loss/∂z_l (step (d))
    "adjoint_u" [B,T,nb]   ∂loss/∂u_t (§6, the first layer's branch columns)
    "adjoint_s" [B,T,S] (v1) or "adjoint_b" [B,T,nb] (v2): ∂loss/∂s_t or ∂loss/∂b_t (§6 dA)
    "adjoint_state0"       ∂loss/∂(state before step 0), keyed like "state0"
"""

import numpy as np

from elmcore.neuron import params as P
from elmcore.verification.reference.common import (activate, activation_slope, check_inputs, check_output_grad,
                                                   check_state, decay, memory_constants, phi, phi_slope_from_output,
                                                   proto_tau_m_grad)


def _branch_sum(v, branches):
    """[..., S] → [..., nb]: the sum over the synapses of each branch (synapses are grouped branch by branch)."""
    return v.reshape(v.shape[:-1] + (branches, -1)).sum(-1)


def _scan_key(config):
    return "b" if config.is_v2 else "s"


# ---- routing: spec §3; gradients.md §1 "Routing as a sparse map", §6 -----------------------------

def routing_forward(X, idx, mask, w_s):
    """x̃ [B,T,S] and each synapse's weighted input v = w_s ⊙ x̃."""
    x_syn = X[:, :, idx] * mask                               # x̃_t[j] = X_t[idx[j]]·mask[j]
    return x_syn, w_s * x_syn                                 # v_t[j] = w_s[j]·x̃_t[j]


def routing_backward(dv, x_syn, idx, mask, w_s, proto_w_s, num_input):
    """∂loss/∂_proto_w_s and ∂loss/∂X from dv = ∂loss/∂v [B,T,S]."""
    # §6 routing → w_s: ∂loss/∂w_s[j] = Σ_{b,t} x̃[b,t,j]·dA[b,t,ch(j)]  (dv is dA seen by synapse j)
    d_w_s = np.einsum("btj,btj->j", dv, x_syn)
    # §6 the relu on w_s: the gradient passes only where _proto_w_s > 0
    d_proto_w_s = d_w_s * (proto_w_s > 0)
    # §6 input gradient: dX[b,t,i] = Σ_{synapses j reading i} w_s[j]·mask[j]·dA[b,t,ch(j)]
    dX = np.zeros(dv.shape[:2] + (num_input,), dv.dtype)
    np.add.at(dX, (slice(None), slice(None), idx), dv * (w_s * mask))
    return d_proto_w_s, dX


# ---- the leaky scan: spec §4; gradients.md §1 "The per-branch scan", §6 "Reverse scan" -------------

def scan_forward(config, v, kappa, state0):
    """u [B,T,nb] and the scan's own trace: s [B,T,S] (v1) or b [B,T,nb] (v2)."""
    T = v.shape[1]
    # v1 integrates each synapse; v2 sums each branch's synapses first: A_t[k] = Σ_{j∈k} w_s[j]·x̃_t[j]
    inflow = _branch_sum(v, config.branches) if config.is_v2 else v
    trace = np.empty_like(inflow)
    previous = state0
    for t in range(T):
        trace[:, t] = kappa * previous + inflow[:, t]         # v1: s_t = κ_s ⊙ s_{t−1} + w_s ⊙ x̃_t
        previous = trace[:, t]                                # v2: b_t = κ_b ⊙ b_{t−1} + A_t
    u = trace if config.is_v2 else _branch_sum(trace, config.branches)   # v1: u_t[k] = Σ_{j∈k} s_t[j]
    return u, trace


def scan_backward(config, du, kappa):
    """dv [B,T,S], the scan trace's adjoint and the adjoint of the state before step 0, from du = ∂loss/∂u."""
    T = du.shape[1]
    spb = config.num_synapse_per_branch
    # §6 v1: u[k] = Σ_{j∈k} s[j], so every synapse trace of branch k receives dU[k]
    d_direct = du if config.is_v2 else np.repeat(du, spb, axis=2)
    d_trace = np.empty_like(d_direct)
    later = np.zeros_like(d_direct[:, 0])
    for t in range(T - 1, -1, -1):
        d_trace[:, t] = d_direct[:, t] + kappa * later        # §6 dA_t = dU_t + κ_c ⊙ dA_{t+1},  dA_T = 0
        later = d_trace[:, t]
    d_state0 = kappa * later                                  # §6 ∂loss/∂u0 = κ_c ⊙ dA_0
    # v2: each synapse of branch k adds its v_t[j] into A_t[k], so it receives dA[k]
    dv = np.repeat(d_trace, spb, axis=2) if config.is_v2 else d_trace
    return dv, d_trace, d_state0


# ---- the MLP and the memory: gradients.md §1 "The MLP and the memory", §3, §4 -----------------------

def recurrence_forward(config, layers, constants, u, m0):
    """Walk t = 0 … T−1; returns the per-step arrays the backward needs (keys as in the trace)."""
    B, T, nb = u.shape
    L, H, Dm, act = config.mlp_num_layers, config.hidden_size, config.num_memory, config.mlp_activation
    kappa_m, c_m = constants["kappa_m"], constants["c_m"]
    dt = u.dtype
    mlp_input = np.empty((B, T, nb + Dm), dt)
    z = [np.empty((B, T, H), dt) for _ in range(L)]
    a = [np.empty((B, T, H), dt) for _ in range(L)]
    o, dm, m = (np.empty((B, T, Dm), dt) for _ in range(3))
    m_prev = m0
    for t in range(T):
        mlp_input[:, t] = np.concatenate([u[:, t], kappa_m * m_prev], axis=1)   # A0_t = [u_t │ κ_m ⊙ m_{t−1}]
        h = mlp_input[:, t]
        for l in range(L):
            W, c = layers[l]
            z[l][:, t] = h @ W.T + c                          # z_0 = W0 A0_t + c_0;  z_l = W_l a_{l−1} + c_l
            a[l][:, t] = activate(z[l][:, t], act)            # a_l = act(z_l)
            h = a[l][:, t]
        W, c = layers[L]
        o[:, t] = h @ W.T + c                                 # o = W_o a_{L−1} + c_o   (L = 0: o = z_0)
        dm[:, t] = phi(o[:, t])                               # Δm_t = φ(o)
        m[:, t] = kappa_m * m_prev + c_m * dm[:, t]           # m_t = κ_m ⊙ m_{t−1} + c_m ⊙ Δm_t
        m_prev = m[:, t]
    return dict(mlp_input=mlp_input, z=z, a=a, o=o, dm=dm, m=m)


def recurrence_backward(config, layers, constants, fw, m0, dM):
    """Walk t = T−1 … 0 (§3 (a)–(f)); returns the MLP's weight gradients, du, Σ gk, Σ gc and the adjoints."""
    B, T, Dm = dM.shape
    nb, L, act = config.branches, config.mlp_num_layers, config.mlp_activation
    kappa_m, c_m = constants["kappa_m"], constants["c_m"]
    W0 = layers[0][0]
    W0b, W0m = W0[:, :nb], W0[:, nb:]
    dW = [np.zeros_like(W) for W, _ in layers]
    dc = [np.zeros_like(c) for _, c in layers]
    gk = np.zeros(Dm, dM.dtype)
    gc = np.zeros(Dm, dM.dtype)
    du = np.empty((B, T, nb), dM.dtype)
    adjoint_m = np.empty_like(dM)
    adjoint_o = np.empty_like(dM)
    adjoint_z = [np.empty_like(z) for z in fw["z"]]
    carry = np.zeros((B, Dm), dM.dtype)                       # ∂loss/∂m_t through steps > t: none after T−1
    for t in range(T - 1, -1, -1):
        m_prev = fw["m"][:, t - 1] if t > 0 else m0
        dm_t = fw["dm"][:, t]
        # (a) g = dM_t + carry: m_t reaches the loss through y_t and through step t+1
        g = dM[:, t] + carry
        # (b) gc += g ⊙ Δm_t  (∂/∂c_m, summed over batch and time)
        gc += (g * dm_t).sum(0)
        # (c) do = g ⊙ c_m ⊙ φ'(o),  φ'(o) = s·k·(1 − (Δm/s)²)
        do = g * c_m * phi_slope_from_output(dm_t)
        # (d) da = W_oᵀ do; for l = L−1 … 0: dz_l = da ⊙ act'(z_l), da = W_lᵀ dz_l   (L = 0: dz0 = do)
        #     §4 on the way: dW_l += (∂loss/∂ layer l's output)ᵀ (its input), dc_l += Σ_rows of the same
        d_out = do
        for l in range(L, 0, -1):
            dW[l] += d_out.T @ fw["a"][l - 1][:, t]           # §4 dW_l += dz_lᵀ act(z_{l−1})  (l = L: doᵀ)
            dc[l] += d_out.sum(0)
            da = d_out @ layers[l][0]                         # da = W_lᵀ dz_l   (l = L: W_oᵀ do)
            d_out = da * activation_slope(fw["z"][l - 1][:, t], act)   # dz_{l−1} = da ⊙ act'(z_{l−1})
            adjoint_z[l - 1][:, t] = d_out
        dz0 = d_out
        dW[0] += dz0.T @ fw["mlp_input"][:, t]                # §4 dW_0 += dz0ᵀ A0_t,  A0 = [U │ κ_m ⊙ M_prev]
        dc[0] += dz0.sum(0)
        # (e) r = W0mᵀ dz0: the gradient of the MLP's memory input κ_m ⊙ m_{t−1}
        r = dz0 @ W0m
        # §6 the first layer's branch columns: dU_t = W0bᵀ dz0
        du[:, t] = dz0 @ W0b
        # (f) both uses of κ_m ⊙ m_{t−1}: gk += (g + r) ⊙ m_{t−1},  carry = κ_m ⊙ (g + r)
        total = g + r
        gk += (total * m_prev).sum(0)
        carry = kappa_m * total
        adjoint_m[:, t] = g
        adjoint_o[:, t] = do
    adjoints = dict(adjoint_m=adjoint_m, adjoint_o=adjoint_o, adjoint_z=adjoint_z, adjoint_u=du)
    return dW, dc, du, gk, gc, adjoints, carry


# ---- the readout: gradients.md §1 "Readout", §2 -----------------------------------------------------

def readout_forward(m, W_y, b_y):
    return m @ W_y.T + b_y                                    # y_t = W_y m_t + b_y


def readout_backward(dY, m, W_y):
    d_W_y = np.einsum("btk,btd->kd", dY, m)                   # §2 dW_y = dY2ᵀ M
    d_b_y = dY.sum((0, 1))                                    # §2 db_y = Σ_rows dY2
    dM = dY @ W_y                                             # §2 dM = dY2 W_y
    return d_W_y, d_b_y, dM


# ---- the whole model ----------------------------------------------------------------------------------

def zero_state(config, batch, dtype=np.float64):
    """The state before step 0 when training: zeros, keyed like the trace ("m" and "s" or "b")."""
    width = config.branches if config.is_v2 else config.num_synapse
    return {"m": np.zeros((batch, config.num_memory), dtype), _scan_key(config): np.zeros((batch, width), dtype)}


def _routing(config, p, dtype):
    """idx and mask of every synapse (the identity and ones without routing)."""
    if config.input_to_synapse_routing is None:
        return np.arange(config.num_input), np.ones(config.num_synapse, dtype)
    return p["input_to_synapse_indices"], p["valid_indices_mask"].astype(dtype)


def _layers(config, p):
    return [(p[wk], p[bk]) for wk, bk in P.mlp_layer_keys(config.mlp_num_layers)]


def _derived(config, p):
    d = dict(w_s=np.maximum(p["_proto_w_s"], 0),                                    # w_s = relu(_proto_w_s)
             kappa_in=decay(p[P.input_tau_key(config)], config.delta_t))            # κ_s (v1) or κ_b (v2)
    d.update(memory_constants(config, p["_proto_tau_m"], version_1=not config.is_v2))
    return d


def forward(config, params, X, state=None, dtype=np.float64):
    """Y [B,T,K] and the trace (see the module docstring) for inputs X [B,T,D].

    ``params``: a state_dict (release keys, as ``model.state_dict()`` returns); ``state``: the
    state before step 0, {"m": [B,Dm], "s": [B,S] (v1) or "b": [B,nb] (v2)}, zeros if None.
    """
    p = P.check_params(config, params, dtype, source="reference parameters")
    X = check_inputs(config, X, dtype)
    state0 = check_state(state, zero_state(config, X.shape[0], dtype))
    d = _derived(config, p)
    idx, mask = _routing(config, p, dtype)
    x_syn, v = routing_forward(X, idx, mask, d["w_s"])
    u, scan_trace = scan_forward(config, v, d["kappa_in"], state0[_scan_key(config)])
    fw = recurrence_forward(config, _layers(config, p), d, u, state0["m"])
    Y = readout_forward(fw["m"], p["w_y.weight"], p["w_y.bias"])
    trace = dict(X=X, x_syn=x_syn, u=u, Y=Y, state0=state0, derived=d, **fw)
    trace[_scan_key(config)] = scan_trace
    return Y, trace


def backward(config, params, trace, dY):
    """∂loss/∂θ for every trainable key plus "X", given dY = ∂loss/∂Y [B,T,K] and ``forward``'s trace.

    The keys and their order are ``model.backward(dY, cache, input_grad=True)``'s. The adjoints
    (module docstring) are added to ``trace``.
    """
    dtype = trace["X"].dtype
    p = P.check_params(config, params, dtype, source="reference parameters")
    dY = check_output_grad(config, dY, trace["X"])
    d = trace["derived"]
    layers = _layers(config, p)
    grads = {}
    grads["w_y.weight"], grads["w_y.bias"], dM = readout_backward(dY, trace["m"], p["w_y.weight"])
    dW, dc, du, gk, gc, adjoints, d_m0 = recurrence_backward(config, layers, d, trace, trace["state0"]["m"], dM)
    for (wk, bk), g_w, g_c in zip(P.mlp_layer_keys(config.mlp_num_layers), dW, dc):
        grads[wk], grads[bk] = g_w, g_c
    dv, d_scan, d_scan0 = scan_backward(config, du, d["kappa_in"])
    idx, mask = _routing(config, p, dtype)
    grads["_proto_w_s"], grads["X"] = routing_backward(dv, trace["x_syn"], idx, mask, d["w_s"], p["_proto_w_s"],
                                                       config.num_input)
    if config.learn_memory_tau:
        grads["_proto_tau_m"] = proto_tau_m_grad(config, p["_proto_tau_m"], d, gk, gc, version_1=not config.is_v2)
    key = _scan_key(config)
    trace.update(adjoints)
    trace["adjoint_" + key] = d_scan
    trace["adjoint_state0"] = {"m": d_m0, key: d_scan0}
    return {k: grads[k] for k in P.trainable_keys(config) + ["X"]}
