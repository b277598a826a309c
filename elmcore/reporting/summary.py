"""Human-readable summaries of configs, models and checkpoints (``elm info``)."""

import os

from elmcore.neuron import params as P
from elmcore.neuron.config import ELMConfig
from elmcore.errors import ELMError


def describe_config(cfg: ELMConfig):
    if getattr(cfg, "is_network", False):
        return describe_network_config(cfg)
    routing = cfg.input_to_synapse_routing or "none"
    layers = P.mlp_layer_shapes(cfg)
    lines = [
        f"version: {cfg.version}",
        f"inputs: {cfg.num_input}, outputs: {cfg.num_output}",
        f"synapses: {cfg.num_synapse} = {cfg.branches} branches x {cfg.num_synapse_per_branch} "
        f"(routing: {routing})",
        f"memory units: {cfg.num_memory}, tau_m in [{cfg.memory_tau_min:g}, {cfg.effective_tau_max:g}]"
        f"{' (learned)' if cfg.learn_memory_tau else ' (fixed)'}, lambda {cfg.lambda_value:g}, "
        f"delta_t {cfg.delta_t:g}",
        f"{'tau_b' if cfg.is_v2 else 'tau_s'}: {cfg.input_tau_value:g}, w_s init {cfg.w_s_value:g}",
        "mlp: " + " -> ".join([str(layers[0][1])] + [str(o) for o, _ in layers]) +
        f" ({cfg.mlp_num_layers} hidden layer{'s' if cfg.mlp_num_layers != 1 else ''}, {cfg.mlp_activation}, "
        "phi = 1.7159 tanh(2x/3) on the output)",
    ]
    shapes = P.expected_shapes(cfg)
    for key in P.trainable_keys(cfg):
        lines.append(f"  {key:<24} {str(shapes[key]):<12} trainable")
    lines.append(f"parameters: {P.count_trainable(cfg)}")
    return lines


def describe_network_config(cfg):
    """The network's shape and its parameter count split into N, k_c (connectivity) and k_e (complexity)."""
    from elmcore.network import params as NP
    widths = NP.mlp_widths(cfg)
    split = NP.parameter_split(cfg)
    N, layers = cfg.num_neurons, cfg.num_layers
    lines = [
        f"version: {cfg.version}",
        f"inputs: {cfg.num_input}, outputs: {cfg.num_output}",
        f"network: {layers} layer{'s' if layers != 1 else ''} x N = {N} neurons",
        f"synapses per neuron: k_c = {cfg.num_synapse} = {cfg.num_branch} branches x {cfg.num_synapse_per_branch}, "
        f"{cfg.num_recurrent_synapse} recurrent (recurrent_fraction {cfg.recurrent_fraction:g}), "
        f"tau_b {cfg.tau_b_value:g}",
        f"memory units per neuron: {cfg.num_memory}, tau_m in [{cfg.memory_tau_min:g}, {cfg.effective_tau_max:g}]"
        f"{' (learned)' if cfg.learn_memory_tau else ' (fixed)'}, lambda {cfg.lambda_value:g}, delta_t {cfg.delta_t:g}",
        "mlp per neuron: " + " -> ".join(str(w) for w in widths) +
        f" ({cfg.mlp_num_layers} hidden layer{'s' if cfg.mlp_num_layers != 1 else ''}, {cfg.mlp_activation}, "
        "phi = 1.7159 tanh(2x/3) on the output)",
    ]
    shapes = NP.expected_shapes(cfg)
    for key in NP.trainable_keys(cfg):
        if key.startswith("layers.") and not key.startswith("layers.0.") and cfg.num_layers > 1:
            continue
        lines.append(f"  {key:<26} {str(shapes[key]):<12} trainable")
    if cfg.num_layers > 1:
        lines.append(f"  (layers.1 ... layers.{cfg.num_layers - 1}: the same keys and shapes)")
    lines.append(f"parameters: {NP.count_trainable(cfg)} = connectivity {split['connectivity']} "
                 f"(N x k_c = {N} x {split['k_c']} per layer) + complexity {split['complexity']} "
                 f"(N x k_e = {N} x {split['k_e']} per layer) + readout {split['readout']}")
    return lines


def describe_path(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ELMError(f"file not found: {path}")
    if path.endswith(".json"):
        return [f"config: {path}"] + describe_config(ELMConfig.load(path))
    from elmcore.training.checkpoint import load_file
    loaded = load_file(path)
    lines = [f"{loaded.kind}: {path} (stored as {loaded.dtype})"]
    meta = loaded.meta
    if meta:
        best = meta.get("best_metric")
        lines.append(f"step {meta.get('step')}, epoch {meta.get('epoch')}"
                     + (f", best {meta.get('metric_name', 'metric')} {best:.4g}"
                        if isinstance(best, (int, float)) and not isinstance(best, bool) else ""))
    if loaded.vocab is not None:
        lines.append(f"vocabulary: {len(loaded.vocab)} byte values, one per input and output channel "
                     f"({loaded.vocab.describe()})")
    loaded.build_model()  # validates every parameter against the config
    return lines + describe_config(loaded.config)
