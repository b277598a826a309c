"""Listings for ``elm tasks``, ``elm info --fields`` and ``elm info RUN_DIR``: what a user can
choose from (tasks with their options and default runs, model config fields) and what a run did."""

import dataclasses
import json
import os

from elmcore.neuron.config import ACTIVATIONS, ROUTINGS, VERSIONS, ELMConfig
from elmcore.network.config import NETWORK_VERSION, NetworkConfig
from elmcore.errors import ELMError
from elmcore.reporting.summary import describe_path


# Values a field accepts, where they are a short list.
_FIELD_CHOICES = {"version": VERSIONS, "mlp_activation": ACTIVATIONS,
                  "input_to_synapse_routing": tuple("null" if r is None else r for r in ROUTINGS)}


def _field_lines(config_class, choices):
    lines = []
    for field in dataclasses.fields(config_class):
        if field.default is not dataclasses.MISSING:
            default = "null" if field.default is None else json.dumps(field.default)
        else:
            default = "(from the task)"
        kind = field.type.__name__ if isinstance(field.type, type) else str(field.type).replace("typing.", "")
        allowed = choices.get(field.name)
        lines.append(f"  {field.name:<26} {kind:<15} default {default}"
                     + (f"; one of {', '.join(allowed)}" if allowed else ""))
    return lines


def describe_fields():
    """The model config fields ``elm train --set FIELD=VALUE`` accepts, with their defaults."""
    lines = ["model config fields (elm train --set FIELD=VALUE; a task sets num_input / num_output "
             "and may suggest others):"]
    lines += _field_lines(ELMConfig, _FIELD_CHOICES)
    lines.append(f"with --set version={NETWORK_VERSION} (an ELM Network of Branch-ELM neurons, docs/spec.md §7):")
    lines += _field_lines(NetworkConfig, {"mlp_activation": ACTIVATIONS})
    return lines


def _read_json(path, what, regular_only=True):
    from elmcore.storage.fileio import read_json
    value = read_json(path, what, regular_only=True)
    if not isinstance(value, dict):
        raise ELMError(f"{path} is not a JSON object")
    return value


def _format_metrics(metrics):
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _describe_task_info(info):
    """What a run recorded about its data (run.json "task_info"): vocabulary, units, reference levels."""
    lines = []
    if isinstance(info.get("vocab"), list):
        lines.append(f"vocabulary: {len(info['vocab'])} byte values (stored with the model: elm sample, elm predict)")
    units = [f"{what} in {info[key]}" for what, key in (("loss", "loss_unit"), ("metric", "metric_unit"))
             if isinstance(info.get(key), str)]
    if units:
        lines.append("units: " + ", ".join(units))
    levels = info.get("references")
    if isinstance(levels, dict) and levels:
        lines.append("reference: " + ", ".join(f"{label} {value:.4g}" if isinstance(value, float) else
                                               f"{label} {value}" for label, value in levels.items()))
    return lines


def describe_run(run_dir):
    """A run directory: its task and settings (run.json), the selection split and scores
    (summary.json, once the run ended), and the selected model (best.npz)."""
    run_dir = os.fspath(run_dir)
    run_file = os.path.join(run_dir, "run.json")
    if not os.path.exists(run_file):
        raise ELMError(f"{run_dir} is not a run directory (no run.json)")
    settings = _read_json(run_file, "run settings")
    options = settings.get("task_options") or {}
    lines = [f"run: {run_dir}",
             f"task: {settings.get('task')}"
             + (f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if isinstance(options, dict) and options
                else "")
             + (f", data {settings['data_dir']}" if settings.get("data_dir") else "")
             + f", seed {settings.get('seed')}"]
    skip = {"task", "task_options", "model", "data_dir", "seed", "run_dir", "task_info"}
    lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() 
                                          if k not in skip and not (k == "lr_restarts" and not v)))
    info = settings.get("task_info")
    if isinstance(info, dict):
        lines += _describe_task_info(info)
    summary_file = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_file):
        from elmcore.training.train import read_summary
        summary = read_summary(run_dir)
        split = summary.get("selection_split") or "valid"
        best = summary.get("best_metric")
        lines.append(f"finished: {summary.get('steps')} steps, {summary.get('epochs')} epochs, "
                     f"{summary.get('seconds') or 0:.1f} s")
        best = format(best, ".4g") if isinstance(best, float) else best
        lines.append(f"model selected on the {split} split: best {summary.get('metric')} {best} "
                     f"at step {summary.get('best_step')}")
        if isinstance(summary.get("test"), dict):
            lines.append("test split: " + _format_metrics(summary["test"]))
    else:
        lines.append("not finished (no summary.json): resume it with `elm train --resume`")
    best_path = os.path.join(run_dir, "best.npz")
    if os.path.exists(best_path):
        lines += describe_path(best_path)
    else:
        lines.append("no best.npz yet")
    return lines


def describe_tasks(names=None):
    """Every task (or ``names``): summary, data source, ``--task-option`` options and its default run of
    each model family, with what that run was measured to reach."""
    from elmcore.data import registry
    lines = []
    for name in names or registry.TASKS:
        spec = registry.task_spec(name)
        lines.append(f"{spec.name}: {spec.summary}")
        if spec.in_memory:
            lines.append("  data: generated in memory (no --data-dir), or read from a file written by "
                         f"`elm data generate {spec.name}`")
        else:
            lines.append(f"  data: --data-dir holding {', '.join(spec.files)}; from {spec.source}")
        try:
            options = registry.task_options(spec.name)
        except ImportError as e:  # an optional dependency of this reader is missing
            lines.append(f"  options: (unavailable: {e})")
        else:
            lines.append("  options: " + (", ".join(f"{k}={'null' if v is None else v}" for k, v in options.items())
                                          or "none"))
        for family in registry.FAMILIES:
            found = registry.find_default_run(spec.name, family)
            how = f"elm train --task {spec.name}" + ("" if family == registry.DEFAULT_FAMILY
                                                     else " --set version=elm_network")
            if found is None:
                lines.append(f"  default {family} run ({how}): the training defaults (elm train --help)")
                continue
            lines.append(f"  default {family} run ({how}): " + ", ".join(
                f"{k}: " + " ".join(f"{f}={v}" for f, v in val.items()) if isinstance(val, dict) else f"{k}={val}"
                for k, val in found.settings.items()))
            lines.append(f"    reaches: {found.reaches}")
        if spec.generator:
            lines.append(f"  generate: elm data generate {spec.name} --out DIR (default --n {spec.default_n})")
    return lines
