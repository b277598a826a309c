"""The gradient's flow back through time: what explicit BPTT shows and autograd hides.

The backward walk of docs/gradients.md carries one adjoint per step, ∂loss/∂m_t of every
memory unit (step (a)'s g), and for an ELM Network ∂loss/∂o_t of every neuron. The plain
NumPy reference (``elmcore.verification.reference``) keeps them all; this module reads them
for one batch and reduces each to its norm over the batch, per step and unit:

    norm[t, u] = sqrt(Σ_b adjoint[b, t, u]²)

Memory units are shown in the order of their time constants τ_m (shortest first), since
that is what sets how far back a unit carries the gradient: each step back multiplies the
carry by κ_m = exp(−Δt/τ_m), plus what flows through the MLP. ``write_csv`` and
``plot_gradient_flow`` write the numbers and the picture (matplotlib, an optional extra).
"""

import csv
import dataclasses
import os
from typing import List, Optional

import numpy as np

from elmcore.errors import ELMError

# Below this fraction of the largest norm a heat-map cell is drawn as the colour scale's floor:
# float64 round-off, not flow.
LOG_FLOOR = 1e-12
CSV_COLUMNS = ("adjoint", "t", "unit", "tau_m", "norm")
# The reference walks in Python over time and keeps everything: past this a picture costs minutes and gigabytes.
MAX_TRACE_BYTES = 2 ** 31


@dataclasses.dataclass
class AdjointField:
    """One adjoint's batch norms over t × unit, units in display order."""
    name: str                      # the trace key: "adjoint_m", "layers.0.adjoint_o", ...
    label: str                     # what it is, for plot titles
    norms: np.ndarray              # (T, U) float64: the batch norm at each step of each unit, in display order
    units: np.ndarray              # (U,) int: each column's unit index in the trace (trailing axes flattened)
    tau_m: Optional[np.ndarray]    # (U,) τ_m of each column, or None where a unit has no single τ_m (∂L/∂o)

    def step_norms(self):
        """(T,) the norm over batch and units at each step."""
        return np.sqrt((self.norms ** 2).sum(axis=1))


@dataclasses.dataclass
class GradientFlow:
    fields: List[AdjointField]
    loss: float
    loss_steps: np.ndarray         # the steps whose outputs the loss reads (dY non-zero there)
    batch: int
    steps: int

    @property
    def last_loss_step(self):
        return int(self.loss_steps.max()) if len(self.loss_steps) else self.steps - 1

    def decay(self, field):
        """(distances, norms): ``field``'s norm over batch and units at distance d = t_loss − t
        from the last step the loss reads, for d = 0 … t_loss."""
        last = self.last_loss_step
        norms = field.step_norms()[:last + 1][::-1]
        return np.arange(last + 1), norms


def batch_norms(adjoint):
    """(T, U): the norm over the batch axis of an adjoint (B, T, ...) whose trailing axes are flattened."""
    adjoint = np.asarray(adjoint, dtype=np.float64)
    flat = adjoint.reshape(adjoint.shape[0], adjoint.shape[1], -1)
    return np.sqrt((flat ** 2).sum(axis=0))


def _by_tau(name, label, adjoint, tau_m):
    """The field of a memory adjoint with its units sorted by τ_m (ties keep their index order)."""
    norms = batch_norms(adjoint)
    tau = np.asarray(tau_m, dtype=np.float64).reshape(-1)
    order = np.argsort(tau, kind="stable")
    return AdjointField(name, label, norms[:, order], order, tau[order])


def trace_bytes(model, batch, steps):
    """What the reference walk of ``batch`` sequences of ``steps`` steps holds in float64: its
    trace and the adjoints (no larger than the trace), measured on a one-step, one-sequence walk."""
    from elmcore.verification import reference
    _, trace = reference.forward(model.config, model.state_dict(), np.zeros((1, 1, model.config.num_input)))
    per_step = 0

    def count(value):
        nonlocal per_step
        if isinstance(value, dict):
            for v in value.values():
                count(v)
        elif isinstance(value, list):
            for v in value:
                count(v)
        elif isinstance(value, np.ndarray) and value.ndim >= 2 and value.shape[:2] == (1, 1):
            per_step += value.nbytes
    count(trace)
    return 2 * per_step * batch * steps


def check_trace_memory(model, batch, steps):
    """Refuse, before the walk, a batch × steps whose float64 trace passes MAX_TRACE_BYTES or this machine's memory."""
    from elmcore.engine.memory import check_memory, format_bytes
    nbytes = trace_bytes(model, batch, steps)
    what = f"the reference walk's float64 trace of {batch} sequences × {steps} steps"
    if nbytes > MAX_TRACE_BYTES:
        raise ELMError(f"{what} would need {format_bytes(nbytes)}, over the {format_bytes(MAX_TRACE_BYTES)} "
                       "this plot allows: lower the batch size (or the sequence length)")
    check_memory(nbytes, what + " (lower the batch size)")


def gradient_flow(model, X, dY=None, target=None, loss_fn=None):
    """The adjoints' batch norms of ``model`` on inputs X (B, T, D).

    Either ``dY`` = ∂loss/∂Y is given, or ``target`` and ``loss_fn(Y, target) -> (loss, dY)``
    (a task's ``loss_and_grad``), evaluated on the reference's float64 outputs.
    """
    from elmcore.verification import reference
    X = np.asarray(X)
    if X.ndim != 3 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ELMError(f"X must have shape (batch, time, {model.config.num_input}) with at least one "
                       f"sequence and one step, got {X.shape}")
    check_trace_memory(model, X.shape[0], X.shape[1])
    params = model.state_dict()
    Y, trace = reference.forward(model.config, params, X)
    loss = float("nan")
    if dY is None:
        if loss_fn is None:
            raise ELMError("gradient_flow needs dY, or a target and a loss function")
        loss, dY = loss_fn(Y, target)
    dY = np.asarray(dY, dtype=np.float64)
    reference.backward(model.config, params, trace, dY)
    loss_steps = np.flatnonzero(np.abs(dY).reshape(dY.shape[0], dY.shape[1], -1).max(axis=(0, 2)) > 0)
    return GradientFlow(_fields(model.config, trace), float(loss), loss_steps, X.shape[0], X.shape[1])


def _fields(config, trace):
    if not getattr(config, "is_network", False):
        return [_by_tau("adjoint_m", "∂L/∂m_t, memory units by τ_m", trace["adjoint_m"], trace["derived"]["tau_m"])]
    fields = []
    for layer in range(config.num_layers):
        pre = f"layers.{layer}."
        adjoint_o = trace[pre + "adjoint_o"]
        fields.append(AdjointField(pre + "adjoint_o", f"layer {layer}: ∂L/∂o_t, neurons", batch_norms(adjoint_o),
                                   np.arange(adjoint_o.shape[2]), None))
        fields.append(_by_tau(pre + "adjoint_m", f"layer {layer}: ∂L/∂m_t, memory units (neuron·Dm + d) by τ_m",
                              trace[pre + "adjoint_m"], trace[pre + "derived"]["tau_m"]))
    return fields


# ---- output ----------------------------------------------------------------------------------------

def write_csv(flow, path, inputs=()):
    """One row per adjoint, step and unit (units in τ_m order): adjoint, t, unit, tau_m, norm."""
    from elmcore.storage.fileio import atomic_output
    with atomic_output(path, inputs=inputs) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for field in flow.fields:
            name = field.name.replace("adjoint_", "")
            taus = [""] * len(field.units) if field.tau_m is None else [repr(float(v)) for v in field.tau_m]
            for t in range(field.norms.shape[0]):
                for column, unit in enumerate(field.units):
                    writer.writerow((name, t, int(unit), taus[column], repr(float(field.norms[t, column]))))
    return path


def read_csv(path):
    """{adjoint: rows of (t, unit, tau_m or None, norm)}, as ``write_csv`` wrote them."""
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        if tuple(next(reader)) != CSV_COLUMNS:
            raise ELMError(f"{path} is not a gradient-flow CSV (columns {', '.join(CSV_COLUMNS)})")
        for name, t, unit, tau, norm in reader:
            out.setdefault(name, []).append((int(t), int(unit), float(tau) if tau else None, float(norm)))
    return out


def plot_gradient_flow(flow, path, title="", inputs=()):
    """A PNG: one heat map (t × unit, log colour scale) per adjoint, and the decay of each adjoint's
    norm with distance from the last step the loss reads (log y axis)."""
    from matplotlib.colors import LogNorm

    from elmcore.reporting.plotting import import_pyplot
    from elmcore.storage.fileio import atomic_output
    plt = import_pyplot()
    rows = len(flow.fields) + 1
    fig, axes = plt.subplots(rows, 1, figsize=(9, 3.2 * rows), squeeze=False)
    axes = axes[:, 0]
    try:
        for ax, field in zip(axes, flow.fields):
            _heat_map(fig, ax, field, flow, LogNorm)
        _decay_panel(axes[-1], flow)
        fig.suptitle(title or f"gradient flow through time (batch {flow.batch}, {flow.steps} steps)")
        fig.tight_layout()
        with atomic_output(path, inputs=inputs) as tmp, open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def _heat_map(fig, ax, field, flow, LogNorm):
    norms = field.norms
    top = float(norms.max())
    if top > 0:
        floor = max(float(norms[norms > 0].min()), top * LOG_FLOOR)
        image = ax.imshow(np.maximum(norms, floor).T, aspect="auto", origin="lower", interpolation="nearest",
                          norm=LogNorm(vmin=floor, vmax=top), cmap="viridis")
        fig.colorbar(image, ax=ax, label="‖adjoint‖ over the batch")
    else:
        ax.text(0.5, 0.5, "no gradient reaches this adjoint", ha="center", va="center", transform=ax.transAxes)
    for step in flow.loss_steps[:1] if len(flow.loss_steps) > 20 else flow.loss_steps:
        ax.axvline(step, color="w", lw=0.8, ls=":")
    units = len(field.units)
    if field.tau_m is not None and units <= 24:
        ax.set_yticks(range(units))
        ax.set_yticklabels([f"{u} (τ {tau:.3g})" for u, tau in zip(field.units, field.tau_m)], fontsize=7)
        ax.set_ylabel("unit (τ_m)")
    else:
        ax.set_ylabel("neuron" if field.tau_m is None else "unit, by τ_m")
    ax.set_xlabel("time step t")
    ax.set_title(field.label, fontsize=10)


def _decay_panel(ax, flow):
    last = flow.last_loss_step
    drawn = False
    for i, field in enumerate(flow.fields):
        distance, norms = flow.decay(field)
        keep = norms > 0
        if keep.any():
            ax.plot(distance[keep], norms[keep], color=f"C{i}", lw=1.6, label=f"{field.label.split(',')[0]}: all units")
            drawn = True
        if field.tau_m is not None and len(field.units) > 1:
            for column, style in ((0, "--"), (len(field.units) - 1, ":")):
                unit_norms = field.norms[:last + 1, column][::-1]
                keep = unit_norms > 0
                if keep.any():
                    ax.plot(distance[keep], unit_norms[keep], color=f"C{i}", lw=1, ls=style,
                            label=f"unit {field.units[column]}, τ_m {field.tau_m[column]:.3g}")
    if drawn:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel(f"distance from the loss step (t = {last}), in steps")
    ax.set_ylabel("‖adjoint‖ over batch and units")
    ax.grid(alpha=0.3, which="both")
    ax.set_title("decay of the adjoint with distance from the loss", fontsize=10)


def write_gradient_flow(flow, prefix, title="", inputs=()):
    """PREFIX.png and PREFIX.csv; neither may be one of ``inputs``. Returns their paths."""
    png, csv_path = os.fspath(prefix) + ".png", os.fspath(prefix) + ".csv"
    from elmcore.reporting.plotting import import_pyplot
    from elmcore.storage.fileio import refuse_inputs
    for path in (png, csv_path):
        refuse_inputs(path, inputs)
    import_pyplot()  # without matplotlib, say so before writing anything
    write_csv(flow, csv_path, inputs=inputs)
    plot_gradient_flow(flow, png, title=title, inputs=inputs)
    return png, csv_path
