"""What every model family shares: dtype resolution, input/output checks, parameter bookkeeping,
streaming one step at a time."""

import contextlib
import functools

import numpy as np

from elmcore.errors import DataError, ELMError, NonFiniteOutputError

DTYPES = {"float32": np.float32, "float64": np.float64}


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ELMError(f"dtype must be float32 or float64, got {dtype!r}")
        return np.dtype(DTYPES[dtype])
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ELMError(f"dtype must be float32 or float64, got {dt}")
    return dt


def threads_by_work(method):
    """Decorates a model method whose first argument is shaped (B, T, ...) (``forward``'s X,
    ``backward``'s dY): its kernels run on the threads the backend's ``kernel_threads`` chooses
    for the pass's work, B × T × trainable parameters (backends without it: as they are).

    A model whose kernels' results depend on Numba's thread count (per-thread partial sums)
    sets ``results_follow_numba_threads``; only its GEMMs' threads are then chosen.
    """
    @functools.wraps(method)
    def run_with_chosen_threads(self, data, *args, **kwargs):
        choose = getattr(self.backend, "kernel_threads", None)
        shape = getattr(data, "shape", ())
        if choose is None or len(shape) < 2:
            return method(self, data, *args, **kwargs)
        with choose(shape[0] * shape[1] * self.num_parameters,
                    numba_threads=not getattr(self, "results_follow_numba_threads", False)):
            return method(self, data, *args, **kwargs)
    return run_with_chosen_threads


class InputChecks:
    """Input and output checks shared by every model family (``ELM``, ``ELMNetwork``).

    Needs ``config.num_input``, ``xp``, ``dtype`` and ``backend`` on the model.
    """

    def prepare_input(self, X):
        """X as a C-contiguous (B, T, num_input) array on the model's device.

        Floats become the model dtype. One-byte integers (spike counts, ±1
        NeuronIO spikes as int8, bool spikes as uint8) are kept as they are: the
        routing kernels read them directly, and reading a quarter of the bytes is
        most of the routing's cost on spike data.
        """
        cfg = self.config
        X = self.xp.asarray(X)
        if X.ndim != 3 or X.shape[2] != cfg.num_input or X.shape[0] < 1 or X.shape[1] < 1:
            raise DataError(f"input must have shape (batch, time, {cfg.num_input}), got {tuple(X.shape)}")
        if X.dtype.kind not in "fiub":
            raise DataError(f"input must be numeric, got dtype {X.dtype}")
        if X.dtype == bool:
            X = X.view(self.xp.uint8)
        if X.dtype.itemsize == 1:
            return self.xp.ascontiguousarray(X)
        if X.dtype.kind == "f" and X.dtype.itemsize > self.dtype.itemsize:
            self._check_input_range(X)
        return self.xp.ascontiguousarray(X, dtype=self.dtype)

    def _check_input_range(self, X):
        """A finite input the model's dtype cannot hold would become inf in the cast (with only a
        NumPy warning to tell): name it instead."""
        xp = self.xp
        limit = float(np.finfo(self.dtype).max)
        with np.errstate(invalid="ignore"):
            beyond = xp.isfinite(X) & (xp.abs(X) > limit)
        if bool(xp.any(beyond)):
            b, t, i = (int(v) for v in self.backend.to_host(xp.argwhere(beyond)[0]))
            raise DataError(f"input value {float(X[b, t, i]):g} (batch {b}, step {t}, input {i}) is beyond the "
                            f"range of {self.dtype.name} (±{limit:.3g}); use dtype float64 or rescale the input")

    # Set inside ``outputs_checked_by_caller``.
    _caller_checks_outputs = False

    @contextlib.contextmanager
    def outputs_checked_by_caller(self):
        """Inside, ``forward`` leaves the outputs' finiteness to its caller: a training step reads it with its
        other scalars in one device→host copy and then calls :meth:`explain_non_finite_output` itself."""
        before, self._caller_checks_outputs = self._caller_checks_outputs, True
        try:
            yield
        finally:
            self._caller_checks_outputs = before

    def _check_output(self, Y, X):
        """NaNs in X reach Y (routing multiplies them in); find their source only when they do."""
        if not self._caller_checks_outputs and not bool(self.xp.all(self.xp.isfinite(Y))):
            self.explain_non_finite_output(X)

    def explain_non_finite_output(self, X):
        """Raise what non-finite outputs from the prepared input X mean: a DataError naming the first
        non-finite input, or, when X is finite, NonFiniteOutputError."""
        bad = self.xp.argwhere(~self.xp.isfinite(X)) if X.dtype.kind == "f" else []
        if len(bad):
            b, t, i = (int(v) for v in self.backend.to_host(bad[0]))
            raise DataError(f"input holds NaN or infinite values (first at batch {b}, step {t}, input {i})")
        raise NonFiniteOutputError("the model produced non-finite outputs from finite input "
                                   "(diverged parameters?)")


class ParameterBookkeeping:
    """Keys, count and host copy of a model's parameters, for every model family.

    Needs ``param_module`` (a module with ``trainable_keys(config)`` and
    ``count_trainable(config)``: ``params`` or ``network_params``), ``config``, ``params``
    and ``backend`` on the model.
    """
    param_module = None

    @property
    def trainable_keys(self):
        return self.param_module.trainable_keys(self.config)

    @property
    def num_parameters(self):
        return self.param_module.count_trainable(self.config)

    def state_dict(self):
        """Host (NumPy) copies of all parameters, in the family's state_dict keys and order."""
        return {k: np.array(self.backend.to_host(v)) for k, v in self.params.items()}


class SingleStep:
    """``step`` for every model family, as a one-step chunk through its ``run``."""

    def step(self, state, x_t):
        """One time step: x_t (B, num_input) -> (y_t (B, num_output), new state)."""
        x_t = self.xp.asarray(x_t)
        if x_t.ndim != 2:
            raise DataError(f"step input must have shape (batch, {self.config.num_input}), got {tuple(x_t.shape)}")
        Y, new_state = self.run(x_t[:, None, :], state)
        return Y[:, 0], new_state
