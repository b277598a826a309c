"""The ELM Network (``elm_network``) in plain NumPy, forward and backward.

Read it beside docs/spec.md §7.3 (the dynamics) and the "ELM Network" part of
docs/gradients.md, whose step letters (a)–(f) label the backward walk. It follows the
spec's definition, not the engine's cut: each synapse reads its value from the pool
[x_t ; o_{t−1}] (external inputs and the layer's own previous outputs alike), and each
layer is one Python loop over t. Weight gradients are summed inside the walk as each
step's term appears.

Per layer, the stages of one step:

    synapses   pool_t = [x_t ; o_{t−1}],  x_syn[i,s] = pool_t[src[i,s]]
    branches   b_t = κ_b ⊙ b_{t−1} + E_t + R_t,  (E_t + R_t)[i,k] = Σ_{s∈k} w_s[i,s]·x_syn[i,s]
    MLP        A0_t = [b_t ; κ_m ⊙ m_{t−1}],  z_l = W_l a_{l−1} + c_l,  a_l = act(z_l),  p_t = W_L a_{L−1} + c_L
    memory     Δm_t = φ(p_t),  m_t = κ_m ⊙ m_{t−1} + c_m ⊙ Δm_t   (c_m = 1 − κ_λ)
    output     o_t = w_o · m_t + c_o
and the readout of the last layer, y_t = W_r o_t + b_r. Layer ℓ + 1 reads layer ℓ's o.

Shapes follow the spec (neuron axis before the per-neuron axis): B batch, T steps, D_ℓ the
layer's inputs, N neurons, k_c synapses, nb branches, Dm memory, H hidden width, L hidden
layers. Everything is float64 unless ``dtype`` says otherwise.

The trace (a dict) that ``forward`` returns holds "X", "Y" [B,T,K], "state0" (the state
before step 0, keyed "layers.ℓ.b" [B,N,nb], "layers.ℓ.m" [B,N,Dm], "layers.ℓ.o" [B,N]) and,
for each layer ℓ, under "layers.ℓ.<name>":

    x [B,T,D_ℓ] (its input), x_syn [B,T,N,k_c], b [B,T,N,nb], mlp_input [B,T,N,nb+Dm],
    z and a (L arrays [B,T,N,H]), p [B,T,N,Dm] (pre-φ), dm [B,T,N,Dm] (Δm), m [B,T,N,Dm],
    o [B,T,N], derived ({"kappa_b", "tau_m", "kappa_m", "kappa_lambda", "c_m"}).

``backward`` adds, for each layer ℓ, the adjoints ∂loss/∂(·) under "layers.ℓ.<name>":

    adjoint_o [B,T,N]     ∂loss/∂o_t, through the next layer (or the readout) and the
                          recurrent synapses of step t + 1 (go of step (a))
    adjoint_m [B,T,N,Dm]  ∂loss/∂m_t, through o_t and step t + 1 (g of step (b))
    adjoint_p [B,T,N,Dm]  ∂loss/∂p_t (dp of step (b))
    adjoint_z             L arrays [B,T,N,H]: ∂loss/∂z_l (step (c))
    adjoint_b [B,T,N,nb]  ∂loss/∂b_t (g_b of step (e))
    adjoint_x [B,T,D_ℓ]   ∂loss/∂(the layer's input)
and "adjoint_state0", keyed like "state0".
"""

import numpy as np

from elmcore.network import params as NP
from elmcore.verification.reference.common import (activate, activation_slope, check_inputs, check_output_grad,
                                                   check_state, decay, memory_constants, phi, phi_slope_from_output,
                                                   proto_tau_m_grad)


def _dense(W, h, c):
    """Every neuron's own affine layer: out[b,i,o] = Σ_j W[i,o,j]·h[b,i,j] + c[i,o]."""
    return np.einsum("noj,bnj->bno", W, h) + c


def _dense_transposed(W, d_out):
    """Wᵀ d_out per neuron: ∂loss/∂(the layer's input) from ∂loss/∂(its output)."""
    return np.einsum("noj,bno->bnj", W, d_out)


def _outer_sum(d_out, h):
    """Σ_rows d_out ⊗ h per neuron: the weight gradient [N,out,in] of one step."""
    return np.einsum("bno,bnj->noj", d_out, h)


# ---- one layer ---------------------------------------------------------------------------------------

def layer_forward(config, lp, x, state0):
    """Walk t = 0 … T−1 through one layer; ``lp`` maps the layer's keys without the "layers.ℓ." prefix."""
    B, T, _ = x.shape
    N, nb, spb, Dm = config.num_neurons, config.num_branch, config.num_synapse_per_branch, config.num_memory
    L, H, act = config.mlp_num_layers, config.hidden_size, config.mlp_activation
    src, w_s, w_o, c_o = lp["synapse_source"], lp["w_s"], lp["w_o.weight"], lp["w_o.bias"]
    mlp = [(lp[f"mlp.{j}.weight"], lp[f"mlp.{j}.bias"]) for j in range(L + 1)]
    derived = dict(kappa_b=decay(lp["tau_b"], config.delta_t))                # κ_b = exp(−Δt / max(τ_b, 1e-6))
    derived.update(memory_constants(config, lp["_proto_tau_m"], version_1=False))
    kappa_b, kappa_m, c_m = derived["kappa_b"], derived["kappa_m"], derived["c_m"]
    dt = x.dtype
    x_syn = np.empty((B, T, N, config.num_synapse), dt)
    b = np.empty((B, T, N, nb), dt)
    mlp_input = np.empty((B, T, N, nb + Dm), dt)
    z = [np.empty((B, T, N, H), dt) for _ in range(L)]
    a = [np.empty((B, T, N, H), dt) for _ in range(L)]
    p, dm, m = (np.empty((B, T, N, Dm), dt) for _ in range(3))
    o = np.empty((B, T, N), dt)
    b_prev, m_prev, o_prev = state0["b"], state0["m"], state0["o"]
    for t in range(T):
        pool = np.concatenate([x[:, t], o_prev], axis=1)                      # pool_t = [x_t ; o_{t−1}]
        x_syn[:, t] = pool[:, src]                                            # synapse s of neuron i reads src[i,s]
        inflow = (w_s * x_syn[:, t]).reshape(B, N, nb, spb).sum(-1)           # E_t + R_t = Σ_{s∈k} w_s·x_syn
        b[:, t] = kappa_b * b_prev + inflow                                   # b_t = κ_b ⊙ b_{t−1} + E_t + R_t
        mlp_input[:, t] = np.concatenate([b[:, t], kappa_m * m_prev], axis=2)  # A0_t = [b_t ; κ_m ⊙ m_{t−1}]
        h = mlp_input[:, t]
        for l in range(L):
            z[l][:, t] = _dense(mlp[l][0], h, mlp[l][1])                      # z_l = W_l a_{l−1} + c_l
            a[l][:, t] = activate(z[l][:, t], act)                            # a_l = act(z_l)
            h = a[l][:, t]
        p[:, t] = _dense(mlp[L][0], h, mlp[L][1])                             # p_t = W_L a_{L−1} + c_L
        dm[:, t] = phi(p[:, t])                                               # Δm_t = φ(p_t)
        m[:, t] = kappa_m * m_prev + c_m * dm[:, t]                           # m_t = κ_m ⊙ m_{t−1} + c_m ⊙ Δm_t
        o[:, t] = (w_o * m[:, t]).sum(-1) + c_o                               # o_t = w_o · m_t + c_o
        b_prev, m_prev, o_prev = b[:, t], m[:, t], o[:, t]
    return dict(x=x, x_syn=x_syn, b=b, mlp_input=mlp_input, z=z, a=a, p=p, dm=dm, m=m, o=o, derived=derived)


def layer_backward(config, lp, fw, state0, dO):
    """Walk t = T−1 … 0 through one layer (steps (a)–(f)), given dO = ∂loss/∂o from outside the layer.

    Returns the layer's gradients (keys without the prefix), ∂loss/∂x, the adjoints and the
    adjoint of the state before step 0.
    """
    x, x_syn, mlp_input, dm, m = fw["x"], fw["x_syn"], fw["mlp_input"], fw["dm"], fw["m"]
    B, T, D = x.shape
    N, nb, spb, Dm = config.num_neurons, config.num_branch, config.num_synapse_per_branch, config.num_memory
    L, act = config.mlp_num_layers, config.mlp_activation
    src, w_s, w_o = lp["synapse_source"], lp["w_s"], lp["w_o.weight"]
    mlp = [(lp[f"mlp.{j}.weight"], lp[f"mlp.{j}.bias"]) for j in range(L + 1)]
    kappa_b, kappa_m, c_m = (fw["derived"][k] for k in ("kappa_b", "kappa_m", "c_m"))
    dt = x.dtype
    d_w_s = np.zeros_like(w_s)
    dW = [np.zeros_like(W) for W, _ in mlp]
    dc = [np.zeros_like(c) for _, c in mlp]
    d_w_o = np.zeros_like(w_o)
    d_c_o = np.zeros(N, dt)
    gk = np.zeros((N, Dm), dt)
    gc = np.zeros((N, Dm), dt)
    dx = np.empty_like(x)
    adj = dict(adjoint_o=np.empty((B, T, N), dt), adjoint_m=np.empty_like(m), adjoint_p=np.empty_like(m),
               adjoint_z=[np.empty_like(z) for z in fw["z"]], adjoint_b=np.empty_like(fw["b"]))
    # Carried from step t + 1 into step t, all zero at t = T − 1:
    carry_o = np.zeros((B, N), dt)        # ∂loss/∂o_t through the recurrent synapses of step t + 1
    carry_m = np.zeros((B, N, Dm), dt)    # κ_m ⊙ (g_{t+1} + r_{t+1}): ∂loss/∂m_t through step t + 1
    carry_b = np.zeros((B, N, nb), dt)    # g_b(t + 1): ∂loss/∂b_{t+1}
    for t in range(T - 1, -1, -1):
        m_prev = m[:, t - 1] if t > 0 else state0["m"]
        # (a) go = dO_t + carry_o: o_t reaches the loss through the readout (or the next layer) and R_{t+1}
        go = dO[:, t] + carry_o
        d_w_o += np.einsum("bn,bnj->nj", go, m[:, t])                         # d w_o += go·m_t
        d_c_o += go.sum(0)                                                    # d c_o += go
        # (b) g = w_o ⊙ go + carry_m;  gc += g ⊙ Δm_t;  dp = g ⊙ c_m ⊙ φ'(p_t),  φ' = s·k·(1 − (Δm/s)²)
        g = w_o * go[:, :, None] + carry_m
        gc += (g * dm[:, t]).sum(0)
        dp = g * c_m * phi_slope_from_output(dm[:, t])
        # (c) the per-neuron MLP: da = W_Lᵀ dp; for l = L−1 … 0: dz_l = da ⊙ act'(z_l), da = W_lᵀ dz_l;
        #     da_0 = W_0ᵀ dz_0 (L = 0: W_0ᵀ dp); weight gradients d W_l += (output gradient) ⊗ (input)
        d_out = dp
        for l in range(L, 0, -1):
            dW[l] += _outer_sum(d_out, fw["a"][l - 1][:, t])                  # d W_l += dz_l ⊗ a_{l−1}  (l = L: dp)
            dc[l] += d_out.sum(0)
            da = _dense_transposed(mlp[l][0], d_out)                          # da = W_lᵀ dz_l
            d_out = da * activation_slope(fw["z"][l - 1][:, t], act)          # dz_{l−1} = da ⊙ act'(z_{l−1})
            adj["adjoint_z"][l - 1][:, t] = d_out
        dW[0] += _outer_sum(d_out, mlp_input[:, t])                           # d W_0 += dz_0 ⊗ A0_t
        dc[0] += d_out.sum(0)
        da0 = _dense_transposed(mlp[0][0], d_out)                             # da_0 = W_0ᵀ dz_0
        # (d) total = g + r, r = da_0[nb:];  gk += total ⊙ m_{t−1};  carry_m = κ_m ⊙ total
        total = g + da0[:, :, nb:]
        gk += (total * m_prev).sum(0)
        carry_m = kappa_m * total
        # (e) g_b(t) = da_0[:nb] + κ_b ⊙ g_b(t+1)
        gb = da0[:, :, :nb] + kappa_b * carry_b
        carry_b = gb
        # w_s: d w_s[i,s] += g_b(t)[i,k(s)]·x_syn[i,s]  (external: x_t[src]; recurrent: o_{t−1}[src − D])
        gb_syn = np.repeat(gb, spb, axis=2)                                   # each synapse's branch gradient
        d_w_s += (gb_syn * x_syn[:, t]).sum(0)
        # (f) and the input: each synapse hands w_s[i,s]·g_b(t)[i,k(s)] back to the pool entry it read
        d_pool = np.zeros((B, D + N), dt)
        np.add.at(d_pool, (slice(None), src), w_s * gb_syn)
        dx[:, t] = d_pool[:, :D]              # dX[b,t,d] = Σ_{external (i,s) reading d} w_s[i,s]·g_b(t)[i,k(s)]
        carry_o = d_pool[:, D:]               # (f) do_{t−1}[j] = Σ_{recurrent e reading j} w_e·g_b(t)[i_e,k_e]
        adj["adjoint_o"][:, t] = go
        adj["adjoint_m"][:, t] = g
        adj["adjoint_p"][:, t] = dp
        adj["adjoint_b"][:, t] = gb
    grads = {"w_s": d_w_s, "w_o.weight": d_w_o, "w_o.bias": d_c_o}
    for j in range(L + 1):
        grads[f"mlp.{j}.weight"], grads[f"mlp.{j}.bias"] = dW[j], dc[j]
    if config.learn_memory_tau:
        grads["_proto_tau_m"] = proto_tau_m_grad(config, lp["_proto_tau_m"], fw["derived"], gk, gc, version_1=False)
    adj["adjoint_x"] = dx
    d_state0 = {"b": kappa_b * carry_b, "m": carry_m, "o": carry_o}
    return grads, dx, adj, d_state0


# ---- the whole network ---------------------------------------------------------------------------------

def zero_state(config, batch, dtype=np.float64):
    """The state before step 0 when training: zeros for every layer's b, m and o."""
    N = config.num_neurons
    state = {}
    for layer in range(config.num_layers):
        pre = NP.layer_prefix(layer)
        state[pre + "b"] = np.zeros((batch, N, config.num_branch), dtype)
        state[pre + "m"] = np.zeros((batch, N, config.num_memory), dtype)
        state[pre + "o"] = np.zeros((batch, N), dtype)
    return state


def _layer_params(p, layer):
    pre = NP.layer_prefix(layer)
    return {k[len(pre):]: v for k, v in p.items() if k.startswith(pre)}


def _layer_state(state, layer):
    pre = NP.layer_prefix(layer)
    return {k: state[pre + k] for k in ("b", "m", "o")}


def forward(config, params, X, state=None, dtype=np.float64):
    """Y [B,T,K] and the trace (module docstring) for inputs X [B,T,D].

    ``params``: a state_dict (as ``model.state_dict()`` returns); ``state``: the state before
    step 0 keyed like ``zero_state``, zeros if None.
    """
    p = NP.check_params(config, params, dtype, source="reference parameters")
    X = check_inputs(config, X, dtype)
    state0 = check_state(state, zero_state(config, X.shape[0], dtype))
    trace = {"X": X, "state0": state0}
    x = X
    for layer in range(config.num_layers):
        fw = layer_forward(config, _layer_params(p, layer), x, _layer_state(state0, layer))
        trace.update({NP.layer_prefix(layer) + k: v for k, v in fw.items()})
        x = fw["o"]                                                           # layer ℓ + 1 reads layer ℓ's o_t
    Y = x @ p["readout.weight"].T + p["readout.bias"]                         # y_t = W_r o_t + b_r
    trace["Y"] = Y
    return Y, trace


def backward(config, params, trace, dY):
    """∂loss/∂θ for every trainable key plus "X", given dY = ∂loss/∂Y [B,T,K] and ``forward``'s trace.

    The keys and their order are ``model.backward(dY, cache, input_grad=True)``'s. The adjoints
    (module docstring) are added to ``trace``.
    """
    dtype = trace["X"].dtype
    p = NP.check_params(config, params, dtype, source="reference parameters")
    dY = check_output_grad(config, dY, trace["X"])
    last = NP.layer_prefix(config.num_layers - 1)
    grads = {"readout.weight": np.einsum("btk,btn->kn", dY, trace[last + "o"]),   # d readout.weight = dYᵀ O
             "readout.bias": dY.sum((0, 1))}                                       # d readout.bias = Σ_rows dY
    dO = dY @ p["readout.weight"]                                                  # dO = dY W_r
    adjoint_state0 = {}
    for layer in range(config.num_layers - 1, -1, -1):
        pre = NP.layer_prefix(layer)
        fw = {k[len(pre):]: v for k, v in trace.items() if k.startswith(pre)}
        layer_grads, dx, adjoints, d_state0 = layer_backward(config, _layer_params(p, layer), fw,
                                                             _layer_state(trace["state0"], layer), dO)
        grads.update({pre + k: v for k, v in layer_grads.items()})
        trace.update({pre + k: v for k, v in adjoints.items()})
        adjoint_state0.update({pre + k: v for k, v in d_state0.items()})
        dO = dx                                                    # layer ℓ − 1's outputs feed only layer ℓ
    grads["X"] = dO
    trace["adjoint_state0"] = {k: adjoint_state0[k] for k in trace["state0"]}
    return {k: grads[k] for k in NP.trainable_keys(config) + ["X"]}
