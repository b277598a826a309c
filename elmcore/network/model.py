"""The ELM Network: recurrent layers of Branch-ELM neurons (docs/spec.md §7), forward and BPTT.

The computation is cut like the single neuron's (docs/architecture.md): what is linear
over all B·T rows runs as one large operation per layer (the external-input part of the
synaptic sums as a sparse routing, the readout as a GEMM, every weight gradient as a
reduction over all rows), and one kernel call walks time forward for the coupled part
(recurrent synapses reading o_{t−1}, the per-neuron MLPs, memory, outputs), one walks
it back (``kernels/network_cpu.py``, ``kernels/network_cuda.py``). Each stage is a
forward/backward pair of methods (a layer, the readout); the τ_m transform and its chain
rule are ``engine/time_constants.py``. Every backward formula is derived in
docs/gradients.md ("ELM Network") with the symbols of its table, which are the names
used here.

Inside the model every per-neuron array is neuron-minor (neurons on the last axis, see
``kernels/network_cpu.py``); parameters, gradients and traces keep the spec's layout.
"""

import dataclasses

import numpy as np

from elmcore.network import params as NP
from elmcore.network.config import NetworkConfig
from elmcore.engine import segments
from elmcore.errors import DataError, ELMError
from elmcore.engine.model_base import InputChecks, ParameterBookkeeping, SingleStep, resolve_dtype, threads_by_work
from elmcore.engine.time_constants import decay, memory_time_constants, memory_time_constants_backward
from elmcore.neuron.params import PHI_SCALE, PHI_SLOPE
from elmcore.kernels import contract as kernel_contract
from elmcore.kernels.pointwise import activation_code


@dataclasses.dataclass
class SynapseMap:
    """One layer's synapses split by what they read (fixed by ``synapse_source``).

    External synapses form a CSR over the layer's inputs, in the routing kernels' format:
    entry e of input d feeds "virtual synapse" ``entry_syn[e]`` = (k·N + i)·spb + j mod spb,
    where j is the synapse of neuron i and k its branch, so ``entry_syn // spb`` is the
    neuron-minor channel k·N + i.
    Recurrent synapses are entries (rec_i, rec_k, rec_src) grouped by target neuron
    (``rec_ptr``), and listed again by source neuron (``src_ptr``, ``src_entry``) for the
    backward gather.
    ``*_flat`` give each entry's position i·k_c + j in w_s, to gather weights and scatter
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


class ELMNetwork(InputChecks, ParameterBookkeeping, SingleStep, segments.Recomputation):
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
        # Spare step-sized buffers for reuse where the backend wants them: on the CPU, fresh 100 MB
        # arrays cost a page fault per 4 KiB on first touch, measured as a fifth of a char-LM step.
        self._spare = {} if getattr(self.backend, "reuses_buffers", False) else None
        self.synapses = [SynapseMap.build(config, host[NP.layer_prefix(l) + "synapse_source"],
                                          config.layer_input_size(l), self.xp)
                         for l in range(config.num_layers)]

    # ---- kernel-layout weights -------------------------------------------------
    def layer_weights(self, layer):
        cfg, xp, params, dt = self.config, self.xp, self.params, self.dtype
        pre = NP.layer_prefix(layer)
        syn = self.synapses[layer]
        w_s = params[pre + "w_s"].reshape(-1)
        def contiguous(a):
            return xp.ascontiguousarray(a, dtype=dt)

        mlp = [(contiguous(params[f"{pre}mlp.{l}.weight"].transpose(2, 1, 0)),
                contiguous(params[f"{pre}mlp.{l}.bias"].T)) for l in range(cfg.mlp_num_layers + 1)]
        # In the kernel layout [Dm,N]: the parameter is [N,Dm].
        tau_m, kappa_m, kappa_lambda, c_m = memory_time_constants(params[pre + "_proto_tau_m"].T, cfg, xp)
        kappa_b = decay(params[pre + "tau_b"].T, cfg.delta_t, xp)
        return LayerWeights(contiguous(w_s[syn.entry_flat]), contiguous(w_s[syn.rec_flat]), contiguous(kappa_b),
                            mlp, contiguous(tau_m), contiguous(kappa_m), contiguous(kappa_lambda),
                            contiguous(c_m), contiguous(params[pre + "w_o.weight"].T),
                            contiguous(params[pre + "w_o.bias"]))

    # ---- buffers ----------------------------------------------------------------
    MAX_SPARE = 4  # per shape: the largest buffers of one step (Z, dZ, act share a shape)

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
        """Hand a forward cache's buffers back; the cache is emptied so that it cannot be read again.

        Only the final state stays: it is no recycled buffer, and a stateful trainer reads it
        after the backward."""
        for layer_cache in cache.get("layers") or []:
            if "A0" in layer_cache:
                self._recycle_layer(layer_cache)
        final = cache.get("final_state")
        cache.clear()
        cache["consumed"] = True
        if final is not None:
            cache["final_state"] = final

    # ---- forward and backward: the stages in order, each a forward/backward pair below ----
    def init_state(self, batch_size=1):
        """Zero state for ``step`` / ``run``: per layer b (branches), m (memory), o (outputs), neuron-minor."""
        cfg, xp = self.config, self.xp
        n, N = cfg.num_layers, cfg.num_neurons
        return {"b": xp.zeros((n, batch_size, cfg.num_branch, N), self.dtype),
                "m": xp.zeros((n, batch_size, cfg.num_memory, N), self.dtype),
                "o": xp.zeros((n, batch_size, N), self.dtype)}

    # ---- long sequences: the recomputation segment (engine/segments.py, Recomputation) -------
    def _bytes_kept_whole(self, batch, steps):
        """Kept whatever the segment: the input, every layer's outputs and their gradients, Y and dY."""
        cfg = self.config
        return 2 * batch * steps * (cfg.num_input + cfg.num_layers * cfg.num_neurons + cfg.num_output) * \
            self.dtype.itemsize

    @threads_by_work
    def forward(self, X, return_cache=False, state=None, recompute_segment=None):
        """Outputs Y (B, T, num_output) for inputs X (B, T, num_input), from the zero state or ``state``.

        The cache holds, per layer, the input, the first MLP layer's input A0 (B·T·(nb + Dm)·N, or
        b_t alone, B·T·nb·N, for a backward walk that rebuilds the rest from m),
        the hidden pre-activations Z (L·B·T·H·N), Δm and m (B·T·Dm·N each) and o (B·T·N),
        and "final_state", the state after the last step (what ``run`` returns).
        With ``recompute_segment`` k (or the model's ``recompute_segment``, or when the whole
        cache would not fit) it keeps per layer only o and the state every k steps (k rounded
        up to whole time blocks), and ``backward`` recomputes each segment's arrays, with the
        same gradients bit for bit (docs/architecture.md, "Long sequences in bounded memory").
        ``state`` (from ``init_state`` / ``run`` / an earlier cache's "final_state") continues a
        stream; ``backward`` then treats it as a constant (truncated BPTT).
        Without ``return_cache``, kernels with the capability "forward_without_cache" keep no cache
        at all (the same Y, bit for bit), in the same segments when the sequence is too long for memory.
        """
        X = self.prepare_input(X)
        start = None if state is None else self._checked_state(state, X.shape[0])
        segment = self.forward_segment(X, recompute_segment)
        if not return_cache and self.forward_without_cache:
            Y, _ = self._forward_without_cache(X, start, segment)
            self._check_output(Y, X)
            return Y
        Y, cache = self._forward(X, start, segment)
        self._check_output(Y, X)
        if return_cache:
            return Y, cache
        self._recycle_cache(cache)
        return Y

    @property
    def forward_without_cache(self):
        """Whether a pass that needs no backward can skip the cache (a kernel capability)."""
        return "forward_without_cache" in kernel_contract.capabilities(self.kernels)

    def _forward_without_cache(self, X, state, segment=None):
        """(Y, the state after the last step) for a pass no backward reads: every layer's walk keeps
        only its outputs. With ``segment`` (a sequence whose arrays would not fit whole) the pass goes
        segment by segment, every layer carrying its state from one into the next: the same walks
        on the same rows as one pass over all T, so the same Y bit for bit."""
        cfg, xp = self.config, self.xp
        B, T, _ = X.shape
        if state is None:
            state = self.init_state(B)
        weights = [self.layer_weights(layer) for layer in range(cfg.num_layers)]
        final = {key: xp.array(state[key]) for key in ("b", "m", "o")}
        Y = xp.empty((B, T, cfg.num_output), self.dtype) if segment else None
        for s0, s1 in segments.segment_bounds(T, segment or T):
            inp = X if not segment else xp.ascontiguousarray(X[:, s0:s1])
            for layer in range(cfg.num_layers):
                start = (final["b"][layer], final["m"][layer], final["o"][layer])
                O, end = self._layer_forward(layer, weights[layer], inp, start, keep_cache=False)
                final["b"][layer], final["m"][layer], final["o"][layer] = end
                if layer > 0:
                    self._recycle(inp)
                inp = O
            if segment:
                Y[:, s0:s1] = self._readout_forward(inp)
            else:
                Y = self._readout_forward(inp)
            self._recycle(inp)
        return Y, final

    def _forward(self, X, state, segment=None):
        cfg, xp = self.config, self.xp
        B, T, _ = X.shape
        if state is None:
            state = self.init_state(B)
        layers = []
        final = {"b": xp.empty_like(state["b"]), "m": xp.empty_like(state["m"]), "o": xp.empty_like(state["o"])}
        inp = X
        for layer in range(cfg.num_layers):
            w = self.layer_weights(layer)
            start = (state["b"][layer], state["m"][layer], state["o"][layer])
            if segment is None:
                layer_cache, end = self._layer_forward(layer, w, inp, start)
            else:
                O = xp.empty((B, T, cfg.num_neurons), self.dtype)
                starts = []
                for s0, s1 in segments.segment_bounds(T, segment):
                    starts.append((s0, s1, start))
                    seg_cache, start = self._layer_forward(layer, w, xp.ascontiguousarray(inp[:, s0:s1]), start)
                    O[:, s0:s1] = seg_cache["O"]
                    self._recycle_layer(seg_cache)
                layer_cache, end = dict(X=inp, O=O, weights=w, segments=starts), start
            final["b"][layer], final["m"][layer], final["o"][layer] = end
            layers.append(layer_cache)
            inp = layer_cache["O"]
        Y = self._readout_forward(inp)
        return Y, dict(layers=layers, final_state=final, shape=(B, T))

    @threads_by_work
    def backward(self, dY, cache, input_grad=False):
        """∂loss/∂θ for every trainable key, given dY = ∂loss/∂Y (B, T, num_output).

        With ``input_grad`` the result also holds "X": ∂loss/∂X (B, T, num_input).
        A layer kept in segments is recomputed one segment at a time, last first; every
        weight gradient is summed over time blocks, last first, in both cases.
        """
        cfg, xp = self.config, self.xp
        if cache.get("consumed"):
            raise ELMError("this forward cache was already used by backward (its buffers are reused): "
                           "run forward again")
        B, T = cache["shape"]
        dY = xp.ascontiguousarray(xp.asarray(dY), dtype=self.dtype)
        if dY.shape != (B, T, cfg.num_output):
            raise ELMError(f"dY must have shape {(B, T, cfg.num_output)}, got {tuple(dY.shape)}")
        layers = cache["layers"]
        grads, dO = self._readout_backward(dY, layers[-1]["O"])
        dX = None
        for layer in range(cfg.num_layers - 1, -1, -1):
            layer_grads, dX = self._layer_backward(layer, layers[layer], dO, layer > 0 or input_grad)
            grads.update(layer_grads)
            dO = dX
        self._recycle_cache(cache)
        keys = self.trainable_keys
        out = {key: grads[key] for key in keys}
        if input_grad:
            out["X"] = dX
        return out

    # ---- one layer: routing, the time walk, the weight gradients ----------------------------
    def _layer_forward(self, layer, w, X, start, keep_cache=True):
        """One layer over the steps of X from the state ``start`` = (b0, m0, o0) [B,nb,N], [B,Dm,N], [B,N].

        X [B,T,D] is the layer's input over those steps: the network's input, or the layer
        below's outputs O. Returns (its cache entry, the state (b, m, o) after the last step);
        without ``keep_cache`` (kernels with the capability "forward_without_cache"), (its outputs
        O [B,T,N], that state).
        """
        cfg, k = self.config, self.kernels
        B, T, _ = X.shape
        N, nb, Dm, L, H = cfg.num_neurons, cfg.num_branch, cfg.num_memory, cfg.mlp_num_layers, cfg.hidden_size
        activation = activation_code(cfg.mlp_activation)
        syn = self.synapses[layer]
        R = self._buffer((B, T, nb * N))
        k.route_forward(X, syn.indptr, syn.entry_syn, w.entry_weight, cfg.num_synapse_per_branch, R)
        W_in, c_in = w.mlp[0]
        W_hid, c_hid, W_out, c_out = self._hidden_and_output(w)
        walk = (R.reshape(B, T, nb, N), w.kappa_b, syn.rec_ptr, syn.rec_i, syn.rec_k, syn.rec_src, w.rec_w, W_in,
                c_in, W_hid, c_hid, W_out, c_out, w.kappa_m, w.c_m, w.w_o, w.c_o, *start, activation,
                self.dtype.type(PHI_SCALE), self.dtype.type(PHI_SLOPE))
        b_end = self.xp.empty_like(start[0])
        O = self._buffer((B, T, N))
        if not keep_cache:
            m_end = self.xp.empty_like(start[1])
            k.network_forward_without_cache(*walk, L, O, b_end, m_end)
            self._recycle(R)
            return O, (b_end, m_end, O[:, -1].copy())
        # A walk that sums the weight gradients itself rebuilds a_0's κ_m ⊙ m_{t−1} rows from M: the
        # cache then keeps b_t alone (37 floats per neuron and step instead of 45 on SHD-Adding).
        in_walk = self.weight_grads_in_walk
        A0 = self._buffer((B, T, nb if in_walk else nb + Dm, N))
        Z = self._buffer((L, B, T, H, N))
        DM = self._buffer((B, T, Dm, N))
        M = self._buffer((B, T, Dm, N))
        k.network_forward(*walk, A0, Z, DM, M, O, b_end)
        self._recycle(R)
        b0, m0, o0 = start
        end = (b_end, M[:, -1].copy(), O[:, -1].copy())
        return dict(X=X, A0=A0, Z=Z, DM=DM, M=M, O=O, m0=m0, o0=o0, weights=w, weight_grads_in_walk=in_walk), end

    def _recycle_layer(self, layer_cache):
        self._recycle(layer_cache["A0"], layer_cache["Z"], layer_cache["DM"], layer_cache["M"], layer_cache["O"])

    def _layer_backward(self, layer, layer_cache, dO, need_input_grad):
        """One layer back over all T steps; returns (its gradients, dX or None).

        dO [B,T,N]  ∂loss/∂o_t from outside the layer (the readout, or the layer above's dX).
        dX [B,T,D]  ∂loss/∂(the layer's input), when ``need_input_grad``.
        A layer kept in segments is recomputed segment by segment, last first, the adjoints
        of the state carried from each segment into the one before.
        """
        cfg, xp = self.config, self.xp
        B, T, N = dO.shape
        nb, Dm = cfg.num_branch, cfg.num_memory
        w, X = layer_cache["weights"], layer_cache["X"]
        sums = segments.BlockSums()
        carry = (xp.zeros((B, nb, N), self.dtype), xp.zeros((B, Dm, N), self.dtype), xp.zeros((B, N), self.dtype))
        gk = xp.zeros((B, Dm, N), self.dtype)
        gc = xp.zeros((B, Dm, N), self.dtype)
        dX = xp.empty(X.shape, self.dtype) if need_input_grad else None
        if "segments" not in layer_cache:
            self._segment_backward(layer, layer_cache, dO, carry, gk, gc, sums, dX)
        else:
            for s0, s1, start in reversed(layer_cache["segments"]):
                seg_cache, _ = self._layer_forward(layer, w, xp.ascontiguousarray(X[:, s0:s1]), start)
                dX_seg = None if dX is None else xp.empty(seg_cache["X"].shape, self.dtype)
                self._segment_backward(layer, seg_cache, xp.ascontiguousarray(dO[:, s0:s1]), carry, gk, gc, sums,
                                       dX_seg)
                if dX is not None:
                    dX[:, s0:s1] = dX_seg
                self._recycle_layer(seg_cache)
        return self._layer_weight_grads(layer, w, sums, gk, gc), dX

    def _segment_backward(self, layer, layer_cache, dO, carry, gk, gc, sums, dX):
        """The walk back over the steps of ``layer_cache`` (a whole sequence, or one segment of it).

        Adds every weight gradient's time blocks (last first) to ``sums`` and, per batch row,
        Σ_t ∂loss/∂κ_m and Σ_t ∂loss/∂c_m to gk, gc; carries the state's adjoints in ``carry``
        (b, m, o) into the steps before; writes ∂loss/∂X of these steps into dX unless None.
        """
        cfg, xp, k = self.config, self.xp, self.kernels
        B, T, N = dO.shape
        nb, Dm, L, H = cfg.num_branch, cfg.num_memory, cfg.mlp_num_layers, cfg.hidden_size
        activation = activation_code(cfg.mlp_activation)
        w, syn = layer_cache["weights"], self.synapses[layer]
        W_in, _ = w.mlp[0]
        W_hid, _, W_out, _ = self._hidden_and_output(w)
        walk = (dO, w.kappa_b, syn.rec_ptr, syn.rec_i, syn.rec_k, syn.rec_src, w.rec_w, syn.src_ptr, syn.src_entry,
                W_in, W_hid, W_out, w.kappa_m, w.c_m, w.w_o, layer_cache["m0"], layer_cache["A0"], layer_cache["Z"],
                layer_cache["DM"], layer_cache["M"], activation, self.dtype.type(PHI_SCALE),
                self.dtype.type(PHI_SLOPE))
        GB = self._buffer((B, T, nb, N))
        in_walk = layer_cache["weight_grads_in_walk"]  # as the forward chose: its A0 fits that path only
        if in_walk:
            for t0, t1 in segments.block_bounds(0, T, self.time_block)[::-1]:
                grad_in = (xp.empty_like(W_in), xp.empty(W_in.shape[1:], self.dtype))
                grad_hid = (xp.empty_like(W_hid), xp.empty(W_hid.shape[:1] + W_hid.shape[2:], self.dtype))
                grad_out = (xp.empty_like(W_out), xp.empty(W_out.shape[1:], self.dtype))
                grad_wo = (xp.empty((Dm, 1, N), self.dtype), xp.empty((1, N), self.dtype))
                grad_rec = xp.empty((B, syn.rec_i.shape[0]), self.dtype)
                k.network_backward_block(*walk, t0, t1, layer_cache["O"], layer_cache["o0"], GB, gk, gc, *carry,
                                         *grad_in, *grad_hid, *grad_out, *grad_wo, grad_rec)
                hidden = [(grad_hid[0][l], grad_hid[1][l]) for l in range(L - 1)]
                self._add_mlp_block_grads(sums, grad_wo, [grad_in] + hidden + ([grad_out] if L else []))
                if syn.rec_i.shape[0]:
                    sums.add("w_s.recurrent", grad_rec)
        else:
            dZ = self._buffer((L, B, T, H, N))
            dP = self._buffer((B, T, Dm, N))
            GO = self._buffer((B, T, N))
            act = self._buffer((L, B, T, H, N))
            k.network_backward(*walk, GB, dZ, dP, GO, act, gk, gc, *carry)
            self._mlp_weight_grads(layer_cache, dZ, dP, GO, act, sums)
            self._recycle(dZ, dP, GO, act)
        self._synapse_weight_grads(layer_cache, syn, GB, sums, recurrent=not in_walk)
        if dX is not None:
            k.route_input_grad(GB.reshape(B, T, nb * N), syn.indptr, syn.entry_syn, w.entry_weight,
                               cfg.num_synapse_per_branch, dX)
        self._recycle(GB)

    @property
    def weight_grads_in_walk(self):
        """Whether the backward walk sums the weight gradients of the MLP, w_o and the recurrent synapses
        itself (a kernel capability)."""
        return not self.separate_weight_grads and \
            "weight_grads_in_walk" in kernel_contract.capabilities(self.kernels)

    # Set to sum the weight gradients after the walk (neuron_weight_grad, recurrent_weight_grad) even where
    # the kernels could sum them in the walk.
    separate_weight_grads = False

    @staticmethod
    def _add_mlp_block_grads(sums, w_o_grads, layer_grads):
        """One time block's weight gradients of w_o and of every MLP layer (weight, bias) into ``sums``."""
        sums.add("w_o", w_o_grads[0])
        sums.add("c_o", w_o_grads[1])
        for l, (gw, g_bias) in enumerate(layer_grads):
            sums.add(f"mlp.{l}.weight", gw)
            sums.add(f"mlp.{l}.bias", g_bias)

    def _mlp_weight_grads(self, layer_cache, dZ, dP, GO, act, sums):
        """The MLP's and w_o's weight gradients from the walk's dZ, dP, GO and act, one reduction per time block,
        last first."""
        xp, k = self.xp, self.kernels
        B, T, N = GO.shape
        Dm, L = self.config.num_memory, self.config.mlp_num_layers
        inputs = [layer_cache["A0"]] + [act[l] for l in range(L)]
        outputs = [dZ[l] for l in range(L)] + [dP]
        for t0, t1 in segments.block_bounds(0, T, self.time_block)[::-1]:
            # w_o: ∂o_t/∂w_o = m_t, ∂o_t/∂c_o = 1.
            g_wo = xp.empty((Dm, 1, N), self.dtype)
            g_co = xp.empty((1, N), self.dtype)
            k.neuron_weight_grad(GO.reshape(B, T, 1, N), layer_cache["M"], t0, t1, g_wo, g_co)
            # The MLP: layer l's weight gradient is Σ_rows (its output gradient) ⊗ (its input).
            layer_grads = []
            for l in range(L + 1):
                a, g = inputs[l], outputs[l]
                layer_grads.append((xp.empty((a.shape[2], g.shape[2], N), self.dtype),
                                    xp.empty((g.shape[2], N), self.dtype)))
                k.neuron_weight_grad(g, a, t0, t1, *layer_grads[-1])
            self._add_mlp_block_grads(sums, (g_wo, g_co), layer_grads)

    def _synapse_weight_grads(self, layer_cache, syn, GB, sums, recurrent=True):
        """w_s's gradient over these steps, one reduction per time block, last first: external synapses
        through the routing, recurrent ones (unless the walk summed them) against o_{t−1}."""
        cfg, xp, k = self.config, self.xp, self.kernels
        B, T, nb, N = GB.shape
        k_c = cfg.num_synapse
        O = layer_cache["O"]
        for t0, t1 in segments.block_bounds(0, T, self.time_block)[::-1]:
            GB_block = segments.block_view(GB, t0, t1)
            partial = xp.empty((B, N * k_c), self.dtype)
            k.route_weight_grad(segments.block_view(layer_cache["X"], t0, t1), syn.indptr, syn.entry_syn,
                                xp.ones(syn.entry_syn.shape[0], self.dtype), cfg.num_synapse_per_branch,
                                GB_block.reshape(B, t1 - t0, nb * N), partial)
            sums.add("w_s.external", partial)
            if recurrent and syn.rec_i.shape[0]:
                partial_rec = xp.empty((B, syn.rec_i.shape[0]), self.dtype)
                o_before = layer_cache["o0"] if t0 == 0 else xp.ascontiguousarray(O[:, t0 - 1])
                k.recurrent_weight_grad(GB_block, segments.block_view(O, t0, t1), o_before, syn.rec_i, syn.rec_k,
                                        syn.rec_src, partial_rec)
                sums.add("w_s.recurrent", partial_rec)

    def _layer_weight_grads(self, layer, w, sums, gk, gc):
        """Every weight gradient of one layer, from its sums over time blocks."""
        cfg, xp = self.config, self.xp
        L, k_c, N = cfg.mlp_num_layers, cfg.num_synapse, cfg.num_neurons
        syn = self.synapses[layer]
        pre = NP.layer_prefix(layer)
        grads = {pre + "w_o.weight": xp.ascontiguousarray(sums["w_o"][:, 0, :].T), pre + "w_o.bias": sums["c_o"][0]}
        for l in range(L + 1):
            grads[f"{pre}mlp.{l}.weight"] = xp.ascontiguousarray(sums[f"mlp.{l}.weight"].transpose(2, 1, 0))
            grads[f"{pre}mlp.{l}.bias"] = xp.ascontiguousarray(sums[f"mlp.{l}.bias"].T)
        g_ws = xp.zeros(N * k_c, self.dtype)
        g_ws[syn.entry_flat] = sums["w_s.external"].sum(0)[syn.entry_syn]
        if syn.rec_i.shape[0]:
            g_ws[syn.rec_flat] = sums["w_s.recurrent"].sum(0)
        grads[pre + "w_s"] = g_ws.reshape(N, k_c)
        if cfg.learn_memory_tau:
            # The kernel layout is [Dm,N]; the parameter is [N,Dm].
            g_proto = memory_time_constants_backward(gk.sum(0), gc.sum(0), w.tau_m, w.kappa_m, w.kappa_lambda,
                                                     self.params[pre + "_proto_tau_m"].T, cfg, xp)
            grads[pre + "_proto_tau_m"] = xp.ascontiguousarray(g_proto.T, dtype=self.dtype)
        return grads

    def _hidden_and_output(self, w):
        """Hidden-to-hidden weights stacked [Lh,H,H,N] and the output layer; placeholders where absent."""
        xp, dt, L = self.xp, self.dtype, self.config.mlp_num_layers
        N, H = self.config.num_neurons, self.config.hidden_size
        hidden = w.mlp[1:L]
        W_hid = xp.stack([W for W, _ in hidden]) if hidden else xp.zeros((1, 1, 1, N), dt)
        c_hid = xp.stack([c for _, c in hidden]) if hidden else xp.zeros((1, 1, N), dt)
        W_out, c_out = w.mlp[L] if L else (xp.zeros((H, 1, N), dt), xp.zeros((1, N), dt))
        return W_hid, c_hid, W_out, c_out

    # ---- the readout --------------------------------------------------------------------
    def _readout_forward(self, O):
        """Y = O W_yᵀ + b_y over all B·T rows, O [B,T,N] being the last layer's outputs."""
        xp, k = self.xp, self.kernels
        B, T, N = O.shape
        Wy, by = self.params["readout.weight"], self.params["readout.bias"]
        Y = xp.empty((B * T, Wy.shape[0]), self.dtype)
        k.rows_product(O.reshape(B * T, N), xp.ascontiguousarray(Wy.T), by, Y)
        return Y.reshape(B, T, -1)

    def _readout_backward(self, dY, O):
        """The readout's gradients and dO = ∂loss/∂o_t of the last layer (B, T, N); returns (grads, dO)."""
        cfg, xp, k = self.config, self.xp, self.kernels
        B, T, N = O.shape
        BT = B * T
        dY2 = dY.reshape(BT, -1)
        grads = {"readout.weight": xp.empty((cfg.num_output, N), self.dtype)}
        k.rows_transposed_product(dY2, O.reshape(BT, N), grads["readout.weight"])
        grads["readout.bias"] = dY2.sum(0)
        dO = xp.empty((BT, N), self.dtype)
        k.rows_product(dY2, self.params["readout.weight"], xp.zeros(N, self.dtype), dO)
        return grads, dO.reshape(B, T, N)

    # ---- traces and streaming -------------------------------------------------
    @threads_by_work
    def traces(self, X):
        """Y plus every layer's outputs and memory after each step, in the spec's layout:
        {"layers.ℓ.o": (B, T, N), "layers.ℓ.m": (B, T, N, Dm)}."""
        X = self.prepare_input(X)
        Y, cache = self._forward(X, None)
        out = {}
        for layer, layer_cache in enumerate(cache["layers"]):
            out[f"layers.{layer}.o"] = layer_cache["O"]
            out[f"layers.{layer}.m"] = self.xp.ascontiguousarray(layer_cache["M"].transpose(0, 1, 3, 2))
        return Y, out

    def _checked_state(self, state, batch_size):
        """``state`` as contiguous arrays of the model dtype, after checking it fits this network and batch."""
        if not isinstance(state, dict) or any(key not in state for key in ("b", "m", "o")):
            raise DataError("state must come from init_state / run of this network")
        expect = self.init_state(batch_size)
        for key in ("b", "m", "o"):
            if tuple(state[key].shape) != tuple(expect[key].shape):
                raise DataError(f"state '{key}' has shape {tuple(state[key].shape)}, this network and batch "
                                f"{batch_size} need {tuple(expect[key].shape)}")
        return {key: self.xp.ascontiguousarray(state[key], dtype=self.dtype) for key in ("b", "m", "o")}

    @threads_by_work
    def run(self, X, state):
        """Continue a stream over a chunk X (B, T, num_input); returns (Y, new state)."""
        X = self.prepare_input(X)
        state = self._checked_state(state, X.shape[0])
        segment = self.forward_segment(X)  # a chunk too long for memory runs in segments
        if self.forward_without_cache:
            Y, final = self._forward_without_cache(X, state, segment)
        else:
            Y, cache = self._forward(X, state, segment)
            final = cache["final_state"]
            self._recycle_cache(cache)
        self._check_output(Y, X)
        return Y, final
