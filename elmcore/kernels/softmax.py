"""The softmax cross-entropy of many rows on the CPU, in one pass over each row (training/losses.py).

Written with NumPy, the loss of a char-LM step (8,192 rows of 256 logits) made five arrays of
the logits' size and two libm exps per logit: 22 ms on the 2-core test machine, more than
the readout's product. Here each row is read twice and written once, with the vectorised exp
of kernels/vecmath.py, the rows in parallel.
"""

import numpy as np
from numba import njit, prange

from . import vecmath as vm


@njit(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def softmax_cross_entropy(Y, targets, count, dY_out, picked_out):
    """For every row r of Y [R,K] (targets [R] in [0, K)):

        log p       = (y − max y) − log Σ_k e^(y_k − max y)
        picked_out[r] = log p[targets[r]]
        dY_out[r]   = (e^{log p} − onehot(targets[r])) / count

    in Y's dtype, as the NumPy form in training/losses.py computes them. A row holding a NaN or
    +inf, or only −inf, gets NaN throughout, as in NumPy's form (the vectorised exp clamps its
    argument, which would hide them); a −inf logit gets probability e^{−708} (float64) or
    e^{−87} (float32) instead of 0.
    """
    R, K = Y.shape
    for r in prange(R):
        y = Y[r]
        d = dY_out[r]
        top = y[0]
        undefined = False  # a NaN or +inf logit, or all of them −inf: NaN in NumPy's form too
        for k in range(K):
            top = max(top, y[k])
            undefined |= np.isnan(y[k]) or y[k] == np.inf
        if undefined or top == -np.inf:
            for k in range(K):
                d[k] = np.nan
            picked_out[r] = np.nan
            continue
        for k in range(K):  # the exps on their own, so that this loop vectorises
            d[k] = vm.exp(y[k] - top)
        total = d[0]
        for k in range(1, K):
            total += d[k]
        log_total = np.log(total)
        for k in range(K):
            d[k] = vm.exp((y[k] - top) - log_total)
        target = targets[r]
        picked_out[r] = (y[target] - top) - log_total
        d[target] -= 1
        for k in range(K):
            d[k] /= count
