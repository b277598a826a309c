"""The ELM / Branch-ELM model: forward, hand-derived backward, streaming steps.

The computation is cut as in docs/architecture.md: everything linear runs as one
large operation over all B·T rows (routing, leaky scan, GEMMs), and only the
MLP-and-memory recurrence walks time, inside one kernel call
(``kernels.recur_forward`` / ``kernels.recur_backward``). Each stage is a
forward/backward pair of methods (input, recurrence, readout); the τ_m transform
and its chain rule are ``engine/time_constants.py``. Every backward formula is
derived in ``docs/gradients.md`` with the symbols of its table, which are the
names used here.
"""

import dataclasses

import numpy as np

from elmcore.neuron import params as P
from elmcore.neuron.config import ELMConfig
from elmcore.engine.memory import check_memory
from elmcore.errors import DataError, ELMError
from elmcore.engine.model_base import InputChecks, ParameterBookkeeping, SingleStep, resolve_dtype, threads_by_work
from elmcore.engine.time_constants import decay, memory_time_constants, memory_time_constants_backward
from elmcore.kernels import contract as kernel_contract
from elmcore.kernels.pointwise import activation_code

@dataclasses.dataclass
class Routing:
    """Input → synapse map as CSR over inputs (fixed for a model's lifetime).

    Only synapses whose mask is non-zero appear; entries are grouped by input.
    """
    indptr: np.ndarray      # [D+1] int64
    entry_syn: np.ndarray   # [E] int64 synapse id
    entry_mask: np.ndarray  # [E] mask value of that synapse (model dtype)

    @classmethod
    def build(cls, cfg, indices, mask, dtype, xp=np):
        if indices is None:
            idx = np.arange(cfg.num_input, dtype=np.int64)
            msk = np.ones(cfg.num_input)
        else:
            idx = np.asarray(indices, dtype=np.int64)
            msk = np.asarray(mask).astype(np.float64)
        keep = np.nonzero(msk != 0)[0]
        order = keep[np.argsort(idx[keep], kind="stable")]
        counts = np.bincount(idx[order], minlength=cfg.num_input)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(xp.asarray(indptr), xp.asarray(order.astype(np.int64)),
                   xp.asarray(msk[order].astype(dtype)))


@dataclasses.dataclass
class Derived:
    """Quantities every pass computes from the raw parameters (docs/spec.md §2 transforms)."""
    w_s: np.ndarray            # [S] relu(_proto_w_s)
    entry_weight: np.ndarray   # [E] w_s · mask per routing entry
    kappa_channel: np.ndarray  # [C] decay of each scan channel (κ_b, or κ_s per branch / synapse)
    syn_per_channel: int       # synapses summed into one scan channel
    tau_m: np.ndarray          # [Dm]
    kappa_m: np.ndarray        # [Dm]
    c_m: np.ndarray            # [Dm] λ(1−κ_m) (v1) or 1−κ_λ (v2)
    kappa_lambda: np.ndarray   # [Dm] v2 only (None in v1)


class ELM(InputChecks, ParameterBookkeeping, SingleStep):
    """An ELM neuron (``elm_v1``) or Branch-ELM (``branch_elm_v2``).

    Parameters live in ``self.params`` under the release's state_dict keys.
    ``forward`` returns outputs and, when asked, a cache that ``backward``
    consumes; ``backward`` returns ∂loss/∂θ for every trainable key (and
    ∂loss/∂X on request). Arrays are NumPy on ``cpu`` and CuPy on ``cuda``.
    """
    param_module = P
    # The sparse first layer's weight gradient keeps one partial sum per Numba thread (batch_chunks).
    results_follow_numba_threads = True

    def __init__(self, config: ELMConfig, params=None, seed=0, dtype="float32", device="cpu"):
        from elmcore.engine.backend import get_backend
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.backend = get_backend(device)
        self.xp = self.backend.xp
        host = P.init_params(config, seed=seed, dtype=self.dtype) if params is None else \
            P.check_params(config, {k: self.backend.to_host(v) for k, v in params.items()}, self.dtype)
        self.params = {k: (self.xp.asarray(v) if v.dtype.kind == "f" else v) for k, v in host.items()}
        self.routing = Routing.build(config, host.get("input_to_synapse_indices"),
                                     host.get("valid_indices_mask"), self.dtype, self.xp)
        self._per_synapse_scan = self._needs_per_synapse_scan(host)

    # ---- scan layout -----------------------------------------------------------
    def _needs_per_synapse_scan(self, host):
        """v1 sums per-synapse traces; they collapse to one per branch only if κ_s is uniform within it."""
        if self.config.is_v2:
            return False
        tau = host["tau_s"].reshape(self.config.branches, self.config.num_synapse_per_branch)
        return bool(np.any(tau != tau[:, :1]))

    def derived(self):
        """The parameter transforms every pass uses; τ_m's chain rule is in ``engine/time_constants.py``."""
        cfg, xp, params = self.config, self.xp, self.params
        w_s = xp.maximum(params["_proto_w_s"], 0)
        kappa_in = decay(params[P.input_tau_key(cfg)], cfg.delta_t, xp)
        if cfg.is_v2:
            kappa_channel, spc = kappa_in, cfg.num_synapse_per_branch
        elif self._per_synapse_scan:
            kappa_channel, spc = kappa_in, 1
        else:
            kappa_channel, spc = kappa_in[::cfg.num_synapse_per_branch].copy(), cfg.num_synapse_per_branch
        tau_m, kappa_m, kappa_lambda, c_m = memory_time_constants(params["_proto_tau_m"], cfg, xp)
        entry_weight = w_s[self.routing.entry_syn] * self.routing.entry_mask
        dt = self.dtype

        def cast(a):
            return None if a is None else a.astype(dt, copy=False)
        return Derived(cast(w_s), cast(entry_weight), cast(kappa_channel), spc, cast(tau_m),
                       cast(kappa_m), cast(c_m), cast(kappa_lambda))

    def _layers(self):
        """[(W, c)] of the MLP, input layer first."""
        return [(self.params[wk], self.params[bk]) for wk, bk in P.mlp_layer_keys(self.config.mlp_num_layers)]

    # ---- forward and backward: the stages in order, each a forward/backward pair below ----
    @threads_by_work
    def forward(self, X, return_cache=False, state=None):
        """Outputs Y (B, T, num_output) for inputs X (B, T, num_input).

        With ``return_cache`` also returns the cache ``backward`` needs. It holds
        references to X and derived parameters plus these arrays, in floats:
        A0 = [U, κ_m ⊙ M_prev] (B·T·(nb + Dm), the first layer's input), M and ΔM
        (B·T·Dm each), Z (L·B·T·H): B·T·(nb + 3·Dm + L·H) in all, plus the routed
        input R (B·T·nb) when the input stage took its sparse path (``cache["input_path"]``
        is "dense" or "sparse"; see ``_input_forward``), and "final_state", the state after the
        last step (what ``run`` returns).
        ``state`` (from ``init_state`` / ``run`` / an earlier cache's "final_state") continues a
        stream instead of starting at zero; ``backward`` then treats it as a constant
        (truncated BPTT).
        """
        X = self.prepare_input(X)
        # Half of activation_bytes: the forward cache without the gradients.
        check_memory(self.config.activation_bytes(X.shape[0], X.shape[1], self.dtype.itemsize) // 2,
                     f"a forward pass over {X.shape[0]} sequences of {X.shape[1]} steps", self.backend)
        Y, cache = self._forward(X, None if state is None else self._checked_state(state, X.shape[0]))
        self._check_output(Y, X)
        return (Y, cache) if return_cache else Y

    def _forward(self, X, state=None):
        cfg, xp = self.config, self.xp
        d = self.derived()
        B, T, _ = X.shape
        C = d.kappa_channel.shape[0]
        u0 = xp.zeros((B, C), self.dtype) if state is None else state["u"]
        m0 = xp.zeros((B, cfg.num_memory), self.dtype) if state is None else state["m"]
        nb, Dm = cfg.branches, cfg.num_memory
        # The first MLP layer's whole input [u_t, κ_m ⊙ m_{t−1}] in one buffer: the input
        # stage fills the branch columns, the recurrence the memory columns, and the
        # backward takes the layer's weight gradient as one GEMM over it.
        A0 = xp.empty((B, T, nb + Dm), self.dtype)
        Zb, final_u, input_cache = self._input_forward(X, d, u0, A0[:, :, :nb])
        M, Z, DM = self._recurrence_forward(Zb, d, m0, A0)
        Y = self._readout_forward(M)
        cache = dict(X=X, A0=A0, M=M, Z=Z, DM=DM, m0=m0, u0=u0, derived=d, **input_cache,
                     final_state=dict(u=final_u, m=M[:, -1].copy()))
        return Y, cache

    @threads_by_work
    def backward(self, dY, cache, input_grad=False):
        """∂loss/∂θ for every trainable key, given dY = ∂loss/∂Y (B, T, num_output).

        With ``input_grad`` the result also holds "X": ∂loss/∂X (B, T, num_input).
        """
        cfg, xp = self.config, self.xp
        X, d = cache["X"], cache["derived"]
        B, T, _ = X.shape
        dY = xp.ascontiguousarray(xp.asarray(dY), dtype=self.dtype)
        if dY.shape != (B, T, cfg.num_output):
            raise ELMError(f"dY must have shape {(B, T, cfg.num_output)}, got {tuple(dY.shape)}")
        grads, dM = self._readout_backward(dY, cache["M"])
        mlp_grads, dZ0, gk, gc = self._recurrence_backward(dM, cache)
        grads.update(mlp_grads)
        grads.update(self._input_backward(dZ0, cache, input_grad))
        if cfg.learn_memory_tau:
            grads["_proto_tau_m"] = memory_time_constants_backward(
                gk.sum(0), gc.sum(0), d.tau_m, d.kappa_m, d.kappa_lambda, self.params["_proto_tau_m"], cfg,
                xp).astype(self.dtype)
        return {key: grads[key] for key in self.trainable_keys + (["X"] if input_grad else [])}

    # ---- the input stage: routing, branch scan, the first layer's branch columns ----
    #
    # Two paths compute the same numbers. "dense": u_t = scan(R) first, then one GEMM
    # u @ W0bᵀ over all B·T rows. "sparse" (kernel modules with the sparse_first_layer
    # capability, when the routed input R is mostly zeros and one decay serves every
    # scan channel, the usual case since τ_s / τ_b are not trained): scan_κ(R) @ W0bᵀ =
    # scan_κ(R @ W0bᵀ), so the products cost nnz(R)·W0 (see kernels/cpu.py). The
    # forward records its choice in the cache as "input_path"; the backward follows it.
    SPARSE_FIRST_LAYER_DENSITY = 0.25

    def _use_sparse_first_layer(self, R, d):
        if "sparse_first_layer" not in kernel_contract.capabilities(self.backend.kernels) or self._per_synapse_scan:
            return False
        kappa = d.kappa_channel
        if not bool((kappa == kappa[0]).all()):
            return False
        return np.count_nonzero(R) < self.SPARSE_FIRST_LAYER_DENSITY * R.size

    def _input_forward(self, X, d, u0, U):
        """Route X, scan it into U and form the first layer's branch part; returns (Zb, u_T, cache entries).

        U   [B,T,nb]  the branch columns of the first layer's input buffer, overwritten with u_t.
        Zb  [B,T,W0]  W0b u_t + c_0: the first layer's pre-activation without its memory columns.
        u_T [B,C]     the scan channels after the last step (the streaming state).
        cache entries: "input_path" ("dense" or "sparse") and, on the sparse path, "R", the
        routed input [B,T,C] its backward multiplies by (the forward caches "u0", the scan's
        starting state, for both paths).
        """
        cfg, xp, k = self.config, self.xp, self.backend.kernels
        B, T, _ = X.shape
        nb = cfg.branches
        R = xp.empty((B, T, d.kappa_channel.shape[0]), self.dtype)
        k.route_forward(X, self.routing.indptr, self.routing.entry_syn, d.entry_weight, d.syn_per_channel, R)
        if self._per_synapse_scan:
            k.scan_forward(R, d.kappa_channel, u0, R)
            U[...] = R.reshape(B, T, nb, cfg.num_synapse_per_branch).sum(-1)
        else:
            k.scan_forward(R, d.kappa_channel, u0, U)
        final_u = (R if self._per_synapse_scan else U)[:, -1].copy()
        W_in, c_in = self._layers()[0]
        W0b = W_in[:, :nb]
        if self._use_sparse_first_layer(R, d):
            # scan_κ(R) @ W0bᵀ = scan_κ(R @ W0bᵀ) for one shared κ.
            Zb = xp.empty((B, T, W_in.shape[0]), self.dtype)
            k.sparse_rows_product(R, xp.ascontiguousarray(W0b.T), Zb)
            k.scan_forward(Zb, xp.full(W_in.shape[0], d.kappa_channel[0], self.dtype), u0 @ W0b.T, Zb)
            Zb += c_in
            return Zb, final_u, dict(input_path="sparse", R=R)
        Zb = (U.reshape(B * T, nb) @ W0b.T + c_in).reshape(B, T, -1)
        return Zb, final_u, dict(input_path="dense")

    def _input_backward(self, dZ0, cache, input_grad):
        """Gradients of the input stage: the first layer's weight and bias, _proto_w_s and, on request, X.

        dZ0 [B·T,W0]  ∂loss/∂z_0 (∂loss/∂p when the MLP has no hidden layer).
        Follows the path ``_input_forward`` recorded in ``cache["input_path"]``.
        """
        cfg, xp, k = self.config, self.xp, self.backend.kernels
        X, A0, d = cache["X"], cache["A0"], cache["derived"]
        B, T, _ = X.shape
        BT, nb, Dm = B * T, cfg.branches, cfg.num_memory
        wk, bk = P.mlp_layer_keys(cfg.mlp_num_layers)[0]
        W0b = self.params[wk][:, :nb]
        routing = self.routing
        grads = {bk: dZ0.sum(0)}
        partial = xp.empty((B, cfg.num_synapse), self.dtype)
        dR = None
        if cache["input_path"] == "dense":
            grads[wk] = dZ0.T @ A0.reshape(BT, nb + Dm)
            # Back through the first layer's branch columns, the scan and the routing.
            dU = (dZ0 @ W0b).reshape(B, T, nb)
            if self._per_synapse_scan:
                dU = xp.repeat(dU, cfg.num_synapse_per_branch, axis=2)
            dR = xp.ascontiguousarray(dU)
            k.scan_backward(dR, d.kappa_channel, dR)
            k.route_weight_grad(X, routing.indptr, routing.entry_syn, routing.entry_mask,
                                d.syn_per_channel, dR, partial)
        elif cache["input_path"] == "sparse":
            # G = revscan_κ(∂z_0); dW0b = Gᵀ R; dR = G W0b only where inputs spiked.
            G = dZ0.reshape(B, T, -1).copy()
            k.scan_backward(G, xp.full(G.shape[2], d.kappa_channel[0], self.dtype), G)
            partial_w = xp.empty((min(B, k.batch_chunks()), nb, G.shape[2]), self.dtype)
            k.sparse_rows_weight_grad(cache["R"], G, partial_w)
            # U_t also holds κ^{t+1}·u0, a stream's starting state: Σ_t κ^{t+1} dZ0_tᵀ u0 = κ·G_0ᵀ u0.
            dW0b = partial_w.sum(0).T + d.kappa_channel[0] * (G[:, 0].T @ cache["u0"])
            grads[wk] = xp.concatenate([dW0b, dZ0.T @ A0[:, :, nb:].reshape(BT, Dm)], axis=1)
            k.route_weight_grad_projected(X, routing.indptr, routing.entry_syn, routing.entry_mask,
                                          d.syn_per_channel, G, xp.ascontiguousarray(W0b.T), partial)
            if input_grad:
                dR = (G.reshape(BT, -1) @ W0b).reshape(B, T, nb)
        else:
            raise ELMError(f"unknown input path {cache['input_path']!r} in the forward cache")
        grads["_proto_w_s"] = partial.sum(0) * (self.params["_proto_w_s"] > 0)
        if input_grad:
            dX = xp.empty(X.shape, self.dtype)
            k.route_input_grad(dR, routing.indptr, routing.entry_syn, d.entry_weight, d.syn_per_channel, dX)
            grads["X"] = dX
        return grads

    # ---- the recurrence: the MLP and the memory, the one stage that walks time -------------
    def _recurrence_forward(self, Zb, d, m0, A0):
        """Walk the MLP-and-memory recurrence over all T steps in one kernel call; returns M, Z, DM.

        Zb [B,T,W0]     the first layer's pre-activation without its memory columns.
        A0 [B,T,nb+Dm]  the first layer's input buffer: its memory columns get κ_m ⊙ m_{t−1}.
        M, DM [B,T,Dm]  m_t and Δm_t;  Z [L,B,T,H] the hidden pre-activations z_l.
        """
        cfg, xp, k = self.config, self.xp, self.backend.kernels
        B, T, _ = Zb.shape
        nb, Dm = cfg.branches, cfg.num_memory
        layers = self._layers()
        W0m = layers[0][0][:, nb:]
        L = cfg.mlp_num_layers
        H = cfg.hidden_size
        Wh = [W for W, _ in layers[1:L]]
        WhT = xp.ascontiguousarray(xp.stack([W.T for W in Wh])) if Wh else xp.zeros((0, H, H), self.dtype)
        ch = xp.stack([c for _, c in layers[1:L]]) if Wh else xp.zeros((0, H), self.dtype)
        Wo, co = layers[-1]
        WoT = xp.ascontiguousarray(Wo.T) if L else xp.zeros((1, 1), self.dtype)
        M = xp.empty((B, T, Dm), self.dtype)
        DM = xp.empty_like(M)
        Z = xp.empty((L, B, T, H), self.dtype)
        k.recur_forward(Zb, xp.ascontiguousarray(W0m.T), WhT, ch, WoT, co, d.kappa_m, d.c_m, m0,
                        activation_code(cfg.mlp_activation), self.dtype.type(P.PHI_SCALE),
                        self.dtype.type(P.PHI_SLOPE), k.batch_tile(B), M, Z, DM, A0[:, :, nb:])
        return M, Z, DM

    def _recurrence_backward(self, dM, cache):
        """Back through the recurrence; returns (grads, dZ0, gk, gc).

        grads   the weights and biases of the MLP's layers after the first.
        dZ0     [B·T,W0] ∂loss/∂z_0 (∂loss/∂p when the MLP has no hidden layer), for the input stage.
        gk, gc  [B,Dm] per batch row Σ_t ∂loss/∂κ_m (explicit uses) and Σ_t ∂loss/∂c_m.
        """
        cfg, xp, k = self.config, self.xp, self.backend.kernels
        M, Z, DM, m0, d = (cache[n] for n in ("M", "Z", "DM", "m0", "derived"))
        B, T, _ = M.shape
        BT, Dm, nb, L = B * T, cfg.num_memory, cfg.branches, cfg.mlp_num_layers
        layers = self._layers()
        W0m = layers[0][0][:, nb:]
        Wh = xp.stack([W for W, _ in layers[1:L]]) if L > 1 else xp.zeros((0, Z.shape[3], Z.shape[3]), self.dtype)
        Wo = layers[-1][0] if L else xp.zeros((1, 1), self.dtype)
        dZ = xp.empty_like(Z)
        act = xp.empty_like(Z)
        dP = xp.empty_like(M)
        gk = xp.empty((B, Dm), self.dtype)
        gc = xp.empty((B, Dm), self.dtype)
        k.recur_backward(dM, xp.ascontiguousarray(W0m), xp.ascontiguousarray(Wh), xp.ascontiguousarray(Wo),
                         d.kappa_m, d.c_m, m0, M, Z, DM, activation_code(cfg.mlp_activation),
                         self.dtype.type(P.PHI_SCALE), self.dtype.type(P.PHI_SLOPE), k.batch_tile(B),
                         dZ, dP, gk, gc, act)

        # ∂loss/∂z_l of every MLP layer (the output layer's is ∂loss/∂p); the layers after
        # the first take their weight gradients as one GEMM each over all B·T rows.
        layer_grads = [dZ[l].reshape(BT, -1) for l in range(L)] + [dP.reshape(BT, Dm)]
        grads = {}
        for l, (wk, bk) in enumerate(P.mlp_layer_keys(L)[1:], start=1):
            grads[wk] = layer_grads[l].T @ act[l - 1].reshape(BT, -1)
            grads[bk] = layer_grads[l].sum(0)
        return grads, layer_grads[0], gk, gc

    # ---- the readout --------------------------------------------------------------------
    def _readout_forward(self, M):
        """Y = M W_yᵀ + b_y, one GEMM over all B·T rows."""
        B, T, _ = M.shape
        Wy, by = self.params["w_y.weight"], self.params["w_y.bias"]
        return (M.reshape(B * T, -1) @ Wy.T + by).reshape(B, T, -1)

    def _readout_backward(self, dY, M):
        """The readout's gradients and dM = ∂loss/∂m_t through y_t (B, T, Dm); returns (grads, dM)."""
        B, T, Dm = M.shape
        BT = B * T
        Wy = self.params["w_y.weight"]
        dY2 = dY.reshape(BT, -1)
        grads = {"w_y.weight": dY2.T @ M.reshape(BT, Dm), "w_y.bias": dY2.sum(0)}
        dM = (dY2 @ Wy).reshape(B, T, Dm)
        return grads, dM

    # ---- traces and streaming -------------------------------------------------
    @threads_by_work
    def traces(self, X):
        """Y plus the state after every step: {"m": (B,T,Dm), "s" (v1, B,T,S) or "b" (v2, B,T,nb)}."""
        X = self.prepare_input(X)
        Y, cache = self._forward(X)
        out = {"m": cache["M"]}
        if self.config.is_v2:
            out["b"] = cache["A0"][:, :, :self.config.branches]
        else:
            out["s"] = self._synapse_traces(X, cache["derived"])
        return Y, out

    def _synapse_traces(self, X, d):
        """v1's per-synapse traces s_t (one scan channel per synapse)."""
        xp, k = self.xp, self.backend.kernels
        B, T, _ = X.shape
        S = self.config.num_synapse
        kappa_s = decay(self.params["tau_s"], self.config.delta_t, xp).astype(self.dtype)
        R = xp.empty((B, T, S), self.dtype)
        k.route_forward(X, self.routing.indptr, self.routing.entry_syn, d.entry_weight, 1, R)
        k.scan_forward(R, kappa_s, xp.zeros((B, S), self.dtype), R)
        return R

    def init_state(self, batch_size=1):
        """Zero state for ``step``: scan channels "u" and memory "m"."""
        C = self.config.num_synapse if self._per_synapse_scan else self.config.branches
        return {"u": self.xp.zeros((batch_size, C), self.dtype),
                "m": self.xp.zeros((batch_size, self.config.num_memory), self.dtype)}

    def _checked_state(self, state, batch_size):
        """``state`` as contiguous arrays of the model dtype, after checking it fits this model and batch."""
        if not isinstance(state, dict) or any(key not in state for key in ("u", "m")):
            raise DataError("state must come from init_state / run of this model")
        expect = self.init_state(batch_size)
        for key in ("u", "m"):
            if tuple(state[key].shape) != tuple(expect[key].shape):
                if state[key].shape[:1] != expect[key].shape[:1]:
                    raise DataError(f"state is for batch {state[key].shape[0]}, input has batch {batch_size}")
                raise DataError(f"state '{key}' has shape {tuple(state[key].shape)}, this model needs "
                                f"{tuple(expect[key].shape)}")
        return {key: self.xp.ascontiguousarray(state[key], dtype=self.dtype) for key in ("u", "m")}

    @threads_by_work
    def run(self, X, state):
        """Continue a stream over a chunk X (B, T, num_input); returns (Y, new state)."""
        X = self.prepare_input(X)
        state = self._checked_state(state, X.shape[0])
        Y, cache = self._forward(X, state)
        self._check_output(Y, X)
        return Y, cache["final_state"]
