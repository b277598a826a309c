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
from elmcore.engine import segments
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


class ELM(InputChecks, ParameterBookkeeping, SingleStep, segments.Recomputation):
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

    # ---- long sequences: the recomputation segment (engine/segments.py, Recomputation) -------
    def _bytes_kept_whole(self, batch, steps):
        """Kept whatever the segment: the input and Y, and their gradients."""
        cfg = self.config
        return 2 * batch * steps * (cfg.num_input + cfg.num_output) * self.dtype.itemsize

    # ---- forward and backward: the stages in order, each a forward/backward pair below ----
    @threads_by_work
    def forward(self, X, return_cache=False, state=None, recompute_segment=None):
        """Outputs Y (B, T, num_output) for inputs X (B, T, num_input).

        With ``return_cache`` also returns the cache ``backward`` needs. It holds
        references to X and derived parameters plus these arrays, in floats:
        A0 = [U, κ_m ⊙ M_prev] (B·T·(nb + Dm), the first layer's input), M and ΔM
        (B·T·Dm each), Z (L·B·T·H): B·T·(nb + 3·Dm + L·H) in all, plus the routed
        input R (B·T·nb) when the input stage took its sparse path (``cache["input_path"]``
        is "dense" or "sparse"; see ``_input_forward``), and "final_state", the state after the
        last step (what ``run`` returns).
        With ``recompute_segment`` k (or the model's ``recompute_segment``, or when the whole
        cache would not fit) the cache keeps only the state every k steps (k rounded up to
        whole time blocks) and ``backward`` recomputes each segment's arrays, with the same
        gradients bit for bit (docs/architecture.md, "Long sequences in bounded memory").
        ``state`` (from ``init_state`` / ``run`` / an earlier cache's "final_state") continues a
        stream instead of starting at zero; ``backward`` then treats it as a constant
        (truncated BPTT).
        Without ``return_cache``, kernels with the capability "forward_without_cache" keep no cache
        at all (the same Y, bit for bit), in the same segments when the sequence is too long for memory.
        """
        X = self.prepare_input(X)
        segment = self.forward_segment(X, recompute_segment)
        start = None if state is None else self._checked_state(state, X.shape[0])
        Y, cache = self._forward(X, start, segment, keep_cache=return_cache or not self.forward_without_cache)
        self._check_output(Y, X)
        return (Y, cache) if return_cache else Y

    @property
    def forward_without_cache(self):
        """Whether a pass that needs no backward can skip the cache (a kernel capability)."""
        return "forward_without_cache" in kernel_contract.capabilities(self.backend.kernels)

    def _forward(self, X, state=None, segment=None, keep_cache=True):
        """(Y, cache) from the state ``state`` (None: zeros), in segments of ``segment`` steps or whole.
        Without ``keep_cache`` (kernels with the capability "forward_without_cache") the segments keep
        nothing for a backward: the cache then holds the final state alone that ``run`` needs."""
        cfg, xp = self.config, self.xp
        d = self.derived()
        B, T, _ = X.shape
        C = d.kappa_channel.shape[0]
        u0 = xp.zeros((B, C), self.dtype) if state is None else state["u"]
        m0 = xp.zeros((B, cfg.num_memory), self.dtype) if state is None else state["m"]
        start = dict(u=u0, m=m0, z=None)
        if segment is None:
            seg_cache, Y, end = self._segment_forward(X, d, start, None, keep_cache)
            return Y, dict(X=X, derived=d, m0=m0, u0=u0, final_state=dict(u=end["u"], m=end["m"]), **seg_cache)
        sparse = self._sparse_over_segments(X, d, segment)
        Y = xp.empty((B, T, cfg.num_output), self.dtype)
        starts = []
        for s0, s1 in segments.segment_bounds(T, segment):
            starts.append((s0, s1, start))
            _, Y[:, s0:s1], start = self._segment_forward(xp.ascontiguousarray(X[:, s0:s1]), d, start, sparse,
                                                          keep_cache)
        return Y, dict(X=X, derived=d, m0=m0, u0=u0, segments=starts,
                       input_path="sparse" if sparse else "dense", final_state=dict(u=start["u"], m=start["m"]))

    def _segment_forward(self, X, d, start, sparse, keep_cache=True):
        """The forward over X (a whole sequence, or one segment of it) from the state ``start``.

        Returns (the segment's cache entries, Y, the state after its last step). ``sparse``
        None lets the input stage choose its path from this X's routed input. Without
        ``keep_cache`` the recurrence writes m_t alone and there are no cache entries.
        """
        cfg, xp = self.config, self.xp
        B, T, _ = X.shape
        nb, Dm = cfg.branches, cfg.num_memory
        if not keep_cache:
            Zb, end_u, end_z, _ = self._input_forward(X, d, start, xp.empty((B, T, nb), self.dtype), sparse)
            M = self._recurrence_forward(Zb, d, start["m"], None)
            return {}, self._readout_forward(M), dict(u=end_u, m=M[:, -1].copy(), z=end_z)
        # The first MLP layer's whole input [u_t, κ_m ⊙ m_{t−1}] in one buffer: the input
        # stage fills the branch columns, the recurrence the memory columns, and the
        # backward takes the layer's weight gradient as one GEMM over it.
        A0 = xp.empty((B, T, nb + Dm), self.dtype)
        Zb, end_u, end_z, input_cache = self._input_forward(X, d, start, A0[:, :, :nb], sparse)
        M, Z, DM = self._recurrence_forward(Zb, d, start["m"], A0)
        Y = self._readout_forward(M)
        cache = dict(A0=A0, M=M, Z=Z, DM=DM, seg_m0=start["m"], seg_u0=start["u"], **input_cache)
        return cache, Y, dict(u=end_u, m=M[:, -1].copy(), z=end_z)

    def _block_product(self, A, W, bias=None):
        """A (B, T, K) @ W (+ bias) → (B, T, ·), one product per time block (``engine/segments.py``)."""
        xp = self.xp
        B, T, _ = A.shape
        out = xp.empty((B, T, W.shape[1]), self.dtype)
        for t0, t1 in segments.block_bounds(0, T, self.time_block):
            whole = (t0, t1) == (0, T)
            # One block: the product lands in ``out`` itself (the same GEMM, no copy).
            rows = xp.matmul(segments.rows(A, t0, t1), W, out=out.reshape(B * T, -1) if whole else None)
            if bias is not None:
                rows += bias
            if not whole:
                out[:, t0:t1] = rows.reshape(B, t1 - t0, -1)
        return out

    @threads_by_work
    def backward(self, dY, cache, input_grad=False):
        """∂loss/∂θ for every trainable key, given dY = ∂loss/∂Y (B, T, num_output).

        With ``input_grad`` the result also holds "X": ∂loss/∂X (B, T, num_input).
        A cache kept in segments is recomputed one segment at a time, last first; every
        weight gradient is summed over time blocks, last first, in both cases.
        """
        cfg, xp = self.config, self.xp
        X, d = cache["X"], cache["derived"]
        B, T, _ = X.shape
        dY = xp.ascontiguousarray(xp.asarray(dY), dtype=self.dtype)
        if dY.shape != (B, T, cfg.num_output):
            raise ELMError(f"dY must have shape {(B, T, cfg.num_output)}, got {tuple(dY.shape)}")
        sums = segments.BlockSums()
        W0 = self._layers()[0][0].shape[0]
        C = d.kappa_channel.shape[0]
        # The adjoints carried from each segment into the one before: of m, and of the scan's state.
        carry = dict(m=xp.zeros((B, cfg.num_memory), self.dtype),
                     scan=xp.zeros((B, W0 if cache["input_path"] == "sparse" else C), self.dtype))
        gk = xp.zeros((B, cfg.num_memory), self.dtype)
        gc = xp.zeros((B, cfg.num_memory), self.dtype)
        dX = xp.empty(X.shape, self.dtype) if input_grad else None
        if "segments" in cache:
            sparse = cache["input_path"] == "sparse"
            for s0, s1, start in reversed(cache["segments"]):
                seg_cache = self._segment_forward(xp.ascontiguousarray(X[:, s0:s1]), d, start, sparse)[0]
                self._segment_backward(dY, X, seg_cache, d, s0, s1, carry, gk, gc, sums, dX)
        else:
            self._segment_backward(dY, X, cache, d, 0, T, carry, gk, gc, sums, dX)
        grads = {"w_y.bias": dY.reshape(B * T, -1).sum(0)}
        grads.update(self._assemble_grads(sums, cache, d))
        if input_grad:
            grads["X"] = dX
        if cfg.learn_memory_tau:
            grads["_proto_tau_m"] = memory_time_constants_backward(
                gk.sum(0), gc.sum(0), d.tau_m, d.kappa_m, d.kappa_lambda, self.params["_proto_tau_m"], cfg,
                xp).astype(self.dtype)
        return {key: grads[key] for key in self.trainable_keys + (["X"] if input_grad else [])}

    def _segment_backward(self, dY, X, seg_cache, d, s0, s1, carry, gk, gc, sums, dX):
        """The backward over steps [s0, s1) from that stretch's forward cache, adding to ``sums``, gk, gc and dX."""
        xp = self.xp
        dM = self._readout_backward(dY, seg_cache["M"], s0, sums)
        dZ0 = self._recurrence_backward(dM, seg_cache, d, carry, gk, gc, sums)
        whole = (s0, s1) == (0, X.shape[1])
        Xs = X if whole else xp.ascontiguousarray(X[:, s0:s1])
        dXs = dX if whole or dX is None else xp.empty(Xs.shape, self.dtype)
        self._input_backward(dZ0, Xs, seg_cache, d, s0, carry, sums, dXs)
        if dXs is not dX:
            dX[:, s0:s1] = dXs

    def _assemble_grads(self, sums, cache, d):
        """The gradients of every weight from their sums over time blocks."""
        cfg, xp = self.config, self.xp
        L = cfg.mlp_num_layers
        grads = {"w_y.weight": sums["w_y.weight"]}
        keys = P.mlp_layer_keys(L)
        for wk, bk in keys[1:]:
            grads[wk], grads[bk] = sums[wk], sums[bk]
        wk, bk = keys[0]
        grads[bk] = sums[bk]
        if cache["input_path"] == "dense":
            grads[wk] = sums[wk]
        else:
            # U_t also holds κ^{t+1}·u0, a stream's starting state: Σ_t κ^{t+1} dZ0_tᵀ u0 = κ·G_0ᵀ u0.
            dW0b = sums["partial_w"].sum(0).T + d.kappa_channel[0] * sums["state_term"]
            grads[wk] = xp.concatenate([dW0b, sums[wk + ".memory"]], axis=1)
        grads["_proto_w_s"] = sums["partial"].sum(0) * (self.params["_proto_w_s"] > 0)
        return grads

    # ---- the input stage: routing, branch scan, the first layer's branch columns ----
    #
    # Two paths compute the same numbers. "dense": u_t = scan(R) first, then one GEMM
    # u @ W0bᵀ over all B·T rows. "sparse" (kernel modules with the sparse_first_layer
    # capability, when the routed input R is mostly zeros and one decay serves every
    # scan channel, the usual case since τ_s / τ_b are not trained): scan_κ(R) @ W0bᵀ =
    # scan_κ(R @ W0bᵀ), so the products cost nnz(R)·W0 (see kernels/cpu.py). The
    # forward records its choice in the cache as "input_path"; the backward follows it.
    SPARSE_FIRST_LAYER_DENSITY = 0.25

    def _sparse_possible(self, d):
        if "sparse_first_layer" not in kernel_contract.capabilities(self.backend.kernels) or self._per_synapse_scan:
            return False
        kappa = d.kappa_channel
        return bool((kappa == kappa[0]).all())

    def _use_sparse_first_layer(self, R, d):
        return self._sparse_possible(d) and np.count_nonzero(R) < self.SPARSE_FIRST_LAYER_DENSITY * R.size

    def _sparse_over_segments(self, X, d, segment):
        """The input path a whole-sequence forward would take, decided by routing X one segment at a time."""
        if not self._sparse_possible(d):
            return False
        k = self.backend.kernels
        B, T, _ = X.shape
        nonzero = 0
        for s0, s1 in segments.segment_bounds(T, segment):
            R = self.xp.empty((B, s1 - s0, d.kappa_channel.shape[0]), self.dtype)
            k.route_forward(self.xp.ascontiguousarray(X[:, s0:s1]), self.routing.indptr, self.routing.entry_syn,
                            d.entry_weight, d.syn_per_channel, R)
            nonzero += int(np.count_nonzero(R))
        return nonzero < self.SPARSE_FIRST_LAYER_DENSITY * (B * T * d.kappa_channel.shape[0])

    def _input_forward(self, X, d, start, U, sparse=None):
        """Route X, scan it into U and form the first layer's branch part; returns (Zb, u_T, z_T, cache entries).

        start     the state before the first step: "u" the scan channels [B,C] and, on the sparse
                  path, "z" the scan of the first layer's branch part [B,W0] (None: from u).
        U   [B,T,nb]  the branch columns of the first layer's input buffer, overwritten with u_t.
        Zb  [B,T,W0]  W0b u_t + c_0: the first layer's pre-activation without its memory columns.
        u_T [B,C]     the scan channels after the last step (the streaming state); z_T likewise
                      the sparse path's scan (None on the dense path).
        cache entries: "input_path" ("dense" or "sparse") and, on the sparse path, "R", the
        routed input [B,T,C] its backward multiplies by. ``sparse`` None decides from R.
        """
        cfg, xp, k = self.config, self.xp, self.backend.kernels
        B, T, _ = X.shape
        nb = cfg.branches
        u0 = start["u"]
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
        if self._use_sparse_first_layer(R, d) if sparse is None else sparse:
            # scan_κ(R) @ W0bᵀ = scan_κ(R @ W0bᵀ) for one shared κ.
            Zb = xp.empty((B, T, W_in.shape[0]), self.dtype)
            k.sparse_rows_product(R, xp.ascontiguousarray(W0b.T), Zb)
            z0 = u0 @ W0b.T if start.get("z") is None else start["z"]
            k.scan_forward(Zb, xp.full(W_in.shape[0], d.kappa_channel[0], self.dtype), z0, Zb)
            final_z = Zb[:, -1].copy()
            Zb += c_in
            return Zb, final_u, final_z, dict(input_path="sparse", R=R)
        Zb = self._block_product(U, W0b.T, c_in)
        return Zb, final_u, None, dict(input_path="dense")

    def _input_backward(self, dZ0, X, cache, d, s0, carry, sums, dX):
        """The input stage's backward over one stretch of steps (the whole sequence, or a segment from s0).

        dZ0 [B,T,W0]  ∂loss/∂z_0 (∂loss/∂p when the MLP has no hidden layer) over the stretch.
        Adds the first layer's weight and bias and the routing's per-row sums to ``sums``
        (one term per time block, last first), carries the scan's adjoint into the stretch
        before in ``carry["scan"]``, and writes ∂loss/∂X of the stretch into dX unless it is None.
        Follows the path ``_input_forward`` recorded in ``cache["input_path"]``.
        """
        cfg, xp, k = self.config, self.xp, self.backend.kernels
        A0 = cache["A0"]
        B, T, _ = dZ0.shape
        nb = cfg.branches
        wk, bk = P.mlp_layer_keys(cfg.mlp_num_layers)[0]
        W0b = self.params[wk][:, :nb]
        routing = self.routing
        blocks = segments.block_bounds(0, T, self.time_block)[::-1]
        dR = None
        if cache["input_path"] == "dense":
            for t0, t1 in blocks:
                g = segments.rows(dZ0, t0, t1)
                sums.add(bk, g.sum(0))
                sums.add(wk, g.T @ segments.rows(A0, t0, t1))
            # Back through the first layer's branch columns, the scan and the routing.
            dU = self._block_product(dZ0, W0b)
            if self._per_synapse_scan:
                dU = xp.repeat(dU, cfg.num_synapse_per_branch, axis=2)
            dR = xp.ascontiguousarray(dU)
            k.scan_backward(dR, d.kappa_channel, carry["scan"], dR)
            carry["scan"] = dR[:, 0].copy()
            for t0, t1 in blocks:
                partial = xp.empty((B, cfg.num_synapse), self.dtype)
                k.route_weight_grad(segments.block_view(X, t0, t1), routing.indptr, routing.entry_syn,
                                    routing.entry_mask, d.syn_per_channel, segments.block_view(dR, t0, t1), partial)
                sums.add("partial", partial)
        elif cache["input_path"] == "sparse":
            # G = revscan_κ(∂z_0); dW0b = Gᵀ R; dR = G W0b only where inputs spiked.
            G = dZ0.copy()
            k.scan_backward(G, xp.full(G.shape[2], d.kappa_channel[0], self.dtype), carry["scan"], G)
            carry["scan"] = G[:, 0].copy()
            W0bT = xp.ascontiguousarray(W0b.T)
            for t0, t1 in blocks:
                g = segments.rows(dZ0, t0, t1)
                sums.add(bk, g.sum(0))
                sums.add(wk + ".memory", g.T @ segments.rows(A0[:, :, nb:], t0, t1))
                partial_w = xp.empty((min(B, k.batch_chunks()), nb, G.shape[2]), self.dtype)
                G_block = segments.block_view(G, t0, t1)
                k.sparse_rows_weight_grad(segments.block_view(cache["R"], t0, t1), G_block, partial_w)
                sums.add("partial_w", partial_w)
                partial = xp.empty((B, cfg.num_synapse), self.dtype)
                k.route_weight_grad_projected(segments.block_view(X, t0, t1), routing.indptr, routing.entry_syn,
                                              routing.entry_mask, d.syn_per_channel, G_block, W0bT, partial)
                sums.add("partial", partial)
            if s0 == 0:
                sums.add("state_term", G[:, 0].T @ cache["seg_u0"])
            if dX is not None:
                dR = self._block_product(G, W0b)
        else:
            raise ELMError(f"unknown input path {cache['input_path']!r} in the forward cache")
        if dX is not None:
            k.route_input_grad(dR, routing.indptr, routing.entry_syn, d.entry_weight, d.syn_per_channel, dX)

    # ---- the recurrence: the MLP and the memory, the one stage that walks time -------------
    def _recurrence_forward(self, Zb, d, m0, A0):
        """Walk the MLP-and-memory recurrence over all T steps in one kernel call; returns M, Z, DM.

        Zb [B,T,W0]     the first layer's pre-activation without its memory columns.
        A0 [B,T,nb+Dm]  the first layer's input buffer: its memory columns get κ_m ⊙ m_{t−1}.
                        None for a pass no backward reads (kernels with the capability
                        "forward_without_cache"): then M alone is written and returned.
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
        walk = (Zb, xp.ascontiguousarray(W0m.T), WhT, ch, WoT, co, d.kappa_m, d.c_m, m0,
                activation_code(cfg.mlp_activation), self.dtype.type(P.PHI_SCALE), self.dtype.type(P.PHI_SLOPE),
                k.batch_tile(B))
        if A0 is None:
            k.recur_forward_without_cache(*walk, L, M)
            return M
        DM = xp.empty_like(M)
        Z = xp.empty((L, B, T, H), self.dtype)
        k.recur_forward(*walk, M, Z, DM, A0[:, :, nb:])
        return M, Z, DM

    def _recurrence_backward(self, dM, cache, d, carry, gk, gc, sums):
        """Back through the recurrence over one stretch of steps; returns dZ0 [B,T,W0] for the input stage.

        Adds the weights and biases of the MLP's layers after the first to ``sums`` (one term
        per time block, last first) and, per batch row, Σ_t ∂loss/∂κ_m (explicit uses) and
        Σ_t ∂loss/∂c_m to gk, gc [B,Dm]; carry["m"] is ∂loss/∂m after the stretch on entry and
        ∂loss/∂m before it on return.
        """
        cfg, xp, k = self.config, self.xp, self.backend.kernels
        M, Z, DM, m0 = (cache[n] for n in ("M", "Z", "DM", "seg_m0"))
        B, T, _ = M.shape
        nb, L = cfg.branches, cfg.mlp_num_layers
        layers = self._layers()
        W0m = layers[0][0][:, nb:]
        Wh = xp.stack([W for W, _ in layers[1:L]]) if L > 1 else xp.zeros((0, Z.shape[3], Z.shape[3]), self.dtype)
        Wo = layers[-1][0] if L else xp.zeros((1, 1), self.dtype)
        dZ = xp.empty_like(Z)
        act = xp.empty_like(Z)
        dP = xp.empty_like(M)
        k.recur_backward(dM, xp.ascontiguousarray(W0m), xp.ascontiguousarray(Wh), xp.ascontiguousarray(Wo),
                         d.kappa_m, d.c_m, m0, M, Z, DM, activation_code(cfg.mlp_activation),
                         self.dtype.type(P.PHI_SCALE), self.dtype.type(P.PHI_SLOPE), k.batch_tile(B),
                         carry["m"], dZ, dP, gk, gc, act)

        # ∂loss/∂z_l of every MLP layer (the output layer's is ∂loss/∂p); the layers after
        # the first take their weight gradients as one GEMM each per time block.
        layer_grads = [dZ[l] for l in range(L)] + [dP]
        for t0, t1 in segments.block_bounds(0, T, self.time_block)[::-1]:
            for l, (wk, bk) in enumerate(P.mlp_layer_keys(L)[1:], start=1):
                g = segments.rows(layer_grads[l], t0, t1)
                sums.add(wk, g.T @ segments.rows(act[l - 1], t0, t1))
                sums.add(bk, g.sum(0))
        return layer_grads[0]

    # ---- the readout --------------------------------------------------------------------
    def _readout_forward(self, M):
        """Y = M W_yᵀ + b_y, one GEMM per time block."""
        return self._block_product(M, self.params["w_y.weight"].T, self.params["w_y.bias"])

    def _readout_backward(self, dY, M, s0, sums):
        """dW_y over steps [s0, s0 + T) of dY into ``sums``; returns dM = ∂loss/∂m_t through y_t (B, T, Dm)."""
        B, T, Dm = M.shape
        Wy = self.params["w_y.weight"]
        dY_part = dY if (s0, T) == (0, dY.shape[1]) else dY[:, s0:s0 + T]
        for t0, t1 in segments.block_bounds(0, T, self.time_block)[::-1]:
            sums.add("w_y.weight", segments.rows(dY_part, t0, t1).T @ segments.rows(M, t0, t1))
        return self._block_product(dY_part, Wy)

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
        # A chunk too long for memory runs in segments.
        Y, cache = self._forward(X, state, self.forward_segment(X), keep_cache=not self.forward_without_cache)
        self._check_output(Y, X)
        return Y, cache["final_state"]
