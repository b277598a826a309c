"""Human-readable summaries of configs, models and checkpoints (``elm info``)."""

import os

from . import params as P
from .config import ELMConfig
from .errors import ELMError


def describe_config(cfg: ELMConfig):
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


def describe_path(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ELMError(f"file not found: {path}")
    if path.endswith(".json"):
        return [f"config: {path}"] + describe_config(ELMConfig.load(path))
    from .checkpoint import load_file
    loaded = load_file(path)
    lines = [f"{loaded.kind}: {path} (stored as {loaded.dtype})"]
    meta = loaded.meta
    if meta:
        best = meta.get("best_metric")
        lines.append(f"step {meta.get('step')}, epoch {meta.get('epoch')}"
                     + (f", best {meta.get('metric_name', 'metric')} {best:.4g}"
                        if isinstance(best, (int, float)) and not isinstance(best, bool) else ""))
    loaded.build_model()  # validates every parameter against the config
    return lines + describe_config(loaded.config)
