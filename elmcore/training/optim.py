"""Adam-family optimisers over plain arrays, global-norm clipping and a cosine schedule.

The update formulas are PyTorch's (``torch.optim.Adam``, ``AdamW``, ``Adamax``)
so that hyper-parameters carry over from the release's training scripts.
Parameters are updated in place, so the model's arrays stay the same objects
(and on the GPU stay in device memory: the arithmetic runs through the
arrays' own module, NumPy or CuPy).
"""

import math

import numpy as np
from numba import njit

from elmcore.engine.backend import array_module
from elmcore.errors import ELMError

KINDS = ("adam", "adamw", "adamax")


# Added to the norm before dividing, as torch's clip_grad_norm_ does.
CLIP_EPS = 1e-6


def squared_norms(grads):
    """Each gradient's squared L2 norm, in ``grads``' order, as 0-d values on the gradients' device (nothing is
    read to the host: a training step on a GPU reads them with its other scalars, in one copy)."""
    return [(g * g).sum() for g in grads.values()]


def norm_from_squares(squares):
    """The global norm from ``squared_norms`` (host numbers): summed in order in float64, as every clip does."""
    total = 0.0
    for square in squares:
        total += float(square)
    return math.sqrt(total)


def global_norm(grads):
    return norm_from_squares(squared_norms(grads))


def clip_by_global_norm(grads, max_norm):
    """Scale all gradients in place so their joint L2 norm is at most ``max_norm``.

    Returns the norm before clipping.
    """
    norm = global_norm(grads)
    if max_norm is not None and norm > max_norm:
        scale = max_norm / (norm + CLIP_EPS)
        for g in grads.values():
            g *= g.dtype.type(scale)
    return norm


def clip_on_device(grads, squares, max_norm):
    """``clip_by_global_norm`` decided on the gradients' device from their ``squared_norms``: no value is read
    to the host. The norm is summed in the same order in float64 and the scale formed by the same operations,
    so the gradients come out bit for bit as ``clip_by_global_norm`` leaves them (below ``max_norm`` they are
    multiplied by exactly 1)."""
    if max_norm is None or not grads:
        return
    xp = array_module(next(iter(grads.values())))
    total = xp.zeros((), xp.float64)
    for square in squares:
        total = total + square.astype(xp.float64)
    norm = xp.sqrt(total)
    scale = xp.where(norm > max_norm, max_norm / (norm + CLIP_EPS), 1.0)
    for g in grads.values():
        g *= scale.astype(g.dtype)


def cosine_lr(step, total_steps, base_lr, min_lr=0.0, warmup_steps=0):
    """Learning rate at ``step`` (0-based): linear warm-up, then half a cosine down to ``min_lr``."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


class Optimizer:
    """Adam, AdamW (decoupled weight decay) or Adamax over a dict of arrays.

    ``params`` maps names to the arrays to update in place; ``step(grads)``
    takes a dict with the same names. ``weight_decay`` is L2 added to the
    gradient for adam/adamax and decoupled for adamw, as in PyTorch.
    """

    def __init__(self, params, kind="adam", lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, clip_norm=None):
        if kind not in KINDS:
            raise ELMError(f"optimizer must be one of {', '.join(KINDS)}, got {kind!r}")
        if not (lr > 0 and math.isfinite(lr)):
            raise ELMError(f"learning rate must be a finite number > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ELMError(f"betas must lie in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ELMError(f"weight decay must be >= 0, got {weight_decay}")
        if clip_norm is not None and not clip_norm > 0:
            raise ELMError(f"gradient clip norm must be > 0, got {clip_norm}")
        self.params = params
        self.kind, self.lr, self.betas, self.eps = kind, float(lr), tuple(betas), float(eps)
        self.weight_decay, self.clip_norm = float(weight_decay), clip_norm
        self.t = 0
        self.exp_avg = {k: _zeros_like(p) for k, p in params.items()}
        self.exp_second = {k: _zeros_like(p) for k, p in params.items()}  # v (adam) or u (adamax)

    def step(self, grads, lr=None, squares=None):
        """Apply one update; returns the gradient norm before clipping.

        With ``squares`` (``squared_norms(grads)``, on the gradients' device) the clipping is decided
        there (``clip_on_device``), nothing is read to the host, and the norm is left to the caller
        (``norm_from_squares`` of the squares once read): returns None then.
        """
        missing = set(self.params) - set(grads)
        if missing:
            raise ELMError(f"optimizer step is missing gradients for {sorted(missing)}")
        if squares is None:
            norm = clip_by_global_norm(grads, self.clip_norm)
        else:
            norm = None
            clip_on_device(grads, squares, self.clip_norm)
        lr = self.lr if lr is None else float(lr)
        self.t += 1
        b1, b2 = self.betas
        bc1 = 1 - b1 ** self.t
        bc2 = 1 - b2 ** self.t
        # Every constant rounded to the parameters' dtype once per step, as both forms below use it.
        constants = {}
        for name, p in self.params.items():
            if p.dtype not in constants:
                constants[p.dtype] = np.array(
                    [1 - lr * self.weight_decay if self.kind == "adamw" else 1,   # decay of p
                     self.weight_decay if self.kind != "adamw" else 0,             # L2 added to g
                     b1, 1 - b1, b2, 1 - b2, math.sqrt(bc2), self.eps, lr / bc1], p.dtype)
            g = grads[name]
            m, s = self.exp_avg[name], self.exp_second[name]
            if isinstance(p, np.ndarray) and _one_layout(p, g, m, s):
                _update_in_one_pass(p.reshape(-1), g.reshape(-1), m.reshape(-1), s.reshape(-1), constants[p.dtype],
                                    self.kind == "adamax")
            else:
                _update_by_array_ops(array_module(p), p, g, m, s, *constants[p.dtype], self.kind == "adamax")
        return norm

    def state_dict(self):
        """Host arrays and scalars, for checkpoints."""
        out = {"t": np.array(self.t)}
        for k in self.params:
            out[f"exp_avg/{k}"] = _to_host(self.exp_avg[k])
            out[f"exp_second/{k}"] = _to_host(self.exp_second[k])
        return out

    def load_state_dict(self, state):
        self.t = int(state["t"])
        for k, p in self.params.items():
            xp = array_module(p)
            for name, store in (("exp_avg", self.exp_avg), ("exp_second", self.exp_second)):
                arr = np.asarray(state[f"{name}/{k}"])
                if arr.shape != p.shape:
                    raise ELMError(f"optimizer state '{name}/{k}' has shape {arr.shape}, parameter has {p.shape}")
                store[k] = xp.asarray(arr.astype(p.dtype))


# ---- the update of one parameter array -------------------------------------------------------
# Two forms of the same arithmetic, operation for operation (tests/test_optim_losses.py holds them to
# the same bits): one pass over each array for NumPy (one compiled call per array, where the array
# operations cost a dozen temporaries and calls: most of Adam's time on small models), and array
# operations for any other module (CuPy). No fastmath: a fused multiply-add would change the bits.

def _one_layout(p, g, m, s):
    return g.dtype == p.dtype and all(a.flags.c_contiguous and a.shape == p.shape for a in (g, m, s))


@njit(cache=True, nogil=True)
def _update_in_one_pass(p, g, m, s, constants, adamax):
    # One array of constants, not nine arguments: each argument costs the call its type check.
    decay, l2, b1, one_minus_b1, b2, one_minus_b2, sqrt_bc2, eps, step = (
        constants[0], constants[1], constants[2], constants[3], constants[4], constants[5], constants[6],
        constants[7], constants[8])
    for i in range(p.shape[0]):
        gi = g[i]
        if decay != 1:
            p[i] *= decay
        if l2 != 0:
            gi += l2 * p[i]
        mi = m[i] * b1 + one_minus_b1 * gi
        m[i] = mi
        if adamax:
            decayed = s[i] * b2
            floor = abs(gi) + eps
            si = decayed if (decayed >= floor or decayed != decayed) else floor  # np.maximum: NaN wins
            s[i] = si
            p[i] -= step * mi / si
        else:
            si = s[i] * b2 + one_minus_b2 * gi * gi
            s[i] = si
            p[i] -= step * mi / (math.sqrt(si) / sqrt_bc2 + eps)


def _update_by_array_ops(xp, p, g, m, s, decay, l2, b1, one_minus_b1, b2, one_minus_b2, sqrt_bc2, eps, step,
                         adamax):
    g = g.astype(p.dtype, copy=True)
    if decay != 1:
        p *= decay
    if l2 != 0:
        g += l2 * p
    m *= b1
    m += one_minus_b1 * g
    if adamax:
        xp.maximum(s * b2, xp.abs(g) + eps, out=s)
        p -= step * m / s
    else:
        s *= b2
        s += one_minus_b2 * g * g
        p -= step * m / (xp.sqrt(s) / sqrt_bc2 + eps)


def _zeros_like(p):
    return array_module(p).zeros_like(p)


def _to_host(a):
    return a.get() if hasattr(a, "get") else np.array(a)
