"""The ELM Network: recurrent layers of Branch-ELM neurons (docs/spec.md §7), forward and BPTT.

The computation is cut like the single neuron's (docs/architecture.md): what is linear
over all B·T rows runs as one large operation per layer (the external-input part of the
synaptic sums as a sparse routing, the readout as a GEMM, every weight gradient as a
reduction over all rows), and one kernel call walks time forward for the coupled part
(recurrent synapses reading o_{t−1}, the per-neuron MLPs, memory, outputs), one walks
it back (``kernels/network_cpu.py``, ``kernels/network_cuda.py``). Every backward
formula is derived in docs/gradients.md ("ELM Network") with the symbols used here.

Inside the model every per-neuron array is neuron-minor (neurons on the last axis, see
``kernels/network_cpu.py``); parameters, gradients and traces keep the spec's layout.
"""

import dataclasses

import numpy as np

from elmcore.network import params as NP
from elmcore.network.config import NetworkConfig
from elmcore.engine.memory import check_memory
from elmcore.errors import DataError, ELMError
from elmcore.engine.model_base import InputChecks, ParameterBookkeeping, SingleStep, resolve_dtype
from elmcore.neuron.params import PHI_SCALE, PHI_SLOPE, TAU_FLOOR
from elmcore.kernels.pointwise import activation_code


@dataclasses.dataclass
class SynapseMap:
    """One layer's synapses split by what they read (fixed by ``synapse_source``).

    External synapses form a CSR over the layer's inputs, in the routing kernels' format:
    entry e of input d feeds "virtual synapse" ``entry_syn[e]`` = (k·N + i)·spb + s mod spb,
    so ``entry_syn // spb`` is the neuron-minor channel k·N + i of neuron i's branch k.
    Recurrent synapses are entries (rec_i, rec_k, rec_src) grouped by target neuron
    (``rec_ptr``), and listed again by source neuron (``src_ptr``, ``src_entry``) for the
    backward gather.
    ``*_flat`` give each entry's position i·k_c + s in w_s, to gather weights and scatter
    gradients.
    """
    indptr: np.ndarray
    entry_syn: np.ndarray
    entry_flat: np.ndarray
    rec_ptr: np.ndarray
    rec_i: np.ndarray
    rec_k: np.ndarray
    rec_src: np.ndarray
    rec_flat: np.ndarray
    src_ptr: np.ndarray
    src_entry: np.ndarray

    @classmethod
    def build(cls, cfg: NetworkConfig, source, num_inputs, xp=np):
        N, k_c, spb = cfg.num_neurons, cfg.num_synapse, cfg.num_synapse_per_branch
        neuron, syn = np.divmod(np.arange(N * k_c, dtype=np.int64), k_c)
        branch = syn // spb
        src = np.asarray(source, np.int64).reshape(-1)
        ext = np.nonzero(src < num_inputs)[0]
        order = ext[np.argsort(src[ext], kind="stable")]
        counts = np.bincount(src[order], minlength=num_inputs)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        entry_syn = (branch[order] * N + neuron[order]) * spb + syn[order] % spb
        rec = np.nonzero(src >= num_inputs)[0]  # already grouped by target neuron
        rec_ptr = np.concatenate([[0], np.cumsum(np.bincount(neuron[rec], minlength=N))]).astype(np.int64)
        rec_src = src[rec] - num_inputs
        src_entry = np.argsort(rec_src, kind="stable")
        src_ptr = np.concatenate([[0], np.cumsum(np.bincount(rec_src, minlength=N))]).astype(np.int64)
        def as_dev(a):
            return xp.asarray(np.ascontiguousarray(a, dtype=np.int64))

        return cls(as_dev(indptr), as_dev(entry_syn), as_dev(order), as_dev(rec_ptr), as_dev(neuron[rec]),
                   as_dev(branch[rec]), as_dev(rec_src), as_dev(rec), as_dev(src_ptr), as_dev(src_entry))


@dataclasses.dataclass
class LayerWeights:
    """One layer's parameters in kernel layout, recomputed each pass (the optimiser updates ``params``)."""
    entry_weight: np.ndarray   # [E_ext] w_s of each external entry
    rec_w: np.ndarray          # [E_rec] w_s of each recurrent entry
    kappa_b: np.ndarray        # [nb,N]
    mlp: list                  # [(W [in,out,N], c [out,N])], input layer first
    tau_m: np.ndarray          # [Dm,N]
    kappa_m: np.ndarray        # [Dm,N]
    kappa_lambda: np.ndarray   # [Dm,N]
    c_m: np.ndarray            # [Dm,N] 1 − κ_λ
    w_o: np.ndarray            # [Dm,N]
    c_o: np.ndarray            # [N]


class ELMNetwork(InputChecks, ParameterBookkeeping, SingleStep):
    """An ELM Network (``version = "elm_network"``) with the single neuron's API.

    Parameters live in ``self.params`` under the spec's state_dict keys. ``forward``
    returns outputs Y (B, T, num_output) and, when asked, a cache that ``backward``
    consumes (once: its buffers are then reused); ``backward`` returns ∂loss/∂θ for every
    trainable key (and ∂loss/∂X on request). Arrays are NumPy on ``cpu`` and CuPy on ``cuda``.
    """
    param_module = NP

    def __init__(self, config: NetworkConfig, params=None, seed=0, dtype="float32", device="cpu"):
        from elmcore.engine.backend import get_backend
        if not getattr(config, "is_network", False):
            raise ELMError(f"ELMNetwork needs an elm_network config, got version {config.version!r}")
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.backend = get_backend(device)
        self.xp = self.backend.xp
        self.kernels = self.backend.network_kernels
        host = NP.init_params(config, seed=seed, dtype=self.dtype) if params is None else \
            NP.check_params(config, {k: self.backend.to_host(v) for k, v in params.items()}, self.dtype)
        self.params = {k: (self.xp.asarray(v) if v.dtype.kind == "f" else v) for k, v in host.items()}
        # Spare step-sized buffers for reuse (CPU only): fresh 100 MB arrays cost a page fault
        # per 4 KiB on first touch, measured as a fifth of a char-LM step.
        self._spare = {} if self.backend.name == "cpu" else None
        self.synapses = [SynapseMap.build(config, host[NP.layer_prefix(l) + "synapse_source"],
                                          config.layer_input_size(l), self.xp)
                         for l in range(config.num_layers)]

    # ---- kernel-layout weights -------------------------------------------------
    def layer_weights(self, layer):
        cfg, xp, p, dt = self.config, self.xp, self.params, self.dtype
        pre = NP.layer_prefix(layer)
        syn = self.synapses[layer]
        w_s = p[pre + "w_s"].reshape(-1)
        def contiguous(a):
            return xp.ascontiguousarray(a, dtype=dt)

        mlp = [(contiguous(p[f"{pre}mlp.{j}.weight"].transpose(2, 1, 0)), contiguous(p[f"{pre}mlp.{j}.bias"].T))
               for j in range(cfg.mlp_num_layers + 1)]
        tau_max = cfg.effective_tau_max
        sig = 1 / (1 + xp.exp(-p[pre + "_proto_tau_m"].T))
        tau_m = (tau_max - cfg.memory_tau_min) * sig + cfg.memory_tau_min
        tau_c = xp.maximum(tau_m, TAU_FLOOR)
        kappa_m = xp.exp(-cfg.delta_t / tau_c)
        kappa_lambda = xp.exp(-cfg.delta_t * cfg.lambda_value / tau_c)
        kappa_b = xp.exp(-cfg.delta_t / xp.maximum(p[pre + "tau_b"].T, TAU_FLOOR))
        return LayerWeights(contiguous(w_s[syn.entry_flat]), contiguous(w_s[syn.rec_flat]), contiguous(kappa_b),
                            mlp, contiguous(tau_m), contiguous(kappa_m), contiguous(kappa_lambda),
                            contiguous(1 - kappa_lambda), contiguous(p[pre + "w_o.weight"].T),
                            contiguous(p[pre + "w_o.bias"]))

    # ---- buffers ----------------------------------------------------------------
    MAX_SPARE = 4  # per shape: the largest buffers of one step (Z, dZ, A share a shape)

    def _buffer(self, shape):
        """An uninitialised array of the model dtype, a recycled one when there is one."""
        spare = self._spare.get(tuple(shape)) if self._spare is not None else None
        return spare.pop() if spare else self.xp.empty(shape, self.dtype)

    def _recycle(self, *arrays):
        if self._spare is None:
            return
        for a in arrays:
            spare = self._spare.setdefault(a.shape, [])
            if len(spare) < self.MAX_SPARE and a.dtype == self.dtype and a.flags.c_contiguous and a.base is None:
                spare.append(a)

    def _recycle_cache(self, cache):
        """Hand a forward cache's buffers back; the cache is emptied so that it cannot be read again."""
        for c in cache.get("layers") or []:
            self._recycle(c["A0"], c["Z"], c["DM"], c["M"], c["O"])
        cache.clear()
        cache["consumed"] = True

    # ---- forward ------------------------------------------------------------
    def init_state(self, batch_size=1):
        """Zero state for ``step`` / ``run``: per layer b (branches), m (memory), o (outputs), neuron-minor."""
        cfg, xp = self.config, self.xp
        n, N = cfg.num_layers, cfg.num_neurons
        return {"b": xp.zeros((n, batch_size, cfg.num_branch, N), self.dtype),
                "m": xp.zeros((n, batch_size, cfg.num_memory, N), self.dtype),
                "o": xp.zeros((n, batch_size, N), self.dtype)}

    def forward(self, X, return_cache=False):
        """Outputs Y (B, T, num_output) for inputs X (B, T, num_input), from the zero state.

        The cache holds, per layer, the input, the first MLP layer's input A0 (B·T·(nb + Dm)·N),
        the hidden pre-activations Z (L·B·T·H·N), Δm and m (B·T·Dm·N each) and o (B·T·N).
        """
        X = self.prepare_input(X)
        # Half of activation_bytes: the forward cache without the gradients.
        check_memory(self.config.activation_bytes(X.shape[0], X.shape[1], self.dtype.itemsize) // 2,
                     f"a forward pass over {X.shape[0]} sequences of {X.shape[1]} steps")
        Y, cache = self._forward(X, None)
        self._check_output(Y, X)
        if return_cache:
            return Y, cache
        self._recycle_cache(cache)
        return Y

    def _forward(self, X, state):
        cfg, xp, k = self.config, self.xp, self.kernels
        B, T, _ = X.shape
        N, nb, Dm, L, H = cfg.num_neurons, cfg.num_branch, cfg.num_memory, cfg.mlp_num_layers, cfg.hidden_size
        if state is None:
            state = self.init_state(B)
        activation = activation_code(cfg.mlp_activation)
        layers = []
        final = {"b": xp.empty_like(state["b"]), "m": xp.empty_like(state["m"]), "o": xp.empty_like(state["o"])}
        inp = X
        for layer in range(cfg.num_layers):
            w = self.layer_weights(layer)
            syn = self.synapses[layer]
            E = self._buffer((B, T, nb * N))
            k.route_forward(inp, syn.indptr, syn.entry_syn, w.entry_weight, cfg.num_synapse_per_branch, E)
            W_in, c_in = w.mlp[0]
            W_hid, c_hid, W_out, c_out = self._hidden_and_output(w)
            A0 = self._buffer((B, T, nb + Dm, N))
            Z = self._buffer((L, B, T, H, N))
            DM = self._buffer((B, T, Dm, N))
            M = self._buffer((B, T, Dm, N))
            O = self._buffer((B, T, N))
            m0, o0 = state["m"][layer], state["o"][layer]
            k.network_forward(E.reshape(B, T, nb, N), w.kappa_b, syn.rec_ptr, syn.rec_i, syn.rec_k, syn.rec_src,
                              w.rec_w, W_in, c_in, W_hid, c_hid, W_out, c_out, w.kappa_m, w.c_m, w.w_o, w.c_o,
                              state["b"][layer], m0, o0, activation, self.dtype.type(PHI_SCALE),
                              self.dtype.type(PHI_SLOPE), A0, Z, DM, M, O, final["b"][layer])
            final["m"][layer] = M[:, -1]
            final["o"][layer] = O[:, -1]
            self._recycle(E)
            layers.append(dict(X=inp, A0=A0, Z=Z, DM=DM, M=M, O=O, m0=m0, o0=o0, weights=w))
            inp = O
        Wr, br = self.params["readout.weight"], self.params["readout.bias"]
        Y = xp.empty((B * T, Wr.shape[0]), self.dtype)
        k.rows_product(inp.reshape(B * T, N), xp.ascontiguousarray(Wr.T), br, Y)
        Y = Y.reshape(B, T, -1)
        return Y, dict(layers=layers, final_state=final, shape=(B, T))

    def _hidden_and_output(self, w):
        """Hidden-to-hidden weights stacked [Lh,H,H,N] and the output layer; placeholders where absent."""
        xp, dt, L = self.xp, self.dtype, self.config.mlp_num_layers
        N, H = self.config.num_neurons, self.config.hidden_size
        hidden = w.mlp[1:L]
        W_hid = xp.stack([W for W, _ in hidden]) if hidden else xp.zeros((1, 1, 1, N), dt)
        c_hid = xp.stack([c for _, c in hidden]) if hidden else xp.zeros((1, 1, N), dt)
        W_out, c_out = w.mlp[L] if L else (xp.zeros((H, 1, N), dt), xp.zeros((1, N), dt))
        return W_hid, c_hid, W_out, c_out

    # ---- backward -----------------------------------------------------------
    def backward(self, dY, cache, input_grad=False):
        """∂loss/∂θ for every trainable key, given dY = ∂loss/∂Y (B, T, num_output).

        With ``input_grad`` the result also holds "X": ∂loss/∂X (B, T, num_input).
        """
        cfg, xp, k = self.config, self.xp, self.kernels
        if cache.get("consumed"):
            raise ELMError("this forward cache was already used by backward (its buffers are reused): "
                           "run forward again")
        B, T = cache["shape"]
        R, N, nb, Dm, L, H = B * T, cfg.num_neurons, cfg.num_branch, cfg.num_memory, cfg.mlp_num_layers, \
            cfg.hidden_size
        dY = xp.ascontiguousarray(xp.asarray(dY), dtype=self.dtype)
        if dY.shape != (B, T, cfg.num_output):
            raise ELMError(f"dY must have shape {(B, T, cfg.num_output)}, got {tuple(dY.shape)}")
        grads = {}
        layers = cache["layers"]
        dY2 = dY.reshape(R, -1)
        grads["readout.weight"] = xp.empty((cfg.num_output, N), self.dtype)
        k.rows_transposed_product(dY2, layers[-1]["O"].reshape(R, N), grads["readout.weight"])
        grads["readout.bias"] = dY2.sum(0)
        dO = xp.empty((R, N), self.dtype)
        k.rows_product(dY2, self.params["readout.weight"], xp.zeros(N, self.dtype), dO)
        dO = dO.reshape(B, T, N)
        activation = activation_code(cfg.mlp_activation)
        dX = None
        for layer in range(cfg.num_layers - 1, -1, -1):
            c = layers[layer]
            w, syn = c["weights"], self.synapses[layer]
            W_in, _ = w.mlp[0]
            W_hid, _, W_out, _ = self._hidden_and_output(w)
            GB = self._buffer((B, T, nb, N))
            dZ = self._buffer((L, B, T, H, N))
            dP = self._buffer((B, T, Dm, N))
            GO = self._buffer((B, T, N))
            A = self._buffer((L, B, T, H, N))
            gk = xp.empty((B, Dm, N), self.dtype)
            gc = xp.empty((B, Dm, N), self.dtype)
            k.network_backward(dO, w.kappa_b, syn.rec_ptr, syn.rec_i, syn.rec_k, syn.rec_src, w.rec_w,
                               syn.src_ptr, syn.src_entry, W_in, W_hid, W_out, w.kappa_m, w.c_m, w.w_o, c["m0"],
                               c["A0"], c["Z"], c["DM"], c["M"], activation, self.dtype.type(PHI_SCALE),
                               self.dtype.type(PHI_SLOPE), GB, dZ, dP, GO, A, gk, gc)
            grads.update(self._layer_weight_grads(layer, c, w, syn, GB, dZ, dP, GO, A, gk, gc))
            if layer > 0 or input_grad:
                inp = c["X"]
                dX = xp.empty(inp.shape, self.dtype)
                k.route_input_grad(GB.reshape(B, T, nb * N), syn.indptr, syn.entry_syn, w.entry_weight,
                                   cfg.num_synapse_per_branch, dX)
                dO = dX
            self._recycle(GB, dZ, dP, GO, A)
        self._recycle_cache(cache)
        keys = self.trainable_keys
        out = {key: grads[key] for key in keys}
        if input_grad:
            out["X"] = dX
        return out

    def _layer_weight_grads(self, layer, c, w, syn, GB, dZ, dP, GO, A, gk, gc):
        """Every weight gradient of one layer, each a reduction over all B·T rows."""
        cfg, xp, k = self.config, self.xp, self.kernels
        B, T, nb, N = GB.shape
        R, Dm, L, k_c = B * T, cfg.num_memory, cfg.mlp_num_layers, cfg.num_synapse
        pre = NP.layer_prefix(layer)
        grads = {}
        # w_o: ∂o_t/∂w_o = m_t, ∂o_t/∂c_o = 1.
        g_wo = xp.empty((Dm, 1, N), self.dtype)
        g_co = xp.empty((1, N), self.dtype)
        k.neuron_weight_grad(GO.reshape(R, 1, N), c["M"].reshape(R, Dm, N), g_wo, g_co)
        grads[pre + "w_o.weight"] = xp.ascontiguousarray(g_wo[:, 0, :].T)
        grads[pre + "w_o.bias"] = g_co[0]
        # The MLP: layer j's weight gradient is Σ_rows (its output gradient) ⊗ (its input).
        inputs = [c["A0"]] + [A[l] for l in range(L)]
        outputs = [dZ[l] for l in range(L)] + [dP]
        for j in range(L + 1):
            a = inputs[j].reshape(R, -1, N)
            g = outputs[j].reshape(R, -1, N)
            gw = xp.empty((a.shape[1], g.shape[1], N), self.dtype)
            g_bias = xp.empty((g.shape[1], N), self.dtype)
            k.neuron_weight_grad(g, a, gw, g_bias)
            grads[f"{pre}mlp.{j}.weight"] = xp.ascontiguousarray(gw.transpose(2, 1, 0))
            grads[f"{pre}mlp.{j}.bias"] = xp.ascontiguousarray(g_bias.T)
        # w_s: external synapses through the routing, recurrent ones against o_{t−1}.
        g_ws = xp.zeros(N * k_c, self.dtype)
        partial = xp.empty((B, N * k_c), self.dtype)
        k.route_weight_grad(c["X"], syn.indptr, syn.entry_syn, xp.ones(syn.entry_syn.shape[0], self.dtype),
                            cfg.num_synapse_per_branch, GB.reshape(B, T, nb * N), partial)
        g_ws[syn.entry_flat] = partial.sum(0)[syn.entry_syn]
        if syn.rec_i.shape[0]:
            partial_rec = xp.empty((B, syn.rec_i.shape[0]), self.dtype)
            k.recurrent_weight_grad(GB, c["O"], c["o0"], syn.rec_i, syn.rec_k, syn.rec_src, partial_rec)
            g_ws[syn.rec_flat] = partial_rec.sum(0)
        grads[pre + "w_s"] = g_ws.reshape(N, k_c)
        if cfg.learn_memory_tau:
            grads[pre + "_proto_tau_m"] = self._tau_m_grad(layer, gk.sum(0), gc.sum(0), w)
        return grads

    def _tau_m_grad(self, layer, g_kappa, g_c, w):
        """Chain Σ ∂loss/∂κ_m and Σ ∂loss/∂c_m (each [Dm,N]) down to _proto_tau_m [N,Dm]."""
        cfg, xp = self.config, self.xp
        tau = w.tau_m
        live = (tau >= TAU_FLOOR).astype(self.dtype)  # as a clamp: no gradient below the floor
        dkappa_dtau = w.kappa_m * cfg.delta_t / (tau * tau) * live
        dc_dtau = -w.kappa_lambda * cfg.delta_t * cfg.lambda_value / (tau * tau) * live
        g_tau = g_kappa * dkappa_dtau + g_c * dc_dtau
        span = cfg.effective_tau_max - cfg.memory_tau_min
        sig = 1 / (1 + xp.exp(-self.params[NP.layer_prefix(layer) + "_proto_tau_m"].T))
        return xp.ascontiguousarray((g_tau * span * sig * (1 - sig)).T, dtype=self.dtype)

    # ---- traces and streaming -------------------------------------------------
    def traces(self, X):
        """Y plus every layer's outputs and memory after each step, in the spec's layout:
        {"layers.ℓ.o": (B, T, N), "layers.ℓ.m": (B, T, N, Dm)}."""
        X = self.prepare_input(X)
        Y, cache = self._forward(X, None)
        out = {}
        for layer, c in enumerate(cache["layers"]):
            out[f"layers.{layer}.o"] = c["O"]
            out[f"layers.{layer}.m"] = self.xp.ascontiguousarray(c["M"].transpose(0, 1, 3, 2))
        return Y, out

    def run(self, X, state):
        """Continue a stream over a chunk X (B, T, num_input); returns (Y, new state)."""
        X = self.prepare_input(X)
        if not isinstance(state, dict) or any(key not in state for key in ("b", "m", "o")):
            raise DataError("state must come from init_state / run of this network")
        expect = self.init_state(X.shape[0])
        for key in ("b", "m", "o"):
            if tuple(state[key].shape) != tuple(expect[key].shape):
                raise DataError(f"state '{key}' has shape {tuple(state[key].shape)}, this network and batch "
                                f"{X.shape[0]} need {tuple(expect[key].shape)}")
        state = {key: self.xp.ascontiguousarray(state[key], dtype=self.dtype) for key in ("b", "m", "o")}
        Y, cache = self._forward(X, state)
        self._check_output(Y, X)
        final = cache["final_state"]
        self._recycle_cache(cache)
        return Y, final
