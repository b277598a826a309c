"""Time constants into decays, and the chain rule back, once for both model families.

Every leaky sum of the ELM decays by κ = exp(−Δt / max(τ, TAU_FLOOR)) per step
(docs/spec.md §2, §7.2). The synaptic and branch time constants (τ_s, τ_b) are fixed;
the memory's τ_m is trained through its proto parameter τ̃_m = ``_proto_tau_m``, so
its transform has a backward, written right below it (docs/gradients.md §5). Symbols
are those of the table in docs/gradients.md.
"""

from typing import Any, NamedTuple

TAU_FLOOR = 1e-6  # κ = exp(−Δt / max(τ, TAU_FLOOR))


def decay(tau, delta_t, xp):
    """κ = exp(−Δt / max(τ, TAU_FLOOR)), elementwise."""
    return xp.exp(-delta_t / xp.maximum(tau, TAU_FLOOR))


class MemoryTimeConstants(NamedTuple):
    """What the memory update m_t = κ_m ⊙ m_{t−1} + c_m ⊙ Δm_t needs, per memory unit."""
    tau_m: Any         # span·σ(τ̃_m) + memory_tau_min
    kappa_m: Any       # exp(−Δt / max(τ_m, floor))
    kappa_lambda: Any  # exp(−Δt·λ / max(τ_m, floor)) in v2; None in v1
    c_m: Any           # λ(1 − κ_m) in v1, 1 − κ_λ in v2


def memory_time_constants(proto_tau_m, config, xp):
    """τ_m, κ_m, κ_λ and c_m from τ̃_m (any layout; every operation is elementwise).

    ``config`` is either family's config: it gives Δt, λ, τ_min, the effective τ_max
    and the version (``is_v2``) that decides c_m.
    """
    span = config.effective_tau_max - config.memory_tau_min
    sig = 1 / (1 + xp.exp(-proto_tau_m))
    tau_m = span * sig + config.memory_tau_min
    kappa_m = decay(tau_m, config.delta_t, xp)
    if config.is_v2:
        kappa_lambda = decay(tau_m, config.delta_t * config.lambda_value, xp)
        return MemoryTimeConstants(tau_m, kappa_m, kappa_lambda, 1 - kappa_lambda)
    return MemoryTimeConstants(tau_m, kappa_m, None, config.lambda_value * (1 - kappa_m))


def memory_time_constants_backward(g_kappa, g_c, tau_m, kappa_m, kappa_lambda, proto_tau_m, config, xp):
    """∂loss/∂τ̃_m from g_kappa = Σ ∂loss/∂κ_m (its explicit uses) and g_c = Σ ∂loss/∂c_m.

    ``tau_m``, ``kappa_m``, ``kappa_lambda`` are what the forward pass used (in the model
    dtype); ``proto_tau_m`` is in the same layout as they are. The result has that layout
    and the dtype of the inputs.
    """
    live = (tau_m >= TAU_FLOOR).astype(tau_m.dtype)  # as torch.clamp(min=floor): no gradient below the floor
    dkappa_dtau = kappa_m * config.delta_t / (tau_m * tau_m) * live
    if config.is_v2:
        dc_dtau = -kappa_lambda * config.delta_t * config.lambda_value / (tau_m * tau_m) * live
        g_tau = g_kappa * dkappa_dtau + g_c * dc_dtau
    else:
        g_tau = (g_kappa - config.lambda_value * g_c) * dkappa_dtau  # c_m = λ(1 − κ_m): ∂c_m/∂κ_m = −λ
    span = config.effective_tau_max - config.memory_tau_min
    sig = 1 / (1 + xp.exp(-proto_tau_m))
    return g_tau * span * sig * (1 - sig)
